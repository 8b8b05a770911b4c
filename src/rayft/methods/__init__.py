"""Fine-tuning methods, one module each, registered once by name.

The trainer never branches on a method's name: it asks the registered method how to load the
base model, how to make it trainable, how to step and export it, and reads its capabilities.
"""

from rayft.methods.base import Method, Preset, Run, get_method, method_names, named_presets, register

# Importing the modules registers their methods.
from rayft.methods import (  # noqa: E402,F401
    adalora, adapter_fusion, bitfit, bottleneck, compacter, freeze, full, ia3, ln_tuning, lora, p_tuning, plora, prefix_tuning,
    prompt_tuning, qlora)

__all__ = ["Method", "Preset", "Run", "get_method", "method_names", "named_presets", "register"]
