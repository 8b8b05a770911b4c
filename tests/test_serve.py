"""Serving: mixed-adapter batching, adapter checks, hot swap, tenants, limits, the openai client.

The engine tests run in-process; the rest go through real HTTP to `rayft serve` (Ray Serve on the
session's Ray instance, on 127.0.0.1) with the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RAYFT, _free_port, run_cli
from tiny import build_other_tiny_model, make_ia3_adapter, make_lora_adapter, make_prompt_tuning_adapter

from rayft.serve.engine import EngineMetrics

PROMPTS = ["Hello there, how are you?", "The capital of France is", "SELECT"]


# ------------------------------------------------------------------ engine, in-process
class Batches(EngineMetrics):
    """Keeps each batch's (rows, distinct adapters)."""

    def __init__(self):
        self.seen = []

    def batch(self, rows, adapters):
        self.seen.append((rows, adapters))


class Pausing(Batches):
    """Metrics whose hook, once armed, holds the engine's worker thread where it is called until
    the test sets `resume` (and tells the test's event loop through `paused`)."""

    def __init__(self):
        import threading

        super().__init__()
        self.armed, self.loop = False, None
        self.paused, self.resume = asyncio.Event(), threading.Event()

    def pause_once(self) -> None:
        if self.armed:
            self.armed = False
            self.loop.call_soon_threadsafe(self.paused.set)
            assert self.resume.wait(timeout=120)


def _kernel_available() -> bool:
    from rayft.serve.kernel import c_compiler

    return c_compiler() is not None


def _engine(model_dir: Path, use_kernel: bool = True, metrics=None, device=torch.device("cpu"), **kwargs):
    from transformers import AutoTokenizer

    from rayft.models import base_fingerprint
    from rayft.serve.engine import Engine, batched_lora_model, load_base_model
    from rayft.serve.validate import BaseShape

    if use_kernel:
        _built_kernel()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base_model(model_dir, torch.float32, device)
    base = BaseShape.of_model(model, base_fingerprint(model_dir))  # before the layers are wrapped
    metrics = metrics or Batches()
    lora = batched_lora_model(model, use_kernel)
    assert (lora.kernel is not None) == use_kernel
    engine = Engine(model, lora, [tokenizer.eos_token_id], tokenizer.pad_token_id, metrics=metrics, **kwargs)
    return engine, tokenizer, base, metrics


def _built_kernel():
    """The CPU LoRA kernel; a skip only where no C compiler exists (serving then runs on the
    stacks), a failure where one exists and the build fails."""
    from rayft.serve.kernel import c_compiler, cpu_lora_kernel

    if c_compiler() is None:
        pytest.skip("no C compiler here: the batched-LoRA kernel cannot be built")
    kernel = cpu_lora_kernel()
    assert kernel is not None, "a C compiler is present but the batched-LoRA kernel did not build (see the log)"
    return kernel


def _load(path: Path, base, model_id: str, engine=None, device=torch.device("cpu")):
    from rayft.serve.lora import load_adapter
    from rayft.serve.validate import check_fits_base, inspect_adapter

    spec = inspect_adapter(path, 64, 10**9)
    check_fits_base(spec, base)
    return load_adapter(spec, model_id, torch.float32, device, engine and engine.backend.layers)


async def _tokens(engine, requests):
    async def one(request):
        return [event[1] async for event in engine.generate(request) if event[0] == "token"]

    return await asyncio.gather(*[one(r) for r in requests])


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu-kernel", "per-row-stacks"])
def test_mixed_batch_equals_solo_and_peft(tiny_model, tmp_path, use_kernel):
    """Rows of different adapters (and the base) in one batch give the tokens each gives alone,
    and those are the tokens peft's own model generates (ranks 4/8/16, rsLoRA included), on both
    LoRA paths: the CPU kernel and the stacks that GPUs and half precision run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rayft.serve.engine import GenerationRequest

    paths = [make_lora_adapter(tiny_model, tmp_path / f"a{i}", r=r, seed=i, use_rslora=i == 1)
             for i, r in enumerate([4, 8, 16])]
    engine, tokenizer, base, metrics = _engine(tiny_model, use_kernel, max_batch_size=16, batch_wait_ms=50)
    adapters = [None] + [_load(p, base, f"t/a{i}@1") for i, p in enumerate(paths)]

    def request(prompt, adapter):
        return GenerationRequest(tokenizer(prompt)["input_ids"], 10, "m", adapter)

    pairs = [(p, a) for p in PROMPTS for a in adapters]
    solo = [asyncio.run(_tokens(engine, [request(p, a)]))[0] for p, a in pairs]
    assert all(rows == 1 for rows, _ in metrics.seen)
    metrics.seen.clear()
    mixed = asyncio.run(_tokens(engine, [request(p, a) for p, a in pairs]))
    assert metrics.seen == [(len(pairs), 3)]  # one batch, three adapters and the base
    assert mixed == solo
    for i, adapter_path in enumerate([None, *paths]):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, adapter_path)
        ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
        reference = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        assert solo[i] == reference[:len(solo[i])] and len(solo[i]) > 0


def every_kind(model_dir: Path, folder: Path) -> dict[str, Path]:
    """One adapter of each served kind, with random (non-identity) weights, as peft saves them."""
    return {
        "lora": make_lora_adapter(model_dir, folder / "lora", r=4, seed=1),
        "dora": make_lora_adapter(model_dir, folder / "dora", r=4, seed=2, use_dora=True),
        "rank-pattern": make_lora_adapter(model_dir, folder / "rank-pattern", r=4, seed=3,  # AdaLoRA's export form
                                          rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 8}),
        "ia3": make_ia3_adapter(model_dir, folder / "ia3", seed=4),
        "prompt-tuning": make_prompt_tuning_adapter(model_dir, folder / "prompt-tuning", virtual_tokens=5, seed=5),
    }


def every_kind_mixed_equals_solo(engine, tokenizer, metrics, loaded: dict):
    """Rows of every loaded adapter and of the base, two prompts each, in one batch: each row's
    greedy tokens are the ones it gives alone. Returns (rows, their tokens, a request builder)."""
    from rayft.serve.engine import GenerationRequest

    rows = [(prompt, kind) for prompt in PROMPTS[:2] for kind in [None, *loaded]]

    def request(prompt, kind):
        return GenerationRequest(tokenizer(prompt)["input_ids"], 10, "m", loaded.get(kind))

    solo = [asyncio.run(_tokens(engine, [request(p, k)]))[0] for p, k in rows]
    metrics.seen.clear()
    mixed = asyncio.run(_tokens(engine, [request(p, k) for p, k in rows]))
    assert metrics.seen == [(len(rows), len(loaded))]  # one batch: every kind of adapter and the base
    assert mixed == solo
    return rows, solo, request


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu-kernel", "per-row-stacks"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # Qwen2's q/k/v biases: DoRA keeps them, IA3 scales them
def test_every_kind_in_one_batch_equals_solo_and_peft(tiny_model, tiny_qwen2, tmp_path, use_kernel, arch):
    """LoRA, DoRA, per-module ranks, IA3 and prompt-tuning adapters and the base, rows of one
    batch (prompts of different lengths, 5 virtual tokens before some): each row gives the greedy
    tokens it gives alone, and those are peft's own model's tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model if arch == "llama" else tiny_qwen2
    paths = every_kind(model_dir, tmp_path)
    if use_kernel and not _kernel_available():
        pytest.skip("no C compiler here: the per-row-stacks case covers the kinds")
    engine, tokenizer, base, metrics = _engine(model_dir, use_kernel, max_batch_size=16, batch_wait_ms=50)
    loaded = {kind: _load(path, base, f"t/{kind}@1", engine) for kind, path in paths.items()}
    assert {kind: a.kind for kind, a in loaded.items()} == {"lora": "lora", "dora": "dora", "ia3": "ia3",
                                                             "rank-pattern": "lora_rank_pattern",
                                                             "prompt-tuning": "prompt_tuning"}
    rows, solo, request = every_kind_mixed_equals_solo(engine, tokenizer, metrics, loaded)
    first_logits = {}
    for (prompt, kind), tokens in zip(rows, solo):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if kind is not None:
            model = PeftModel.from_pretrained(model, paths[kind])
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        reference = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        assert tokens == reference[:len(tokens)] and len(tokens) > 0, (prompt, kind)
        if prompt == PROMPTS[0]:  # the next-token logits too: the tiny model's greedy tokens often repeat
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, -1]
            first_logits[kind] = _prefill_logits(engine, request(prompt, kind))
            torch.testing.assert_close(first_logits[kind], expected, rtol=1e-4, atol=1e-4, msg=str(kind))
    for kind in paths:  # every kind changes the output
        assert not torch.allclose(first_logits[kind], first_logits[None], atol=1e-3), kind


