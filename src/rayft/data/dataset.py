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
from typing import Iterator

import numpy as np
import pyarrow as pa

from rayft.config import DataConfig
from rayft.data.formats import read_records
from rayft.data.packing import Row
from rayft.errors import DataError

CACHE_VERSION = "1"
SCHEMA = pa.schema([(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids")])


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

    @property
    def train_file(self) -> str:
        return str(Path(self.cache_dir) / "train.arrow")

    @property
    def val_file(self) -> str:
        return str(Path(self.cache_dir) / "val.arrow")


def _file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            digest.update(name.encode() + _file_digest(tokenizer_dir / name).encode())
    return digest.hexdigest()


def dataset_key(cfg: DataConfig, tokenizer_dir: Path, seed: int, stage: str = "sft") -> str:
    parts = {
        "version": CACHE_VERSION,
        "stage": stage,
        "train": _file_digest(cfg.train),
        "val": _file_digest(cfg.val) if cfg.val else None,
        "tokenizer": _tokenizer_digest(tokenizer_dir),
        "settings": cfg.model_dump(exclude={"train", "val"}),
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


def _records_for(objective, path: str) -> list[dict]:
    """The file's records, refused in one line when they are another stage's (preference pairs
    for SFT, conversations for a preference stage)."""
    from rayft.objectives import get_objective, stage_names

    records = read_records(path)
    if not objective.recognises(records[0]):
        others = [name for name in stage_names() if get_objective(name).recognises(records[0])]
        hint = f"; they are {others[0]} records: set stage: {others[0]}" if others else ""
        raise DataError(f"{path}: stage {objective.name} cannot train on these records (fields: "
                        f"{', '.join(sorted(records[0]))}){hint}")
    return records


def prepare_data(cfg: DataConfig, tokenizer_dir: Path, cache_root: Path, seed: int, stage: str = "sft") -> PreparedData:
    """Tokenize (and pack) train and validation splits once, the way the training stage reads
    records (objectives/); reuse the cache when it exists."""
    from rayft.objectives import get_objective

    objective = get_objective(stage)
    if not Path(cfg.train).is_file():
        raise DataError(f"data.train: file not found: {cfg.train}")
    if cfg.val and not Path(cfg.val).is_file():
        raise DataError(f"data.val: file not found: {cfg.val}")
    cache_dir = cache_root / dataset_key(cfg, tokenizer_dir, seed, stage)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        return PreparedData(cache_dir=str(cache_dir), **json.loads(meta_path.read_text()))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Validate whole files before splitting, so errors count and index records as in the file.
    train_items = objective.parse(_records_for(objective, cfg.train), cfg, cfg.train)
    if cfg.val:
        val_items = objective.parse(_records_for(objective, cfg.val), cfg, cfg.val)
    else:
        train_items, val_items = split_records(train_items, cfg.val_size, seed)

    staging = cache_root / f".tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        train_counts = {"kept": 0, "dropped": 0}
        train_rows, train_tokens = _write_rows(objective.rows(tokenizer, train_items, cfg, train_counts),
                                               staging / "train.arrow")
        if train_rows == 0:
            raise DataError(f"{cfg.train}: {objective.nothing_left} at data.cutoff_len={cfg.cutoff_len} "
                            f"({train_counts['dropped']} dropped)")
        val_counts = {"kept": 0, "dropped": 0}
        val_rows, _ = _write_rows(objective.rows(tokenizer, val_items, cfg, val_counts), staging / "val.arrow")
        if val_rows == 0:
            raise DataError(f"{cfg.val or cfg.train}: the validation split is empty after truncation "
                            f"at data.cutoff_len={cfg.cutoff_len}")
        meta = {"train_rows": train_rows, "val_rows": val_rows, "train_tokens": train_tokens,
                "train_samples": train_counts["kept"], "dropped_samples": train_counts["dropped"],
                "notes": {k: v for k, v in train_counts.items() if k not in ("kept", "dropped") and v}}
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
