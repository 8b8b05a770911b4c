"""How often DeepSpeed's engine makes the host wait for the device (its accelerator's synchronize)
over training micro-batches, under the DeepSpeed config rayft builds for GPU workers and under
that config with DeepSpeed's default timers. One process (gloo, world size 1) on the CPU, the
accelerator answering as CUDA's does (no data dependency resolved by the runtime). Run by
tests/test_train.py in a subprocess (a process group is process-wide); prints one JSON line."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def main() -> None:
    from rayft.config import DistributedConfig, TrainConfig
    from rayft.measure import ensure_process_group
    from rayft.train.deepspeed_config import deepspeed_config, skip_the_inference_comm_build

    skip_the_inference_comm_build()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ensure_process_group("gloo")
    accelerator = get_accelerator()
    waits = []
    accelerator.synchronize = lambda *args: waits.append(1)
    accelerator.resolves_data_dependency = lambda: False
    job = type("Job", (), {"train": TrainConfig(micro_batch_size=2, grad_accum=2, precision="bf16"),
                           "distributed": DistributedConfig(zero_stage=2)})()
    result = {}
    for name in ("rayft", "deepspeed_timers"):
        config = deepspeed_config(job, 1, on_gpu=True)
        if name == "deepspeed_timers":
            config.pop("timers")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config=config, dist_init_required=False)
        waits.clear()
        for _ in range(8):  # four optimizer steps
            engine.backward(engine(torch.randn(2, 8)).sum())
            engine.step()
        result[name] = len(waits)
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
