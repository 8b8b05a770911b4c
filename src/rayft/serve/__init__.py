"""Multi-tenant LoRA serving: registry, adapter cache, mixed-adapter batching, the Ray Serve app."""
