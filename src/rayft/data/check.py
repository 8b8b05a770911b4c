"""`rayft data check CONFIG`: a report per source before any training, read the way training
reads it.

Each training source (and its validation file), and each eval set, streams through the same path
as data preparation (data/dataset.py: the source's records, the stage's parse and units in chunks,
in worker processes for a large corpus). Per source: records, format, token lengths as the stage
renders them (untruncated: the longest sequence of a sample), how many are longer than
data.cutoff_len (and how many of those truncation leaves nothing to learn from), exact and near
duplicates of an earlier record of the source, and of a record of an earlier training source
(data/dedup.py: what dedup would drop, as it spans the sources), what the stage flags in the
answers (Objective.answer_issues) and the records that do not parse (the Problems counts).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from rayft.config import TrainJobConfig
from rayft.data.dedup import Duplicates, exact_key, record_identity, same_source, signature
from rayft.data.formats import Problems, with_task_prompt

UNBOUNDED = 1 << 30  # a cutoff_len no record reaches: the untruncated lengths


@dataclass
class SourceCheck:
    name: str  # the source's label, with its role: "(val)" or "eval set <name>"
    format: str
    records: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per sample, untruncated
    truncated: int = 0  # longer than data.cutoff_len
    lost: int = 0  # of those, left with nothing to learn from (dropped when prepared)
    exact_duplicates: int = 0  # of an earlier record of this source
    near_duplicates: int = 0
    exact_across: int = 0  # of a record of an earlier training source
    near_across: int = 0
    answer_issues: collections.Counter = field(default_factory=collections.Counter)
    bad_records: int = 0  # records that do not parse (format, roles, the chat template)
    first_problem: str = ""  # the first bad record's reason, as preparation would report it

    def percentiles(self) -> Optional[tuple[int, int, int, int]]:
        """Token length p50, p90, p99 and max (None: no sample)."""
        if not self.lengths:
            return None
        p50, p90, p99 = np.percentile(self.lengths, [50, 90, 99], method="nearest")
        return int(p50), int(p90), int(p99), max(self.lengths)


def _check_chunk(chunk: list[tuple[str, str, int, dict]]):
    """Worker side (dataset._units runs it like _chunk_units): per parsed record of the chunk,
    (identity, untruncated length or None, exact key, signature, answer issues), how many of the
    records longer than cutoff_len truncation leaves with nothing, and the problems per label."""
    from rayft.data.dataset import _worker

    objective, cfg, tokenizer = _worker["objective"], _worker["cfg"], _worker["tokenizer"]
    problems: dict[str, Problems] = {}
    items, identities = [], []
    for label, fmt, index, record in chunk:
        if record.get("task"):
            record = with_task_prompt(record, cfg.task_template, record["task"])
        (item,) = objective.parse([record], fmt, label, index, problems.setdefault(label, Problems()))
        if item is not None:
            items.append(item)
            identities.append(record_identity(label, index))
    scratch = {"kept": 0, "dropped": 0}
    whole = objective.units(tokenizer, items, cfg.model_copy(update={"cutoff_len": UNBOUNDED}), scratch)
    lengths = [max(len(s.input_ids) for s in unit) if unit else None for unit in whole]
    long = [item for item, n in zip(items, lengths) if n is not None and n > cfg.cutoff_len]
    lost = sum(unit is None for unit in objective.units(tokenizer, long, cfg, scratch)) if long else 0
    results = [(identity, n, exact_key(item), signature(item), objective.answer_issues(item))
               for identity, item, n in zip(identities, items, lengths)]
    return results, lost, {label: p for label, p in problems.items() if p.cases}


def _once_each(stream: Iterator) -> Iterator:
    """A source's records once each: a record drawn again on purpose (num_samples) is no duplicate."""
    last = None
    for entry in stream:
        if (entry[0], entry[2]) != last:
            last = (entry[0], entry[2])
            yield entry


