"""Where records come from: `data.train` as one file or a list of sources, or the datasets of a
LLaMA-Factory `dataset_info.json`. Each source's records come out in rayft's field names
(data/formats.py reads them), with their task, ready for the stage to parse.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from rayft.config import DataConfig
from rayft.data.formats import SKIPPED, Problems, iter_records
from rayft.errors import DataError

# rayft's record fields a `columns` entry may name
FIELDS = ("instruction", "input", "output", "history", "system", "tools", "conversations", "messages", "chosen",
          "rejected", "prompt", "task")
# LLaMA-Factory's column names that are not rayft's (its `prompt` is the alpaca instruction)
LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
ALIASES = {"query": "input", "response": "output"}  # accepted in a source's columns too
# LLaMA-Factory's sharegpt tags: tag -> (its default, the sharegpt role rayft reads it as)
LF_TAGS = {"user_tag": ("human", "human"), "assistant_tag": ("gpt", "gpt"),
           "observation_tag": ("observation", "observation"), "function_tag": ("function_call", "function_call"),
           "system_tag": ("system", "system")}
LF_TAG_KEYS = ("role_tag", "content_tag", *LF_TAGS)


@dataclass
class Source:
    name: str  # how errors and notes name it: the file, or the dataset_info name
    path: str  # a JSON/JSONL file or a directory of them
    format: str = "auto"
    weight: float = 1.0
    task: Optional[str] = None
    max_samples: Optional[int] = None
    num_samples: Optional[int] = None  # LLaMA-Factory's: a seeded sample of N records, repeating past its size
    columns: dict[str, str] = field(default_factory=dict)  # rayft field -> the record's field
    tags: dict[str, str] = field(default_factory=dict)  # sharegpt tags; empty: rayft's own role names
    val: Optional[str] = None
    val_size: float = 0.1


def resolve_sources(cfg: DataConfig) -> list[Source]:
    if cfg.dataset_info:
        return dataset_info_sources(cfg)
    if isinstance(cfg.train, str):
        return [Source(name=cfg.train, path=cfg.train, format=cfg.format, val=cfg.val, val_size=cfg.val_size)]
    sources = []
    for i, s in enumerate(cfg.train):
        unknown = sorted(set(s.columns) - set(FIELDS) - set(ALIASES))
        if unknown:
            raise DataError(f"data.train.{i}.columns: unknown field {unknown[0]!r}; rayft's fields: {', '.join(FIELDS)}")
        bad_tags = sorted(set(s.tags) - set(LF_TAG_KEYS))
        if bad_tags:
            raise DataError(f"data.train.{i}.tags: unknown tag {bad_tags[0]!r}; allowed: {', '.join(LF_TAG_KEYS)}")
        columns = {ALIASES.get(k, k): v for k, v in s.columns.items()}
        sources.append(Source(name=s.path, path=s.path, format=s.format, weight=s.weight, task=s.task,
                              max_samples=s.max_samples, columns=columns, tags=_full_tags(s.tags) if s.tags else {},
                              val=s.val, val_size=cfg.val_size if s.val_size is None else s.val_size))
    if cfg.val:
        raise DataError("data.val: with several sources, give each source its own val (data.train.N.val)")
    return sources


def _full_tags(tags: dict) -> dict:
    return {"role_tag": "from", "content_tag": "value", **{k: default for k, (default, _) in LF_TAGS.items()}, **tags}


def dataset_info_sources(cfg: DataConfig) -> list[Source]:
    """LLaMA-Factory's dataset descriptions: file_name (relative to the file's directory),
    formatting, columns, tags, ranking (preference records; the stage reads them) and num_samples."""
    info_path = Path(cfg.dataset_info)
    if not info_path.is_file():
        raise DataError(f"data.dataset_info: file not found: {info_path}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{info_path}: not a JSON file ({exc})") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: not a JSON object of datasets")
    sources = []
    for name in cfg.datasets:
        if name not in info:
            raise DataError(f"data.datasets: {name!r} is not in {info_path}; it has: {', '.join(sorted(info)) or 'none'}")
        entry = info[name]
        where = f"{info_path}: dataset {name!r}"
        if not isinstance(entry, dict) or "file_name" not in entry:
            hub = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                   if isinstance(entry, dict) and k in entry]
            raise DataError(f"{where}: " + (f"{hub[0]} names a remote dataset; rayft reads local files (file_name)"
                                             if hub else "has no file_name"))
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise DataError(f"{where}: formatting {formatting!r} is not alpaca or sharegpt")
        columns = {}
        for lf_column, record_field in (entry.get("columns") or {}).items():
            if lf_column in ("images", "videos", "audios", "kto_tag"):
                raise DataError(f"{where}: column {lf_column!r} is not supported (rayft trains on text)")
            rayft_field = "conversations" if lf_column == "messages" else LF_COLUMNS.get(lf_column, lf_column)
            if rayft_field not in FIELDS:
                raise DataError(f"{where}: unknown column {lf_column!r}")
            columns[rayft_field] = record_field
        tags = entry.get("tags") or {}
        bad_tags = sorted(set(tags) - set(LF_TAG_KEYS))
        if bad_tags:
            raise DataError(f"{where}: unknown tag {bad_tags[0]!r}; allowed: {', '.join(LF_TAG_KEYS)}")
        sources.append(Source(name=name, path=str(info_path.parent / entry["file_name"]), format=formatting,
                              num_samples=entry.get("num_samples"), columns=columns,
                              tags=_full_tags(tags) if formatting == "sharegpt" else {}, val_size=cfg.val_size))
    return sources


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: a directory without .json or .jsonl files")
        return files
    return [path]


def _file_count(path: Path) -> int:
    stat = path.stat()
    return _counted(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _counted(path: str, size: int, mtime_ns: int) -> int:
    """A file's records, counted once per version of it (a corpus's lines are asked for by the
    split, the sampling and each stream)."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        return sum(1 for _ in iter_records(path))
    with open(path, "rb") as handle:  # JSONL: its non-blank lines (a malformed one fails when read)
        return sum(1 for line in handle if not line.isspace())


