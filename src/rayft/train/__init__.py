"""Training: the per-worker loop, the DeepSpeed config, checkpoints and the driver that runs them."""
