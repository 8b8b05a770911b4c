"""One decoding step of a mixed-adapter batch under several LoRA layouts, against the base alone.

    .venv/bin/python benchmarks/lora_layouts.py [--batch 16] [--adapters 16] [--rank 16] [--repeats 3]

Where the serving gap to the base model comes from, without the engine around it: SmolLM2-135M
(fp32 on CPU, bf16 on GPU), a batch of rows whose adapters are drawn Zipf(1.1) from N random
rank-r all-linear adapters, a 40-token prompt, then 32 timed decoding steps per repeat; the
median step is reported per layout, in alternating order so drift hits all alike:

  base      no adapter
  kernel    rayft's CPU path (serve/kernel.py, fp32): per layer one call of a C kernel that reads
            each adapter of the batch in place, once, for all its rows
  per-row   rayft's path elsewhere (serve/lora.py): A and B stacked per row, one bmm + baddbmm
            per layer
  grouped   rows grouped by adapter, padded to the largest group: each adapter read once per
            step, one bmm pair per layer, plus a gather of the inputs and of the outputs
  masked    the batch's distinct adapters concatenated along the rank: two plain matmuls and a
            per-row mask (every row computes every adapter's products)
  loop      one matmul pair per distinct adapter on its rows (peft's way, without peft)
  fused     per-row stacks, but layers that read the same input (q/k/v, gate/up) share one
            A-side bmm over their ranks concatenated: 4 instead of 7 A-side bmm per block

The alternatives live here, not in the package: they were measured and not kept.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rayft.models import base_fingerprint, resolve_model_path  # noqa: E402
from rayft.serve.engine import batched_lora_model, load_base_model  # noqa: E402
from rayft.serve.kernel import cpu_lora_kernel  # noqa: E402
from rayft.serve.lora import BatchLoRA, LoadedAdapter, MultiLoRALinear  # noqa: E402
from rayft.serve.validate import BaseShape  # noqa: E402


def grouped_forward(layer: MultiLoRALinear, x: torch.Tensor, rows) -> torch.Tensor:
    gather, slot, a, b = rows
    out = layer.base(x)
    batch, tokens = x.shape[0], x.shape[1]
    grouped = x.reshape(batch, -1).index_select(0, gather).view(a.shape[0], -1, x.shape[-1])
    y = torch.bmm(torch.bmm(grouped, a), b).view(-1, tokens * out.shape[-1])
    return out.view(batch, -1).add_(y.index_select(0, slot)).view(out.shape)


def masked_forward(layer: MultiLoRALinear, x: torch.Tensor, rows) -> torch.Tensor:
    a_cat, b_cat, mask = rows
    return layer.base(x).add_(torch.matmul(x, a_cat).mul_(mask) @ b_cat)


def loop_forward(layer: MultiLoRALinear, x: torch.Tensor, rows) -> torch.Tensor:
    out = layer.base(x)
    for index, a, b in rows:
        out.index_add_(0, index, (x.index_select(0, index) @ a) @ b)
    return out


def fused_forward(layer: MultiLoRALinear, x: torch.Tensor, rows) -> torch.Tensor:
    shared, a_fused, columns, b = rows
    if shared.get("x") is not x:  # the first of the layers that read this input computes x @ A for all
        shared["x"], shared["h"] = x, torch.bmm(x, a_fused)
    return layer.base(x).baddbmm_(shared["h"][..., columns], b)


def set_layout(lora, layout: str, rows: list, device) -> None:
    """Puts each wrapped layer's rows for `layout` in place (and its forward)."""
    distinct = list(dict.fromkeys(rows))
    members = [[i for i, a in enumerate(rows) if a is u] for u in distinct]
    for layer in lora.layers.values():
        layer.__dict__.pop("forward", None)
        layer.rows = layer.plan = None
    if layout in ("base", "per-row", "kernel"):
        if layout != "base":
            backend = BatchLoRA(lora.layers, cpu_lora_kernel() if layout == "kernel" else None)
            backend.append(rows)
            backend.use(0, len(rows))
        return
    if layout == "grouped":
        width = max(map(len, members))
        gather = torch.tensor([g[j] if j < len(g) else g[0] for g in members for j in range(width)], device=device)
        slot = torch.empty(len(rows), dtype=torch.long)
        for k, group in enumerate(members):
            for j, i in enumerate(group):
                slot[i] = k * width + j
        slot = slot.to(device)
    if layout == "masked":
        rank = distinct[0].rank
        mask = torch.zeros(len(rows), 1, len(distinct) * rank, device=device, dtype=next(iter(distinct[0].weights.values()))[0].dtype)
        for k, group in enumerate(members):
            mask[group, 0, k * rank:(k + 1) * rank] = 1
    if layout == "loop":
        indices = [torch.tensor(group, device=device) for group in members]
    if layout == "fused":
        siblings = {}  # (block, input group) -> names of the layers that read that input
        for name in lora.layers:
            block, _, leaf = name.rpartition(".")
            group = "qkv" if leaf in ("q_proj", "k_proj", "v_proj") else "gate_up" if leaf in ("gate_proj", "up_proj") else leaf
            siblings.setdefault((block, group), []).append(name)
        for names in siblings.values():
            shared, a_fused = {}, torch.cat([torch.stack([u.weights[n][0] for u in rows]) for n in names], -1)
            at = 0
            for name in names:
                rank = rows[0].weights[name][0].shape[1]
                layer_rows = (shared, a_fused, slice(at, at + rank), torch.stack([u.weights[name][1] for u in rows]))
                lora.layers[name].forward = lambda x, layer=lora.layers[name], r=layer_rows: fused_forward(layer, x, r)
                at += rank
        return
    forward = {"grouped": grouped_forward, "masked": masked_forward, "loop": loop_forward}[layout]
    for name, layer in lora.layers.items():
        a_of, b_of = [u.weights[name][0] for u in distinct], [u.weights[name][1] for u in distinct]
        if layout == "grouped":
            layer_rows = (gather, slot, torch.stack(a_of), torch.stack(b_of))
        elif layout == "masked":
            layer_rows = (torch.cat(a_of, 1), torch.cat(b_of, 0), mask)
        else:
            layer_rows = list(zip(indices, a_of, b_of))
        layer.forward = lambda x, layer=layer, layer_rows=layer_rows: forward(layer, x, layer_rows)


