"""`rayft data score CONFIG`: score every training record with the base model, before training.

Per record, as the stage renders it (Objective.score_samples; truncated at data.cutoff_len):
  loss  the mean NLL of the answer's tokens after its prompt (the tokens training learns);
  ifd   the instruction-following difficulty of Li et al. 2023 ("From Quantity to Quality"): that
        loss over the answer's loss without the prompt (its turns emptied). Near or above 1: the
        prompt does not help to predict the answer.
The losses come from the training loop's own per-sequence log-probabilities (train/loop.py
sequence_logps). Records go in chunks to Ray actors (distributed.num_workers of them, each with
the base model loaded once), each scoring `batch` rows per forward pass.

Each source's records are written again, in order and unchanged, with `score: {loss, ifd}` added
(null where truncation leaves no answer token), as JSONL beside the source (or under --out):
<name>.scored.jsonl, through a temporary name and a rename. data.filter reads the scores.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from rayft.config import TrainJobConfig
from rayft.errors import DataError, RayftError

CHUNK_BATCHES = 8  # batches per chunk sent to an actor: a few, so that every actor stays busy
SCORE_FIELD = "score"
SCORE_KEYS = {"loss", "ifd"}


class Scorer:
    """A Ray actor: the base model, the tokenizer and the stage, loaded once."""

    def __init__(self, model_dir: str, stage: str, data_cfg: dict, precision: str, use_gpu: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rayft.config import DataConfig
        from rayft.objectives import get_objective
        from rayft.train.loop import resolve_precision

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.objective, self.cfg = get_objective(stage), DataConfig.model_validate(data_cfg)
        self.precision = resolve_precision(precision, self.device, say=lambda _: None)

    def score(self, chunk: list[tuple[str, str, int, dict]], batch_rows: int):
        """(index, loss, ifd) per parsed record of the chunk (None scores where nothing of the
        answer is left), and the chunk's Problems (None if none)."""
        from rayft.data.formats import Problems, with_task_prompt

        problems = Problems()
        items, indices = [], []
        for label, fmt, index, record in chunk:
            if record.get("task"):
                record = with_task_prompt(record, self.cfg.task_template, record["task"])
            (item,) = self.objective.parse([record], fmt, label, index, problems)
            if item is not None:
                items.append(item)
                indices.append(index)
        pairs = self.objective.score_samples(self.tokenizer, items, self.cfg)
        samples = [sample for pair in pairs if pair is not None for sample in pair]
        losses = iter(self.mean_nll(samples, batch_rows))
        scores = []
        for index, pair in zip(indices, pairs):
            if pair is None:
                scores.append((index, None, None))
                continue
            with_prompt, without = next(losses), next(losses)
            scores.append((index, with_prompt, with_prompt / without if without > 0 else None))
        return scores, problems if problems.cases else None

    def mean_nll(self, samples: list, batch_rows: int) -> list[float]:
        """Each sample's mean NLL over its learned tokens: one sample per row, rows of similar
        length batched together (less padding)."""
        import torch

        from rayft.data.packing import collate, single_row
        from rayft.train.loop import sequence_logps, to_device

        order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
        losses = [0.0] * len(samples)
        with torch.no_grad():
            for start in range(0, len(order), batch_rows):
                rows = order[start:start + batch_rows]
                batch = collate([single_row(samples[i]) for i in rows], self.pad_id)
                batch = to_device(batch, self.device)
                sums, tokens, _ = sequence_logps(self.model, batch, self.precision)
                for i, total, count in zip(rows, sums.tolist(), tokens.tolist()):
                    losses[i] = -total / count
        return losses


def scored_path(source, out_dir: Optional[Path]) -> Path:
    """<out_dir or the source's folder>/<name>.scored.jsonl (a directory source's copy goes beside
    the directory: inside, it would be read as one more of its files)."""
    path = Path(source.path)
    return (out_dir or path.parent) / f"{path.name if path.is_dir() else path.stem}.scored.jsonl"


def _targets(sources, out_dir: Optional[Path]) -> list[Path]:
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise RayftError(f"--out {out_dir}: is a file; name a directory for the scored copies")
    targets = [scored_path(source, out_dir) for source in sources]
    for source, target in zip(sources, targets):
        if Path(source.path).is_dir() and Path(source.path).resolve() == target.parent.resolve():
            raise RayftError(f"--out {out_dir}: the source directory {source.path}, where the scored copy would be "
                             "read as one more of its files; write it elsewhere")
        clash = [s.name for s, t in zip(sources, targets) if t == target and s is not source]
        if clash:
            raise RayftError(f"--out: the scored copies of {source.name} and {clash[0]} would both be {target}; "
                             "give the sources different file names or score them separately")
    return targets


def score_data(cfg: TrainJobConfig, out_dir: Optional[Path], batch_rows: int, verbose: bool = False
               ) -> list[tuple[str, Path, int]]:
    """Score every record of every training source; returns (source, scored copy, records) each.
    Ray's and the libraries' output goes to a log file unless `verbose` (rayft.console)."""
    from rayft.console import RunConsole

    with RunConsole(verbose) as console:
        return _score_data(cfg, out_dir, batch_rows, console.say)


