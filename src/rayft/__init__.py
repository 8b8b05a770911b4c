"""rayft: distributed LLM fine-tuning and multi-tenant adapter serving on Ray."""

import os

__version__ = "0.1.0"

# transformers (5.x, with the `kernels` package it requires) swaps layers of a model it loads for
# kernels it downloads from the Hugging Face Hub (on CUDA: RoPE, RMSNorm). rayft never fetches
# code or weights from a hub, and on a GPU host without one every load failed at its first
# forward (seen on an H200); USE_HUB_KERNELS=YES set by a user still opts in.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