@pytest.mark.parametrize("block", [
    {"type": "adalora", "adalora": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1}},
    {"type": "p_tuning", "p_tuning": {"num_virtual_tokens": 6, "encoder_hidden": 32}},
    {"type": "lora", "lora": {"r": 4, "init": "pissa", "dropout": 0.0}},
], ids=["adalora", "p_tuning", "pissa"])
def test_rayft_trained_outputs_serve_like_peft_loads_them(tiny_model, tmp_path, block):
    """Outputs as rayft's training exports them (AdaLoRA as a LoRA with a rank pattern, P-tuning as
    its encoder's embeddings, PiSSA as a plain LoRA of the unmodified base; each with rayft.json
    naming its kind) publish and serve with the logits of the method's own reload."""
    from test_catalogue import write_output

    from rayft.config import MethodConfig
    from rayft.methods import get_method
    from rayft.serve.engine import GenerationRequest

    out = write_output(tiny_model, block, tmp_path / "out", seed=3)
    cfg = MethodConfig.model_validate(block)
    meta = json.loads((out / "rayft.json").read_text())
    meta["serve_kind"] = get_method(cfg.type).serve_kind(cfg.options)
    (out / "rayft.json").write_text(json.dumps(meta))
    engine, tokenizer, base, _ = _engine(tiny_model, _kernel_available())
    adapter = _load(out, base, "t/out@1", engine)
    assert adapter.kind == meta["serve_kind"]
    from transformers import AutoModelForCausalLM

    reference = get_method(cfg.type).load_output(out, AutoModelForCausalLM.from_pretrained(tiny_model)).eval()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(_prefill_logits(engine, GenerationRequest(ids, 4, "m", adapter)), expected,
                               rtol=1e-4, atol=1e-4)


def _prefill_logits(engine, request) -> torch.Tensor:
    """The engine's next-token logits for one request after its prefill (its adapter's rows set up
    as the batching loop does)."""
    engine.backend.append([request.adapter])
    try:
        with torch.inference_mode():
            return engine._prefill([request], engine.backend.use(0, 1))[0][0].clone()
    finally:
        engine.backend.clear()


def test_requests_join_a_running_batch(tiny_model, tmp_path):
    """Requests arriving while a long one decodes join its batch at the next step (one shorter
    prompt, one longer than the running rows' cache; ranks 8 and 4), end in order of length as the
    rows leave (a leaving row's place is taken by a later row), and every request gives the tokens
    it gives alone. Joining needs no kernel: without a C compiler it runs on the stacks."""
    from rayft.serve.engine import GenerationRequest

    engine, tokenizer, base, metrics = _engine(tiny_model, _kernel_available(), max_batch_size=4, batch_wait_ms=1)
    engine.eos_token_ids = set()  # every request runs to its max_new_tokens
    adapter = _load(make_lora_adapter(tiny_model, tmp_path / "a", r=8, seed=3), base, "t/a@1")
    other = _load(make_lora_adapter(tiny_model, tmp_path / "b", r=4, seed=4), base, "t/b@1")
    long_prompt = tokenizer(" ".join([PROMPTS[0]] * 12))["input_ids"]
    requests = {  # name -> (prompt, max_new_tokens, adapter)
        "long": (tokenizer(PROMPTS[0])["input_ids"], 40, None),
        "short": (tokenizer(PROMPTS[1])["input_ids"], 3, adapter),
        "long-prompt": (long_prompt, 9, other),
    }
    assert len(long_prompt) > len(requests["long"][0]) + 40

    def request(name):
        prompt, new_tokens, lora = requests[name]
        return GenerationRequest(prompt, new_tokens, "m", lora)

    solo = {name: asyncio.run(_tokens(engine, [request(name)]))[0] for name in requests}
    metrics.seen.clear()

    async def together():
        ended, decoding = [], asyncio.Event()

        async def run(name):
            if name != "long":
                await decoding.wait()
            tokens = []
            async for kind, value in engine.generate(request(name)):
                if kind == "token":
                    tokens.append(value)
                    if len(tokens) == 2:
                        decoding.set()
            ended.append(name)
            return name, tokens

        return dict(await asyncio.gather(*[run(name) for name in requests])), ended

    tokens, ended = asyncio.run(together())
    assert tokens == solo
    assert ended == ["short", "long-prompt", "long"]
    assert metrics.seen[0] == (1, 0) and len(metrics.seen) in (2, 3)


@pytest.mark.parametrize("tokens", [1, 7])
def test_lora_kernel_matches_torch(tokens):
    """The CPU kernel adds (x @ A) @ B row by row: ranks with and without a fixed-size path, sizes
    that are not multiples of its blocks, an adapter on more rows than one work item holds, rows
    without an adapter, and several tokens per row (prefill) as well as one (decoding)."""
    from rayft.serve.lora import BatchLoRA, LoadedAdapter, MultiLoRALinear

    generator = torch.Generator().manual_seed(0)
    layers = {"wide": MultiLoRALinear(torch.nn.Linear(70, 83)), "narrow": MultiLoRALinear(torch.nn.Linear(83, 9))}
    adapters = [LoadedAdapter(f"a{rank}", rank, {
        name: (torch.randn(layer.base.in_features, rank, generator=generator) / layer.base.in_features ** 0.5,
               torch.randn(rank, layer.base.out_features, generator=generator) / rank ** 0.5)
        for name, layer in layers.items() if rank != 5 or name == "wide"})  # rank 5 adapts one layer only
        for rank in (4, 5, 16, 64, 100)]
    joined = [adapters[2]] * 6 + [None, adapters[0], adapters[1], adapters[3], adapters[4], adapters[2], None]
    lora = BatchLoRA(layers, _built_kernel())
    lora.append(joined[:4])
    lora.append(joined[4:])
    order = [0, 1, 2, len(joined) - 1, *range(4, len(joined) - 1)]  # row 3 left, the last row took its place
    lora.keep(order)
    rows = [joined[i] for i in order]
    x = torch.randn(len(rows), tokens, 70, generator=generator)
    with torch.inference_mode():
        lora.use(0, len(rows))
        got = layers["narrow"](layers["wide"](x))
        lora.clear()
        plain_wide = layers["wide"](x)
    expected_wide = plain_wide.clone()
    for i, adapter in enumerate(rows):
        if adapter is not None:
            a, b = adapter.weights["wide"]
            expected_wide[i] += (x[i] @ a) @ b
    expected = layers["narrow"].base(expected_wide)
    for i, adapter in enumerate(rows):
        if adapter is not None and "narrow" in adapter.weights:
            a, b = adapter.weights["narrow"]
            expected[i] += (expected_wide[i] @ a) @ b
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, summed in another order


