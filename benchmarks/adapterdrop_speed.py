"""AdapterDrop's speed gain: Houlsby bottleneck adapters in every layer against the same adapters
dropped from the first N layers, in training and in inference, in one run.

    .venv/bin/python benchmarks/adapterdrop_speed.py [--drop-first 15] [--steps 6] [--rounds 3] [--threads 2]

SmolLM2-135M-Instruct (30 layers), reduction factor 16, the demo's packed rows (batch 4, cutoff
256), rayft's loss step (train/loop.token_losses) under the precision `auto` picks here.
- training: forward + backward + AdamW step over the adapters, real tokens per second;
- inference: a forward over the same rows (no grad), tokens per second, and greedy decoding of
  32 tokens for 4 prompts, new tokens per second.
Rounds alternate the two configurations (the machine's speed drifts); the ratio of each round
and their median are printed. Baseline: the undropped adapter, same everything else.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_step import batches  # noqa: E402

from rayft.config import MethodConfig  # noqa: E402
from rayft.methods import Run  # noqa: E402
from rayft.models import resolve_model_path  # noqa: E402
from rayft.models.loading import load_for_training  # noqa: E402
from rayft.train.loop import autocast_context, resolve_precision, token_losses  # noqa: E402


def model_with(model_dir: Path, drop_first: int, precision: str):
    torch.manual_seed(0)
    cfg = MethodConfig.model_validate({"type": "bottleneck", "bottleneck": {
        "placement": "houlsby", "reduction_factor": 16, "drop_first_n": drop_first}})
    # sdpa on both sides: generate() needs a KV cache, which rayft's packed training attention does not take
    return load_for_training(model_dir, cfg, torch.device("cpu"), "sdpa", Run(precision=precision))


def train_rate(model, data, precision) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(batch):
        loss, tokens = token_losses(model, batch, precision)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(data[0])
    start = time.perf_counter()
    for batch in data[1:]:
        step(batch)
    return sum(int(b["real_tokens"]) for b in data[1:]) / (time.perf_counter() - start)


@torch.no_grad()
def forward_rate(model, data, precision) -> float:
    model.eval()
    token_losses(model, data[0], precision)
    start = time.perf_counter()
    for batch in data[1:]:
        token_losses(model, batch, precision)
    return sum(int(b["real_tokens"]) for b in data[1:]) / (time.perf_counter() - start)


@torch.no_grad()
def decode_rate(model, prompts, precision, new_tokens: int = 32) -> float:
    model.eval()
    model.config.use_cache = True
    start = time.perf_counter()
    with autocast_context(precision, torch.device("cpu")):
        model.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.config.use_cache = False
    return prompts["input_ids"].shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop-first", type=int, default=15)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    precision = resolve_precision("auto", torch.device("cpu"))
    model_dir = resolve_model_path("smollm2-135m-instruct")
    data = batches(model_dir, args.steps + 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    prompts = tokenizer(["Extract the person: Ana is 30 and lives in Rome."] * 4, return_tensors="pt", padding=True)
    print(f"precision {precision}, {args.threads} thread(s), rows {tuple(data[1]['input_ids'].shape)}, "
          f"adapters dropped from the first {args.drop_first} layers", flush=True)
    ratios = {"train": [], "forward": [], "decode": []}
    for index in range(args.rounds):
        rates = {}
        for drop in (0, args.drop_first):
            model = model_with(model_dir, drop, precision)
            rates[drop] = {"train": train_rate(model, data, precision), "forward": forward_rate(model, data, precision),
                           "decode": decode_rate(model, prompts, precision)}
        for kind in ratios:
            ratios[kind].append(rates[args.drop_first][kind] / rates[0][kind])
        print(f"round {index + 1}: " + "; ".join(
            f"{kind} {rates[0][kind]:.0f} -> {rates[args.drop_first][kind]:.0f} tokens/s ({ratios[kind][-1]:.3f}x)"
            for kind in ratios), flush=True)
    print("median speed-up of the dropped adapter over the undropped one: " +
          ", ".join(f"{kind} {statistics.median(values):.3f}x" for kind, values in ratios.items()))


if __name__ == "__main__":
    main()
