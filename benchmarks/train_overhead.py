"""Where a training step loses time between plain processes, DeepSpeed and Ray Train.

    .venv/bin/python benchmarks/train_overhead.py [--steps 8] [--rounds 2]

The same step (rayft's `token_losses`, backward, optimizer step; SmolLM2-135M-Instruct, LoRA r=16
all-linear, 4 packed rows of the demo task at cutoff 256, the precision `precision: auto` picks)
runs on 2 ranks of 1 thread each, on disjoint batches, three ways:

    plain      2 processes (torch.multiprocessing), no gradient synchronisation
    deepspeed  2 processes, the step under rayft's DeepSpeed ZeRO-2 engine (all-reduce over gloo)
    ray-train  the deepspeed step in a Ray Train TorchTrainer, 2 workers x 1 CPU, fresh local Ray

Each prints the ranks' real tokens/s and their sum (the first step of a round is a warm-up and
not counted) and the mean forward / backward / optimizer seconds per step. rayft's full loop adds
data loading, logging and evaluation on top of the ray-train figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed_steps(rank: int, world: int, use_deepspeed: bool, args: dict) -> dict:
    """Runs on every rank, torch.distributed already initialised; returns rank 0's gathered figures."""
    import torch
    import torch.distributed as dist

    import train_step
    from rayft.config import parse_config
    from rayft.models import resolve_model_path
    from rayft.train.deepspeed_config import deepspeed_config
    from rayft.train.loop import resolve_precision, token_losses

    torch.set_num_threads(1)
    precision = resolve_precision("auto", torch.device("cpu"))
    model_dir = resolve_model_path("smollm2-135m-instruct")
    batches = train_step.batches(model_dir, world * (args["steps"] + 1))[rank::world]
    model, optimizer = train_step.lora_model_and_optimizer(model_dir, "auto", precision)
    if use_deepspeed:
        import deepspeed

        cfg = parse_config({"name": "overhead", "output_dir": args["work"], "data": {"train": args["data"]},
                            "train": {"micro_batch_size": 4},
                            "distributed": {"num_workers": world, "zero_stage": 2}})
        model, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                                      config=deepspeed_config(cfg, world, on_gpu=False))
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(batch, count: bool):
        start = time.perf_counter()
        loss, tokens = token_losses(model, batch, precision)
        forward = time.perf_counter()
        if use_deepspeed:
            model.backward(loss / tokens)
        else:
            (loss / tokens).backward()
        backward = time.perf_counter()
        if use_deepspeed:
            model.step()
        else:
            optimizer.step()
            optimizer.zero_grad()
        if count:
            phases["forward"] += forward - start
            phases["backward"] += backward - forward
            phases["optimizer"] += time.perf_counter() - backward

    rates = []
    for _ in range(args["rounds"]):
        step(batches[0], count=False)
        dist.barrier()
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch, count=True)
        rates.append(sum(int(b["real_tokens"]) for b in batches[1:]) / (time.perf_counter() - start))
    steps = args["rounds"] * (len(batches) - 1)
    mine = {"tokens_per_s": rates, **{k: v / steps for k, v in phases.items()}}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def _spawned(rank: int, world: int, use_deepspeed: bool, args: dict, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = timed_steps(rank, world, use_deepspeed, args)
    if rank == 0:
        Path(args["result"]).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_processes(use_deepspeed: bool, args: dict) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free loopback port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(2, use_deepspeed, args, port), nprocs=2)
    return json.loads(Path(args["result"]).read_text())


def run_ray_train(args: dict) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayft.raycluster import connect_ray

    connect_ray(None)  # a fresh local instance, as `rayft train` starts one

    def loop(config: dict) -> None:
        import ray.train

        sys.path[:0] = config["paths"]
        context = ray.train.get_context()
        result = timed_steps(context.get_world_rank(), context.get_world_size(), True, config)
        if context.get_world_rank() == 0:  # one machine: the driver reads the file
            Path(config["result"]).write_text(json.dumps(result))

    trainer = TorchTrainer(loop, train_loop_config={**args, "paths": sys.path[:2]},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="overhead", storage_path=str(Path(args["work"]) / "ray")))
    try:
        trainer.fit()
    finally:
        ray.shutdown()
    return json.loads(Path(args["result"]).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=["plain", "deepspeed", "ray-train"],
                        default=["plain", "deepspeed", "ray-train"])
    cli = parser.parse_args()
    from rayft.demo import write_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        args = {"steps": cli.steps, "rounds": cli.rounds, "work": tmp, "result": str(Path(tmp) / "result.json"),
                "data": str(write_demo_data(Path(tmp) / "people.jsonl", n=200))}
        for way in cli.only:
            result = run_ray_train(args) if way == "ray-train" else run_processes(way == "deepspeed", args)
            ranks = result["ranks"]
            total = [round(sum(r["tokens_per_s"][i] for r in ranks), 1) for i in range(cli.rounds)]
            phases = {k: round(sum(r[k] for r in ranks) / len(ranks), 3) for k in ("forward", "backward", "optimizer")}
            print(json.dumps({"way": way, "tokens_per_s_sum_per_round": total,
                              "per_rank": [[round(x, 1) for x in r["tokens_per_s"]] for r in ranks],
                              "seconds_per_step": phases}), flush=True)


if __name__ == "__main__":
    main()
