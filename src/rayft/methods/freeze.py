"""Freeze tuning: only the last N decoder layers and the final norm train."""

from pydantic import Field

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import Method, register


class FreezeOptions(Strict):
    trainable_layers: int = Field(2, gt=0)


def decoder_layers(model, block: str = "freeze"):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"method.type={block}: cannot find decoder layers (model.model.layers) in {type(model).__name__}")
    return layers


@register
class FreezeMethod(Method):
    name = "freeze"
    usual_lr = 1e-4
    options = FreezeOptions
    output = "model"
    merge_refusal = "its output is already a whole model"

    def check(self, opts, model):
        count = len(decoder_layers(model))
        if opts.trainable_layers > count:
            raise ConfigError(f"method.freeze.trainable_layers={opts.trainable_layers}: the model has only {count} layers")

    def apply(self, opts, model, run):
        model.requires_grad_(False)
        for layer in decoder_layers(model)[-opts.trainable_layers:]:
            layer.requires_grad_(True)
        final_norm = getattr(model.model, "norm", None)
        if final_norm is not None:
            final_norm.requires_grad_(True)
        return model

    def changed_base_params(self, opts, model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
