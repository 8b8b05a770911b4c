"""BitFit (Ben Zaken et al. 2022): only the bias terms train. The output is a delta of the biases."""

from __future__ import annotations

from typing import Literal

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import register
from rayft.methods.selective import SelectiveMethod

# where a bias sits, by the name of the module that holds it (HF decoder layers)
ATTENTION_PARTS = ("self_attn", "attention", "attn")
MLP_PARTS = ("mlp", "feed_forward", "ffn")


class BitfitOptions(Strict):
    biases: Literal["all", "attention", "mlp"] = "all"


def bias_names(model, which: str) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if not name.endswith(".bias"):
            continue
        parts = name.split(".")
        if which == "attention" and not any(p in ATTENTION_PARTS for p in parts):
            continue
        if which == "mlp" and not any(p in MLP_PARTS for p in parts):
            continue
        names.append(name)
    return names


@register
class BitfitMethod(SelectiveMethod):
    name = "bitfit"
    usual_lr = 1e-3
    options = BitfitOptions

    def check(self, opts, model):
        if not bias_names(model, opts.biases):
            where = "" if opts.biases == "all" else f" in its {opts.biases} layers"
            raise ConfigError(f"method.type=bitfit: model type {model.config.model_type!r} has no bias terms{where} "
                              "to train; BitFit needs an architecture with biases (Qwen2 has attention biases; "
                              "GPT-2, OPT, Phi and BERT have biases throughout)")

    def selected(self, opts, model):
        return bias_names(model, opts.biases)