def test_lora_kernel_refuses_autograd():
    from rayft.serve.lora import BatchLoRA, LoadedAdapter, MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(8, 8))
    lora = BatchLoRA({"layer": layer}, _built_kernel())
    lora.append([LoadedAdapter("a", 4, {"layer": (torch.zeros(8, 4), torch.zeros(4, 8))})])
    with pytest.raises(RuntimeError, match="inference_mode"):
        lora.use(0, 1)


@pytest.mark.parametrize("case", ["no-compiler", "failed-build"])
def test_lora_kernel_falls_back_to_the_stacks(monkeypatch, caplog, tmp_path, case):
    """Both ways the kernel can be missing end on the stacks with one warning that says which:
    no C compiler at all (none in $CC or on PATH), or a compiler whose build fails (`false`)."""
    import shutil

    from rayft.serve import kernel

    if case == "no-compiler":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no cc, no gcc
        assert kernel.c_compiler() is None
    else:
        monkeypatch.setenv("CC", shutil.which("false"))
        monkeypatch.setenv("RAYFT_HOME", str(tmp_path))  # no kernel cached from an earlier build
    with caplog.at_level("WARNING"):
        assert kernel.cpu_lora_kernel.__wrapped__() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "per-row stacks" in warnings[0]
    assert ("no C compiler found" in warnings[0]) == (case == "no-compiler")
    assert ("did not build" in warnings[0]) == (case == "failed-build")


def test_adapter_cache_loads_once_and_evicts_lru():
    from rayft.serve.engine import AdapterCache
    from rayft.serve.lora import LoadedAdapter

    loads = []

    def load(model_id):
        loads.append(model_id)
        return LoadedAdapter(model_id, 4, {})

    cache = AdapterCache(load, capacity=2)

    async def scenario():
        first = await asyncio.gather(*[cache.get("t/a@1") for _ in range(5)])  # one cold adapter, 5 requests
        assert len({id(a) for a in first}) == 1 and loads == ["t/a@1"]
        await cache.get("t/b@1")
        await cache.get("t/a@1")  # a is now the most recently used
        await cache.get("t/c@1")  # evicts b
        assert cache.resident() == ["t/a@1", "t/c@1"]
        await cache.get("t/b@1")
        assert loads == ["t/a@1", "t/b@1", "t/c@1", "t/b@1"]
        await cache.get("t/a@2")  # a newer version replaces the old one
        assert "t/a@1" not in cache.resident()

    asyncio.run(scenario())


def test_adapter_names_refuse_paths():
    from rayft.serve.validate import AdapterError, check_name

    for bad in ["../evil", "a/b", ".hidden", "", "x" * 65, "a..b", "na me"]:
        with pytest.raises(AdapterError):
            check_name(bad)
    assert check_name("support-bot_v2.1") == "support-bot_v2.1"


def test_adapter_cache_counts_hits_and_loads_apart():
    """A cold adapter is a load, not a hit (its concurrent waiters neither); a resident one is a
    hit; each load reports the seconds it took."""
    from rayft.serve.engine import AdapterCache
    from rayft.serve.lora import LoadedAdapter

    class Counts(EngineMetrics):
        def __init__(self):
            self.hits, self.loads = [], []

        def adapter_cache_hit(self, model):
            self.hits.append(model)

        def adapter_load(self, model, seconds):
            self.loads.append((model, seconds))

    metrics = Counts()
    cache = AdapterCache(lambda model_id: LoadedAdapter(model_id, 4, {}), capacity=2, metrics=metrics)

    async def scenario():
        await asyncio.gather(*[cache.get("t/a@1") for _ in range(3)])
        assert metrics.hits == [] and [m for m, _ in metrics.loads] == ["t/a@1"]
        await cache.get("t/a@1")
        assert metrics.hits == ["t/a@1"] and len(metrics.loads) == 1 and metrics.loads[0][1] > 0

    asyncio.run(scenario())


# ------------------------------------------------------------------ the HTTP API, in-process
def _local_api(model_dir: Path, tmp_path: Path, metrics=None, max_batch_size: int = 16, batch_wait_ms: float = 10,
               **limits):
    """The real HTTP API (Frontend + FastAPI app) over a real Engine and AdapterCache in this
    process: what `rayft serve` runs, without Ray Serve's hop between ingress and replica. No auth
    keys: the caller is tenant "default", an admin."""
    from rayft.config import ServeConfig
    from rayft.serve.api import Frontend, create_app
    from rayft.serve.engine import AdapterCache, adapter_loader
    from rayft.serve.registry import AdapterRegistry

    engine, tokenizer, base, metrics = _engine(model_dir, _kernel_available(), metrics, max_batch_size=max_batch_size,
                                               batch_wait_ms=batch_wait_ms)
    cfg = ServeConfig.model_validate({"base_model": str(model_dir), "registry": str(tmp_path / "registry"),
                                      "limits": limits})
    cache = AdapterCache(adapter_loader(AdapterRegistry(cfg.registry), base, 64, 10**9, torch.float32,
                                        torch.device("cpu"), engine.backend.layers), capacity=4)

    async def replica(model_id, payload):  # LoRAEngine.generate, less the Serve routing
        adapter = await cache.get(model_id) if model_id else None
        async for event in engine.serve(payload, adapter):
            yield event

    frontend = Frontend(cfg, tokenizer, "tiny", base, replica)
    return create_app(frontend), engine, frontend, cache, metrics


def _client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rayft", timeout=120)


def _sse_texts(body: str) -> dict[int, str]:
    """Joined text per choice index of a completions event stream."""
    texts: dict[int, str] = {}
    lines = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_completions_serve_a_batch_of_prompts(tiny_model, tmp_path):
    """A list of prompts (text or token ids) is one batch: one row each, one choice each at the
    prompt's index, each the text the prompt gets alone; streaming too."""
    app, engine, frontend, _, metrics = _local_api(tiny_model, tmp_path)
    engine.eos_token_ids = set()  # every row runs to its max_tokens
    token_prompts = [frontend.tokenizer(p)["input_ids"] for p in PROMPTS]

    async def scenario():
        async with _client(app) as client:
            async def complete(prompt, **extra):
                response = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                                      "max_tokens": 6, "temperature": 0, **extra})
                assert response.status_code == 200, response.text
                return response

            solo = [(await complete(p)).json()["choices"][0]["text"] for p in PROMPTS]
            metrics.seen.clear()
            batch = (await complete(PROMPTS)).json()
            assert metrics.seen == [(len(PROMPTS), 0)]  # one batch, a row per prompt
            assert [c["index"] for c in batch["choices"]] == list(range(len(PROMPTS)))
            assert [c["text"] for c in batch["choices"]] == solo
            assert batch["usage"]["prompt_tokens"] == sum(len(ids) for ids in token_prompts)
            assert batch["usage"]["completion_tokens"] == 6 * len(PROMPTS)
            by_ids = (await complete(token_prompts)).json()
            assert [c["text"] for c in by_ids["choices"]] == solo
            streamed = await complete(PROMPTS, stream=True)
            assert _sse_texts(streamed.text) == dict(enumerate(solo))
            empty = await client.post("/v1/completions", json={"model": "tiny", "prompt": [PROMPTS[0], ""]})
            assert empty.status_code == 400 and empty.json()["error"]["message"] == "prompt[1] is empty"

    asyncio.run(scenario())


