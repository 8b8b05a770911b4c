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
    embedding_dim: Optional[int] = None  # the input embeddings' width (what virtual tokens must have)

    @classmethod
    def of_model(cls, model, fingerprint: str) -> "BaseShape":
        import torch

        shapes = {name: (module.in_features, module.out_features) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name != "lm_head"}
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        return cls(fingerprint, shapes, context, model.get_input_embeddings().embedding_dim)

    @classmethod
    def of_model_dir(cls, model_dir: Path) -> "BaseShape":
        from rayft.models import base_fingerprint
        from rayft.models.loading import load_on_meta

        return cls.of_model(load_on_meta(model_dir), base_fingerprint(model_dir))


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    kind: str  # serve/kinds/: lora, lora_rank_pattern, dora, ia3
    shapes: dict[str, tuple[Optional[int], Optional[int]]] = field(repr=False)  # module -> (in, out); None: unknown
    rank: int = 0  # the largest module rank (0: no LoRA term)
    scalings: dict[str, float] = field(default_factory=dict, repr=False)  # module -> alpha / r (or / sqrt(r))
    virtual_tokens: int = 0  # positions put before the prompt (prompt tuning)
    embedding_dim: Optional[int] = None  # the width of those positions' embeddings
    nbytes: int = 0
    meta: dict = field(default_factory=dict, repr=False)  # rayft.json, when the adapter has one


def inspect_adapter(path: Path, max_rank: int, max_bytes: int) -> AdapterSpec:
    """File-level checks: no pickles anywhere in the tree, safetensors within the size limit, a
    kind rayft serves, and the kind's own checks of its tensors against its config."""
    from safetensors import safe_open

    from rayft.serve import kinds

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not an adapter directory")
    pickled = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(f"{path}: pickle-based weight files are refused ({', '.join(pickled)}); "
                           "save adapters as safetensors")
    meta = _read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if meta.get("method"):  # a rayft output that is no peft adapter: a delta file or a model
            raise AdapterError(f"{path}: a {meta['method']} output cannot be served as an adapter: {kinds.NOT_ADAPTERS}")
        raise AdapterError(f"{path}: an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = _read_json(config_path)
    kind = kinds.kind_of(config, meta)
    if kind in kinds.REFUSED:
        raise AdapterError(f"{path}: a {kind} adapter cannot be served: {kinds.REFUSED[kind]}")
    if kind not in kinds.SERVED:
        raise AdapterError(f"{path}: {kind} adapters are not served (served kinds: {', '.join(sorted(kinds.SERVED))})")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{path}: an adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    nbytes = weights.stat().st_size
    if nbytes > max_bytes:
        raise AdapterError(f"{path}: {WEIGHTS_FILE} is {nbytes} bytes, above the limit of {max_bytes}")
    try:
        with safe_open(str(weights), framework="pt") as tensors:
            shapes = {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    # each kind checks its own tensors and fills the spec fields it knows
    return AdapterSpec(path, kind, **kinds.SERVED[kind].inspect(path, config, shapes, max_rank), nbytes=nbytes,
                       meta=meta)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: invalid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return value


def check_fits_base(spec: AdapterSpec, base: BaseShape) -> None:
    """The adapter's layers exist in the served base with the same shapes (and the same
    architecture, when the adapter records the base it was trained on)."""
    trained_on: Optional[str] = spec.meta.get("base_fingerprint")
    if trained_on and trained_on != base.fingerprint:
        raise AdapterError(f"{spec.path}: trained on base {spec.meta.get('base_model', '?')} "
                           f"(fingerprint {trained_on}), which is not the served base (fingerprint "
                           f"{base.fingerprint})")
    if spec.embedding_dim is not None and base.embedding_dim is not None and spec.embedding_dim != base.embedding_dim:
        raise AdapterError(f"{spec.path}: its virtual tokens are {spec.embedding_dim} wide, the served base's "
                           f"embeddings {base.embedding_dim}")
    if spec.virtual_tokens and base.context_tokens is not None and spec.virtual_tokens >= base.context_tokens:
        raise AdapterError(f"{spec.path}: {spec.virtual_tokens} virtual tokens fill the served base's context of "
                           f"{base.context_tokens}")
    for module, shape in spec.shapes.items():
        if module not in base.linear_shapes:
            raise AdapterError(f"{spec.path}: targets {module}, which is not a linear layer of the served base")
        served = base.linear_shapes[module]
        if any(side is not None and side != served_side for side, served_side in zip(shape, served)):
            shown = tuple("?" if side is None else side for side in shape)
            raise AdapterError(f"{spec.path}: {module} is (in, out)={shown} in the adapter but "
                               f"{served} in the served base")