def _check_stream(report: SourceCheck, records: Iterator, n_records: int, stage: str, cfg: TrainJobConfig,
                  tokenizer_dir: Path, found: Problems, duplicates: Optional[Duplicates] = None) -> SourceCheck:
    """Fill `report` from one stream's records; `found` is the stream's Problems (the reader's
    own, for records that are not JSON objects), the chunks' are added to it. `duplicates`: the
    index shared by the training sources (a validation file or an eval set gets its own)."""
    from rayft.data.dataset import _units

    duplicates = Duplicates(cfg.data.filter.near_threshold) if duplicates is None else duplicates
    for results, lost, chunk_problems in _units(records, n_records, tokenizer_dir, stage, cfg.data, work=_check_chunk):
        report.lost += lost
        for problems in chunk_problems.values():  # one label: the stream's
            found.merge(problems)
        for identity, length, key, values, issues in results:
            report.records += 1
            if length is not None:
                report.lengths.append(length)
                report.truncated += length > cfg.data.cutoff_len
            verdict = duplicates.seen(identity, key, values)
            if verdict and same_source(identity, duplicates.repeated):
                report.exact_duplicates += verdict == "exact"
                report.near_duplicates += verdict == "near"
            elif verdict:
                report.exact_across += verdict == "exact"
                report.near_across += verdict == "near"
            report.answer_issues.update(issues)
    report.bad_records = sum(count for count, _, _ in found.cases.values())
    report.records += report.bad_records
    if found.cases:
        template, (count, first, detail) = min(found.cases.items(), key=lambda case: case[1][1])
        report.first_problem = template.format(count=count, first=first, detail=detail)
    return report


def check_data(cfg: TrainJobConfig, tokenizer_dir: Path) -> list[SourceCheck]:
    """The report of every training source, its validation file, and every eval set."""
    from rayft.data.dataset import _SourcePlan, check_paths
    from rayft.data.sources import Source, count_records, resolve_sources, source_label
    from rayft.objectives import general_objective, get_objective

    objective = get_objective(cfg.stage)
    sources = resolve_sources(cfg.data)
    check_paths(cfg.data, sources)
    seed = cfg.train.seed
    reports = []
    training = Duplicates(cfg.data.filter.near_threshold)  # across the training sources, as dedup is
    for i, source in enumerate(sources):
        problems: dict[str, Problems] = {}  # per stream label: what its reader and its chunks found
        plan = _SourcePlan(objective, source, i, seed, problems)  # refuses another stage's records
        reports.append(_check_stream(SourceCheck(plan.label, plan.format), _once_each(plan._stream()),
                                     count_records(source), objective.name, cfg, tokenizer_dir,
                                     problems.setdefault(plan.label, Problems()), training))
        if source.val:
            label = source_label(source, source.val)
            reports.append(_check_stream(SourceCheck(f"{label} (val)", plan.format), plan._stream(source.val),
                                         count_records(source, source.val), objective.name, cfg, tokenizer_dir,
                                         problems.setdefault(label, Problems())))
    general = general_objective()  # eval sets are conversations, measured by their next-token loss
    for name, path in cfg.data.eval_sets.items():
        problems = {}
        plan = _SourcePlan(general, Source(name=path, path=path, val_size=0), 0, seed, problems)
        reports.append(_check_stream(SourceCheck(f"{path} (eval set {name})", plan.format), plan._stream(),
                                     count_records(plan.source), general.name, cfg, tokenizer_dir,
                                     problems.setdefault(plan.label, Problems())))
    return reports


def report_table(reports: list[SourceCheck], cutoff_len: int, title: str):
    """The reports as a rich table, a column per source (a console of 80 columns holds a few), and
    the lines below it: each source's full name and its first bad record's reason."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for i, r in enumerate(reports, start=1):
        table.add_column(f"[{i}] {Path(r.name.split(' (')[0]).name}", justify="right")
    spreads = [r.percentiles() for r in reports]
    rows = {
        "records": [str(r.records) for r in reports],
        "format": [r.format for r in reports],
        "tokens p50/p90/p99/max": ["/".join(map(str, s)) if s else "-" for s in spreads],
        f"longer than cutoff_len {cutoff_len}": [str(r.truncated) + (f" ({r.lost} lost)" if r.lost else "")
                                                 for r in reports],
        "exact duplicates": [str(r.exact_duplicates) for r in reports],
        "near duplicates": [str(r.near_duplicates) for r in reports],
        "of earlier sources (exact/near)": [f"{r.exact_across}/{r.near_across}" for r in reports],
        "answer issues": ["\n".join(f"{n} {issue}" for issue, n in sorted(r.answer_issues.items())) or "0"
                          for r in reports],
        "bad records": [str(r.bad_records) for r in reports],
    }
    for name, cells in rows.items():
        table.add_row(name, *cells)
    lines = [f"[{i}] {r.name}" + (f": {r.first_problem}" if r.first_problem else "")
             for i, r in enumerate(reports, start=1)]
    if any(r.lost for r in reports):
        lines.append("lost: longer than cutoff_len, and truncation leaves nothing to learn (dropped when prepared)")
    return table, lines
