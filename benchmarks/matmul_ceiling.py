"""The highest MFU a LoRA training step of SmolLM2-135M can reach on this machine: the step's own
matmuls, each timed alone at its real shape and then replayed in the step's order, with every
other operation taken as free.

    .venv/bin/python benchmarks/matmul_ceiling.py [--threads 2] [--tokens 1024] [--rank 16]
        [--processes 2] [--learned-fraction 0.31]

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
products at these speeds, and if it ran the adapter's too.

Timed alone, a product reuses one weight and one input that stay in the caches. A step does not:
every layer has its own weights (212 MB in bf16 for SmolLM2), read once in the forward and once
in the backward, and its own activations. So the script then replays the same products in the
step's order, each layer's with its own tensors (the forward through the layers, then the
backward in reverse), and times that whole sequence: the ceiling of the matmuls as the step
meets them. It replays three steps: the base's products only, with the adapter's, and rayft's
(the head only on the tokens that learn, as rayft computes it: the share in train_throughput.py's
rows unless --learned-fraction says otherwise). With --processes above 1 (the default: --threads)
the last two also run in that many one-thread processes at once, as train_throughput.py's workers
do, against the peak of as many threads. train_throughput.py's rayft cannot make more real tokens/s
than rayft's replay in its 2 processes without some product running faster than it does there
(compare tokens/s: each run measures its own peak).
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

    def products() -> None:
        for _ in range(inner):
            a @ b

    return best_seconds(products, repeats, warm_up=False) / inner


def step_order_products(t: int, linears: dict, layers: int, rank: int, head: tuple[int, int, int, int],
                        dtype: torch.dtype, adapter: bool):
    """One step's products replayed in the step's order (a function to call), each layer with its
    own weights, adapter and activations (allocated up front, as a step holds its activations).
    `adapter`: also LoRA's products, as rayft's fused layers run them (forward: an addmm that adds
    s (x A^T) B^T to the base's output; backward: the input gradient through the base and through
    A as two products, and A's and B's weight gradients). `head`: (the rows
    the head computes, its chunk of rows, hidden size, vocabulary)."""
    head_rows, chunk, hidden, vocab = head
    weights = [{name: (torch.randn(fan_out, fan_in, dtype=dtype), torch.randn(rank, fan_in, dtype=dtype),
                       torch.randn(fan_out, rank, dtype=dtype), torch.randn(t, fan_in, dtype=dtype),
                       torch.randn(t, rank, dtype=dtype), torch.randn(t, fan_out, dtype=dtype))
                for name, (fan_in, fan_out) in linears.items()} for _ in range(layers)]
    head_weight, normed = torch.randn(vocab, hidden, dtype=dtype), torch.randn(head_rows, hidden, dtype=dtype)

    def step() -> None:
        for layer in weights:  # forward (A's output is kept for B's gradient: `xa`, as a step keeps it)
            for weight, a, b, x, _, _ in layer.values():
                torch.addmm(x @ weight.T, x @ a.T, b.T) if adapter else x @ weight.T
        for row in range(0, head_rows, chunk):  # the head, chunk by chunk: logits, then their input gradient
            (normed[row:row + chunk] @ head_weight.T) @ head_weight
        for layer in reversed(weights):  # backward: the input gradient; the adapter's A and B gradients
            for weight, a, b, x, xa, grad in layer.values():
                if adapter:  # the two input gradients' sum is autograd's, not a matmul: free here
                    grad_xa = grad @ b
                    grad @ weight, grad_xa @ a
                    grad.T @ xa, grad_xa.T @ x
                else:
                    grad @ weight

    return step


def best_seconds(step, repeats: int = 3, warm_up: bool = True) -> float:
    if warm_up:
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def _replay_worker(barrier, args) -> float:
    torch.set_num_threads(1)
    step = step_order_products(*args)
    step()  # warm up before the others start timing
    barrier.wait()
    return best_seconds(step, warm_up=False)


def step_order_in_processes(processes: int, args: tuple) -> list[float]:
    """The replay's best time in each of `processes` one-thread processes at once, as train_throughput.py's
    workers run: each its own step, sharing the machine's caches and memory bandwidth."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(processes) as pool:
        barrier = manager.Barrier(processes)
        return pool.starmap(_replay_worker, [(barrier, args)] * processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--processes", type=int, default=None,
                        help="also replay the step in this many one-thread processes at once (default: --threads)")
    parser.add_argument("--learned-fraction", type=float, default=None,
                        help="the share of tokens the head runs on (default: that of train_throughput.py's rows)")
    args = parser.parse_args()

    from transformers import AutoConfig

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    args.processes = args.processes or args.threads
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path("smollm2-135m-instruct")
    cfg = AutoConfig.from_pretrained(model_dir)
    h, i, layers, t, r = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, args.tokens, args.rank
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    linears = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
               "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    peak = matmul_peak_flops(dtype, args.threads)
    # the processes' peak: as many threads in one process, as train_throughput.py measures it
    process_peak = peak
    if args.processes != args.threads:
        process_peak = matmul_peak_flops(dtype, args.processes)
        torch.set_num_threads(args.threads)  # matmul_peak_flops set its own
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
    learned = args.learned_fraction if args.learned_fraction is not None else learned_fraction(model_dir)
    replays = [("base products, the head on every token", False, t),
               ("with the adapter's, the head on every token", True, t),
               (f"with the adapter's, the head on the learned tokens ({learned:.0%}): rayft's step", True,
                round(t * learned))]
    print("in the step's order, each layer's own tensors:")
    for label, adapter, head_rows in replays:
        replay = (t, linears, layers, r, (head_rows, chunk, h, cfg.vocab_size), dtype, adapter)
        alone = best_seconds(step_order_products(*replay))
        print(f"  {label}: {alone:.3f} s per step -> ceiling {t / alone:.0f} tokens/s, "
              f"MFU {model_flops / alone / peak:.3f}")
        if args.processes > 1 and adapter:
            seconds = step_order_in_processes(args.processes, replay)
            tokens_per_s = sum(t / s for s in seconds)
            print(f"    in {args.processes} one-thread processes at once: "
                  f"{', '.join(f'{s:.3f}' for s in seconds)} s per step -> ceiling {tokens_per_s:.0f} tokens/s, "
                  f"MFU {model_flops / t * tokens_per_s / process_peak:.3f}")


def learned_fraction(model_dir: Path) -> float:
    """The share of real tokens that learn (the assistant's) in train_throughput.py's rows (the
    demo's extraction task, as train_step.py builds them): where rayft's head runs. The MFU's
    FLOPs count the head on every token."""
    from train_step import batches

    rows = batches(model_dir, 8)
    return sum(int((b["labels"] != -100).sum()) for b in rows) / sum(int(b["real_tokens"]) for b in rows)


if __name__ == "__main__":
    main()
