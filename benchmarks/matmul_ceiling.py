"""The highest MFU a LoRA training step of SmolLM2-135M can reach on this machine: the step's own
matmuls, each timed alone at its real shape, with every other operation taken as free.

    .venv/bin/python benchmarks/matmul_ceiling.py [--threads 2] [--tokens 1024] [--rank 16]

train_throughput.py reports MFU as (model FLOPs per token x real tokens/s) / the bf16 matmul
peak of a 2048 x 2048 x 2048 product. A step's matmuls are far smaller (576 wide for SmolLM2),
and a small product runs below the peak. This script times, in the compute precision, every
product of one step over --tokens tokens (4 rows of 256 by default, train_throughput.py's batch):
- the base's: each linear layer's forward (tokens x in x out) and its input gradient (tokens x
  out x in), and the LM head's forward and input gradient on every token (what the MFU's
  FLOPs count), in the head's chunks of rows as rayft computes it;
- the adapter's: LoRA's A and B forwards and their three backward products each (input and
  weight gradients), which the MFU's FLOPs leave out (they are ~7% of them) but a step must run.

It prints each shape's GFLOP/s and two ceilings: the MFU if the step ran only the base's
products at these speeds, and if it ran the adapter's too. The MFU of train_throughput.py cannot
exceed the second without some operation running faster than it does here alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_throughput import lora_flops_per_token, matmul_peak_flops  # noqa: E402

from rayft.models import resolve_model_path  # noqa: E402
from rayft.train.head_loss import _CHUNK_ELEMENTS  # noqa: E402


def seconds_per_product(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """The best time of an (m x k) @ (k x n) product: a machine's noise only slows it."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    inner = max(1, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP per timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()

    from transformers import AutoConfig

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path("smollm2-135m-instruct")
    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, layers, t, r = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, args.tokens, args.rank
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    peak = matmul_peak_flops(dtype, args.threads)
    print(f"{args.precision}, {args.threads} thread(s), {t} tokens, LoRA r={r}; "
          f"peak (2048^3) {peak / 1e9:.0f} GFLOP/s")

    def timed(label: str, m: int, k: int, n: int, times: float) -> float:
        seconds = seconds_per_product(m, k, n, dtype)
        print(f"  {label:28s} {m:5d} x {k:5d} x {n:5d}  {2 * m * k * n / seconds / 1e9:7.0f} GFLOP/s  x{times:g}")
        return seconds * times

    base = adapter = 0.0
    for name, (fan_in, fan_out) in linears.items():
        base += timed(f"{name} forward", t, fan_in, fan_out, layers)
        base += timed(f"{name} input gradient", t, fan_out, fan_in, layers)
        adapter += timed(f"{name} A forward", t, fan_in, r, layers)
        adapter += timed(f"{name} B forward", t, r, fan_out, layers)
        adapter += timed(f"{name} B weight gradient", fan_out, t, r, layers)
        adapter += timed(f"{name} A output gradient", t, fan_out, r, layers)
        adapter += timed(f"{name} A weight gradient", r, t, fan_in, layers)
        adapter += timed(f"{name} input gradient via A", t, r, fan_in, layers)
    chunk = _CHUNK_ELEMENTS["cpu"] // cfg.vocab_size  # rayft's head runs chunk by chunk (train/head_loss.py)
    base += timed("head forward (one chunk)", chunk, h, cfg.vocab_size, t / chunk)
    base += timed("head input gradient (chunk)", chunk, cfg.vocab_size, h, t / chunk)

    model_flops = lora_flops_per_token(model_dir) * t
    print(f"base products: {base:.3f} s per step -> ceiling {t / base:.0f} tokens/s, MFU {model_flops / base / peak:.3f}")
    print(f"with the adapter's: {base + adapter:.3f} s per step -> ceiling {t / (base + adapter):.0f} tokens/s, "
          f"MFU {model_flops / (base + adapter) / peak:.3f}")


if __name__ == "__main__":
    main()
