"""LN-tuning (Zhao et al. 2023): only the normalisation layers' weights (and biases) train. The
output is a delta of those weights."""

from __future__ import annotations

import torch

from rayft.errors import ConfigError
from rayft.methods.base import NoOptions, register
from rayft.methods.selective import SelectiveMethod


def norm_parameter_names(model) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        # LayerNorm, and the RMSNorms every model family defines for itself (LlamaRMSNorm, Qwen2RMSNorm, ...)
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            names += [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
    return names


@register
class LnTuningMethod(SelectiveMethod):
    name = "ln_tuning"
    usual_lr = 5e-3
    options = NoOptions

    def check(self, opts, model):
        if not norm_parameter_names(model):
            raise ConfigError(f"method.type=ln_tuning: model type {model.config.model_type!r} has no normalisation layers")

    def selected(self, opts, model):
        return norm_parameter_names(model)