def test_prompt_and_max_tokens_must_fit_the_context(tiny_model, tmp_path):
    """The tiny model's context is 1024 tokens: a prompt of 1000 tokens may ask for 24 new ones,
    not 25 (400 naming both numbers); without max_tokens a chat gets what the context leaves."""
    app, engine, frontend, _, _ = _local_api(tiny_model, tmp_path, max_prompt_tokens=2000, max_new_tokens=2000)
    assert frontend.base.context_tokens == 1024
    prompt = [frontend.tokenizer.eos_token_id + 1] * 1000

    async def scenario():
        async with _client(app) as client:
            fits = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24})
            assert fits.status_code == 200, fits.text
            over = await client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 25})
            error = over.json()["error"]
            assert over.status_code == 400 and error["code"] == "context_length_exceeded", over.text
            assert "1000 tokens" in error["message"] and "max_tokens is 25" in error["message"] \
                and "1024" in error["message"] and error["param"] == "max_tokens"

    asyncio.run(scenario())
    chat = frontend.max_new_tokens(_chat_body(), [prompt])
    assert chat == 24


def _chat_body():
    from rayft.serve.api import ChatBody

    return ChatBody.model_validate({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "What is the weather in Oslo?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 3}'}]


def _trained_prompt_ids(tokenizer, tools=TOOLS) -> list[int]:
    """TOOL_CHAT's prompt as training renders it: the record through data/formats.py, then data/tools.py."""
    from rayft.data.formats import to_conversations
    from rayft.data.tools import render

    (conversation,) = to_conversations([{"messages": TOOL_CHAT, **({"tools": tools} if tools else {})}], "messages",
                                       "request")
    text = render(tokenizer, conversation.messages, conversation.tools, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_tools_render_as_trained_and_replies_parse_as_calls(tiny_model):
    """A chat with tools, an assistant's call and the tool's result is the prompt training renders
    for that record (the fallback, and a template with tool support, whose call arguments arrive
    as an object); tool_choice "none" renders no tools. A reply holding a <tool_call> comes back
    as OpenAI tool_calls with finish_reason "tool_calls", whole or streamed in the delta form."""
    from transformers import AutoTokenizer

    from rayft.config import ServeConfig
    from rayft.serve.api import ChatBody, Frontend, _sse, chat_choice
    from rayft.serve.validate import BaseShape

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    frontend = Frontend(ServeConfig.model_validate({"base_model": str(tiny_model), "registry": "unused"}), tokenizer,
                        "tiny", BaseShape("f", {}, 1024), engine=None)

    def prompt(**extra):
        body = ChatBody.model_validate({"model": "tiny", "messages": TOOL_CHAT, "tools": TOOLS, **extra})
        return frontend.prompts(body)[0]

    served = prompt()
    assert served == _trained_prompt_ids(tokenizer)
    assert "<tools>" in tokenizer.decode(served) and '"arguments": {"city": "Oslo"}' in tokenizer.decode(served)
    assert prompt(tool_choice="none") == _trained_prompt_ids(tokenizer, tools=None) != served
    tokenizer.chat_template = (  # a template with tool support of its own
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}{% for m in messages %}<{{ m.role }}>"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.arguments | tojson }}{% endfor %}{{ m.content }}\n"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    native = tokenizer.decode(prompt())
    assert native == 'TOOL weather\n<user>What is the weather in Oslo?\n<assistant>CALL {"city": "Oslo"}\n' \
        '<tool>{"temp_c": 3}\n<assistant>' and prompt() == _trained_prompt_ids(tokenizer)

    reply = 'Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    choice = chat_choice(reply, "stop", TOOLS)
    (call,) = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    only_call = chat_choice(reply.removeprefix("Checking.\n"), "stop", TOOLS)
    assert only_call["message"]["content"] is None and only_call["finish_reason"] == "tool_calls"
    assert chat_choice(reply, "stop", None)["message"] == {"role": "assistant", "content": reply}
    broken = reply.replace('"Oslo"}}', '"Oslo"')  # not JSON: the reply stays text
    answer = '{"name": "Alice", "age": 30}'  # a JSON answer, no call of an offered tool: text
    for text in (broken, answer):
        assert chat_choice(text, "length", TOOLS) == {
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}

    async def streamed():
        async def events():
            for token in tokenizer(reply, add_special_tokens=False)["input_ids"]:
                yield ("token", token, 0)
            yield ("end", "stop", 0)

        frontend.in_flight = 1
        return [json.loads(line[6:]) for line in "".join([c async for c in _sse(
            frontend, events(), [], 1, True, "chatcmpl-x", 0, "tiny", TOOLS)]).splitlines()
            if line.startswith("data: {")]

    chunks = asyncio.run(streamed())
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[1] == {"content": "Checking."}
    (streamed_call,) = deltas[2]["tool_calls"]
    assert streamed_call["index"] == 0 and streamed_call["function"] == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and frontend.in_flight == 0


def test_streamed_text_is_decoded_incrementally(tiny_model, tmp_path):
    """A 512-token answer streams the text of one full decode of its tokens, while the tokenizer
    decodes a bounded number of ids per token (re-decoding the output at each token would be
    about 131,000 ids); multi-byte characters split across tokens and stop strings as well."""
    from rayft.serve.engine import GenerationRequest

    app, engine, frontend, _, _ = _local_api(tiny_model, tmp_path, max_new_tokens=512)
    engine.eos_token_ids = set()  # the answer runs to its 512 tokens
    tokenizer = frontend.tokenizer
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    ids = asyncio.run(_tokens(engine, [GenerationRequest(prompt_ids, 512, "m")]))[0]
    assert len(ids) == 512
    decoded_ids = []
    decode = tokenizer.decode

    def counting_decode(token_ids, **kwargs):
        decoded_ids.append(len(token_ids))
        return decode(token_ids, **kwargs)

    tokenizer.decode = counting_decode

    async def scenario():
        async with _client(app) as client:
            response = await client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0],
                                                                  "max_tokens": 512, "temperature": 0, "stream": True})
            return _sse_texts(response.text)[0]

    streamed = asyncio.run(scenario())
    assert streamed == decode(ids, skip_special_tokens=True)
    assert sum(decoded_ids) < 16 * 512, sum(decoded_ids)

    async def events(token_ids):
        for token in token_ids:
            yield ("token", token, 0)
        yield ("end", "length", 0)

    async def pieces(token_ids, stop=()):
        return [piece async for piece in frontend.texts(events(token_ids), list(stop))]

    text = "Grüße aus Köln, 東京 and 🎉🎉 done. ¿Qué? 🇫🇷"
    token_ids = [tokenizer.bos_token_id or 1, *tokenizer(text)["input_ids"], tokenizer.eos_token_id, 33]
    full = decode(token_ids, skip_special_tokens=True)
    got = asyncio.run(pieces(token_ids))
    assert "".join(p[1] for p in got) == full and len(got) > 5 and "\ufffd" not in full
    cut = asyncio.run(pieces(token_ids, stop=["🎉", "Qué"]))
    assert "".join(p[1] for p in cut) == full[:full.index("🎉")] and cut[-1][2] == "stop"
    halves = asyncio.run(pieces(tokenizer("🎉")["input_ids"][:-1]))  # an unfinished character, as decode shows it
    assert "".join(p[1] for p in halves) == decode(tokenizer("🎉")["input_ids"][:-1], skip_special_tokens=True)


