"""Where rayft's full training loop spends a step, against the bare Ray Train + DeepSpeed step.

    .venv/bin/python benchmarks/train_breakdown.py [--steps 20] [--rounds 1]

Runs, alternating, (1) train_overhead.py's bare step in Ray Train (rayft's loss step, DeepSpeed
ZeRO-2, 2 workers x 1 CPU, pre-collated batches, nothing else) and (2) rayft's own
`run_training` with the settings of train_throughput.py, its worker loop unchanged but with
wall-clock timers wrapped around its parts (no profiler): fetching and collating the batch and
moving it to the device, the loss step (forward, fused head), DeepSpeed's backward (the autograd
backward) and within it the gradient all-reduce, the optimizer step (DeepSpeed's step: clipping,
AdamW, ZeRO-2's parameter all-gather), and the logging calls (the metrics all-reduce, MLflow
and the progress queue). What is left of a step is the loop's own Python (method hooks, the
schedule, the logging window's sums; until 2026-12-04 also three `.item()` reads per micro-batch). Figures are seconds per 1,000 real tokens of a rank (rows differ
between the two ways, so per token is what compares), each rank's and their mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PARTS = ("data", "forward", "backward", "allreduce", "optimizer", "logging")


def timed_worker(loop_config: dict) -> None:
    """rayft's train_loop_per_worker with timers around its parts; writes this rank's figures."""
    import deepspeed
    import ray.train

    from rayft.train import loop

    seconds = dict.fromkeys(PARTS, 0.0)
    counts = {"tokens": 0, "steps": 0, "in_eval": False, "start": None, "end": None}

    def timed(part, fn):
        def wrapper(*args, **kwargs):
            if counts["in_eval"]:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - start
        return wrapper

    train_batches = loop.train_batches

    def timed_batches(*args, **kwargs):
        batches = train_batches(*args, **kwargs)
        while True:
            start = time.perf_counter()
            counts["start"] = counts["start"] or start
            try:
                batch = next(batches)
            except StopIteration:
                return
            seconds["data"] += time.perf_counter() - start
            counts["tokens"] += int(batch["real_tokens"])
            yield batch

    loop.train_batches = timed_batches
    evaluate = loop.evaluate

    def untimed_evaluate(*args, **kwargs):
        counts["in_eval"] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            counts["in_eval"] = False

    loop.evaluate = untimed_evaluate
    get_objective = loop.get_objective

    def timed_objective(stage):
        objective = get_objective(stage)
        objective.loss = timed("forward", objective.loss)  # an instance attribute: this process only
        return objective

    loop.get_objective = timed_objective
    loop.all_sum = timed("logging", loop.all_sum)
    loop.Reporter.log = timed("logging", loop.Reporter.log)
    initialize = deepspeed.initialize

    def timed_initialize(*args, **kwargs):
        engine, *rest = initialize(*args, **kwargs)
        engine.allreduce_gradients = timed("allreduce", engine.allreduce_gradients)
        engine.backward = timed("backward", engine.backward)
        step = engine.step

        def timed_step(*a, **k):
            result = timed("optimizer", step)(*a, **k)
            if not counts["in_eval"]:
                counts["steps"] += 1
                counts["end"] = time.perf_counter()
            return result

        engine.step = timed_step
        return (engine, *rest)

    deepspeed.initialize = timed_initialize
    loop.train_loop_per_worker(loop_config)
    rank = ray.train.get_context().get_world_rank()
    seconds["backward"] -= seconds["allreduce"]  # the all-reduce runs inside DeepSpeed's backward
    total = counts["end"] - counts["start"]
    seconds["rest"] = total - sum(seconds.values())
    Path(loop_config["breakdown_dir"], f"rank{rank}.json").write_text(json.dumps(
        {"seconds": seconds, "total": total, "tokens": counts["tokens"], "steps": counts["steps"]}))


def run_full_loop(data_path: Path, work: Path, args) -> dict:
    import train_throughput

    from rayft.train import loop

    breakdown_dir = work / "breakdown"
    breakdown_dir.mkdir(parents=True, exist_ok=True)
    original = loop.train_loop_per_worker

    def worker(loop_config: dict) -> None:  # pickled by value into the Ray workers
        timed_worker({**loop_config, "breakdown_dir": str(breakdown_dir)})

    loop.train_loop_per_worker = worker
    try:
        metrics = train_throughput.run_rayft(data_path, work, args)
    finally:
        loop.train_loop_per_worker = original
    ranks = [json.loads(p.read_text()) for p in sorted(breakdown_dir.glob("rank*.json"))]
    return {"tokens_per_s": metrics["tokens_per_s"], "ranks": ranks}


def per_kilotoken(seconds: float, tokens: int) -> float:
    return round(1000 * seconds / tokens, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    cli = parser.parse_args()
    import train_overhead

    from rayft.demo import write_demo_data

    args = argparse.Namespace(steps=cli.steps, cutoff=256, batch=4, workers=2, cpus_per_worker=1, precision=None)
    from rayft.train.loop import resolve_precision
    import torch

    args.precision = resolve_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        data_path = write_demo_data(Path(tmp) / "people.jsonl", n=2000)
        for index in range(cli.rounds):
            bare_args = {"steps": cli.steps, "rounds": 1, "work": str(Path(tmp) / f"bare{index}"),
                         "result": str(Path(tmp) / f"bare{index}.json"), "data": str(data_path)}
            bare = train_overhead.run_ray_train(bare_args)["ranks"]
            # the bare step's phases, per rank and step; its real tokens per rank and step from its rate
            bare_rate = sum(r["tokens_per_s"][0] for r in bare)
            bare_seconds_per_step = {k: statistics.mean(r[k] for r in bare) for k in ("forward", "backward", "optimizer")}
            step_seconds = sum(bare_seconds_per_step.values())
            bare_tokens_per_rank_step = bare_rate / len(bare) * step_seconds
            print(json.dumps({"round": index + 1, "way": "bare ray-train + deepspeed",
                              "tokens_per_s": round(bare_rate, 1),
                              "s_per_1k_tokens": {k: per_kilotoken(v, bare_tokens_per_rank_step)
                                                  for k, v in bare_seconds_per_step.items()}}), flush=True)
            full = run_full_loop(data_path, Path(tmp) / f"full{index}", args)
            for rank, r in enumerate(full["ranks"]):
                print(json.dumps({"round": index + 1, "way": "rayft full loop", "rank": rank,
                                  "tokens_per_s": round(full["tokens_per_s"], 1), "steps": r["steps"],
                                  "rank_tokens": r["tokens"], "s_per_1k_tokens": {
                                      **{k: per_kilotoken(v, r["tokens"]) for k, v in r["seconds"].items()},
                                      "total": per_kilotoken(r["total"], r["tokens"])}}), flush=True)


if __name__ == "__main__":
    main()
