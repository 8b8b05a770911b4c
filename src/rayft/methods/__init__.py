"""Fine-tuning methods, one module each, registered once by name.

The trainer never branches on a method's name: it asks the registered method how to load the
base model, how to make it trainable and whether the result is an adapter or a whole model.
"""

from rayft.methods.base import Method, get_method, method_names, register

# Importing the modules registers their methods.
from rayft.methods import full, freeze, lora, qlora  # noqa: E402,F401

__all__ = ["Method", "get_method", "method_names", "register"]