def test_openapi_describes_the_request_bodies(tiny_model, tmp_path):
    """Each POST documents its JSON body, every $ref resolves, and the contract is the parser's:
    a body the schema refuses answers 400 in the error shape, naming the field."""
    app, *_ = _local_api(tiny_model, tmp_path)

    async def scenario():
        async with _client(app) as client:
            document = (await client.get("/openapi.json")).json()
            bad = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 3})
            return document, bad

    document, bad = asyncio.run(scenario())
    schemas = document["components"]["schemas"]
    for path, model in [("/v1/completions", "CompletionBody"), ("/v1/chat/completions", "ChatBody"),
                        ("/v1/adapters", "AdapterBody")]:
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
    assert {"model", "prompt", "max_tokens", "stop", "seed"} <= set(schemas["CompletionBody"]["properties"])
    assert set(schemas["CompletionBody"]["required"]) == {"model", "prompt"}
    assert schemas["AdapterBody"]["additionalProperties"] is False
    refs = {ref for ref in _refs(document)}
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs), refs
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_hot_swap_while_requests_run(tiny_model, tmp_path):
    """A request streaming on version 1 of an adapter keeps version 1 to its last token while the
    adapter is replaced, and the cache drops version 1 for version 2 under it. The swap happens
    mid-stream for sure: a 3-token request in the same batch ends at step 3, and the worker waits
    there (a metrics hook) until the swap is done, with 17 of the long request's 20 tokens to go."""
    adapters = {name: make_lora_adapter(tiny_model, tmp_path / name, r=r, seed=seed)
                for name, r, seed in [("v1", 8, 2), ("v2", 8, 4)]}

    class PauseAtFirstEnd(Pausing):
        def tokens(self, model, count):  # worker thread: a row ended
            self.pause_once()

    metrics = PauseAtFirstEnd()
    app, engine, frontend, cache, _ = _local_api(tiny_model, tmp_path, metrics, max_batch_size=2)
    engine.eos_token_ids = set()  # every request runs to its max_tokens

    async def scenario():
        async with _client(app) as client:
            async def complete(model, max_tokens=20, **extra):
                response = await client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0],
                                                                      "max_tokens": max_tokens, "temperature": 0,
                                                                      **extra})
                assert response.status_code == 200, response.text
                return response

            async def publish(name, made):
                response = await client.post("/v1/adapters", json={"name": name, "source": str(adapters[made])})
                assert response.status_code == 201, response.text
                return response.json()["version"]

            assert await publish("swap", "v1") == 1 and await publish("reference", "v2") == 1
            first = (await complete("swap")).json()["choices"][0]["text"]
            second = (await complete("reference")).json()["choices"][0]["text"]
            assert first != second

            # the last response can arrive before its rows have left the worker thread, which would
            # take the next request in as a joining row (a batch of 1): wait until the worker is idle
            await asyncio.to_thread(engine.wait_idle)
            engine.batch_wait_s = 60  # the batch starts when both requests below are in: max_batch_size=2
            metrics.armed, metrics.loop = True, asyncio.get_running_loop()
            metrics.seen.clear()
            held = asyncio.create_task(complete("swap", stream=True))
            short = asyncio.create_task(complete("tiny", max_tokens=3))
            await metrics.paused.wait()  # the long request is mid-stream, 3 of its 20 tokens made
            engine.batch_wait_s = 0.01  # later requests start at once
            assert metrics.seen == [(2, 1)]
            assert await publish("swap", "v2") == 2
            await cache.get("default/swap@2")  # what the next request for "swap" loads
            assert "default/swap@1" not in cache.resident()
            metrics.resume.set()
            after = (await complete("swap")).json()["choices"][0]["text"]
            assert (await short).json()["usage"]["completion_tokens"] == 3
            return _sse_texts((await held).text)[0], first, second, after

    held, first, second, after = asyncio.run(scenario())
    assert held == first and after == second  # the running request kept version 1, new ones get version 2


def test_prompts_beyond_the_in_flight_limit_get_429_at_once(tiny_model, tmp_path):
    """max_concurrent_requests=10 counts prompts in flight: a batch of 6 (held in the engine: its
    worker waits at the batch's start) and a queued batch of 4 fill it, so one more prompt gets 429
    at once; when they have ended, a request is admitted again."""
    class PauseAtFirstBatch(Pausing):
        def batch(self, rows, adapters):  # worker thread: a batch starts
            super().batch(rows, adapters)
            self.pause_once()

    metrics = PauseAtFirstBatch()
    app, engine, frontend, cache, _ = _local_api(tiny_model, tmp_path, metrics, max_concurrent_requests=10)

    async def scenario():
        async with _client(app) as client:
            def complete(prompts):
                return client.post("/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": 4})

            metrics.armed, metrics.loop = True, asyncio.get_running_loop()
            six = asyncio.create_task(complete([PROMPTS[0]] * 6))
            await metrics.paused.wait()  # 6 prompts in flight, their batch held
            four = asyncio.create_task(complete([PROMPTS[1]] * 4))
            while frontend.in_flight < 10:  # admitted and queued (an ASGI call in this loop: no event to await)
                await asyncio.sleep(0.01)
            refused = await complete(PROMPTS[2])
            metrics.resume.set()
            return refused, await six, await four, await complete(PROMPTS[2])

    refused, six, four, after = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "limit 10" in refused.json()["error"]["message"]
    assert (six.status_code, four.status_code, after.status_code) == (200, 200, 200)
    assert len(six.json()["choices"]) == 6 and len(four.json()["choices"]) == 4 and frontend.in_flight == 0


# ------------------------------------------------------------------ the server, over HTTP
class Server:
    def __init__(self, url: str, keys: dict, root: Path, adapters: dict, console: list[str]):
        self.url, self.keys, self.root, self.adapters = url, keys, root, adapters
        self.console = console  # what `rayft serve` has printed so far

    def client(self, tenant: str):
        import httpx

        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, timeout=120)


