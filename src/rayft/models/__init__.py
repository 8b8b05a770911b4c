"""Base-model resolution: aliases, the bundled GGUF conversion, local directories."""

from rayft.models.resolve import KNOWN_ALIASES, base_fingerprint, prepare_alias, rayft_home, resolve_model_path

__all__ = ["KNOWN_ALIASES", "base_fingerprint", "prepare_alias", "resolve_model_path", "rayft_home"]
