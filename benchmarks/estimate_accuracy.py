"""rayft estimate's predicted peak against the measured one, per device, for SmolLM2-135M.

    .venv/bin/python benchmarks/estimate_accuracy.py                      # CPU, the whole grid
    .venv/bin/python benchmarks/estimate_accuracy.py --cells lora:0:off --micro-batch 2
    .venv/bin/python benchmarks/estimate_accuracy.py --device cuda        # on a GPU machine

The grid: full fine-tuning, LoRA (r 16, all linear layers) and QLoRA (NF4) under ZeRO 0 and 3
(QLoRA: 0 only; ZeRO-3 refuses it), each with and without gradient checkpointing; one rank
(world size 1), micro-batch 4 x cutoff 256, precision auto. Each cell is measured in a fresh
process (rayft.measure: the peak of allocated tensor bytes over 3 optimizer steps: on CPU the
allocator's own count through torch.profiler, on a GPU torch.cuda.max_memory_allocated) and
predicted on the meta device (rayft.estimate). Beside them, the model-states-only estimators:
DeepSpeed's estimate_zero2/3_model_states_mem_needs (every parameter trainable, no activations;
ZeRO-2's formula stands for stage 0 at one GPU, where it shards nothing) and the 17.5 x
parameters rule of thumb. Goal: within 10% on a GPU, 15% on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MiB = 1 << 20
GRID = [f"{method}:{zero}:{ckpt}" for method in ("full", "lora") for zero in (0, 3) for ckpt in ("off", "on")] \
    + [f"qlora:0:{ckpt}" for ckpt in ("off", "on")]


def cell_config(cell: str, model_dir: str, micro_batch: int, cutoff: int, precision: str) -> dict:
    method, zero, ckpt = cell.split(":")
    block = {"type": method, **({method: {"r": 16, "alpha": 32, "dropout": 0.0}} if method != "full" else {})}
    return {"name": f"accuracy-{method}-{zero}-{ckpt}", "output_dir": "unused", "model": {"name_or_path": model_dir},
            "method": block, "data": {"train": "unused.jsonl", "cutoff_len": cutoff},
            "train": {"micro_batch_size": micro_batch, "precision": precision, "gradient_checkpointing": ckpt == "on"},
            "distributed": {"num_workers": 1, "zero_stage": int(zero)}}


def measure_one(raw: dict, device: str) -> None:
    """In a fresh process: one cell's measurement, as one JSON line."""
    from rayft.config import parse_config
    from rayft.measure import measure_peak

    cfg = parse_config(raw)
    started = time.perf_counter()
    measured = measure_peak(cfg, cfg.model.name_or_path, steps=3, device=device)
    print(json.dumps({"peak_bytes": measured.peak_bytes, "loaded_bytes": measured.loaded_bytes,
                      "seconds": time.perf_counter() - started}), flush=True)


def model_states_baselines(raw: dict, facts) -> tuple[float, float]:
    """(DeepSpeed's model-states estimate at one GPU without offload, the 17.5 x rule of thumb)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from rayft.estimate import RULE_OF_THUMB_BYTES_PER_PARAM

    params = facts.base_params
    if raw["distributed"]["zero_stage"] == 3:
        largest = max(sum(p.numel() for p in layer.module.parameters()) for layer in facts.layers)
        deepspeed_bytes = estimate_zero3_model_states_mem_needs(params, largest, cpu_offload=False)[1]
    else:
        deepspeed_bytes = estimate_zero2_model_states_mem_needs(params, cpu_offload=False)[1]
    return deepspeed_bytes, RULE_OF_THUMB_BYTES_PER_PARAM * params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cells", default=",".join(GRID), help="method:zero:checkpointing, comma-separated")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--measure-one", help=argparse.SUPPRESS)  # internal: a cell's config, measured here
    args = parser.parse_args()
    if args.measure_one:
        return measure_one(json.loads(args.measure_one), args.device)

    import deepspeed  # noqa: F401 (imported first: its accelerator line comes before the table)
    import torch

    from rayft.config import parse_config
    from rayft.estimate import Device, estimate, model_facts, resolved_precision
    from rayft.models import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    if args.device == "cuda":
        device = Device("cuda", torch.cuda.get_device_properties(0).total_memory)
        where = torch.cuda.get_device_name(0)
    else:
        import platform

        device = Device("cpu", 1 << 40)
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{args.model} on {where}; micro-batch {args.micro_batch} x {args.cutoff} tokens, "
          f"one rank, precision {args.precision}")
    header = ("| method | ZeRO | checkpointing | predicted (MiB) | measured (MiB) | error | DeepSpeed model states "
              "(MiB) | 17.5 x params (MiB) | peak at |")
    print(header)
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    errors = []
    for cell in args.cells.split(","):
        raw = cell_config(cell, model_dir, args.micro_batch, args.cutoff, args.precision)
        cfg = parse_config(raw)
        facts = model_facts(cfg, model_dir, resolved_precision(cfg, device))
        predicted = estimate(cfg, model_dir, device, peak_tflops=1.0, advise=False, facts=facts)
        done = subprocess.run([sys.executable, __file__, "--device", args.device, "--measure-one", json.dumps(raw)],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            raise SystemExit(f"{cell}: the measurement failed:\n{done.stderr[-3000:]}")
        measured = json.loads(lines[-1])["peak_bytes"]
        error = predicted.peak_bytes / measured - 1
        errors.append(abs(error))
        deepspeed_bytes, thumb = model_states_baselines(raw, facts)
        method, zero, ckpt = cell.split(":")
        print(f"| {method} | {zero} | {ckpt} | {predicted.peak_bytes / MiB:,.1f} | {measured / MiB:,.1f} | "
              f"{100 * error:+.1f}% | {deepspeed_bytes / MiB:,.1f} | {thumb / MiB:,.1f} | {predicted.phase} |", flush=True)
    goal = 0.10 if args.device == "cuda" else 0.15
    print(f"largest error {100 * max(errors):.1f}%, mean {100 * sum(errors) / len(errors):.1f}%; goal within "
          f"{100 * goal:.0f}% on {args.device}: {'met' if max(errors) <= goal else 'not met'}")


if __name__ == "__main__":
    main()
