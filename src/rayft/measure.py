"""Measure the peak of allocated tensor bytes of real training steps, in one process: what
`rayft estimate` predicts, checked (tests/test_estimate.py, benchmarks/estimate_accuracy.py).

On a GPU this is torch.cuda.max_memory_allocated (that path has not run on a GPU yet). On CPU
torch keeps no such statistic, and the process's resident size would count libraries, Python
objects and freed-but-cached pages. So the count comes from the CPU allocator itself: while
torch.profiler runs with profile_memory, c10's CPU allocator reports every allocation and free,
with its size. That sees every tensor, whether an op of the model, autograd or DeepSpeed made it,
including a kernel's own temporaries (logsumexp's fp32 buffer in the fused head, for one), and
nothing that is not a tensor. Summing the reports in time order gives the bytes live at each
moment; the window opens before the model is loaded, so the weights are in it. Two checks that
the count is sound: with ZeRO-0 it returns to zero once everything is released, and the loaded
bytes equal the parameters' (tests/test_estimate.py). A TorchDispatchMode that tracked each op's
outputs would miss those kernel temporaries (it did, by 8 MB of a tiny model's 80 MB peak);
weakref finalizers on storages need every storage to be made where Python sees it.

The step is rayft's: the model loaded and the method applied as a worker does it
(models/loading.py), the optimizer of train/loop.py, DeepSpeed initialised with rayft's config at
world size 1, and the stage's loss. The batch is the estimate's worst case: micro_batch_size rows
of cutoff_len tokens, one sample per row, every token learned.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from rayft.config import TrainJobConfig

MEMORY_EVENT = "[memory]"


@dataclass
class Measured:
    peak_bytes: int  # the most tensor bytes live at once, from before loading to the last step
    loaded_bytes: int  # live once the method is applied (the weights, as stored)
    engine_bytes: int  # live once DeepSpeed is initialised (optimizer states are created at the first step)
    steps: int
    left_bytes: int  # still counted once everything is released: what the count missed, or what DeepSpeed keeps
    phases: dict[str, int]  # live bytes after each micro-batch's forward, backward and step (rayft.forward.0, ...)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group(backend: str = "fake") -> None:
    """A one-rank process group, as DeepSpeed needs one (process-wide: made once). On CPU it is
    torch's fake backend: at world size 1 every collective is the identity, and the fake one runs
    it on the calling thread, where gloo frees its buffers on its own threads, out of the
    profiler's sight."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("measuring runs at world size 1; this process has a larger process group")
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # DeepSpeed reads them
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the backend

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, rank=0, world_size=1)


def worst_case_batch(cfg: TrainJobConfig, vocab_size: int, rows_per_sample: int, device) -> dict[str, torch.Tensor]:
    """micro_batch_size rows of rows_per_sample x cutoff_len tokens (DPO: two sequences of
    cutoff_len per row), every token learned."""
    length = cfg.data.cutoff_len
    generator = torch.Generator().manual_seed(cfg.train.seed)
    rows = cfg.train.micro_batch_size
    input_ids = torch.randint(0, vocab_size, (rows, rows_per_sample * length), generator=generator)
    positions = torch.arange(length).repeat(rows, rows_per_sample)
    return {"input_ids": input_ids.to(device), "labels": input_ids.clone().to(device),
            "position_ids": positions.to(device), "row_index": torch.arange(rows, device=device),
            "split_id": torch.tensor(0, device=device), "real_tokens": torch.tensor(input_ids.numel())}


def live_bytes(prof) -> list[tuple[int, int]]:
    """(time in ns, tensor bytes live just after it) at every allocation and free the CPU
    allocator reported while `prof` ran."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == MEMORY_EVENT and str(e.device_type()).endswith("CPU"))
    timeline, live = [], 0
    for at, nbytes in events:
        live += nbytes
        timeline.append((at, live))
    return timeline


def live_at(timeline: list[tuple[int, int]], time_ns: int) -> int:
    return next((live for at, live in reversed(timeline) if at <= time_ns), 0)


MARK = "rayft.mark."


class CpuCount:
    """Tensor bytes on CPU, from the allocator's own reports to torch.profiler. The profiler counts
    the allocations and frees of the thread that started it only, so the window keeps them there:
    transformers loads weights on a thread pool unless told not to, and Python's cyclic collector
    frees objects on whichever thread it runs in (it runs at each mark instead)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.saved_env = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        gc.collect()  # what an earlier measurement left is freed before the window opens
        gc.disable()
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()
        return self

    def mark(self, name: str) -> None:
        from torch.profiler import record_function

        # everything made since the last mark is young (the collector is off): a cheap collection
        # finds its cycles; a full one over the libraries' objects costs ~0.5 s
        gc.collect(1 if name != "released" else 2)
        with record_function(MARK + name):
            pass

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        gc.enable()
        if self.saved_env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD")
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = self.saved_env

    def result(self) -> tuple[int, dict[str, int]]:
        """(peak, bytes live at each mark)."""
        marks = {e.name()[len(MARK):]: e.start_ns() for e in self.prof.profiler.kineto_results.events()
                 if e.name().startswith(MARK)}
        timeline = live_bytes(self.prof)
        return max(live for _, live in timeline), {name: live_at(timeline, at) for name, at in marks.items()}


