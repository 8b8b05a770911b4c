"""A frozen copy of the model as training starts: what a preference stage compares the policy with
when the policy's own weights cannot be switched back to the base (full and freeze fine-tuning).

It is loaded as the policy was (the same method, hence the same initial weights), every weight
frozen, in eval mode. Under ZeRO-3 it is sharded like the policy: a DeepSpeed engine with the
policy's ZeRO-3 settings and no optimizer, as TRL's `prepare_deepspeed` makes its reference model,
so each rank holds 1/world of the copy and the forward gathers layer by layer. Under ZeRO 0-2 the
policy's weights are whole on every rank, and so is the copy: a plain module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rayft.config import TrainJobConfig


def frozen_copy(cfg: TrainJobConfig, model_dir: str | Path, device: torch.device, world: int):
    """The policy's initial model, frozen (a DeepSpeed engine under ZeRO-3, else the module)."""
    import deepspeed

    from rayft.methods import Run
    from rayft.models.loading import load_for_training
    from rayft.train.deepspeed_config import deepspeed_config

    torch.manual_seed(cfg.train.seed)  # a method that draws its initial weights draws the policy's
    model = load_for_training(model_dir, cfg.method, device, cfg.train.attention,
                              Run(precision=cfg.train.precision), gradient_checkpointing=False)
    model.requires_grad_(False)
    model.eval()
    if cfg.distributed.zero_stage != 3:
        return model.to(device)
    ds_config = deepspeed_config(cfg, world, device.type == "cuda")
    ds_config["zero_optimization"].pop("offload_optimizer", None)  # there is no optimizer
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine
