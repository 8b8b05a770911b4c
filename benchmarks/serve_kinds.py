"""Serving adapter kinds mixed in one batch: LoRA, DoRA and IA3 rows together, against the base and peft.

    .venv/bin/python benchmarks/serve_kinds.py [--per-kind 4] [--clients 16] [--requests 64] [--new-tokens 32]
        [--rounds 3] [--steps 32]

One invocation, one model (SmolLM2-135M-Instruct, fp32 on CPU / bf16 on GPU), random (non-identity)
adapters made with peft and saved as peft saves them, --per-kind of each kind:

  LoRA  rank 16, all linear layers (A ~ N(0, 1/in), B ~ N(0, 0.02^2), alpha 32)
  DoRA  the same plus peft's magnitude vector (its init, ||W + s B A|| per column, times 1 + N(0, 0.05^2))
  IA3   k_proj, v_proj (output scales) and down_proj (input scale), vectors 1 + N(0, 0.1^2)

The mix covers LoRA, DoRA and IA3 only: no prompt-tuning rows, which issue 16's brief also
names. This benchmark was written while prompt tuning was still refused, and serving it landed
(4f41e1e) during that work. Per-module
rank LoRA (AdaLoRA's export) runs LoRA's path (the same kernel, a rank per module) and is not
measured apart.

C closed-loop clients (each sends its next request when the previous one ends; by default 16,
the batch size), each request's adapter drawn uniformly from all the adapters (so a batch of 16
rows mixes the three kinds), greedy decoding of exactly --new-tokens tokens (no end-of-sequence
stop). Every path runs through the same engine (the batching loop of a rayft Serve replica),
in-process, with the same requests (each client's prompts, adapters and order are seeded):

  rayft  batches mix adapters of every kind; rayft's batched layers (serve/lora.py,
         y = s * (W (x * i) + B A x) + t per row; on CPU in fp32 the C kernel for the B A term)
  base   the base model alone, no adapters (same engine, same model): the ceiling
  peft   one adapter at a time: peft has no mixed batch for DoRA or IA3 (its `adapter_names`
         forward refuses DoRA, and IA3 has none), and one PeftModel cannot hold LoRA and IA3
         adapters together, so two PeftModels (LoRA + DoRA adapters on one copy of the base,
         IA3 adapters on another) with all adapters loaded; the engine batches only requests
         of one adapter (`mix_adapters=False`, as serve_multi_lora.py's naive path) and
         `set_adapter` selects it before the batch. DoRA under peft runs with peft's own
         DoraCaching enabled (B A and the column norms cached in eval mode, its fast inference
         setting), so peft is measured at its best.

The three paths run in --rounds alternating rounds (rayft, base, peft, rayft, ...) and the
medians are reported, each ratio the median of the rounds' ratios (this machine's speed drifts
within one invocation). Goals (issue 16): rayft/base >= 0.85 (0.9), rayft/peft >= 2.

Then the cost of one decoding step per kind, without the engine around it: a 16-row decode step
whose rows are all LoRA, all DoRA, all IA3 (each over its kind's adapters, rows cycling through
them), the mixed batch, and the base, a 40-token prompt then --steps timed steps per repeat,
layouts in alternating order, 3 repeats after a warm-up: the median step of each, and what it
adds to the base's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_layouts import decode_steps  # noqa: E402
from serve_multi_lora import PROMPTS, closed_loop  # noqa: E402  (also puts src/ on the path)

from rayft.models import base_fingerprint, resolve_model_path  # noqa: E402
from rayft.serve.engine import Engine, batched_lora_model, load_base_model  # noqa: E402
from rayft.serve.lora import load_adapter  # noqa: E402
from rayft.serve.validate import BaseShape, check_fits_base, inspect_adapter  # noqa: E402

KINDS = ("lora", "dora", "ia3")
LABEL = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]


def make_adapter(model_dir: Path, target: Path, kind: str, rank: int, seed: int) -> Path:
    """One random adapter of `kind`, built and saved by peft (as training would save it)."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if kind == "ia3":
        config = IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"])
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                            init_lora_weights=False, use_dora=kind == "dora")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.normal_(0, param.shape[1] ** -0.5)
            elif "lora_B" in name:
                param.normal_(0, 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn_like(param))
            elif "ia3_l" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(target)
    return target


class PeftModels(torch.nn.Module):
    """The peft path's model: the PeftModel holding the running batch's adapter, selected by PeftOneAdapter."""

    def __init__(self, models: dict):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)
        self.current = next(iter(models))

    def forward(self, **kwargs):
        return self.models[self.current](**kwargs)


class PeftOneAdapter:
    """The peft path's backend: every row of a batch has one adapter (the engine runs with
    mix_adapters=False); selects that adapter in its PeftModel when the rows come."""

    def __init__(self, model: PeftModels, names: dict):
        self.model = model
        self.names = names  # LoadedAdapter id -> (PeftModels key, peft adapter name)
        self.adapter = None

    def append(self, row_adapters) -> None:
        wanted = {id(a) for a in row_adapters} | ({id(self.adapter)} if self.adapter is not None else set())
        if len(wanted) != 1:
            raise RuntimeError("the peft path runs one adapter per batch")
        if self.adapter is None:
            self.adapter = row_adapters[0]
            key, name = self.names[id(self.adapter)]
            self.model.current = key
            self.model.models[key].set_adapter(name)

    def keep(self, order) -> None:
        if not order:  # every row ended: the next rows may be another adapter's
            self.adapter = None

    def use(self, start: int, stop: int) -> dict:
        return {}

    def clear(self) -> None:
        self.adapter = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=4, help="adapters of each kind (LoRA, DoRA, IA3)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of rayft, base and peft (0: the step costs alone)")
    parser.add_argument("--steps", type=int, default=32, help="timed decoding steps per layout and repeat")
    args = parser.parse_args()

    from peft import PeftModel
    from peft.helpers import DoraCaching
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                          tokenize=False), add_special_tokens=False)["input_ids"]
                  for p in PROMPTS]
    print(f"model {args.model} on {device} ({dtype}), {torch.get_num_threads()} threads; clients {args.clients}, "
          f"batch {args.batch}, {args.requests} requests x {args.new_tokens} tokens; {args.per_kind} adapters each of "
          f"LoRA r{args.rank}, DoRA r{args.rank}, IA3 ({', '.join(IA3_TARGETS)})")
    print("prompt tuning not in the mix (this benchmark covers LoRA, DoRA and IA3)", flush=True)

    ours = load_base_model(model_dir, dtype, device)
    base = BaseShape.of_model(ours, base_fingerprint(model_dir))
    lora = batched_lora_model(ours)
    print(f"rayft's layers: {'the C kernel' if lora.kernel is not None else 'per-row stacks'}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {kind: [make_adapter(model_dir, Path(scratch) / f"{kind}{i}", kind, args.rank, seed=100 * k + i)
                        for i in range(args.per_kind)] for k, kind in enumerate(KINDS)}
        loaded = {}
        for kind in KINDS:
            loaded[kind] = []
            for i, path in enumerate(paths[kind]):
                spec = inspect_adapter(path, 64, 2**31)
                check_fits_base(spec, base)
                assert spec.kind == kind, (spec.kind, kind)
                loaded[kind].append(load_adapter(spec, f"bench/{kind}{i}@1", dtype, device, base_layers=lora.layers))
        # peft: LoRA and DoRA adapters in one PeftModel, IA3 in another (peft cannot combine the types)
        groups = {"lora_dora": [(kind, i) for kind in ("lora", "dora") for i in range(args.per_kind)],
                  "ia3": [("ia3", i) for i in range(args.per_kind)]}
        peft_models, names = {}, {}
        for key, members in groups.items():
            model = None
            for kind, i in members:
                name = f"{kind}{i}"
                if model is None:
                    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
                    model = PeftModel.from_pretrained(hf.to(device), paths[kind][i], adapter_name=name)
                else:
                    model.load_adapter(paths[kind][i], adapter_name=name)
                names[id(loaded[kind][i])] = (key, name)
            peft_models[key] = model.eval()
    peft_model = PeftModels(peft_models)
    DoraCaching()(enabled=True)  # peft's DoRA inference cache (eval mode): peft at its best

    # each kind in turn, so every batch of 16 mixes them
    mixed = [loaded[kind][i] for i in range(args.per_kind) for kind in KINDS]
    engine = lambda model, backend, mix: Engine(model, backend, [], tokenizer.pad_token_id,  # noqa: E731
                                                args.batch, batch_wait_ms=5, mix_adapters=mix)
    paths_under_test = {
        "rayft": (engine(ours, lora, True), mixed),
        "base": (engine(ours, lora, True), [None]),
        "peft": (engine(peft_model, PeftOneAdapter(peft_model, names), False), mixed),
    }
    for name, (runner, picks) in paths_under_test.items():
        asyncio.run(closed_loop(runner, picks, args.batch, args.batch, prompt_ids, 4))  # warm-up
        runner.wait_idle()  # rayft and base share the model and its batched layers
    runs = {name: [] for name in paths_under_test}
    for name in [*paths_under_test] * args.rounds:
        runner, picks = paths_under_test[name]
        result = asyncio.run(closed_loop(runner, picks, args.clients, args.requests, prompt_ids, args.new_tokens))
        runner.wait_idle()
        runs[name].append(result)
        print(f"{name:6s} {result['tokens_per_s']:8.1f} tok/s  p50 {result['p50_s']:6.2f} s  p99 {result['p99_s']:6.2f} s  "
              f"({result['requests']} requests, {result['seconds']:.0f} s)", flush=True)

    steps = step_costs(ours, lora, loaded, mixed, args, device)

    print()
    if args.rounds:
        medians = {name: {key: statistics.median(r[key] for r in results) for key in ("tokens_per_s", "p50_s", "p99_s")}
                   for name, results in runs.items()}
        print("medians of {} rounds: ".format(args.rounds) + "  ".join(
            f"{name} {m['tokens_per_s']:.1f} tok/s p50 {m['p50_s']:.2f} s p99 {m['p99_s']:.2f} s" for name, m in medians.items()))
        for name in ("rayft", "base", "peft"):
            print(f"  {name} rounds: " + " / ".join(f"{r['tokens_per_s']:.1f}" for r in runs[name]) + " tok/s")
        of_base = [a["tokens_per_s"] / c["tokens_per_s"] for a, c in zip(runs["rayft"], runs["base"])]
        of_peft = [a["tokens_per_s"] / p["tokens_per_s"] for a, p in zip(runs["rayft"], runs["peft"])]
        ratio_base, ratio_peft = statistics.median(of_base), statistics.median(of_peft)
        verdict_base = "goal 0.9 met" if ratio_base >= 0.9 else "floor 0.85 met, goal 0.9 not" if ratio_base >= 0.85 \
            else "floor 0.85 NOT met"
        print(f"rayft mixed kinds / base alone: {ratio_base:.2f} (rounds {', '.join(f'{r:.2f}' for r in of_base)}; "
              f">= 0.85, goal 0.9: {verdict_base})")
        print(f"rayft mixed kinds / peft one adapter at a time: {ratio_peft:.2f} (rounds "
              f"{', '.join(f'{r:.2f}' for r in of_peft)}; goal >= 2: {'met' if ratio_peft >= 2 else 'NOT met'})")
    base_ms = steps["base"]
    print(f"one decoding step, {args.batch} rows (median of {3 * args.steps} steps per layout):")
    for layout, ms in steps.items():
        print(f"  {layout:6s} {ms:7.2f} ms  {ms - base_ms:+6.2f} ms over the base ({100 * (ms / base_ms - 1):+.1f}%)  "
              f"base/this {base_ms / ms:.2f}")


def step_costs(model, lora, loaded: dict, mixed: list, args, device) -> dict[str, float]:
    """Median ms of one decoding step with every row of one kind, the mix, and the base."""
    rows = {"base": None, **{LABEL[kind]: [loaded[kind][i % len(loaded[kind])] for i in range(args.batch)]
                             for kind in KINDS}, "mixed": [mixed[i % len(mixed)] for i in range(args.batch)]}
    times = {layout: [] for layout in rows}
    with torch.inference_mode():
        for repeat in range(4):  # the first warms up
            for layout, adapters in rows.items():
                lora.clear()
                if adapters is not None:
                    lora.append(adapters)
                    lora.use(0, len(adapters))
                measured = decode_steps(model, args.batch, args.steps, device)
                if repeat:
                    times[layout] += measured
    lora.clear()
    return {layout: 1000 * statistics.median(measured) for layout, measured in times.items()}


if __name__ == "__main__":
    main()
