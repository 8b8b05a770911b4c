"""Prompt tuning and P-tuning v1: n learned embeddings put before each row's prompt (training
exports P-tuning's encoder output as fixed embeddings, so both serve alike). In a mixed batch
the rows' prefixes differ in length: the engine's prefill builds each row's input embeddings as
[virtual; prompt], left-padded like prompts of different lengths, the virtual tokens taking
positions 0..n-1 as in peft; decoding then runs from the cache like any row."""

from __future__ import annotations

from pathlib import Path

import torch

KEY = "prompt_embeddings"


def inspect(path: Path, config: dict, tensors: dict[str, tuple[int, ...]], max_rank: int):
    from rayft.serve.validate import AdapterError, WEIGHTS_FILE

    virtual = config.get("num_virtual_tokens")
    if not isinstance(virtual, int) or virtual <= 0:
        raise AdapterError(f"{path / 'adapter_config.json'}: num_virtual_tokens={virtual!r} is not a positive integer")
    shape = tensors.get(KEY)
    if set(tensors) != {KEY} or shape is None or len(shape) != 2 or shape[0] != virtual:
        raise AdapterError(f"{path / WEIGHTS_FILE}: expected one tensor {KEY!r} of shape ({virtual}, hidden), found "
                           f"{ {k: v for k, v in tensors.items()} } (train a prompt encoder's output with rayft train)")
    return {"shapes": {}, "virtual_tokens": virtual, "embedding_dim": shape[1]}


def load(spec, tensors: dict[str, torch.Tensor], dtype, device, base_layers):
    return {"prompt_embeddings": tensors[KEY].to(device, dtype)}
