"""Pack samples into rows of at most `cutoff_len` tokens, and collate rows into batches.

A packed row carries `position_ids` that restart at 0 for each sample. Given position ids and no
attention mask (and no KV cache), transformers builds a block-diagonal causal mask, so no sample
attends to another. Right padding needs no mask either: under causal attention nothing real
attends to a pad token, and pads carry no labels.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from rayft.data.tokenize import IGNORE_INDEX, TokenizedSample

if TYPE_CHECKING:
    import torch

Row = dict[str, np.ndarray]  # int32 token arrays (a row read back from Arrow: lists)
PACK_CHUNK = 4096  # units packed together: bounded memory, rows nearly as full as packing everything at once


def single_row(sample: TokenizedSample) -> Row:
    return unit_row([sample])


def unit_row(unit: list[TokenizedSample]) -> Row:
    """Sequences that must share a row (a preference pair's two answers), each with positions
    restarting at 0, in order. Built as int32 arrays: the Arrow files are written from them
    without walking a token in Python."""
    if len(unit) == 1:
        ids, labels = (np.asarray(unit[0].input_ids, dtype=np.int32), np.asarray(unit[0].labels, dtype=np.int32))
        return {"input_ids": ids, "labels": labels, "position_ids": _positions(len(ids))}
    return {"input_ids": np.concatenate([np.asarray(s.input_ids, dtype=np.int32) for s in unit]),
            "labels": np.concatenate([np.asarray(s.labels, dtype=np.int32) for s in unit]),
            "position_ids": np.concatenate([_positions(len(s.input_ids)) for s in unit])}


_POSITIONS = np.arange(8192, dtype=np.int32)
_POSITIONS.flags.writeable = False  # rows share its slices


def _positions(n: int) -> np.ndarray:
    return _POSITIONS[:n] if n <= len(_POSITIONS) else np.arange(n, dtype=np.int32)


def pack(samples: Iterable[TokenizedSample], max_len: int, chunk_size: int = PACK_CHUNK) -> Iterator[Row]:
    """Best-fit-decreasing packing within chunks of `chunk_size` samples (streams, bounded memory)."""
    return pack_units(([sample] for sample in samples), max_len, chunk_size)


def pack_units(units: Iterable[list[TokenizedSample]], max_len: int, chunk_size: int = PACK_CHUNK) -> Iterator[Row]:
    """`pack` for units of sequences that stay together and in order in one row."""
    chunk: list[list[TokenizedSample]] = []
    for unit in units:
        chunk.append(unit)
        if len(chunk) == chunk_size:
            yield from _pack_chunk(chunk, max_len)
            chunk = []
    if chunk:
        yield from _pack_chunk(chunk, max_len)


def _pack_chunk(chunk: list[list[TokenizedSample]], max_len: int) -> Iterator[Row]:
    bins: list[list[TokenizedSample]] = []
    free = []  # sorted (free tokens, bin index)
    sized = sorted(((sum(len(sample.input_ids) for sample in unit), unit) for unit in chunk),
                   key=lambda pair: pair[0], reverse=True)
    for size, unit in sized:
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, index = free.pop(at)
        else:
            space, index = max_len, len(bins)
            bins.append([])
        bins[index].extend(unit)
        if space - size > 0:
            bisect.insort(free, (space - size, index))
    for samples in bins:
        yield unit_row(samples)


def collate(rows: list[Row], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Pads get labels IGNORE_INDEX and their own positions;
    `real_tokens` counts the tokens that are not padding (for throughput)."""
    import torch  # here, not at the top: data preparation's worker processes never collate

    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        position_ids[i, :n] = torch.tensor(row["position_ids"])
        position_ids[i, n:] = torch.arange(width - n)
    real_tokens = torch.tensor(sum(len(row["input_ids"]) for row in rows))
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "real_tokens": real_tokens}
    if "task" in rows[0]:
        batch["task"] = torch.tensor([row["task"] for row in rows], dtype=torch.long)
    return batch