def count_records(source: Source, path: Optional[str] = None) -> int:
    """How many records (positions) the source's file(s) hold, up to max_samples, without parsing
    them (JSONL: counting lines)."""
    n = sum(_file_count(file) for file in _files(Path(path or source.path)))
    return n if path else min(n, source.max_samples or n)


def repeats_of(source: Source, n: int, seed: int) -> Optional[np.ndarray]:
    """How often each position is drawn by LLaMA-Factory's num_samples (None: once each)."""
    return np.bincount(_lf_sample(n, source.num_samples, seed), minlength=n) if source.num_samples else None


def stream_source(source: Source, seed: int, problems: Problems, path: Optional[str] = None,
                  wanted: Optional[Callable[[int], bool]] = None) -> Iterator[tuple[int, dict]]:
    """(position, record) of the source (or of its validation file, `path`) in file order, for the
    positions `wanted` (all by default), in rayft's field names, each with its task under "task"
    (its own, else the source's, else none); a record drawn more than once (num_samples) comes as
    often. Records that are not JSON objects, or name an unknown role, go to `problems`."""
    target = Path(path or source.path)
    label = source_label(source, path)
    values = _values(_files(target), wanted)
    repeats = None
    if path is None:
        if source.max_samples:
            values = itertools.islice(values, source.max_samples)
        repeats = repeats_of(source, count_records(source), seed)
    seen_columns: set[str] = set()
    first_fields: list[str] = []
    any_record = False
    for position, record in enumerate(values):
        if record is SKIPPED or (wanted is not None and not wanted(position)):
            continue
        if not isinstance(record, dict):
            problems.add("{count} records are not JSON objects; first at index {first}", position)
            continue
        any_record = True
        first_fields = first_fields or sorted(record)
        if source.columns:
            seen_columns.update(c for c in source.columns.values() if c in record)
            record = _rename_columns(record, source.columns)
        if source.tags:
            record = _canonical_roles(record, source.tags, problems, position)
        if not (isinstance(record.get("task"), str) and record["task"]):
            record.pop("task", None)
            if source.task:
                record["task"] = source.task
        for _ in range(1 if repeats is None else int(repeats[position])):
            yield position, record
    if not any_record and not problems.cases:
        raise DataError(f"{label}: no records")
    for rayft_field, record_field in source.columns.items():
        if record_field not in seen_columns:
            raise DataError(f"{label}: columns.{rayft_field} names field {record_field!r}, which no record has "
                            f"(fields: {', '.join(first_fields)})")


def _values(files: list[Path], wanted: Optional[Callable[[int], bool]]) -> Iterator:
    """The files' records in order; those at positions not `wanted` are not decoded (SKIPPED)."""
    base = 0
    for file in files:
        count = 0
        skip = None if wanted is None else (lambda p, base=base: not wanted(base + p))
        for value in iter_records(file, skip):
            count += 1
            yield value
        base += count


def source_label(source: Source, path: Optional[str] = None) -> str:
    target = path or source.path
    return str(target) if path or source.name == source.path else f"{source.name} ({target})"


def _lf_sample(size: int, count: int, seed: int) -> np.ndarray:
    """LLaMA-Factory's num_samples: a permutation's first N, topped up by random picks past the size."""
    rng = np.random.default_rng(seed)
    picks = rng.permutation(size)[:count]
    if count > size:
        picks = np.concatenate([picks, rng.choice(size, count - size)])
    return picks


def _rename_columns(record: dict, columns: dict[str, str]) -> dict:
    record = dict(record)
    values = {f: record.pop(c) for f, c in columns.items() if c in record}
    record.update(values)
    return record


def _canonical_roles(record: dict, tags: dict[str, str], problems: Problems, index: int) -> dict:
    """sharegpt turns under the source's role and content tags, as {from, value} with rayft's
    role names; an unknown role goes to `problems`."""
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {tags[tag]: role for tag, (_, role) in LF_TAGS.items()}
    unknown: list = []

    def turn(t):
        if not isinstance(t, dict):
            return t
        if t.get(role_tag) not in roles:
            unknown.append(t.get(role_tag))
            return t
        return {"from": roles[t[role_tag]], "value": t.get(content_tag)}

    record = dict(record)
    if isinstance(record.get("conversations"), list):
        record["conversations"] = [turn(t) for t in record["conversations"]]
    for key in ("chosen", "rejected"):  # ranking records: one message each
        if isinstance(record.get(key), dict):
            record[key] = turn(record[key])
    if unknown:
        known = ", ".join(f"{tag} {tags[tag]!r}" for tag in LF_TAGS).replace("{", "{{").replace("}", "}}")
        problems.add(f"{{count}} records have a turn whose {role_tag} is not one of the tags ({known}); "
                     f"first at index {{first}} ({role_tag} {{detail}})", index, repr(unknown[0]))
    return record