@pytest.fixture(scope="module")
def server(ray_address, tiny_model, tmp_path_factory):
    from rayft.serve.keys import create_key

    root = tmp_path_factory.mktemp("serve")
    keys_file = root / "tenants.yaml"
    keys = {"acme": create_key(keys_file, "acme"), "globex": create_key(keys_file, "globex"),
            "ops": create_key(keys_file, "ops", admin=True)}
    adapters = {name: make_lora_adapter(tiny_model, root / "made" / name, r=r, seed=seed)
                for name, r, seed in [("support", 4, 1), ("sql", 8, 2), ("summary", 16, 3), ("support2", 8, 4),
                                      ("huge", 48, 5)]}
    # a training run's output: the adapter plus rayft.json naming its base and MLflow run
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_id = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("t")).info.run_id
    trained = root / "trained-run"
    (trained / "adapter").mkdir(parents=True)
    for f in adapters["support"].iterdir():
        (trained / "adapter" / f.name).write_bytes(f.read_bytes())
    (trained / "adapter" / "rayft.json").write_text(json.dumps({"base_model": str(tiny_model), "mlflow_run_id": run_id}))
    (trained / "run.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    registry = root / "registry"
    published = run_cli("adapters", "publish", str(trained), "--name", "support-bot", "--tenant", "acme",
                        "--registry", str(registry))
    assert published.returncode == 0, published.stderr
    assert "registered MLflow model acme.support-bot version 1" in published.stdout
    version = mlflow.MlflowClient(uri).get_model_version("acme.support-bot", "1")
    assert version.run_id == run_id
    from rayft.serve.registry import AdapterRegistry, publish_adapter
    from rayft.serve.validate import BaseShape

    tiny_shape = BaseShape.of_model_dir(tiny_model)
    for name, tenant, made in [("sql-writer", "globex", "sql"), ("summarizer", "shared", "summary")]:
        publish_adapter(AdapterRegistry(registry), adapters[made], tenant, name, tiny_shape, 64, 10**9)

    port = _free_port()
    config = {"base_model": str(tiny_model), "registry": str(registry), "adapters": ["acme/support-bot"],
              "max_resident_adapters": 3, "max_batch_size": 8, "batch_wait_ms": 30, "port": port,
              "auth": {"keys_file": str(keys_file)}, "log_dir": str(root / "logs"),
              "limits": {"max_prompt_tokens": 256, "max_new_tokens": 40, "max_concurrent_requests": 10,
                         "max_body_bytes": 20000, "max_lora_rank": 32}}
    config_path = root / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([RAYFT, "serve", str(config_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready, log = threading.Event(), []

    def drain():  # keep reading, or Ray's worker logs would fill the pipe and block the server
        for line in process.stdout:
            log.append(line)
            if line.startswith("serving "):
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ready.wait(timeout=300)
    assert process.poll() is None and any(line.startswith("serving ") for line in log), "".join(log[-40:])
    yield Server(f"http://127.0.0.1:{port}", keys, root, adapters, log)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _complete(client, model: str, prompt: str = PROMPTS[0], max_tokens: int = 12, **extra):
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_openai_client_completions_chat_and_streaming(server, tiny_model):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=server.keys["acme"], max_retries=0)
    models = {m.id for m in client.models.list().data}
    assert models == {"tiny", "support-bot", "summarizer"}  # its own, the shared one, the base

    completion = client.completions.create(model="support-bot", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="support-bot", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True))
    assert streamed == completion.choices[0].text

    messages = [{"role": "user", "content": "Say hello"}]
    chat = client.chat.completions.create(model="summarizer", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="summarizer", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"

    base = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert base.choices[0].text != completion.choices[0].text  # the adapter changes the output

    # tools, a call and its result: the prompt is the one training renders for them (whether the
    # tiny model's reply parses as a call is chance: test_chat_tools_render_as_trained_... shows that)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tooled = client.chat.completions.create(model="summarizer", messages=TOOL_CHAT, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    assert tooled.usage.prompt_tokens == len(_trained_prompt_ids(tokenizer))
    untooled = client.chat.completions.create(model="summarizer", messages=TOOL_CHAT, tools=TOOLS, tool_choice="none",
                                              max_tokens=8, temperature=0)
    assert untooled.usage.prompt_tokens == len(_trained_prompt_ids(tokenizer, tools=None)) < tooled.usage.prompt_tokens
    reply = tooled.choices[0]
    assert reply.finish_reason in ("length", "stop", "tool_calls") and (reply.finish_reason == "tool_calls") == bool(
        reply.message.tool_calls)
    chunks = list(client.chat.completions.create(model="summarizer", messages=TOOL_CHAT, tools=TOOLS, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (reply.message.content or "")
    assert chunks[-1].choices[0].finish_reason == reply.finish_reason


def test_concurrent_mixed_requests_equal_solo(server):
    with server.client("acme") as acme, server.client("globex") as globex:
        jobs = [(acme, m, p) for m in ["support-bot", "summarizer", "tiny"] for p in PROMPTS[:2]] + \
               [(globex, "sql-writer", p) for p in PROMPTS[:2]]  # 8: within max_concurrent_requests
        solo = [_complete(c, m, p) for c, m, p in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _complete(*job), jobs))
    assert together == solo


def test_every_kind_over_http_mixed_equals_solo(server, tiny_model, tmp_path):
    """DoRA, per-module ranks, IA3 and prompt tuning published through the API like LoRA;
    concurrent requests of several kinds (one batch where they meet) answer as each does alone."""
    paths = every_kind(tiny_model, tmp_path)
    with server.client("ops") as ops:
        for kind in ("dora", "rank-pattern", "ia3", "prompt-tuning"):
            added = ops.post("/v1/adapters", json={"name": f"kind-{kind}", "tenant": "acme", "source": str(paths[kind])})
            assert added.status_code == 201, added.text
        listed = {a["id"]: (a["kind"], a["rank"]) for a in ops.get("/v1/adapters").json()["data"]}
        assert listed["kind-dora"] == ("dora", 4) and listed["kind-rank-pattern"] == ("lora_rank_pattern", 6)
        assert listed["kind-ia3"] == ("ia3", 0) and listed["support-bot"] == ("lora", 4)
        assert listed["kind-prompt-tuning"] == ("prompt_tuning", 0)
    with server.client("acme") as acme:
        models = ["kind-dora", "kind-ia3", "kind-prompt-tuning", "tiny"]  # 3 adapters: within the cache of 3
        jobs = [(acme, m, p) for m in models for p in PROMPTS[:2]]
        solo = [_complete(c, m, p) for c, m, p in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda job: _complete(*job), jobs))
        assert acme.get("/v1/models").status_code == 200
    assert together == solo


def test_tenants_keys_and_admin(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        assert anonymous.get("/v1/models").status_code == 401
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer rft-not-a-key"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with server.client("acme") as acme, server.client("globex") as globex:
        assert {m["id"] for m in globex.get("/v1/models").json()["data"]} == {"tiny", "sql-writer", "summarizer"}
        # another tenant's adapter answers exactly like one that does not exist
        theirs = acme.post("/v1/completions", json={"model": "sql-writer", "prompt": "x", "max_tokens": 2})
        missing = acme.post("/v1/completions", json={"model": "no-such", "prompt": "x", "max_tokens": 2})
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["message"].replace("sql-writer", "X") == \
            missing.json()["error"]["message"].replace("no-such", "X")
        assert _complete(globex, "sql-writer")
        # tenants do not manage adapters, admins do
        assert acme.post("/v1/adapters", json={"name": "x", "source": str(server.adapters["sql"])}).status_code == 403
        assert acme.get("/v1/adapters").status_code == 403
        assert acme.delete("/v1/adapters/support-bot").status_code == 403
    with server.client("ops") as ops:
        listed = {(a["tenant"], a["id"]) for a in ops.get("/v1/adapters").json()["data"]}
        assert {("acme", "support-bot"), ("globex", "sql-writer"), ("shared", "summarizer")} <= listed


def test_bad_adapters_are_refused_and_serving_goes_on(server, tiny_model, tmp_path):
    from transformers import AutoConfig

    pickled = make_lora_adapter(tiny_model, tmp_path / "pickled", r=4)
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    other = build_other_tiny_model(tmp_path / "other-base", AutoConfig.from_pretrained(tiny_model).vocab_size)
    wrong_shapes = make_lora_adapter(other, tmp_path / "wrong-shapes", r=4)
    wrong_module = make_lora_adapter(tiny_model, tmp_path / "wrong-module", r=4, target_modules=["q_proj"])
    config = json.loads((wrong_module / "adapter_config.json").read_text())
    tensors_file = wrong_module / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k.replace("q_proj", "qq_proj"): v for k, v in load_file(tensors_file).items()}, tensors_file)
    (wrong_module / "adapter_config.json").write_text(json.dumps(config))
    wrong_base = make_lora_adapter(tiny_model, tmp_path / "wrong-base", r=4)
    (wrong_base / "rayft.json").write_text(json.dumps({"base_model": "other", "base_fingerprint": "0123456789abcdef"}))
    nested_pickle = make_lora_adapter(tiny_model, tmp_path / "nested-pickle", r=4)  # anywhere in the tree
    (nested_pickle / "extra").mkdir()
    (nested_pickle / "extra" / "optimizer.pt").write_bytes(b"not really a pickle")
    # kinds rayft trains but does not batch: each refused in one line that says why
    prefix = make_lora_adapter(tiny_model, tmp_path / "prefix", r=4)
    (prefix / "rayft.json").write_text(json.dumps({"method": "prefix_tuning", "serve_kind": "prefix_tuning"}))
    delta = tmp_path / "bitfit-delta"
    delta.mkdir()
    (delta / "delta.safetensors").write_bytes(b"")
    (delta / "rayft.json").write_text(json.dumps({"method": "bitfit"}))

    cases = [("pickled", pickled, "pickle"), ("shapes", wrong_shapes, "(in, out)"),
             ("module", wrong_module, "not a linear layer"), ("base", wrong_base, "not the served base"),
             ("nested", nested_pickle, "pickle-based weight files are refused (extra/optimizer.pt)"),
             ("prefix", prefix, "a prefix_tuning adapter cannot be served: its key/value prefixes"),
             ("delta", delta, "a bitfit output cannot be served as an adapter: BitFit / LN-tuning deltas"),
             ("huge", server.adapters["huge"], "above the served limit of 32"),
             ("../evil", server.adapters["sql"], "not allowed"), ("missing", tmp_path / "nowhere", "no such directory")]
    with server.client("ops") as ops:
        for name, source, reason in cases:
            response = ops.post("/v1/adapters", json={"name": name, "source": str(source)})
            assert response.status_code == 400, (name, response.text)
            assert reason in response.json()["error"]["message"], (name, response.text)
        assert ops.post("/v1/adapters", content=b"{not json").status_code == 400
    assert not (server.root / "registry" / "ops" / "pickled").exists()
    with server.client("acme") as acme:
        assert _complete(acme, "support-bot")


def test_hot_swap_over_http(server):
    """Through Ray Serve: a replaced adapter answers as version 2 at once, a deleted one is 404.
    (test_hot_swap_while_requests_run shows a running request keeping version 1.)"""
    with server.client("ops") as ops, server.client("acme") as acme:
        added = ops.post("/v1/adapters", json={"name": "swap", "tenant": "acme", "source": str(server.adapters["sql"])})
        assert added.status_code == 201, added.text
        first = _complete(acme, "swap", max_tokens=40)
        ops.post("/v1/adapters", json={"name": "reference", "tenant": "acme", "source": str(server.adapters["support2"])})
        second = _complete(acme, "reference", max_tokens=40)
        assert first != second
        replaced = ops.post("/v1/adapters", json={"name": "swap", "tenant": "acme",
                                                  "source": str(server.adapters["support2"])})
        assert replaced.status_code == 201 and replaced.json()["version"] == 2
        assert _complete(acme, "swap", max_tokens=40) == second
        deleted = ops.delete("/v1/adapters/swap", params={"tenant": "acme"})
        assert deleted.status_code == 200
        assert acme.post("/v1/completions", json={"model": "swap", "prompt": "x"}).status_code == 404


def test_limits(server):
    with server.client("acme") as acme:
        too_long = acme.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 300})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        too_many = acme.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 41})
        assert too_many.status_code == 400 and "max_tokens" in too_many.json()["error"]["message"]
        big = acme.post("/v1/completions", json={"model": "tiny", "prompt": "y" * 30000})
        assert big.status_code == 413
        assert acme.post("/v1/completions", json={"model": "tiny"}).status_code == 400  # no prompt
        assert acme.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2}).status_code == 400
        known = acme.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12,
                                                   "temperature": 0}).json()["choices"][0]["text"]
        stop = known[len(known) // 2:][:2]  # a stop string from the middle of the known output
        assert stop.strip(), known
        cut = acme.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12,
                                                 "temperature": 0, "stop": ["no such text", stop]}).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == known[:known.index(stop)]
        tail = known[len(known) // 2:]  # a long stop string, held back until it is known
        long_cut = acme.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12,
                                                      "temperature": 0, "stop": tail}).json()["choices"][0]
        assert long_cut["finish_reason"] == "stop" and long_cut["text"] == known[:known.index(tail)]
        over = acme.post("/v1/completions", json={"model": "tiny", "prompt": [PROMPTS[0]] * 11, "max_tokens": 2})
        assert over.status_code == 400 and "batch of 11 prompts" in over.json()["error"]["message"]
        call = TOOL_CHAT[1]["tool_calls"][0]
        for param, extra, says in [
                ("tools.0.function.name", {"tools": [{"type": "function", "function": {"description": "no name"}}]},
                 "Field required"),
                ("tools", {"tools": {"weather": {}}}, "valid list"),
                ("messages.2.content", {"messages": TOOL_CHAT[:2] + [{"role": "tool", "tool_call_id": "c1"}]},
                 "a tool message needs content"),
                ("messages.1.tool_calls.0.function.arguments",
                 {"messages": [TOOL_CHAT[0], {"role": "assistant", "tool_calls": [
                     {**call, "function": {"name": "weather", "arguments": '"Oslo"'}}]}, TOOL_CHAT[2]]},
                 "not a JSON object"),
                ("tool_choice", {"tool_choice": "required"}, "not supported"),
                ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
                 "not supported")]:
            refused = acme.post("/v1/chat/completions", json={"model": "tiny", "messages": TOOL_CHAT, "tools": TOOLS,
                                                              "max_tokens": 2, **extra})
            error = refused.json()["error"]
            assert refused.status_code == 400 and error["param"] == param, (param, refused.text)
            message = error["message"]
            assert message.startswith(param + ":") and says in message and "\n" not in message


