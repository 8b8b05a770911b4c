"""LoRA: y += scaling * B A x per adapted linear layer; per-module ranks and alphas (AdaLoRA's
rank patterns, peft's rank_pattern / alpha_pattern) give each module its own rank and scaling."""

from __future__ import annotations

import re
from pathlib import Path

import torch

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def pattern_value(patterns: dict, module: str, default):
    """peft's rule: a pattern key matches a module whose path ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def inspect(path: Path, config: dict, tensors: dict[str, tuple[int, ...]], max_rank: int, extra_keys=()):
    """The spec fields of a LoRA adapter's files (shapes, rank, scalings per module); refuses
    unknown tensors, shapes that disagree with the config, ranks above max_rank."""
    from rayft.serve.validate import AdapterError, WEIGHTS_FILE

    where = path / "adapter_config.json"
    default_rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(default_rank, int) or default_rank <= 0:
        raise AdapterError(f"{where}: r={default_rank!r} is not a positive integer")
    if not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: lora_alpha={alpha!r} is not a number")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={config['modules_to_save']!r} cannot be served in a mixed "
                           "batch; merge the adapter into a model instead (rayft merge)")
    if config.get("bias") not in (None, "none"):
        raise AdapterError(f"{where}: bias={config['bias']!r} cannot be served in a mixed batch; merge it (rayft merge)")
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensors.items():
        match = KEY.match(key)
        if match is None:
            if any(key.endswith(suffix) for suffix in extra_keys):
                continue
            raise AdapterError(f"{path / WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B weight; only LoRA layers "
                               "can be served (no modules_to_save, embeddings or biases)")
        parts.setdefault(match["module"], {})[match["part"]] = shape
    if not parts:
        raise AdapterError(f"{path / WEIGHTS_FILE}: holds no LoRA weights")
    shapes, scalings, top_rank = {}, {}, 0
    for module, found in parts.items():
        rank = pattern_value(config.get("rank_pattern"), module, default_rank)
        a, b = found.get("A"), found.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise AdapterError(f"{path / WEIGHTS_FILE}: {module} has LoRA shapes A={a} B={b}, expected A=(r, in) "
                               f"and B=(out, r) with r={rank}")
        if rank > max_rank:
            raise AdapterError(f"{where}: rank r={rank} of {module} is above the served limit of {max_rank}")
        module_alpha = pattern_value(config.get("alpha_pattern"), module, alpha)
        shapes[module], top_rank = (a[1], b[0]), max(top_rank, rank)
        scalings[module] = float(module_alpha) / (rank ** 0.5 if config.get("use_rslora") else rank)
    return {"shapes": shapes, "rank": top_rank, "scalings": scalings}


def load_pairs(spec, tensors: dict[str, torch.Tensor], dtype, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A^T: in x r, scaling * B^T: r x out), the layout the batched layers read."""
    pairs = {}
    for module in spec.shapes:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, in)
        b = tensors[f"base_model.model.{module}.lora_B.weight"]  # (out, r)
        pairs[module] = (a.t().contiguous().to(device, dtype),
                         (b.t() * spec.scalings[module]).contiguous().to(device, dtype))
    return pairs


def load(spec, tensors: dict[str, torch.Tensor], dtype, device, base_layers):
    return {"weights": load_pairs(spec, tensors, dtype, device)}
