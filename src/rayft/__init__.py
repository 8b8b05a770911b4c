"""rayft: distributed LLM fine-tuning and multi-tenant adapter serving on Ray."""

__version__ = "0.1.0"
