"""The generation engine of one replica: base model + adapter cache + mixed-adapter batches.

Token ids in, token ids out (tokenizing and the HTTP API live in api.py). Requests wait at most
`batch_wait_ms` to be batched with others, whatever adapter they use; a batch runs prefill and
then decodes step by step on one worker thread (torch releases the GIL, so the event loop keeps
accepting requests), streaming each row's tokens back as they come. Between two steps finished
rows leave and waiting requests join the running batch (prefilled on their own, then stacked
into the shared KV cache), so a batch is never held up by its longest request.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Sequence

import torch

from rayft.serve.lora import BatchLoRA, LoadedAdapter, load_adapter, wrap_linear_layers
from rayft.serve.validate import BaseShape, check_fits_base, inspect_adapter


_ANY = object()  # _take_batch: requests of any adapter


class EngineMetrics:
    """Hooks the Serve deployment fills with Prometheus metrics; no-ops elsewhere."""

    def batch(self, rows: int, adapters: int) -> None: ...
    def tokens(self, model: str, count: int) -> None: ...
    def adapter_load(self, model: str, seconds: float) -> None: ...
    def adapter_eviction(self, model: str) -> None: ...
    def adapter_cache_hit(self, model: str) -> None: ...


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    model: str  # for metrics: the adapter's name, or the base model's
    adapter: Optional[LoadedAdapter] = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    cancelled: bool = False  # set when the caller goes away: the row stops at the next step
    row: int = 0  # its index among the requests queued together (a batch of prompts)
    events: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)  # (row, event), shared by a batch


class Engine:
    """Batches requests and runs them. The backend holds the running rows' LoRA: `append(adapters)`
    when rows join, `keep(order)` when rows leave, `use(start, stop)` before a forward pass (it
    returns extra forward arguments), `clear()` (BatchLoRA here; the benchmark plugs in peft's)."""

    def __init__(self, model, backend, eos_token_ids: Sequence[int], pad_token_id: int, max_batch_size: int = 16,
                 batch_wait_ms: float = 10, mix_adapters: bool = True, metrics: Optional[EngineMetrics] = None,
                 join_running: bool = True):
        self.model = model
        self.backend = backend
        self.eos_token_ids = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.mix_adapters = mix_adapters  # False: one adapter per batch (the naive baseline)
        self.join_running = join_running  # False: a batch runs until its last row ends (a benchmark baseline)
        self.metrics = metrics or EngineMetrics()
        self.device = next(model.parameters()).device
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._pending_lock = threading.Lock()  # the worker thread admits waiting requests too
        self._pending_loop: Optional[asyncio.AbstractEventLoop] = None  # the event loop they wait on
        self._cache_joinable: Optional[bool] = None  # see _joinable
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rayft-batch")
        self._loop_task: Optional[asyncio.Task] = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[tuple]:
        """Yields ("token", id) per generated token, then ("end", "stop" | "length")."""
        async for _, event in self.generate_rows([request]):
            yield event

    async def generate_rows(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, tuple]]:
        """Several requests queued at once, so they start as rows of one batch (up to max_batch_size):
        yields (row, event) until every row has ended."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()  # an Event belongs to the loop that first awaits it
            self._loop_task = loop.create_task(self._batch_loop())
        events: asyncio.Queue = asyncio.Queue()
        for row, request in enumerate(requests):
            request.row, request.events = row, events
        with self._pending_lock:
            self._pending_loop = loop
            self._pending.extend(requests)
        self._wakeup.set()
        running = len(requests)
        try:
            while running:
                row, event = await events.get()
                if event[0] == "error":
                    raise RuntimeError(event[1])
                yield row, event
                if event[0] == "end":
                    running -= 1
        finally:
            for request in requests:
                request.cancelled = True

    async def serve(self, payload: dict, adapter: Optional[LoadedAdapter]) -> AsyncIterator[tuple]:
        """The replica's side of the HTTP API: payload {"prompts": [token ids, ...], "max_new_tokens",
        "temperature", "top_p", "seed", "model"} -> ("token", id, row) ... ("end", reason, row) per prompt."""
        requests = [GenerationRequest(prompt_ids, payload["max_new_tokens"], payload["model"], adapter,
                                      payload["temperature"], payload["top_p"], payload["seed"])
                    for prompt_ids in payload["prompts"]]
        async for row, event in self.generate_rows(requests):
            yield (*event, row)

    def wait_idle(self) -> None:
        """Blocks until the worker thread has ended its rows and released the backend (for callers
        that run several engines over one model in turn, like the benchmark)."""
        self._executor.submit(lambda: None).result()

    # ------------------------------------------------------------ batching
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch(self.max_batch_size)
            if batch:
                await loop.run_in_executor(self._executor, self._run, batch, loop)

    def _take_batch(self, limit: int, adapter=_ANY, loop=None) -> list[GenerationRequest]:
        """Up to `limit` waiting requests, oldest first; without mixing, only those of one adapter
        (`adapter`, or the oldest request's). Called from both threads, hence the lock; the worker
        passes the event loop its rows answer on and takes nothing that waits on another one."""
        with self._pending_lock:
            if loop is not None and loop is not self._pending_loop:
                return []
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            if not self._pending or limit <= 0:
                return []
            if self.mix_adapters:
                return [self._pending.popleft() for _ in range(min(limit, len(self._pending)))]
            wanted = self._pending[0].adapter if adapter is _ANY else adapter
            batch, rest = [], collections.deque()
            for request in self._pending:
                if request.cancelled:
                    continue
                (batch if request.adapter is wanted and len(batch) < limit else rest).append(request)
            self._pending = rest
            return batch

    # ------------------------------------------------------------ running rows (worker thread)
    def _run(self, batch: list[GenerationRequest], loop: asyncio.AbstractEventLoop) -> None:
        """Runs `batch` and every request admitted while it runs, until no row is left: after each
        decoding step finished rows leave and waiting requests join (continuous batching), so a short
        request never waits for a long one. A failure fails the rows running, never the engine."""
        held = set(batch)  # taken and not ended yet: what a failure must answer
        try:
            self._decode_rows(batch, held, loop)
        except Exception as exc:
            loop.call_soon_threadsafe(_deliver, [(request, ("error", f"generation failed: {exc}")) for request in held])
        finally:
            self.backend.clear()

    @torch.inference_mode()
    def _decode_rows(self, joining: list[GenerationRequest], held: set, loop) -> None:
        live: list[_Row] = []
        cache = mask = logits = None
        while True:
            if joining:  # prefill the newcomers alone, then stack them under the running rows
                first = len(live)
                live.extend(_Row(request, _generator(request)) for request in joining)
                self.backend.append([request.adapter for request in joining])
                new_logits, new_cache, new_mask = self._prefill(joining, self.backend.use(first, len(live)))
                if cache is None:
                    logits, cache, mask = new_logits, new_cache, new_mask
                else:
                    mask = _stack_caches(cache, mask, new_cache, new_mask)
                    logits = torch.cat([logits, new_logits])
                self.metrics.batch(len(live), len({id(row.request.adapter) for row in live
                                                    if row.request.adapter is not None}))
            next_ids = _pick_tokens(logits, [row.request for row in live], [row.generator for row in live])
            events = []
            for row, token in zip(live, next_ids.tolist()):
                request = row.request
                if request.cancelled:
                    row.finished = "cancelled"
                elif token in self.eos_token_ids:
                    row.finished = "stop"
                else:
                    row.produced += 1
                    events.append((request, ("token", token)))
                    if row.produced >= request.max_new_tokens:
                        row.finished = "length"
                if row.finished:
                    held.discard(request)
                    events.append((request, ("end", row.finished)))
                    self.metrics.tokens(request.model, row.produced)
            loop.call_soon_threadsafe(_deliver, events)
            if any(row.finished for row in live):
                keep = _compact_order([not row.finished for row in live])
                live[:] = [live[i] for i in keep]
                self.backend.keep(keep)
                if keep:
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, next_ids = _trim_padding(cache, mask[index]), next_ids[index]
                else:
                    cache = mask = None
            joinable = self.join_running and (cache is None or self._joinable(cache))
            joining = self._take_batch(self.max_batch_size - len(live),
                                       live[0].request.adapter if live else _ANY, loop) if joinable else []
            held.update(joining)
            if not live:
                if not joining:
                    return
                continue
            extra = self.backend.use(0, len(live))
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            logits = self.model(input_ids=next_ids[:, None], attention_mask=mask,
                                position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache, use_cache=True,
                                **extra).logits[:, -1]

    def _prefill(self, requests: list[GenerationRequest], extra: dict):
        """Left-padded prompts through the model: every row's next token comes at the end."""
        from transformers import DynamicCache

        prefixes = [_virtual_tokens(request) for request in requests]
        lengths = [len(request.prompt_ids) + (0 if prefix is None else len(prefix))
                   for request, prefix in zip(requests, prefixes)]
        width = max(lengths)
        input_ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        inputs = {"input_ids": input_ids}
        if any(prefix is not None for prefix in prefixes):
            # prompt tuning: the rows' virtual tokens go right before their prompts (positions
            # 0..n-1, as in peft), in the padding the longer rows leave
            embeddings = self.model.get_input_embeddings()(input_ids)
            for i, prefix in enumerate(prefixes):
                if prefix is not None:
                    start = width - lengths[i]
                    embeddings[i, start:start + len(prefix)] = prefix.to(embeddings.dtype)
            inputs = {"inputs_embeds": embeddings}
        cache = DynamicCache()
        logits = self.model(**inputs, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            cache=cache, use_cache=True, logits_to_keep=1, **extra).logits[:, -1]
        return logits, cache, mask

    def _joinable(self, cache) -> bool:
        """Rows can join only a cache of plain full-attention layers (sliding windows cannot be
        padded); the layer kinds are the model's, so the first cache answers for all."""
        from transformers.cache_utils import DynamicLayer

        if self._cache_joinable is None:
            self._cache_joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        return self._cache_joinable


def _virtual_tokens(request: GenerationRequest) -> Optional[torch.Tensor]:
    return None if request.adapter is None else request.adapter.prompt_embeddings


def _compact_order(alive: list[bool]) -> list[int]:
    """The rows that stay, in their new order: each finished row's place goes to a live row from
    the end, so only those rows move (their stacked adapter weights are copied, no others)."""
    count = sum(alive)
    order = list(range(count))
    holes = [i for i in range(count) if not alive[i]]
    movers = [i for i in range(count, len(alive)) if alive[i]]
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    generator: Optional[torch.Generator]
    produced: int = 0
    finished: Optional[str] = None


def _stack_caches(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Appends the rows of `new_cache` to `cache` in place, left-padding the shorter one (masked
    out, so no row sees it); returns the stacked attention mask."""
    import torch.nn.functional as F

    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("keys", "values"):
            old, new = getattr(layer, name), getattr(new_layer, name)
            setattr(layer, name, torch.cat([F.pad(old, (0, 0, width - old.shape[-2], 0)),
                                            F.pad(new, (0, 0, width - new.shape[-2], 0))]))
    return torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])


def _trim_padding(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drops the leading cache positions no remaining row uses (left by rows that left)."""
    start = int(mask.any(dim=0).int().argmax())
    if start == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
    return mask[:, start:]


def _deliver(events: list) -> None:
    for request, event in events:
        request.events.put_nowait((request.row, event))


def _generator(request: GenerationRequest) -> Optional[torch.Generator]:
    if request.temperature <= 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(request.seed if request.seed is not None else int(time.time_ns() % 2**63))
    return generator


def _pick_tokens(logits: torch.Tensor, batch: list[GenerationRequest], generators: list) -> torch.Tensor:
    """Greedy rows take the argmax; sampling rows draw from temperature + top-p, each with its own
    generator so a seeded request gives the same text in any batch."""
    next_ids = logits.argmax(dim=-1)
    for i, generator in enumerate(generators):
        if generator is None:
            continue
        row_logits = logits[i].float().cpu()
        # shifted first: a tiny temperature would otherwise overflow the top logits to inf (inf - inf = nan)
        probs = torch.softmax((row_logits - row_logits.max()) / batch[i].temperature, dim=-1)
        if batch[i].top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > batch[i].top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        next_ids[i] = torch.multinomial(probs, 1, generator=generator).item()
    return next_ids


class AdapterCache:
    """Loaded adapters of one replica, least recently used evicted beyond `capacity`.

    Concurrent requests for the same cold adapter share one load. An evicted adapter stays usable
    by the requests already holding it; a newer version of an adapter evicts its older ones.
    """

    def __init__(self, load: Callable[[str], LoadedAdapter], capacity: int, metrics: Optional[EngineMetrics] = None):
        self._load = load
        self.capacity = capacity
        self.metrics = metrics or EngineMetrics()
        self._resident: collections.OrderedDict[str, LoadedAdapter] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self.loads = 0

    def resident(self) -> list[str]:
        return list(self._resident)

    def preload(self, model_id: str) -> None:
        """Load at start-up, before any request (synchronously)."""
        self._insert(model_id, self._load(model_id))

    def _insert(self, model_id: str, adapter: LoadedAdapter) -> None:
        name = model_id.rpartition("@")[0]
        for older in [key for key in self._resident if key.rpartition("@")[0] == name]:
            del self._resident[older]
        self._resident[model_id] = adapter
        while len(self._resident) > self.capacity:
            evicted, _ = self._resident.popitem(last=False)
            self.metrics.adapter_eviction(evicted)

    async def get(self, model_id: str) -> LoadedAdapter:
        if model_id in self._resident:
            self._resident.move_to_end(model_id)
            self.metrics.adapter_cache_hit(model_id)
            return self._resident[model_id]
        if model_id in self._loading:
            return await asyncio.shield(self._loading[model_id])
        loop = asyncio.get_running_loop()
        future = self._loading[model_id] = loop.create_future()
        started = time.perf_counter()
        try:
            adapter = await loop.run_in_executor(None, self._load, model_id)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: only the waiters need it
            raise
        finally:
            self._loading.pop(model_id, None)
        self.loads += 1
        self.metrics.adapter_load(model_id, time.perf_counter() - started)
        self._insert(model_id, adapter)
        future.set_result(adapter)
        return adapter


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_base_model(model_dir: Path, dtype: torch.dtype, device: torch.device, load_in_4bit: bool = False):
    """The served base model, eval mode, its linear layers wrapped for batched LoRA."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    return model


def adapter_loader(registry, base: BaseShape, max_rank: int, max_bytes: int, dtype: torch.dtype,
                   device: torch.device, base_layers: Optional[dict] = None) -> Callable[[str], LoadedAdapter]:
    """model id -> weights, checked again at load: the registry is shared storage that others write.
    `base_layers`: the served model's wrapped layers, for kinds computed against the base (DoRA)."""

    def load(model_id: str) -> LoadedAdapter:
        spec = inspect_adapter(registry.path_of(model_id), max_rank, max_bytes)
        check_fits_base(spec, base)
        return load_adapter(spec, model_id, dtype, device, base_layers)

    return load


def batched_lora_model(model, use_kernel: bool = True) -> BatchLoRA:
    """Wraps the model's linear layers; on CPU in fp32 they run the batched-LoRA kernel where it
    builds (`use_kernel=False`: per-row stacks, the path of GPUs and half precision)."""
    from rayft.serve.kernel import cpu_lora_kernel

    on_cpu_fp32 = model.device.type == "cpu" and model.dtype == torch.float32
    return BatchLoRA(wrap_linear_layers(model), cpu_lora_kernel() if use_kernel and on_cpu_fp32 else None)
