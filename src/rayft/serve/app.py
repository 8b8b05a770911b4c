"""The Ray Serve application: an HTTP ingress (api.py) in front of engine replicas.

    client --HTTP--> OpenAIIngress --handle, multiplexed_model_id="tenant/name@version"--> LoRAEngine

Serve routes a request to a replica that already holds its adapter (model multiplexing); inside a
replica, requests of all adapters are batched together (engine.py). `build_app` is the import
path for `serve run` / `serve deploy` (services/serve.yaml); `rayft serve` calls it too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ray import serve

from rayft.config import ServeConfig, load_serve_config, parse_serve
from rayft.serve.engine import AdapterCache, EngineMetrics

APP_NAME = "rayft"


def base_model_id(cfg: ServeConfig) -> str:
    """The `model` name clients use for the base: the alias, or the model directory's name."""
    from rayft.models import KNOWN_ALIASES

    name = cfg.base_model.name_or_path
    return name if name in KNOWN_ALIASES else Path(name).name


class ServeMetrics(EngineMetrics):
    """Prometheus metrics through Ray Serve's metrics API (exported by each node's metrics agent)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("rayft_requests", "requests per model (adapter or base)", tag_keys=("model",))
        self.generated = Counter("rayft_generated_tokens", "generated tokens per model", tag_keys=("model",))
        self.latency = Histogram("rayft_request_latency_ms", "time from arrival in the replica to the last token",
                                 boundaries=[25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                 tag_keys=("model",))
        self.batch_rows = Histogram("rayft_batch_size", "requests per forward batch", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.batch_adapters = Histogram("rayft_batch_adapters", "distinct adapters per forward batch",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.loads = Counter("rayft_adapter_loads", "adapters loaded from the registry", tag_keys=("model",))
        self.load_seconds = Histogram("rayft_adapter_load_seconds", "time to check and load an adapter from the registry",
                                      boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                                      tag_keys=("model",))
        self.evictions = Counter("rayft_adapter_evictions", "adapters evicted from the cache", tag_keys=("model",))
        self.hits = Counter("rayft_adapter_cache_hits", "requests whose adapter was resident", tag_keys=("model",))

    @staticmethod
    def _name(model_id: str) -> str:
        return model_id.rpartition("@")[0] or model_id

    def batch(self, rows: int, adapters: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)

    def tokens(self, model: str, count: int) -> None:
        self.generated.inc(count, tags={"model": model})

    def adapter_load(self, model: str, seconds: float) -> None:
        self.loads.inc(tags={"model": self._name(model)})
        self.load_seconds.observe(seconds, tags={"model": self._name(model)})

    def adapter_eviction(self, model: str) -> None:
        self.evictions.inc(tags={"model": self._name(model)})

    def adapter_cache_hit(self, model: str) -> None:
        self.hits.inc(tags={"model": self._name(model)})


def _replica_options(cfg: ServeConfig) -> dict:
    if isinstance(cfg.replicas, int):
        return {"num_replicas": cfg.replicas}
    return {"autoscaling_config": cfg.replicas.model_dump()}


def engine_deployment(cfg: ServeConfig):
    """The engine replica class; made per config because Serve's multiplexing takes its capacity
    when the class is defined."""

    @serve.deployment(name="LoRAEngine", max_ongoing_requests=max(256, 2 * cfg.limits.max_concurrent_requests),
                      ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
                      health_check_period_s=10, **_replica_options(cfg))
    class LoRAEngine:
        def __init__(self, config: dict):
            import torch

            from rayft.models import base_fingerprint, resolve_model_path
            from rayft.serve.engine import Engine, adapter_loader, batched_lora_model, load_base_model, serving_dtype
            from rayft.serve.registry import AdapterRegistry
            from rayft.serve.validate import BaseShape

            self.cfg = ServeConfig.model_validate(config)
            model_dir = resolve_model_path(self.cfg.base_model.name_or_path)
            device = torch.device("cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu")
            dtype = serving_dtype(self.cfg.dtype, device)
            model = load_base_model(model_dir, dtype, device, self.cfg.base_model.load_in_4bit)
            base = BaseShape.of_model(model, base_fingerprint(model_dir))
            lora = batched_lora_model(model)
            self.metrics = ServeMetrics()
            self.registry = AdapterRegistry(self.cfg.registry)
            limits = self.cfg.limits
            self.cache = AdapterCache(adapter_loader(self.registry, base, limits.max_lora_rank, limits.max_adapter_bytes,
                                                     dtype, device, lora.layers), self.cfg.max_resident_adapters,
                                      self.metrics)
            tokenizer_eos = model.generation_config.eos_token_id
            eos = tokenizer_eos if isinstance(tokenizer_eos, list) else [tokenizer_eos]
            pad = model.generation_config.pad_token_id
            self.engine = Engine(model, lora, [e for e in eos if e is not None],
                                 pad if pad is not None else eos[0], self.cfg.max_batch_size, self.cfg.batch_wait_ms,
                                 metrics=self.metrics)
            for name in self.cfg.adapters:  # preloaded: "tenant/name", or "name" of tenant default or shared
                tenant, _, adapter = name.rpartition("/")
                ref = self.registry.resolve(tenant or "default", adapter)
                if ref is None:
                    raise ValueError(f"adapters: {name!r} is not in the registry {self.registry.root}")
                self.cache.preload(ref.model_id)

        @serve.multiplexed(max_num_models_per_replica=cfg.max_resident_adapters)
        async def _route(self, model_id: str) -> str:
            """Tells Serve's router this replica holds `model_id`. It touches no weights: the cache
            owns them, and one lookup per request keeps its hit and load counts true."""
            return model_id

        async def generate(self, payload: dict):
            """Events of Engine.serve: ("token", id, row) ... ("end", reason, row) for each prompt,
            or one ("error", "adapter", message) when the adapter cannot be loaded."""
            from rayft.errors import RayftError

            started = time.perf_counter()
            model_id = serve.get_multiplexed_model_id()
            adapter = None
            if model_id:
                try:
                    adapter = await self.cache.get(model_id)  # a hit, or a load
                except RayftError as exc:  # a bad or vanished adapter: the caller gets a 4xx, we serve on
                    yield ("error", "adapter", str(exc))
                    return
                await self._route(model_id)
            self.metrics.requests.inc(tags={"model": payload["model"]})
            async for event in self.engine.serve(payload, adapter):
                yield event
            self.metrics.latency.observe((time.perf_counter() - started) * 1000, tags={"model": payload["model"]})

        def resident_adapters(self) -> list[str]:
            return self.cache.resident()

    return LoRAEngine


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, config: dict, engine):
        from transformers import AutoTokenizer

        from rayft.models import resolve_model_path
        from rayft.serve.api import Frontend
        from rayft.serve.validate import BaseShape

        cfg = ServeConfig.model_validate(config)
        model_dir = resolve_model_path(cfg.base_model.name_or_path)
        self.engine = engine
        self.frontend = Frontend(cfg, AutoTokenizer.from_pretrained(model_dir), base_model_id(cfg),
                                 BaseShape.of_model_dir(model_dir), self._stream, cfg.mlflow_uri)

    def __serve_build_asgi_app__(self):
        from rayft.serve.api import create_app

        return create_app(self.frontend)

    async def _stream(self, model_id: Optional[str], payload: dict):
        options = {"stream": True, **({"multiplexed_model_id": model_id} if model_id else {})}
        response = self.engine.options(**options).generate.remote(payload)
        finished = False
        try:
            async for event in response:
                yield tuple(event)
            finished = True
        finally:
            if not finished:
                response.cancel()


def serve_application(cfg: ServeConfig):
    """The bound application, with paths made absolute (replicas do not share the caller's cwd)."""
    cfg = absolute_paths(cfg)
    config = cfg.model_dump(mode="json")
    engine = engine_deployment(cfg).bind(config)
    ingress = OpenAIIngress.options(max_ongoing_requests=cfg.limits.max_concurrent_requests + 32,
                                    ray_actor_options={"num_cpus": 0}, **_replica_options(cfg))
    return ingress.bind(config, engine)


def absolute_paths(cfg: ServeConfig) -> ServeConfig:
    updates: dict[str, Any] = {"registry": str(Path(cfg.registry).expanduser().resolve())}
    if cfg.auth.keys_file:
        updates["auth"] = cfg.auth.model_copy(update={"keys_file": str(Path(cfg.auth.keys_file).expanduser().resolve())})
    name = cfg.base_model.name_or_path
    if Path(name).expanduser().is_dir():
        updates["base_model"] = cfg.base_model.model_copy(update={"name_or_path": str(Path(name).expanduser().resolve())})
    return cfg.model_copy(update=updates)


def build_app(args: dict[str, Any]):
    """Import path for `serve run` / `serve deploy`: args {config: path/to/serve.yaml} or the
    serve config's keys inline."""
    if "config" in args:
        return serve_application(load_serve_config(args["config"]))
    return serve_application(parse_serve(args, source="application args"))
