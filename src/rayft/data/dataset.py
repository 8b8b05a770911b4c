"""Build the tokenized dataset once per dataset version, and read disjoint shards of it per worker.

The driver tokenizes (and packs) once, into Arrow IPC files under a cache directory keyed by a
hash of the data, the tokenizer, its chat template and the data settings. Each Ray Train worker
memory-maps those files and reads only its own rows, batch by batch: a corpus of millions of rows
streams instead of sitting in every worker's memory. The shard of a worker is its contiguous slice of a
seeded per-epoch permutation, so shards are disjoint, equal-sized (every rank runs the same number
of steps) and deterministic, which lets a resumed run skip exactly the batches it already trained.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from rayft.config import DataConfig
from rayft.data.formats import with_task_prompt
from rayft.data.packing import Row
from rayft.data.sources import Source, read_source, resolve_sources
from rayft.errors import DataError

CACHE_VERSION = "2"
SCHEMA = pa.schema([*[(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids")],
                    ("task", pa.int32())])  # index into PreparedData.tasks; -1: none
NO_TASK = -1


@dataclass
class PreparedData:
    """Where the tokenized splits live, and their sizes (for step counts and throughput)."""

    cache_dir: str
    train_rows: int
    val_rows: int
    train_tokens: int  # real (non-pad) tokens
    train_samples: int
    dropped_samples: int
    notes: dict = field(default_factory=dict)  # the stage's counts worth a note (e.g. identical pairs dropped)
    tasks: list = field(default_factory=list)  # the task of each task index (rows' `task` column)
    eval_sets: list = field(default_factory=list)  # names of data.eval_sets, each in eval-<name>.arrow
    sources: list = field(default_factory=list)  # per source: name, train and val records

    @property
    def train_file(self) -> str:
        return str(Path(self.cache_dir) / "train.arrow")

    @property
    def val_file(self) -> str:
        return str(Path(self.cache_dir) / "val.arrow")

    def eval_set_file(self, name: str) -> str:
        return str(Path(self.cache_dir) / f"eval-{name}.arrow")


def _path_digest(path: str | Path) -> str:
    """A file's content hash, or a directory's over its files' names and contents."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode() + _path_digest(tokenizer_dir / name).encode())
    return digest.hexdigest()


def dataset_key(cfg: DataConfig, sources: list[Source], tokenizer_dir: Path, seed: int, stage: str = "sft") -> str:
    files = [_path_digest(path) for s in sources for path in (s.path, s.val) if path]
    parts = {
        "version": CACHE_VERSION,
        "stage": stage,
        "files": files,
        "dataset_info": _path_digest(cfg.dataset_info) if cfg.dataset_info else None,
        "eval_sets": {name: _path_digest(path) for name, path in cfg.eval_sets.items()},
        "tokenizer": _tokenizer_digest(tokenizer_dir),
        "settings": cfg.model_dump(mode="json"),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def split_records(records: list, val_size: float, seed: int) -> tuple[list, list]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_size))
    if n_val >= len(records):
        raise DataError(f"data.val_size={val_size} leaves no training records out of {len(records)}")
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def _write_rows(rows: Iterator[Row], path: Path, batch_rows: int = 1024) -> tuple[int, int]:
    """Stream rows into an Arrow IPC file; returns (rows, real tokens)."""
    n_rows = n_tokens = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        buffer: list[Row] = []

        def flush() -> None:
            writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMA))
            buffer.clear()

        for row in rows:
            buffer.append(row)
            n_rows += 1
            n_tokens += len(row["input_ids"])
            if len(buffer) == batch_rows:
                flush()
        if buffer:
            flush()
    return n_rows, n_tokens


def _stage_records(objective, source: Source, seed: int, label: str, path: Optional[str] = None) -> list[dict]:
    """The source's records, refused in one line when they are another stage's (preference pairs
    for SFT, conversations for a preference stage)."""
    from rayft.objectives import get_objective, stage_names

    records = read_source(source, seed, path)
    if not objective.recognises(records[0]):
        others = [name for name in stage_names() if get_objective(name).recognises(records[0])]
        hint = f"; they are {others[0]} records: set stage: {others[0]}" if others else ""
        raise DataError(f"{label}: stage {objective.name} cannot train on these records (fields: "
                        f"{', '.join(sorted(records[0]))}){hint}")
    return records


