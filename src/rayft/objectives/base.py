"""The objective interface and its registry: what a training stage learns from.

A stage is one module under rayft/objectives/ that owns its options (the top-level block named
after it, e.g. `dpo:`), turns records into token rows (data/dataset.py writes them) and a batch
of rows into a loss. The loop calls it and never names a stage.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

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

    @classmethod
    @lru_cache(maxsize=None)
    def block_schema(cls):
        return create_model(f"{cls.name}_stage_block", __base__=Strict, **{cls.name: (cls.options, ...)})

    # ---- checks, when the config is read
    def check_job(self, opts, job) -> None:
        """Raise ValueError for a job this stage cannot run (method, reference, data settings)."""

    # ---- data, on the driver (once per dataset version)
    def parse(self, records: list[dict], fmt: str, source: str) -> list:
        """The whole source's records (in rayft's field names) checked and normalised, in format
        `fmt` (or auto); errors count and index them as in the file, before the validation split."""
        raise NotImplementedError

    def rows(self, tokenizer, items: list, cfg, counts: dict) -> Iterator[dict]:
        """Token rows (input_ids, labels, position_ids) of parsed items; `counts` gets kept and
        dropped samples and any other count worth a note."""
        raise NotImplementedError

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