def _score_data(cfg: TrainJobConfig, out_dir: Optional[Path], batch_rows: int, say) -> list[tuple[str, Path, int]]:
    import ray

    from rayft.data.dataset import _SourcePlan, check_paths
    from rayft.data.sources import count_records, resolve_sources
    from rayft.models import resolve_model_path
    from rayft.objectives import get_objective
    from rayft.raycluster import connect_ray
    from rayft.train.runner import resolve_use_gpu

    if batch_rows < 1:
        raise RayftError(f"--batch {batch_rows}: must be at least 1")
    objective = get_objective(cfg.stage)
    sources = resolve_sources(cfg.data)
    check_paths(cfg.data, sources)
    targets = _targets(sources, out_dir)
    plans = [_SourcePlan(objective, source, i, cfg.train.seed, {}) for i, source in enumerate(sources)]
    model_dir = resolve_model_path(cfg.model.name_or_path)

    connect_ray(cfg.distributed.ray_address)
    use_gpu = resolve_use_gpu(cfg)
    actor = ray.remote(num_cpus=cfg.distributed.cpus_per_worker, num_gpus=1 if use_gpu else 0)(Scorer)
    scorers = [actor.remote(str(model_dir), objective.name, cfg.data.model_dump(mode="json"), cfg.train.precision,
                            use_gpu) for _ in range(cfg.distributed.num_workers)]
    written = []
    try:
        for plan, target in zip(plans, targets):
            n = count_records(plan.source, plan.source.path)
            say(f"[rayft] scoring {n} records of {plan.label} on {len(scorers)} worker(s)")
            losses, ifds = _score_source(plan, n, scorers, batch_rows)
            _write_scored(plan.source, target, losses, ifds)
            written.append((plan.label, target, n))
    finally:
        for scorer in scorers:
            ray.kill(scorer)
    return written


def _records(plan):
    """The source's every record in file order (all of its files; no max_samples, no repeats),
    as (label, format, index, record), and the label its reader reports problems under."""
    from rayft.data.sources import source_label

    return plan._stream(plan.source.path), source_label(plan.source, plan.source.path)


def _score_source(plan, n: int, scorers: list, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each position's loss and IFD (NaN: not scored), from chunks spread over the actors, at most
    two in flight per actor (the driver's memory stays flat)."""
    import ray

    from rayft.data.formats import Problems

    losses, ifds = np.full(n, np.nan), np.full(n, np.nan)
    records, label = _records(plan)
    problems = plan.problems.setdefault(label, Problems())
    idle = [scorer for scorer in scorers for _ in range(2)]
    pending: dict = {}

    def collect(ref) -> None:
        idle.append(pending.pop(ref))
        try:
            scores, found = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # a RayftError (e.g. a template) raised in the actor
            if isinstance(exc.cause, RayftError):
                raise exc.cause from None
            raise
        for index, loss, ifd in scores:
            losses[index] = np.nan if loss is None else loss
            ifds[index] = np.nan if ifd is None else ifd
        if found is not None:
            problems.merge(found)

    chunk: list = []
    for entry in records:
        _check_score_field(entry[3], label, entry[2])
        chunk.append(entry)
        if len(chunk) == batch_rows * CHUNK_BATCHES:
            if not idle:
                collect(ray.wait(list(pending))[0][0])
            scorer = idle.pop()
            pending[scorer.score.remote(chunk, batch_rows)] = scorer
            chunk = []
    if chunk:
        scorer = idle.pop() if idle else None
        if scorer is None:
            collect(ray.wait(list(pending))[0][0])
            scorer = idle.pop()
        pending[scorer.score.remote(chunk, batch_rows)] = scorer
    while pending:
        collect(ray.wait(list(pending))[0][0])
    problems.raise_first(label)  # the records training would refuse: one line, before anything is written
    return losses, ifds


def _check_score_field(record: dict, label: str, index: int) -> None:
    """A record's own `score` field (not rayft's) is never overwritten."""
    score = record.get(SCORE_FIELD)
    if score is not None and not (isinstance(score, dict) and set(score) <= SCORE_KEYS):
        raise DataError(f"{label}: record {index} has its own field {SCORE_FIELD!r}, which the scored copy would "
                        "overwrite; rename it (or map the source's columns)")


def _write_scored(source, target: Path, losses: np.ndarray, ifds: np.ndarray) -> None:
    """The source's records as they are in its files, each with its score, to `target` atomically."""
    from rayft.data.formats import iter_records
    from rayft.data.sources import _files

    def value(x: float) -> Optional[float]:
        return None if math.isnan(x) else float(x)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            position = 0
            for file in _files(Path(source.path)):
                for record in iter_records(file):
                    scored = {**record, SCORE_FIELD: {"loss": value(losses[position]), "ifd": value(ifds[position])}}
                    handle.write(json.dumps(scored, ensure_ascii=False) + "\n")
                    position += 1
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