Tagged = list[tuple[object, Optional[str]]]  # (the stage's parsed item, its task)


def _parse(objective, records: list[dict], cfg: DataConfig, fmt: str, label: str) -> Tagged:
    """Records parsed by the stage, each with its task (written into its prompt)."""
    tasks = [record.get("task") for record in records]
    records = [with_task_prompt(r, cfg.task_template, t) if t else r for r, t in zip(records, tasks)]
    return list(zip(objective.parse(records, fmt, label), tasks))


def mix(parts: list[Tagged], weights: list[float], how: str, until: str, seed: int) -> Tagged:
    """The training items of all sources in one fixed order (data.mix)."""
    rng = np.random.default_rng([seed, 1])
    if how == "concat":
        mixed: Tagged = []
        for items, weight in zip(parts, weights):
            whole, fraction = int(weight), weight - int(weight)
            mixed += items * whole
            if fraction:
                mixed += [items[i] for i in sorted(rng.choice(len(items), round(fraction * len(items)), replace=False))]
        return mixed
    drawn = [i for i, w in enumerate(weights) if w > 0]
    p = np.array([weights[i] for i in drawn]) / sum(weights[i] for i in drawn)
    position, seen, mixed = [0] * len(parts), set(), []
    while True:
        for choice in rng.choice(len(drawn), size=4096, p=p):  # draws in blocks: one rng call per block
            source = drawn[choice]
            if position[source] == len(parts[source]):
                seen.add(source)
                if until == "first_exhausted" or len(seen) == len(drawn):
                    return mixed
                position[source] = 0  # all_seen: a source that ran out starts again
            mixed.append(parts[source][position[source]])
            position[source] += 1
            if until == "all_seen" and position[source] == len(parts[source]):
                seen.add(source)
                if len(seen) == len(drawn):
                    return mixed


def _task_rows(objective, tokenizer, items: Tagged, tasks: list[str], cfg: DataConfig, counts: dict) -> Iterator[Row]:
    """The stage's rows of each task in turn (a packed row holds one task's samples, so a row's
    loss weight and per-task loss are the row's task's), each row with its task index."""
    by_task: dict[Optional[str], list] = {}
    for item, task in items:
        by_task.setdefault(task, []).append(item)
    for task in sorted(by_task, key=lambda t: (t is None, t or "")):
        index = tasks.index(task) if task is not None else NO_TASK
        for row in objective.rows(tokenizer, by_task[task], cfg, counts):
            row["task"] = index
            yield row


