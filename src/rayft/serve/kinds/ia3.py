"""IA3: learned vectors that rescale keys and values (the layer's output, bias included) and the
feed-forward's input (the down projection's input), per row of a batch. peft saves the vector of
an output-scaled layer as (out, 1) and of an input-scaled one as (1, in)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l$")


def inspect(path: Path, config: dict, tensors: dict[str, tuple[int, ...]], max_rank: int):
    from rayft.serve.validate import AdapterError, WEIGHTS_FILE

    if config.get("modules_to_save"):
        raise AdapterError(f"{path / 'adapter_config.json'}: modules_to_save={config['modules_to_save']!r} cannot be "
                           "served in a mixed batch")
    shapes = {}
    for key, shape in tensors.items():
        match = KEY.match(key)
        if match is None or len(shape) != 2 or 1 not in shape:
            raise AdapterError(f"{path / WEIGHTS_FILE}: tensor {key!r} {shape} is not an IA3 vector")
        # (out, 1) scales the output, (1, in) the input; the other side of the layer is unknown here
        # and checked against the base (check_fits_base) through the known one.
        shapes[match["module"]] = (None, shape[0]) if shape[1] == 1 else (shape[1], None)
    if not shapes:
        raise AdapterError(f"{path / WEIGHTS_FILE}: holds no IA3 vectors")
    return {"shapes": shapes}


def load(spec, tensors: dict[str, torch.Tensor], dtype, device, base_layers):
    in_scales, out_scales = {}, {}
    for module, (fan_in, _) in spec.shapes.items():
        vector = tensors[f"base_model.model.{module}.ia3_l"].reshape(-1).to(device, dtype)
        if fan_in is not None:
            in_scales[module] = vector
        else:
            out_scales[module] = (vector, None)  # the bias is scaled with the rest: peft's forward
    return {"in_scales": in_scales, "out_scales": out_scales}
