"""Serving adapter kinds mixed in one batch: LoRA, DoRA, IA3 and prompt-tuning rows together, against the base and peft.

    .venv/bin/python benchmarks/serve_kinds.py [--per-kind 4] [--clients 16] [--requests 64] [--new-tokens 32]
        [--rounds 3] [--steps 32] [--virtual-tokens 8]

One invocation, one model (SmolLM2-135M-Instruct, fp32 on CPU / bf16 on GPU), random (non-identity)
adapters made with peft and saved as peft saves them, --per-kind of each kind:

  LoRA  rank 16, all linear layers (A ~ N(0, 1/in), B ~ N(0, 0.02^2), alpha 32)
  DoRA  the same plus peft's magnitude vector (its init, ||W + s B A|| per column, times 1 + N(0, 0.05^2))
  IA3   k_proj, v_proj (output scales) and down_proj (input scale), vectors 1 + N(0, 0.1^2)
  PT    prompt tuning (peft's PromptTuningConfig, CAUSAL_LM), --virtual-tokens 8 virtual tokens whose
        embeddings are drawn like the model's token embeddings (per hidden dimension, the mean and
        standard deviation of the model's embedding matrix)

Per-module rank LoRA (AdaLoRA's export) runs LoRA's path (the same kernel, a rank per module)
and P-tuning v1 serves as prompt tuning (fixed embeddings); neither is measured apart.

C closed-loop clients (each sends its next request when the previous one ends; by default 16,
the batch size), each request's adapter drawn uniformly from all the adapters (so a batch of 16
rows mixes the four kinds), greedy decoding of exactly --new-tokens tokens (no end-of-sequence
stop). Every path runs through the same engine (the batching loop of a rayft Serve replica),
in-process, with the same requests (each client's prompts, adapters and order are seeded), and
tokens/s counts the tokens the clients receive, alike on every path:

  rayft  batches mix adapters of every kind; rayft's batched layers (serve/lora.py,
         y = s * (W (x * i) + B A x) + t per row; on CPU in fp32 the C kernel for the B A term),
         and each prompt-tuning row's virtual-token embeddings put before its prompt in the
         prefill (engine.py), rows of different prefix lengths left-padded in one batch
  base   the base model alone, no adapters (same engine, same model): the ceiling
  peft   one adapter at a time: peft has no mixed batch for DoRA or IA3 (its `adapter_names`
         forward refuses DoRA, and IA3 has none), and one PeftModel cannot hold LoRA and IA3
         adapters together, so two PeftModels (LoRA + DoRA adapters on one copy of the base,
         IA3 adapters on another) with all adapters loaded; the engine batches only requests
         of one adapter (`mix_adapters=False`, as serve_multi_lora.py's naive path) and
         `set_adapter` selects it before the batch. DoRA under peft runs with peft's own
         DoraCaching enabled (B A and the column norms cached in eval mode, its fast inference
         setting), so peft is measured at its best.
         Prompt tuning differs: peft's prompt-learning model prepends the virtual tokens inside
         its forward and handles the cache only in its own `generate`, so it cannot run through
         the engine step by step. A third PeftModel (on a third copy of the base) holds the
         prompt-tuning adapters; the engine still queues and batches the requests (one adapter
         per batch, the worker running one batch at a time, whatever its kind), and a batch of
         one prompt-tuning adapter's requests runs as one call of peft's `generate` (greedy,
         exactly --new-tokens new tokens: min_new_tokens = max_new_tokens; prompts left-padded),
         its tokens delivered when the call returns. With this peft (0.21.2) and transformers
         (5.24), peft's cached `generate` for prompt tuning is right for the first new token only:
         later tokens differ from its own forward without a cache (which rayft's tokens equal;
         not traced further, a known kind of peft/transformers mismatch over the cache).
         The work per token is that of any cached decoding step, so it is timed as it is;
         use_cache=False would give peft's right tokens at a quadratic cost, an unfair baseline.

The three paths run in --rounds alternating rounds (rayft, base, peft, rayft, ...) and the
medians are reported, each ratio the median of the rounds' ratios (this machine's speed drifts
within one invocation). Goals (issue 16): rayft/base >= 0.85 (0.9), rayft/peft >= 2.

Then the cost of one decoding step per kind, without the engine's loop around it: a 16-row
decode step whose rows are all LoRA, all DoRA, all IA3, all prompt tuning (each over its kind's
adapters, rows cycling through them), the mixed batch, and the base. Each repeat prefills a
40-token prompt per row with the engine's own prefill (a prompt-tuning row's virtual tokens
before it, so its cache holds 40 + --virtual-tokens positions), then times --steps steps; layouts
in alternating order, 3 repeats after a warm-up: the median step of each and what it adds to the
base's, and the median prefill. A prompt-tuning row adds nothing to a decoding step's layers
(no per-layer term): only its longer cache, and the prefill's extra positions. In the mixed
layout the other rows are left-padded to the prompt-tuning rows' length, and padded rows make
a step dearer on their own (the masked attention), adapters or not.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_multi_lora import PROMPTS, closed_loop  # noqa: E402  (also puts src/ on the path)

from rayft.models import base_fingerprint, resolve_model_path  # noqa: E402
from rayft.serve.engine import (_ANY, Engine, GenerationRequest, _deliver, batched_lora_model,  # noqa: E402
                                load_base_model)
from rayft.serve.lora import load_adapter  # noqa: E402
from rayft.serve.validate import BaseShape, check_fits_base, inspect_adapter  # noqa: E402

KINDS = ("lora", "dora", "ia3", "prompt_tuning")
LABEL = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prompt_tuning": "PT"}
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]


def make_adapter(model_dir: Path, target: Path, kind: str, rank: int, seed: int, virtual_tokens: int) -> Path:
    """One random adapter of `kind`, built and saved by peft (as training would save it)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if kind == "prompt_tuning":
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    elif kind == "ia3":
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
        if kind == "prompt_tuning":  # drawn like the token embeddings: their per-dimension mean and spread
            vocabulary = model.get_input_embeddings().weight
            for param in model.prompt_encoder.parameters():
                param.copy_(vocabulary.mean(0) + vocabulary.std(0) * torch.randn_like(param))
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