def prepare_data(cfg: DataConfig, tokenizer_dir: Path, cache_root: Path, seed: int, stage: str = "sft") -> PreparedData:
    """Tokenize (and pack) the train and validation splits of every source, and each eval set,
    once, the way the training stage reads records (objectives/); reuse the cache when it exists."""
    from rayft.objectives import general_objective, get_objective

    objective = get_objective(stage)
    sources = resolve_sources(cfg)
    for i, source in enumerate(sources):
        keys = {str: ("data.train", "data.val"), list: (f"data.train.{i}.path", f"data.train.{i}.val")}.get(
            type(cfg.train), (f"data.datasets: {source.name}",) * 2)
        for key, path in zip(keys, (source.path, source.val)):
            if path and not Path(path).exists():
                raise DataError(f"{key}: file not found: {path}")
    for name, path in cfg.eval_sets.items():
        if not Path(path).is_file():
            raise DataError(f"data.eval_sets.{name}: file not found: {path}")
    cache_dir = cache_root / dataset_key(cfg, sources, tokenizer_dir, seed, stage)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        return PreparedData(cache_dir=str(cache_dir), **json.loads(meta_path.read_text()))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    parts, val_items, summary = [], [], []
    for i, source in enumerate(sources):
        # Validate whole files before splitting, so errors count and index records as in the file.
        items = _parse(objective, _stage_records(objective, source, seed, source.name), cfg, source.format,
                       source.name)
        if source.val:
            val = _parse(objective, _stage_records(objective, source, seed, source.val, source.val), cfg,
                         source.format, source.val)
        elif source.val_size:
            items, val = split_records(items, source.val_size, seed + 1_000_003 * i)
        else:
            val = []
        parts.append(items)
        val_items += val
        summary.append({"name": source.name, "train": len(items), "val": len(val)})
    if not val_items:
        raise DataError("data: no validation records (every source has val_size 0 and no val file)")
    train_items = parts[0] if len(parts) == 1 else \
        mix(parts, [s.weight for s in sources], cfg.mix, cfg.interleave_until, seed)
    tasks = sorted({task for _, task in train_items + val_items if task is not None})
    unknown = sorted(set(cfg.task_weights) - set(tasks))
    if unknown:
        raise DataError(f"data.task_weights: no record has task {unknown[0]!r} (tasks: {', '.join(tasks) or 'none'})")

    staging = cache_root / f".tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        train_counts = {"kept": 0, "dropped": 0}
        train_rows, train_tokens = _write_rows(_task_rows(objective, tokenizer, train_items, tasks, cfg, train_counts),
                                               staging / "train.arrow")
        where = sources[0].name if len(sources) == 1 else "data.train"
        if train_rows == 0:
            raise DataError(f"{where}: {objective.nothing_left} at data.cutoff_len={cfg.cutoff_len} "
                            f"({train_counts['dropped']} dropped)")
        val_counts = {"kept": 0, "dropped": 0}
        val_rows, _ = _write_rows(_task_rows(objective, tokenizer, val_items, tasks, cfg, val_counts),
                                  staging / "val.arrow")
        if val_rows == 0:
            raise DataError(f"{sources[0].val or where}: the validation split is empty after truncation "
                            f"at data.cutoff_len={cfg.cutoff_len}")
        general = general_objective()
        for name, path in cfg.eval_sets.items():  # conversations, measured by their next-token loss
            items = _parse(general, _stage_records(general, Source(name=path, path=path), seed, path), cfg,
                           "auto", path)
            n_rows, _ = _write_rows(_task_rows(general, tokenizer, [(item, None) for item, _ in items], [], cfg,
                                               {"kept": 0, "dropped": 0}), staging / f"eval-{name}.arrow")
            if n_rows == 0:
                raise DataError(f"data.eval_sets.{name}: {path}: {general.nothing_left} at "
                                f"data.cutoff_len={cfg.cutoff_len}")
        meta = {"train_rows": train_rows, "val_rows": val_rows, "train_tokens": train_tokens,
                "train_samples": train_counts["kept"], "dropped_samples": train_counts["dropped"],
                "notes": {k: v for k, v in train_counts.items() if k not in ("kept", "dropped") and v},
                "tasks": tasks, "eval_sets": list(cfg.eval_sets), "sources": summary}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            staging.rename(cache_dir)
        except OSError:  # another process published the same version first
            if not meta_path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(cache_dir=str(cache_dir), **meta)


class RowFile:
    """A memory-mapped Arrow IPC file of token rows; rows are read only when asked for."""

    def __init__(self, path: str):
        self.table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, indices: np.ndarray) -> list[Row]:
        return self.table.take(pa.array(indices, type=pa.int64())).to_pylist()

    def tasks(self) -> np.ndarray:
        """Each row's task index (NO_TASK: none)."""
        return self.table.column("task").to_numpy()


def shard_indices(n_rows: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """This rank's rows for an epoch: disjoint across ranks, equal in size (the remainder of
    n_rows / world_size is left out of the epoch), together covering the rest."""
    order = np.arange(n_rows)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    per_rank = n_rows // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def batches_per_epoch(n_rows: int, world_size: int, micro_batch_size: int) -> int:
    return (n_rows // world_size) // micro_batch_size
