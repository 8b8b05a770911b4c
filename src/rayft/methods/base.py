"""The method interface and its registry."""

from __future__ import annotations

from typing import Any, Literal

from rayft.config import MethodConfig

_REGISTRY: dict[str, "Method"] = {}


class Method:
    """How one fine-tuning method loads, prepares and saves a model."""

    name: str = ""
    # "adapter": only the trained adapter is saved (servable next to its base);
    # "model": a whole model directory is saved.
    output: Literal["adapter", "model"] = "model"

    def load_kwargs(self, cfg: MethodConfig, device) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` (quantization, device map)."""
        return {}

    def check(self, cfg: MethodConfig, model) -> None:
        """Raise ConfigError when `cfg` cannot apply to `model` (may be on the meta device)."""

    def apply(self, cfg: MethodConfig, model):
        """Make the model trainable the method's way; returns the model to train."""
        raise NotImplementedError


def register(method_cls: type[Method]) -> type[Method]:
    if not method_cls.name:
        raise ValueError(f"{method_cls.__name__} has no name")
    if method_cls.name in _REGISTRY:
        raise ValueError(f"method {method_cls.name!r} is registered twice")
    _REGISTRY[method_cls.name] = method_cls()
    return method_cls


def get_method(name: str) -> Method:
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)