class PeftEngine(Engine):
    """The peft path's engine: one adapter per batch (mix_adapters=False). A batch of LoRA, DoRA
    or IA3 rows runs step by step as in rayft's engine; a batch of one prompt-tuning adapter's
    requests runs as one call of peft's own `generate` (its prompt-learning model prepends the
    virtual tokens inside forward and handles the cache only there)."""

    def __init__(self, *args, prompt_model, prompt_names: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_model = prompt_model
        self.prompt_names = prompt_names  # LoadedAdapter id -> peft adapter name

    def _prompt_learning(self, request) -> bool:
        return request.adapter is not None and id(request.adapter) in self.prompt_names

    def _take_batch(self, limit: int, adapter=_ANY, loop=None) -> list:
        # a step-by-step batch whose rows all ended must not take prompt-tuning requests in: the
        # worker returns, and the batching loop hands them to _run as a batch of their own
        if loop is not None and adapter is _ANY:
            with self._pending_lock:
                waiting = [request for request in self._pending if not request.cancelled]
            if waiting and self._prompt_learning(waiting[0]):
                return []
        return super()._take_batch(limit, adapter, loop)

    def _run(self, batch: list, loop) -> None:
        if not self._prompt_learning(batch[0]):
            return super()._run(batch, loop)
        try:
            events = self._generate(batch)
        except Exception as exc:
            events = [(request, ("error", f"generation failed: {exc}")) for request in batch]
        loop.call_soon_threadsafe(_deliver, events)

    @torch.inference_mode()
    def _generate(self, batch: list) -> list:
        self.prompt_model.set_adapter(self.prompt_names[id(batch[0].adapter)])
        width = max(len(request.prompt_ids) for request in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(batch):  # left padding
            ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids):] = 1
        new = max(request.max_new_tokens for request in batch)
        out = self.prompt_model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_token_id)
        events = []
        for request, row in zip(batch, out[:, -new:].tolist()):
            if request.cancelled:
                continue
            events += [(request, ("token", token)) for token in row[:request.max_new_tokens]]
            events.append((request, ("end", "length")))
            self.metrics.tokens(request.model, request.max_new_tokens)
        return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=4,
                        help="adapters of each kind (LoRA, DoRA, IA3, prompt tuning)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--virtual-tokens", type=int, default=8, help="prompt tuning's virtual tokens")
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
    warnings.filterwarnings("ignore", message="Position ids are not supported")  # peft's prompt tuning generate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                          tokenize=False), add_special_tokens=False)["input_ids"]
                  for p in PROMPTS]
    print(f"model {args.model} on {device} ({dtype}), {torch.get_num_threads()} threads; clients {args.clients}, "
          f"batch {args.batch}, {args.requests} requests x {args.new_tokens} tokens; {args.per_kind} adapters each of "
          f"LoRA r{args.rank}, DoRA r{args.rank}, IA3 ({', '.join(IA3_TARGETS)}), prompt tuning (PT, "
          f"{args.virtual_tokens} virtual tokens)")
    print("peft path: LoRA, DoRA and IA3 step by step in the engine, one adapter per batch; prompt tuning by peft's "
          "own generate\n  (cached, greedy, exactly the new tokens), one adapter's requests per call: its "
          "prompt-learning model cannot run step by step", flush=True)

    ours = load_base_model(model_dir, dtype, device)
    base = BaseShape.of_model(ours, base_fingerprint(model_dir))
    lora = batched_lora_model(ours)
    print(f"rayft's layers: {'the C kernel' if lora.kernel is not None else 'per-row stacks'}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {kind: [make_adapter(model_dir, Path(scratch) / f"{kind}{i}", kind, args.rank, seed=100 * k + i,
                                     virtual_tokens=args.virtual_tokens)
                        for i in range(args.per_kind)] for k, kind in enumerate(KINDS)}
        loaded = {}
        for kind in KINDS:
            loaded[kind] = []
            for i, path in enumerate(paths[kind]):
                spec = inspect_adapter(path, 64, 2**31)
                check_fits_base(spec, base)
                assert spec.kind == kind, (spec.kind, kind)
                loaded[kind].append(load_adapter(spec, f"bench/{kind}{i}@1", dtype, device, base_layers=lora.layers))
        # peft: LoRA and DoRA adapters in one PeftModel, IA3 in another, prompt tuning in a third
        # (peft cannot combine the types)
        groups = {"lora_dora": [(kind, i) for kind in ("lora", "dora") for i in range(args.per_kind)],
                  "ia3": [("ia3", i) for i in range(args.per_kind)],
                  "prompt_tuning": [("prompt_tuning", i) for i in range(args.per_kind)]}
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
    prompt_model = peft_models.pop("prompt_tuning")
    prompt_names = {id(loaded["prompt_tuning"][i]): f"prompt_tuning{i}" for i in range(args.per_kind)}
    peft_model = PeftModels(peft_models)
    DoraCaching()(enabled=True)  # peft's DoRA inference cache (eval mode): peft at its best

    # each kind in turn, so every batch of 16 mixes them
    mixed = [loaded[kind][i] for i in range(args.per_kind) for kind in KINDS]
    engine = lambda model, backend, mix: Engine(model, backend, [], tokenizer.pad_token_id,  # noqa: E731
                                                args.batch, batch_wait_ms=5, mix_adapters=mix)
    paths_under_test = {
        "rayft": (engine(ours, lora, True), mixed),
        "base": (engine(ours, lora, True), [None]),
        "peft": (PeftEngine(peft_model, PeftOneAdapter(peft_model, names), [], tokenizer.pad_token_id, args.batch,
                            batch_wait_ms=5, mix_adapters=False, prompt_model=prompt_model, prompt_names=prompt_names),
                 mixed),
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

    steps, prefills = step_costs(paths_under_test["rayft"][0], lora, loaded, mixed, args, device)

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
    print(f"one decoding step, {args.batch} rows (median of {3 * args.steps} steps per layout; PT = prompt tuning, "
          f"its rows' caches {args.virtual_tokens} positions longer), and the prefill of 40-token prompts (median of 3):")
    for layout, ms in steps.items():
        print(f"  {layout:6s} {ms:7.2f} ms  {ms - base_ms:+6.2f} ms over the base ({100 * (ms / base_ms - 1):+.1f}%)  "
              f"base/this {base_ms / ms:.2f}   prefill {prefills[layout]:7.1f} ms "
              f"({100 * (prefills[layout] / prefills['base'] - 1):+.1f}%)")


def step_costs(engine, lora, loaded: dict, mixed: list, args, device) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of one decoding step with every row of one kind, the mix, and the base; and of
    the prefill before the steps (the engine's, prompt-tuning rows' virtual tokens included)."""
    rows = {"base": [None] * args.batch,
            **{LABEL[kind]: [loaded[kind][i % len(loaded[kind])] for i in range(args.batch)] for kind in KINDS},
            "mixed": [mixed[i % len(mixed)] for i in range(args.batch)]}
    prompt = torch.randint(100, 1000, (args.batch, 40), generator=torch.Generator().manual_seed(0)).tolist()
    times = {layout: [] for layout in rows}
    prefill_times = {layout: [] for layout in rows}
    with torch.inference_mode():
        for repeat in range(4):  # the first warms up
            for layout, adapters in rows.items():
                lora.clear()  # the base: no rows appended, the layers plain
                if layout != "base":
                    lora.append(adapters)
                extra = lora.use(0, len(adapters)) if layout != "base" else {}
                prefill, measured = decode_steps_from_prefill(
                    engine, [GenerationRequest(ids, args.steps, "bench", a) for ids, a in zip(prompt, adapters)],
                    extra, args.steps, device)
                if repeat:
                    times[layout] += measured
                    prefill_times[layout].append(prefill)
    lora.clear()
    median_ms = lambda found: {layout: 1000 * statistics.median(t) for layout, t in found.items()}  # noqa: E731
    return median_ms(times), median_ms(prefill_times)


def decode_steps_from_prefill(engine, requests: list, extra: dict, steps: int, device) -> tuple[float, list[float]]:
    """lora_layouts.decode_steps after the engine's own prefill of `requests` (so prompt-tuning rows
    have their virtual tokens): the prefill's seconds and each step's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    logits, cache, mask = engine._prefill(requests, extra)
    sync()
    prefill = time.perf_counter() - started
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((len(requests), 1))], dim=1)
        sync()
        started = time.perf_counter()
        logits = engine.model(input_ids=logits.argmax(-1)[:, None], attention_mask=mask,
                              position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True,
                              **extra).logits[:, -1]
        sync()
        times.append(time.perf_counter() - started)
    return prefill, times


if __name__ == "__main__":
    main()