def _resident(ray_address: str) -> list[str]:
    """The adapter names the (one) engine replica holds, least recently used first."""
    import ray
    from ray import serve

    from rayft.serve.app import APP_NAME

    ray.init(address=ray_address, ignore_reinit_error=True)
    handle = serve.get_deployment_handle("LoRAEngine", app_name=APP_NAME)
    return [model_id.rpartition("@")[0] for model_id in handle.resident_adapters.remote().result()]


def test_evicted_adapter_reloads(server, ray_address):
    """max_resident_adapters=3: using four adapters in turn evicts the least recently used one,
    and using it again reloads it, with the same output."""
    models = ["support-bot", "e1", "e2", "e3"]
    with server.client("acme") as acme, server.client("ops") as ops:
        for name, made in [("e1", "sql"), ("e2", "summary"), ("e3", "support2")]:
            assert ops.post("/v1/adapters", json={"name": name, "tenant": "acme",
                                                  "source": str(server.adapters[made])}).status_code == 201
        first = [_complete(acme, m) for m in models]
        assert _resident(ray_address) == ["acme/e1", "acme/e2", "acme/e3"]  # support-bot was evicted
        again = [_complete(acme, m) for m in models]
        assert _resident(ray_address) == ["acme/e1", "acme/e2", "acme/e3"]  # it came back, and left again
        assert first == again


