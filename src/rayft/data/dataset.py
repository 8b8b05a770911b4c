"""Build the tokenized dataset once per dataset version, and read disjoint shards of it per worker.

The driver tokenizes (and packs) once, into Arrow IPC files under a cache directory keyed by a
hash of the data, the tokenizer, its chat template and the data settings. Each Ray Train worker
memory-maps those files and reads only its own rows, batch by batch: a corpus of millions of rows
streams instead of sitting in every worker's memory. The shard of a worker is its contiguous slice of a
seeded per-epoch permutation, so shards are disjoint, equal-sized (every rank runs the same number
of steps) and deterministic, which lets a resumed run skip exactly the batches it already trained.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from rayft.config import DataConfig, FilterConfig
from rayft.data.dedup import Duplicates, exact_key, record_identity, signature
from rayft.data.formats import Problems, with_task_prompt
from rayft.data.packing import PACK_CHUNK, Row, pack_units, unit_row
from rayft.data.tokenize import TokenizedSample
from rayft.data.sources import Source, count_records, repeats_of, resolve_sources, source_label, stream_source
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


def _val_positions(n: int, val_size: float, seed: int, label: str) -> np.ndarray:
    """The seeded positions of a source's records that form its validation split."""
    if not val_size:
        return np.zeros(0, dtype=np.int64)
    n_val = max(1, round(n * val_size))
    if n_val >= n:
        raise DataError(f"{label}: data.val_size={val_size} leaves no training records out of {n}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_val])


def _table(rows: list[Row]) -> pa.Table:
    """Rows (int32 arrays, packing.unit_row's) as an Arrow table."""
    lengths = np.array([len(row["input_ids"]) for row in rows], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = [pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([row[name] for row in rows])))
               for name in ("input_ids", "labels", "position_ids")]
    columns.append(pa.array([row["task"] for row in rows], type=pa.int32()))
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _write_rows(rows: Iterator[Row], path: Path, batch_rows: int = 1024) -> tuple[int, int]:
    """Stream rows into an Arrow IPC file; returns (rows, real tokens)."""
    n_rows = n_tokens = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        buffer: list[Row] = []

        def flush() -> None:
            writer.write_table(_table(buffer))
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


def mix(streams, counts: list[int], weights: list[float], how: str, until: str, seed: int) -> Iterator:
    """The training records of all sources in one order, fixed by the seed (data.mix).
    `streams(i)` starts source i's records anew; counts[i] is how many it has."""
    rng = np.random.default_rng([seed, 1])
    if how == "concat":
        for i, (count, weight) in enumerate(zip(counts, weights)):
            for _ in range(int(weight)):
                yield from streams(i)
            fraction = weight - int(weight)
            if fraction:  # a seeded share of the records, in their order
                chosen = set(rng.choice(count, round(fraction * count), replace=False).tolist())
                yield from (item for position, item in enumerate(streams(i)) if position in chosen)
        return
    drawn = [i for i, w in enumerate(weights) if w > 0 and counts[i] > 0]
    p = np.array([weights[i] for i in drawn]) / sum(weights[i] for i in drawn)
    iterators = {i: streams(i) for i in drawn}
    left = {i: counts[i] for i in drawn}
    seen: set[int] = set()
    while True:
        for choice in rng.choice(len(drawn), size=4096, p=p):  # draws in blocks: one rng call per block
            source = drawn[choice]
            if left[source] == 0:
                if until == "first_exhausted":
                    return
                iterators[source], left[source] = streams(source), counts[source]  # all_seen: again
            item = next(iterators[source], None)
            left[source] = left[source] - 1 if item is not None else 0  # fewer than counted: bad records, reported
            if item is not None:
                yield item
            if left[source] == 0:
                seen.add(source)
                if len(seen) == len(drawn) and until == "all_seen":
                    return


# ---------------------------------------------------------------- records -> units, in worker processes
CHUNK_RECORDS = 1000
POOL_MIN_RECORDS = 20_000  # below this, starting worker processes costs more than it saves
_worker: dict = {}


def _start_worker(tokenizer_dir: str, stage: str, cfg: dict, pooled: bool = False) -> None:
    if pooled:  # one process per core already: the tokenizer's own threads would only contend
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker.get("key") == (tokenizer_dir, stage, cfg):
        return  # this process has them (the validation split after the training one)
    from transformers import AutoTokenizer

    from rayft.objectives import get_objective

    _worker.update(key=(tokenizer_dir, stage, cfg), tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                   objective=get_objective(stage), cfg=DataConfig.model_validate(cfg))


