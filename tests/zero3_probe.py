"""What AdaLoRA's and PLoRA's step hooks would do under ZeRO-3, which their configs refuse: one
DeepSpeed ZeRO-3 process (gloo, world size 1) on the tiny model. Run by tests/test_catalogue.py
in a subprocess (a process group is process-wide); prints one JSON line per method."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))


def main(model_dir: str, port: str) -> None:
    import deepspeed

    from rayft.config import MethodConfig
    from rayft.methods import Run, get_method
    from rayft.models.loading import load_for_training
    from rayft.train.loop import token_losses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).repeat(2, 1)}
    for block in ({"type": "adalora", "adalora": {"init_r": 4, "target_r": 2}},
                  {"type": "plora", "plora": {"merge_every": 1, "rewarm_steps": 0}}):
        cfg = MethodConfig.model_validate(block)
        method, opts = get_method(cfg.type), cfg.options
        torch.manual_seed(0)
        model = load_for_training(model_dir, cfg, torch.device("cpu"), "sdpa", Run(total_steps=10))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config={
            "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
            # partition every parameter, as a real model's are (the tiny model's fit under the default threshold)
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
        result = {"method": cfg.type}
        try:
            loss, count = token_losses(engine, batch, "fp32")
            engine.backward(loss / count)
            method.before_optimizer_step(opts, engine.module, 1)
            engine.step()
            with torch.no_grad():
                before = (token_losses(engine, batch, "fp32")[0] / count).item()
            method.after_optimizer_step(opts, engine, 1)
            with torch.no_grad():
                after = (token_losses(engine, batch, "fp32")[0] / count).item()
            result.update(before=before, after=after)
        except Exception as exc:  # noqa: BLE001 (the failure is what this probe reports)
            result["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
