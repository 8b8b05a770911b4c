"""What the selective methods (BitFit, LN-tuning) share: a chosen subset of the base's own
parameters trains, and the output is a small delta file of just those parameters.

Output directory: delta.safetensors (trained minus original value, under the base's parameter
names) and delta_config.json. Applying it (or merging it: the same thing) adds each delta to the
base parameter of that name, so nothing but the base and this file is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rayft.errors import RayftError
from rayft.methods.base import Method, host_copy

DELTA_FILE = "delta.safetensors"
DELTA_CONFIG = "delta_config.json"


class SelectiveMethod(Method):
    output = "adapter"
    mergeable = True

    def __init__(self):
        self.original: dict[str, torch.Tensor] = {}

    def selected(self, opts, model) -> list[str]:
        """Names of the base parameters that train."""
        raise NotImplementedError

    def apply(self, opts, model, run):
        names = set(self.selected(opts, model))
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(True)
        self.original = {name: host_copy(p) for name, p in model.named_parameters() if name in names}
        return model

    def changed_base_params(self, opts, model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def export(self, opts, module, state, directory: Path):
        delta = {name: (tensor.float() - self.original[name].float()).contiguous() for name, tensor in state.items()}
        directory.mkdir(parents=True, exist_ok=True)
        save_file(delta, directory / DELTA_FILE, metadata={"format": "pt"})
        (directory / DELTA_CONFIG).write_text(json.dumps({"method": self.name, "options": opts.model_dump(mode="json"),
                                                          "parameters": sorted(delta)}, indent=2))

    def load_output(self, output_dir, base):
        return apply_delta(base, Path(output_dir))


def apply_delta(model, directory: Path):
    """Add a selective method's delta to `model`'s parameters of the same names, in place."""
    if not (directory / DELTA_FILE).is_file():
        raise RayftError(f"{directory}: no {DELTA_FILE}")
    delta = load_file(directory / DELTA_FILE)
    params = dict(model.named_parameters())
    missing = sorted(set(delta) - set(params))
    if missing:
        raise RayftError(f"{directory}/{DELTA_FILE}: parameters not in the model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, value in delta.items():
            params[name].add_(value.to(params[name].dtype))
    return model
