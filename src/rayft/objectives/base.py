"""The objective interface and its registry: what a training stage learns from.

A stage is one module under rayft/objectives/ that owns its options (the top-level block named
after it, e.g. `dpo:`), turns records into token rows (data/dataset.py writes them) and a batch
of rows into a loss. The loop calls it and never names a stage.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from pydantic import create_model

from rayft.config import Strict

_REGISTRY: dict[str, "Objective"] = {}


class NoOptions(Strict):
    """A stage without options: its block may be absent or empty."""


class Objective:
    name: str = ""
    options: type[Strict] = NoOptions
    # does exp(eval_loss) mean a perplexity?
    reports_perplexity: bool = False
    # what an evaluation reports (a sweep's search.metric is one of these)
    eval_metrics: tuple[str, ...] = ("eval_loss",)
    # the data error when truncation leaves nothing to train on
    nothing_left = "no training sample keeps an assistant token after truncation"
    # the stage whose loss on conversations measures general ability (data.eval_sets)
    measures_general_ability: bool = False
    # what `rayft estimate` reads of a stage's step: a row holds this many sequences of up to
    # data.cutoff_len tokens (DPO: a pair's two answers), and does the output head return the loss
    # itself where the method allows (train/head_loss.py), or plain logits
    sequences_per_row: int = 1
    fused_head: bool = True

    def reference_forwards(self, opts, method, method_opts) -> int:
        """Forward passes without gradients that each micro-batch runs besides the policy's (a
        preference stage's reference); for `rayft estimate`."""
        return 0

    def frozen_model_copies(self, opts, method, method_opts) -> int:
        """Whole frozen copies of the model each rank keeps besides the policy (a preference
        stage's reference model, sharded as the policy is under ZeRO-3); for `rayft estimate`."""
        return 0

    @classmethod
    @lru_cache(maxsize=None)
    def block_schema(cls):
        return create_model(f"{cls.name}_stage_block", __base__=Strict, **{cls.name: (cls.options, ...)})

    # ---- checks, when the config is read
    def check_job(self, opts, job) -> None:
        """Raise ValueError for a job this stage cannot run (method, reference, data settings)."""

    # ---- data, on the driver (once per dataset version)
    def parse(self, records: list[dict], fmt: str, source: str, offset: int = 0, problems=None) -> list:
        """Records (in rayft's field names, the first at index `offset` of its source) checked and
        normalised, in format `fmt` (or auto): an item per record, None for a bad one, whose reason
        goes to `problems` (data.formats.Problems; without it, one error counting them)."""
        raise NotImplementedError

    def source_format(self, fmt: str, first: dict) -> str:
        """The format a source's records are read in, from data's `format` and its first record
        (decided once per source, so every record is held to the same fields)."""
        return fmt

    def units(self, tokenizer, items: list, cfg, counts: dict) -> list[Optional[list]]:
        """Per parsed item, in order, its unit of tokenized sequences (data.tokenize.TokenizedSample)
        that stay together, in order, in one row (a sample; a preference pair's two answers), or
        None for an item left out; `counts` gets kept and dropped samples and any other count worth
        a note (the note names what None stood for)."""
        raise NotImplementedError

    def answer_issues(self, item) -> list[str]:
        """What `rayft data check` flags in a parsed item's answers (e.g. an empty answer), each as
        a short phrase; none by default."""
        return []

    def score_samples(self, tokenizer, items: list, cfg) -> list[Optional[tuple]]:
        """Per parsed item, what `rayft data score` scores: (the answer after its prompt, the same
        answer with the prompt's text left out) as two TokenizedSamples learning the same answer
        tokens, truncated at cfg.cutoff_len; None where no answer token is left."""
        raise NotImplementedError

    def row_length(self, cfg) -> int:
        """The longest row that units are packed into."""
        return cfg.cutoff_len

    # ---- on each worker
    def setup(self, opts, job, method, engine, data, rank, world, pad_id, device, reporter, resumed, model_dir) -> None:
        """After the engine is built and any checkpoint loaded, before the first evaluation: what
        the stage needs from the model (a reference's log-probabilities)."""

    def recognises(self, record: dict) -> bool:
        """Is this record one this stage reads? (Another stage's records get an error naming it.)"""
        return True

    def loss(self, opts, model, batch: dict[str, torch.Tensor], precision: str, method, method_opts
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, its normaliser, metric sums): the step's loss is sum / normaliser and each
        metric's mean over a window is its sum over the window / the normaliser's sum."""
        raise NotImplementedError



def register(objective_cls: type[Objective]) -> type[Objective]:
    if not objective_cls.name:
        raise ValueError(f"{objective_cls.__name__} has no name")
    if objective_cls.name in _REGISTRY:
        raise ValueError(f"stage {objective_cls.name!r} is registered twice")
    _REGISTRY[objective_cls.name] = objective_cls()
    return objective_cls


def get_objective(name: str) -> Objective:
    return _REGISTRY[name]


def stage_names() -> list[str]:
    return sorted(_REGISTRY)


def general_objective() -> Objective:
    """The stage that data.eval_sets are read and measured with."""
    return next(o for o in _REGISTRY.values() if o.measures_general_ability)