def _chunk_units(chunk: list[tuple[str, str, int, dict]]):
    """Records of a chunk, (label, format, index, record), parsed and tokenized: ((task, unit,
    dedup key) triples, counts, problems per label), after cfg.filter's score range and max_tokens
    (dedup keys: None unless cfg.filter.dedup asks for them)."""
    objective, cfg, tokenizer = _worker["objective"], _worker["cfg"], _worker["tokenizer"]
    problems: dict[str, Problems] = {}
    by_task: dict[Optional[str], list] = {}
    counts: dict[str, int] = {"kept": 0, "dropped": 0}
    for label, fmt, index, record in chunk:
        found = problems.setdefault(label, Problems())
        if cfg.filter.bounds_score and not _score_kept(record, cfg.filter, index, found, counts):
            continue
        task = record.get("task")
        if task:
            record = with_task_prompt(record, cfg.task_template, task)
        (item,) = objective.parse([record], fmt, label, index, found)
        if item is not None:
            by_task.setdefault(task, []).append((item, record_identity(label, index)))
    units = [entry for task, entries in by_task.items() for entry in _filtered_units(objective, tokenizer, task,
                                                                                     entries, cfg, counts)]
    return units, counts, {label: p for label, p in problems.items() if p.cases}


def _score_kept(record: dict, rules, index: int, problems: Problems, counts: dict) -> bool:
    """Is the record's score (rayft data score's) inside data.filter's range? A record without
    one is a problem of its source; a null score (nothing of the answer was left to score) is
    outside any range."""
    score = record.get("score")
    value = score.get(rules.score, False) if isinstance(score, dict) else False
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        problems.add(f"{{count}} records have no score.{rules.score} for data.filter's min_score/max_score (score "
                     "them with rayft data score and train on its scored copy); first at index {first}", index)
        return False
    if value is None or (rules.min_score is not None and value < rules.min_score) or \
            (rules.max_score is not None and value > rules.max_score):
        counts["records_outside_the_score_range"] = counts.get("records_outside_the_score_range", 0) + 1
        return False
    return True


def _filtered_units(objective, tokenizer, task, entries: list, cfg: DataConfig, counts: dict) -> list[tuple]:
    """(task, unit, dedup key) of the (item, identity) entries that data.filter.max_tokens keeps."""
    rules = cfg.filter
    if rules.max_tokens:  # one token past cutoff_len: a sample truncated there is longer than max_tokens
        cfg = cfg.model_copy(update={"cutoff_len": cfg.cutoff_len + 1})
    kept = []
    items = [item for item, _ in entries]
    for (item, identity), unit in zip(entries, objective.units(tokenizer, items, cfg, counts)):
        if unit is None:
            continue
        if rules.max_tokens and max(len(sequence.input_ids) for sequence in unit) > rules.max_tokens:
            counts["kept"] -= 1
            counts["samples_over_max_tokens"] = counts.get("samples_over_max_tokens", 0) + 1
            continue
        key = None
        if rules.dedup != "none":
            key = (identity, exact_key(item), signature(item) if rules.dedup == "near" else None)
        # int32 arrays: they cross to the main process and into Arrow without a Python int each
        kept.append((task, [TokenizedSample(np.asarray(sample.input_ids, dtype=np.int32),
                                            np.asarray(sample.labels, dtype=np.int32)) for sample in unit], key))
    return kept