def decode_steps(model, batch: int, steps: int, device) -> list[float]:
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (batch, 40), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logits = model(input_ids=logits.argmax(-1)[:, None], attention_mask=mask,
                       position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True).logits[:, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = resolve_model_path(args.model)
    model = load_base_model(model_dir, dtype, device)
    base = BaseShape.of_model(model, base_fingerprint(model_dir))
    lora = batched_lora_model(model)
    generator = torch.Generator().manual_seed(0)
    adapters = [LoadedAdapter(f"a{i}", args.rank, {
        module: ((torch.randn(fan_in, args.rank, generator=generator) / fan_in ** 0.5).to(device, dtype),
                 (torch.randn(args.rank, fan_out, generator=generator) * 0.02).to(device, dtype))
        for module, (fan_in, fan_out) in base.linear_shapes.items()}) for i in range(args.adapters)]
    rows = random.Random(1).choices(adapters, weights=[1 / (k + 1) ** 1.1 for k in range(args.adapters)], k=args.batch)
    print(f"{args.model} on {device} ({dtype}), {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{len(set(map(id, rows)))} distinct of {args.adapters} adapters, rank {args.rank}")

    layouts = ["base", "per-row", "grouped", "masked", "loop", "fused"]
    if device.type == "cpu" and dtype == torch.float32 and cpu_lora_kernel() is not None:
        layouts.insert(1, "kernel")
    steps = {layout: [] for layout in layouts}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # the first round warms up
            for layout in layouts:
                set_layout(lora, layout, rows, device)
                times = decode_steps(model, args.batch, 32, device)
                if repeat:
                    steps[layout] += times
    set_layout(lora, "base", rows, device)
    base_ms = 1000 * statistics.median(steps["base"])
    for layout in layouts:
        ms = 1000 * statistics.median(steps[layout])
        print(f"{layout:8s} decode step {ms:7.2f} ms (median of {len(steps[layout])})  base/this {base_ms / ms:.2f}")


if __name__ == "__main__":
    main()