def _scrape_metrics(ray_address: str) -> str:
    """Every node's Prometheus endpoint (Ray's metrics agent), as a Prometheus server would scrape it."""
    import httpx
    import ray

    ray.init(address=ray_address, ignore_reinit_error=True)
    texts = []
    for node in ray.nodes():
        if node["Alive"]:
            texts.append(httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                   timeout=10).text)
    return "\n".join(texts)


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (Ray prefixes application metrics with ray_)."""
    import re

    total = 0.0
    for match in re.finditer(rf"^(?:ray_)?{name}(?:{{([^}}]*)}})? (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_prometheus_metrics_are_scraped(server, ray_address):
    """The replica's metrics reach each node's Prometheus endpoint (Ray's metrics agent): requests,
    tokens and latency per adapter, batch sizes, adapter loads, evictions and cache hits. Five
    adapters in turn through a cache of 3 load, evict and hit. The agent exports every few
    seconds: poll, with a bound."""
    with server.client("acme") as acme, server.client("ops") as ops:
        for name, made in [("m1", "sql"), ("m2", "summary"), ("m3", "support2")]:
            assert ops.post("/v1/adapters", json={"name": name, "tenant": "acme",
                                                  "source": str(server.adapters[made])}).status_code == 201
        for model in ["support-bot", "m1", "m2", "m3", "support-bot", "support-bot"]:
            _complete(acme, model)
    wanted = [("rayft_requests_total", {"model": "acme/support-bot"}),
              ("rayft_generated_tokens_total", {"model": "acme/support-bot"}),
              ("rayft_request_latency_ms_count", {"model": "acme/support-bot"}),
              ("rayft_adapter_cache_hits_total", {"model": "acme/support-bot"}),
              ("rayft_adapter_loads_total", {"model": "acme/m1"}), ("rayft_adapter_evictions_total", {}),
              ("rayft_batch_size_count", {}), ("rayft_batch_adapters_count", {})]
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:
        text = _scrape_metrics(ray_address)
        missing = [(name, labels) for name, labels in wanted if _metric(text, name, **labels) <= 0]
        if missing:
            time.sleep(2)  # the agent's next export: nothing to await from here
    assert not missing, f"not exported: {missing}\n" + "\n".join(
        line[:200] for line in text.splitlines() if "rayft" in line and "_bucket" not in line)


def test_adapter_cache_hits_exclude_cold_loads(server, ray_address):
    """A newly published adapter's first request is a load (timed in the load histogram), not a
    cache hit; its second is a hit. A replica exports its metrics together, so the scrape that
    first shows the load shows the hits recorded with it."""
    with server.client("acme") as acme, server.client("ops") as ops:
        assert ops.post("/v1/adapters", json={"name": "cold", "tenant": "acme",
                                              "source": str(server.adapters["sql"])}).status_code == 201
        _complete(acme, "cold")
        text = _scrape_until(ray_address, "rayft_adapter_loads_total", model="acme/cold")
        assert _metric(text, "rayft_adapter_cache_hits_total", model="acme/cold") == 0
        assert _metric(text, "rayft_adapter_load_seconds_count", model="acme/cold") == 1
        assert _metric(text, "rayft_adapter_load_seconds_sum", model="acme/cold") > 0
        _complete(acme, "cold")
        text = _scrape_until(ray_address, "rayft_adapter_cache_hits_total", model="acme/cold")
        assert _metric(text, "rayft_adapter_cache_hits_total", model="acme/cold") == 1
        assert _metric(text, "rayft_adapter_loads_total", model="acme/cold") == 1


def _scrape_until(ray_address: str, name: str, **labels: str) -> str:
    """The first scrape that shows the metric; the agent exports every few seconds: poll, with a bound."""
    deadline = time.monotonic() + 90
    while True:
        text = _scrape_metrics(ray_address)
        if _metric(text, name, **labels) > 0:
            return text
        assert time.monotonic() < deadline, f"{name} {labels} not exported"
        time.sleep(2)  # the agent's next export: nothing to await from here


SCHEMATHESIS_HOOKS = """
import schemathesis


@schemathesis.hook
def map_body(context, body):
    # Half the generated requests name the served base model, so that they reach generation.
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
        body["model"] = "tiny"
    return body
"""


def test_openapi_passes_schemathesis_with_no_server_errors(server, tmp_path):
    """Requests generated from the served OpenAPI document (bodies included; half of them for the
    base model, so they run on the engine) get no 5xx."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(SCHEMATHESIS_HOOKS)
    run = subprocess.run(
        [str(Path(RAYFT).parent / "schemathesis"), "run", f"{server.url}/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "30", "--seed", "7", "-H", f"Authorization: Bearer {server.keys['acme']}"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)})
    assert run.returncode == 0, run.stdout[-4000:]


def test_the_console_shows_one_ready_line_and_the_log_keeps_the_rest(server):
    """After every request of the tests above: one line on the console (URL, registry, where the
    log is); Ray's, Serve's and the replicas' output, access lines included, in log_dir/serve.log."""
    lines = [line.rstrip("\n") for line in server.console if line.strip()]
    log = server.root / "logs" / "serve.log"
    assert len(lines) == 1, "".join(server.console[-40:])
    assert lines[0].startswith(f"serving tiny and the adapters of {server.root / 'registry'} (3 published; "
                               "loaded: acme/support-bot) on http://127.0.0.1:") and lines[0].endswith(f"; logs in {log}")
    text = log.read_text()
    assert "Deploying new version of Deployment" in text and "POST /v1/completions 200" in text


def test_shipped_serve_configs_build(tmp_path):
    """services/serve.yaml (serve deploy) builds both applications; the demo serve config parses."""
    from ray.serve import Application

    from rayft.config import load_serve_config
    from rayft.serve.app import build_app

    REPO = Path(__file__).resolve().parent.parent
    deploy = yaml.safe_load((REPO / "services" / "serve.yaml").read_text())
    app_spec = deploy["applications"][0]
    assert app_spec["import_path"] == "rayft.serve.app:build_app"
    assert isinstance(build_app(app_spec["args"]), Application)
    from rayft.jobs.service import build_service_app

    training = deploy["applications"][1]
    assert training["import_path"] == "rayft.jobs.service:build_service_app"
    assert isinstance(build_service_app(training["args"]), Application)
    with pytest.raises(Exception, match="unknown key"):
        build_service_app({**training["args"], "dburl": "x"})
    assert load_serve_config(REPO / "pipelines" / "serve_demo.yaml").auth.keys_file is None


@pytest.mark.parametrize("config, message", [
    ({"registry": "r", "maxbatch": 3}, "unknown key maxbatch"),
    ({"auth": {"keys_file": "nope.yaml"}}, "auth.keys_file=nope.yaml: no such file"),
    ({"host": "0.0.0.0"}, "set auth.keys_file"),
    ({"adapters": ["acme/absent"], "registry": "r"}, "'acme/absent' is not in the registry"),
])
def test_serve_cli_rejects_bad_configs(tmp_path, tiny_model, config, message):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(tiny_model), **config}))
    result = run_cli("serve", str(path), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr
