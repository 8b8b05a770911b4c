"""Checks an adapter must pass before it is published or loaded for serving.

Only the files and metadata are read (safetensors headers, adapter_config.json): a bad adapter is
refused with a reason, before any weight is loaded next to the served base model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rayft.errors import RayftError

# Safe identifiers for tenants and adapter names: no path separators, no "..", no leading dot.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
META_FILE = "rayft.json"
# Formats that unpickle arbitrary code when loaded: refused wherever they appear in an adapter.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(RayftError):
    """An adapter that cannot be published or served; the message says why."""


def check_name(name: str, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise AdapterError(f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must fit: the served base's architecture hash and its linear layers; and the
    context length a request (prompt + new tokens) must fit."""
    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    context_tokens: Optional[int] = None  # max_position_embeddings; None where the config has none

    @classmethod
    def of_model(cls, model, fingerprint: str) -> "BaseShape":
        import torch

        shapes = {name: (module.in_features, module.out_features) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name != "lm_head"}
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        return cls(fingerprint, shapes, context)

    @classmethod
    def of_model_dir(cls, model_dir: Path) -> "BaseShape":
        from rayft.models import base_fingerprint
        from rayft.models.loading import load_on_meta

        return cls.of_model(load_on_meta(model_dir), base_fingerprint(model_dir))


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    rank: int
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    shapes: dict[str, tuple[int, int]] = field(repr=False)  # module path -> (in, out)
    nbytes: int = 0
    meta: dict = field(default_factory=dict, repr=False)  # rayft.json, when the adapter has one


def inspect_adapter(path: Path, max_rank: int, max_bytes: int) -> AdapterSpec:
    """File-level checks: safetensors only, a plain LoRA config, consistent shapes, within limits."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter directory")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(f"{path}: pickle-based weight files are refused ({', '.join(pickled)}); "
                           "save adapters as safetensors")
    weights, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    if not config_path.is_file() or not weights.is_file():
        raise AdapterError(f"{path}: an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    nbytes = weights.stat().st_size
    if nbytes > max_bytes:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} is {nbytes} bytes, above the limit of {max_bytes}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: invalid JSON ({exc.msg})") from None
    rank = _check_config(config, config_path, max_rank)

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            for key in tensors.keys():
                match = _KEY.match(key)
                if match is None:
                    raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA A/B weight; only plain "
                                       "LoRA layers can be served (no modules_to_save, embeddings or biases)")
                shapes.setdefault(match["module"], {})[match["part"]] = tuple(tensors.get_slice(key).get_shape())
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    if not shapes:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    module_shapes = {}
    for module, parts in shapes.items():
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise AdapterError(f"{weights}: {module} has LoRA shapes A={a} B={b}, expected A=(r, in) and "
                               f"B=(out, r) with r={rank}")
        module_shapes[module] = (a[1], b[0])
    scaling = float(config["lora_alpha"]) / (rank ** 0.5 if config.get("use_rslora") else rank)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    return AdapterSpec(path, rank, scaling, module_shapes, nbytes, meta)


def _check_config(config: dict, where: Path, max_rank: int) -> int:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type={config.get('peft_type')!r}, only LORA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{where}: r={rank!r} is not a positive integer")
    if rank > max_rank:
        raise AdapterError(f"{where}: rank r={rank} is above the served limit of {max_rank}")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise AdapterError(f"{where}: lora_alpha={config.get('lora_alpha')!r} is not a number")
    unsupported = {
        "use_dora": config.get("use_dora"),  # a magnitude vector per layer: merge it instead
        "modules_to_save": config.get("modules_to_save"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "bias": config.get("bias") not in (None, "none") and config.get("bias"),
    }
    for key, value in unsupported.items():
        if value:
            raise AdapterError(f"{where}: {key}={value!r} cannot be served with batched LoRA; "
                               "merge the adapter into a model instead (rayft merge)")
    return rank


def check_fits_base(spec: AdapterSpec, base: BaseShape) -> None:
    """The adapter's layers exist in the served base with the same shapes (and the same
    architecture, when the adapter records the base it was trained on)."""
    trained_on: Optional[str] = spec.meta.get("base_fingerprint")
    if trained_on and trained_on != base.fingerprint:
        raise AdapterError(f"{spec.path}: trained on base {spec.meta.get('base_model', '?')} "
                           f"(fingerprint {trained_on}), which is not the served base (fingerprint "
                           f"{base.fingerprint})")
    for module, shape in spec.shapes.items():
        if module not in base.linear_shapes:
            raise AdapterError(f"{spec.path}: targets {module}, which is not a linear layer of the served base")
        if base.linear_shapes[module] != shape:
            raise AdapterError(f"{spec.path}: {module} is (in, out)={shape} in the adapter but "
                               f"{base.linear_shapes[module]} in the served base")