class CudaCount:
    """Tensor bytes on a GPU: the caching allocator's own statistics (not yet run on a GPU)."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, {}

    def __enter__(self):
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def mark(self, name: str) -> None:
        gc.collect()
        self.marks[name] = torch.cuda.memory_allocated(self.device) - self.base

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)

    def result(self) -> tuple[int, dict[str, int]]:
        return torch.cuda.max_memory_allocated(self.device) - self.base, self.marks


def measure_peak(cfg: TrainJobConfig, model_dir: str | Path, steps: int = 3, device: str = "cpu") -> Measured:
    """Peak allocated tensor bytes of `steps` optimizer steps of `cfg` at world size 1, on `device`
    ("cpu", or "cuda" for this machine's first GPU). The stage's loss runs without its setup: SFT,
    and DPO's reference-free losses."""
    from rayft.train.loop import resolve_precision

    if cfg.distributed.num_workers != 1:
        raise ValueError("measure_peak runs one rank: set distributed.num_workers=1")
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    ensure_process_group("nccl" if on_gpu else "fake")
    cfg = cfg.model_copy(deep=True)
    precision = resolve_precision(cfg.train.precision, device, say=lambda _: None)
    cfg.train.precision = precision
    torch.manual_seed(cfg.train.seed)
    # ZeRO-3 replaces torch.nn.functional.linear process-wide: a later measurement in this process
    # must run with the linear its own worker would have
    linear = torch.nn.functional.linear
    try:
        return _measure(cfg, model_dir, steps, device, on_gpu, precision)
    finally:
        torch.nn.functional.linear = linear


def _measure(cfg: TrainJobConfig, model_dir, steps: int, device: torch.device, on_gpu: bool, precision: str) -> Measured:
    import deepspeed

    from rayft.methods import Run, get_method
    from rayft.models.loading import load_for_training
    from rayft.objectives import get_objective
    from rayft.train.deepspeed_config import deepspeed_config, skip_the_inference_comm_build
    from rayft.train.loop import build_optimizer

    skip_the_inference_comm_build()
    method, opts = get_method(cfg.method.type), cfg.method.options
    objective = get_objective(cfg.stage)
    with (CudaCount(device) if on_gpu else CpuCount()) as count:
        run = Run(total_steps=max(steps, 10), precision=precision, zero_stage=cfg.distributed.zero_stage)
        model = load_for_training(model_dir, cfg.method, device, cfg.train.attention, run,
                                  cfg.train.gradient_checkpointing)
        count.mark("loaded")
        optimizer = build_optimizer(model, cfg, on_gpu)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, 1, on_gpu),
                                          dist_init_required=False)
        count.mark("engine")
        batch = worst_case_batch(cfg, model.config.vocab_size, objective.sequences_per_row, device)
        engine.train()
        for micro in range(steps * cfg.train.grad_accum):
            loss_sum, normaliser, _ = objective.loss(cfg.stage_options, engine, batch, precision, method, opts)
            count.mark(f"forward.{micro}")
            engine.backward(loss_sum / normaliser.clamp(min=1))
            count.mark(f"backward.{micro}")
            engine.step()
            count.mark(f"step.{micro}")
        del engine, optimizer, model, batch, loss_sum, normaliser
        count.mark("released")
    peak, phases = count.result()
    return Measured(peak_bytes=peak, loaded_bytes=phases["loaded"], engine_bytes=phases["engine"], steps=steps,
                    left_bytes=phases["released"], phases=phases)


def measure_peak_on_ray(cfg: TrainJobConfig, steps: int, use_gpu: bool) -> Measured:
    """measure_peak of `cfg` at one rank, in a Ray task that holds one Ray Train worker's resources
    (its CPUs, and its GPU on GPU clusters), so that it runs where and as a worker would."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    one_rank = cfg.to_dict()
    one_rank["distributed"]["num_workers"] = 1
    # called from a Tune trial, whose placement group holds no CPU: the task takes its own
    outside_trial = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(num_cpus=cfg.distributed.cpus_per_worker, num_gpus=1 if use_gpu else 0,
                      scheduling_strategy=outside_trial)(_measure_task)
    return ray.get(task.remote(one_rank, steps, "cuda" if use_gpu else "cpu"))


def _measure_task(raw: dict, steps: int, device: str) -> Measured:
    from rayft.config import parse_config
    from rayft.models import resolve_model_path

    cfg = parse_config(raw, source="measure")
    return measure_peak(cfg, resolve_model_path(cfg.model.name_or_path), steps=steps, device=device)
