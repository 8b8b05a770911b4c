"""DoRA (weight-decomposed LoRA): y = m / ||W + scaling B A||_col * (W x + scaling B A x) + bias.

The column norms depend only on the adapter and the base, so the scale s = m / ||W + s B A|| is
computed once per adapter at load (in fp32, from the served base's weights), and the per-row op
is LoRA's term plus an output scale: s * (W x + B A x) + (1 - s) * bias (peft's forward exactly).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayft.serve.kinds import lora

MAGNITUDE = ".lora_magnitude_vector"


def inspect(path: Path, config: dict, tensors: dict[str, tuple[int, ...]], max_rank: int):
    from rayft.serve.validate import AdapterError, WEIGHTS_FILE

    fields = lora.inspect(path, config, tensors, max_rank, extra_keys=(MAGNITUDE,))
    for module, (_, out) in fields["shapes"].items():
        magnitude = tensors.get(f"base_model.model.{module}{MAGNITUDE}")
        if magnitude != (out,):
            raise AdapterError(f"{path / WEIGHTS_FILE}: {module} has DoRA magnitude shape {magnitude}, expected ({out},)")
    return fields


def load(spec, tensors: dict[str, torch.Tensor], dtype, device, base_layers):
    from peft.utils.integrations import dequantize_module_weight

    if base_layers is None:
        raise ValueError(f"{spec.path}: a DoRA adapter needs the served base's weights to load")
    out_scales = {}
    for module in spec.shapes:
        base = base_layers[module]
        weight = dequantize_module_weight(base).detach().float().cpu()  # a 4-bit base's too
        a = tensors[f"base_model.model.{module}.lora_A.weight"].float()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].float()
        magnitude = tensors[f"base_model.model.{module}{MAGNITUDE}"].float()
        scale = magnitude / torch.linalg.norm(weight + spec.scalings[module] * (b @ a), dim=1)
        shift = None if base.bias is None else (1 - scale) * base.bias.detach().float().cpu()
        out_scales[module] = (scale.to(device, dtype), None if shift is None else shift.to(device, dtype))
    return {"weights": lora.load_pairs(spec, tensors, dtype, device), "out_scales": out_scales}