def _chunks(records: Iterator[tuple[str, str, int, dict]]) -> Iterator[list]:
    chunk = []
    for entry in records:
        chunk.append(entry)
        if len(chunk) == CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _units(records, n_records: int, tokenizer_dir: Path, stage: str, cfg: DataConfig, work=_chunk_units) -> Iterator:
    """`work` (_chunk_units, or data/check.py's) over all records' chunks, in order: in this process, or
    for a large corpus in worker processes on every core, with a bounded number of chunks in flight
    (memory stays flat)."""
    workers = min(os.cpu_count() or 1, 8)
    if n_records < POOL_MIN_RECORDS or workers < 2:
        _start_worker(str(tokenizer_dir), stage, cfg.model_dump(mode="json"))
        yield from (work(chunk) for chunk in _chunks(records))
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forking of a process with threads (tokenizers, torch)
    with context.Pool(workers, _start_worker, (str(tokenizer_dir), stage, cfg.model_dump(mode="json"), True)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(records):
            pending.append(pool.apply_async(work, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Tasks:
    """Task names in order of first appearance; each row carries its task's index."""

    def __init__(self):
        self.names: list[str] = []

    def index(self, task: Optional[str]) -> int:
        if task is None:
            return NO_TASK
        if task not in self.names:
            self.names.append(task)
        return self.names.index(task)


def _rows(objective, records, n_records: int, tokenizer_dir: Path, cfg: DataConfig, tasks: _Tasks,
          counts: dict, problems: dict[str, Problems]) -> Iterator[Row]:
    """Token rows of a stream of (label, format, index, record): units packed per task (a packed
    row holds one task's samples, so its loss weight and per-task loss are its task's) into rows
    of the stage's length, a chunk of units at a time; each row with its task index. Units that
    repeat an earlier one are dropped when cfg.filter.dedup says so."""
    row_length = objective.row_length(cfg)
    buffers: dict[int, list] = {}
    duplicates = None if cfg.filter.dedup == "none" else \
        Duplicates(cfg.filter.near_threshold if cfg.filter.dedup == "near" else None)
    for units, chunk_counts, chunk_problems in _units(records, n_records, tokenizer_dir, objective.name, cfg):
        for key, value in chunk_counts.items():
            counts[key] = counts.get(key, 0) + value
        for label, found in chunk_problems.items():
            problems.setdefault(label, Problems()).merge(found)
        for task, unit, key in units:
            if duplicates is not None and (verdict := duplicates.seen(*key)):
                counts["kept"] -= 1
                counts[f"{verdict}_duplicates"] = counts.get(f"{verdict}_duplicates", 0) + 1
                continue
            if not cfg.packing:
                yield {**unit_row(unit), "task": tasks.index(task)}
                continue
            buffer = buffers.setdefault(tasks.index(task), [])
            buffer.append(unit)
            if len(buffer) == PACK_CHUNK:
                yield from _packed(buffer, row_length, tasks.index(task))
                buffer.clear()
    for task, buffer in buffers.items():
        yield from _packed(buffer, row_length, task)


def _packed(units: list, row_length: int, task: int) -> Iterator[Row]:
    for row in pack_units(units, row_length):
        row["task"] = task
        yield row


def prepare_data(cfg: DataConfig, tokenizer_dir: Path, cache_root: Path, seed: int, stage: str = "sft") -> PreparedData:
    """Tokenize (and pack) the train and validation splits of every source, and each eval set,
    once, the way the training stage reads records (objectives/); reuse the cache when it exists.
    Records stream from the files through worker processes into the Arrow files: memory does not
    grow with the corpus."""
    from rayft.objectives import general_objective, get_objective

    objective = get_objective(stage)
    sources = resolve_sources(cfg)
    check_paths(cfg, sources)
    cache_dir = cache_root / dataset_key(cfg, sources, tokenizer_dir, seed, stage)
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        return PreparedData(cache_dir=str(cache_dir), **json.loads(meta_path.read_text()))

    problems: dict[str, Problems] = {}
    plans = [_SourcePlan(objective, source, i, seed, problems) for i, source in enumerate(sources)]
    train_counts = [plan.n_train for plan in plans]
    weights = [source.weight for source in sources]
    n_train = sum(int(w * n) if cfg.mix == "concat" else n for w, n in zip(weights, train_counts))
    train_records = mix(lambda i: plans[i].train(), train_counts, weights, cfg.mix, cfg.interleave_until, seed)
    val_records = (entry for plan in plans for entry in plan.val())
    tasks = _Tasks()

    staging = cache_root / f".tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        counts = {"kept": 0, "dropped": 0}
        train_rows, train_tokens = _write_rows(_rows(objective, train_records, n_train, tokenizer_dir, cfg, tasks,
                                                     counts, problems), staging / "train.arrow")
        val_counts = {"kept": 0, "dropped": 0}
        unfiltered = cfg.model_copy(update={"filter": FilterConfig()})  # data.filter is the training records'
        val_rows, _ = _write_rows(_rows(objective, val_records, sum(p.n_val for p in plans), tokenizer_dir,
                                        unfiltered, tasks, val_counts, problems), staging / "val.arrow")
        for label, found in problems.items():  # every record was read: each source's count is whole
            found.raise_first(label)
        where = sources[0].name if len(sources) == 1 else "data.train"
        if train_rows == 0:
            filtered = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()
                                 if k not in ("kept", "dropped") and v)
            raise DataError(f"{where}: {objective.nothing_left} at data.cutoff_len={cfg.cutoff_len} "
                            f"({counts['dropped']} dropped{', ' + filtered if filtered else ''})")
        if not any(p.n_val for p in plans):
            raise DataError("data: no validation records (every source has val_size 0 and no val file)")
        if val_rows == 0:
            raise DataError(f"{sources[0].val or where}: the validation split is empty after truncation "
                            f"at data.cutoff_len={cfg.cutoff_len}")
        unknown = sorted(set(cfg.task_weights) - set(tasks.names))
        if unknown:
            raise DataError(f"data.task_weights: no record has task {unknown[0]!r} "
                            f"(tasks: {', '.join(tasks.names) or 'none'})")
        if cfg.task_weighting == "dwa" and len(tasks.names) < 2:
            raise DataError(f"data.task_weighting=dwa weights tasks against each other: the records have "
                            f"{len(tasks.names)} task{'s' if len(tasks.names) != 1 else ''} "
                            f"({', '.join(tasks.names) or 'none'}); give records or sources a task")
        general = general_objective()
        for name, path in cfg.eval_sets.items():  # conversations, measured by their next-token loss
            plan = _SourcePlan(general, Source(name=path, path=path, val_size=0), 0, seed, problems)
            n_rows, _ = _write_rows(_rows(general, plan.train(), plan.n_train, tokenizer_dir, unfiltered, _Tasks(),
                                          {"kept": 0, "dropped": 0}, problems), staging / f"eval-{name}.arrow")
            problems.get(path, Problems()).raise_first(path)
            if n_rows == 0:
                raise DataError(f"data.eval_sets.{name}: {path}: {general.nothing_left} at "
                                f"data.cutoff_len={cfg.cutoff_len}")
        meta = {"train_rows": train_rows, "val_rows": val_rows, "train_tokens": train_tokens,
                "train_samples": counts["kept"], "dropped_samples": counts["dropped"],
                "notes": {k: v for k, v in counts.items() if k not in ("kept", "dropped") and v},
                "tasks": tasks.names, "eval_sets": list(cfg.eval_sets),
                "sources": [{"name": p.source.name, "train": p.n_train, "val": p.n_val} for p in plans]}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            staging.rename(cache_dir)
        except OSError:  # another process published the same version first
            if not meta_path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(cache_dir=str(cache_dir), **meta)


def check_paths(cfg: DataConfig, sources: list[Source]) -> None:
    """Every data file the config names exists; else one line naming its key."""
    for i, source in enumerate(sources):
        keys = {str: ("data.train", "data.val"), list: (f"data.train.{i}.path", f"data.train.{i}.val")}.get(
            type(cfg.train), (f"data.datasets: {source.name}",) * 2)
        for key, path in zip(keys, (source.path, source.val)):
            if path and not Path(path).exists():
                raise DataError(f"{key}: file not found: {path}")
    for name, path in cfg.eval_sets.items():
        if not Path(path).is_file():
            raise DataError(f"data.eval_sets.{name}: file not found: {path}")


class _SourcePlan:
    """One source's train and validation records as streams of (label, format, index, record),
    with their counts known before anything is tokenized (lines counted, not parsed). The split
    is by position in the file: a record drawn twice (num_samples) stays on one side."""

    def __init__(self, objective, source: Source, position: int, seed: int, problems: dict[str, Problems]):
        self.source, self.seed, self.problems = source, seed, problems
        self.label = source_label(source)
        first = self._first(objective, None)
        self.format = objective.source_format(source.format, first)
        n = count_records(source)
        repeats = repeats_of(source, n, seed)
        total = n if repeats is None else int(repeats.sum())
        if source.val:
            self._first(objective, source.val)
            self.val_positions, self.n_val, self.n_train = set(), count_records(source, source.val), total
        else:
            positions = _val_positions(n, source.val_size, seed + 1_000_003 * position, self.label)
            self.val_positions = set(positions.tolist())
            self.n_val = len(positions) if repeats is None else int(repeats[positions].sum())
            self.n_train = total - self.n_val

    def _first(self, objective, path: Optional[str]) -> dict:
        """The first record, refused in one line when it is another stage's (preference pairs for
        SFT, conversations for a preference stage)."""
        from rayft.objectives import get_objective, stage_names

        label = source_label(self.source, path)
        first = next((record for _, record in stream_source(self.source, self.seed, Problems(), path)), None)
        if first is None:
            raise DataError(f"{label}: no records")
        if not objective.recognises(first):
            others = [name for name in stage_names() if get_objective(name).recognises(first)]
            hint = f"; they are {others[0]} records: set stage: {others[0]}" if others else ""
            raise DataError(f"{label}: stage {objective.name} cannot train on these records (fields: "
                            f"{', '.join(sorted(first))}){hint}")
        return first

    def _stream(self, path: Optional[str] = None, wanted=None) -> Iterator:
        label = source_label(self.source, path)
        found = self.problems.setdefault(label, Problems())
        return ((label, self.format, i, record)
                for i, record in stream_source(self.source, self.seed, found, path, wanted))

    def train(self) -> Iterator:
        return self._stream(wanted=lambda i: i not in self.val_positions)

    def val(self) -> Iterator:
        if self.source.val:
            return self._stream(self.source.val)
        return self._stream(wanted=lambda i: i in self.val_positions)


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
