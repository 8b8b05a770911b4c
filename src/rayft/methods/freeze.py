"""Freeze tuning: only the last N decoder layers and the final norm train."""

from rayft.errors import ConfigError
from rayft.methods.base import Method, register


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"method.type=freeze: cannot find decoder layers (model.model.layers) in {type(model).__name__}")
    return layers


@register
class FreezeMethod(Method):
    name = "freeze"
    output = "model"

    def check(self, cfg, model):
        count = len(decoder_layers(model))
        if cfg.freeze.trainable_layers > count:
            raise ConfigError(f"method.freeze.trainable_layers={cfg.freeze.trainable_layers}: the model has only {count} layers")

    def apply(self, cfg, model):
        model.requires_grad_(False)
        for layer in decoder_layers(model)[-cfg.freeze.trainable_layers:]:
            layer.requires_grad_(True)
        final_norm = getattr(model.model, "norm", None)
        if final_norm is not None:
            final_norm.requires_grad_(True)
        return model
