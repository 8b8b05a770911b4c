"""Base-model resolution: aliases, the bundled GGUF conversion, local directories."""

from rayft.models.resolve import KNOWN_ALIASES, prepare_alias, resolve_model_path, rayft_home

__all__ = ["KNOWN_ALIASES", "prepare_alias", "resolve_model_path", "rayft_home"]
