"""The DeepSpeed config, built from the rayft config."""

from __future__ import annotations

from typing import Any

from rayft.config import TrainJobConfig


def deepspeed_config(cfg: TrainJobConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    train, dist = cfg.train, cfg.distributed
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage >= 1:
        # ZeRO-1/2 with overlap_comm reduce gradients on a stream of their own, and then the host
        # waits for the device after every micro-batch's backward (stage_1_and_2.py's reduce
        # epilogue): only where there is communication to overlap, i.e. more than one GPU. ZeRO-3
        # waits there either way (stage3.py), so it keeps the overlap.
        overlap = on_gpu and (world_size > 1 or dist.zero_stage == 3)
        zero.update(contiguous_gradients=True, overlap_comm=overlap,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if dist.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = dist.zero3_persistence_threshold
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        # bf16 runs under torch.autocast in the loss step (fp32 master weights, bf16 matmuls),
        # the same on CPU and GPU; fp16 needs DeepSpeed's dynamic loss scaling (GPU only).
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": False},
        # DeepSpeed's engine turns an enclosing CUDA autocast off inside its forward unless its own
        # torch_autocast section is on (runtime/torch_autocast.py; a CPU autocast it leaves alone):
        # without this, bf16 jobs computed in fp32 on GPUs, and failed on LoRA's bf16-stored frozen
        # weights (seen on an H200). No module is listed as safe for bf16 communication, so the
        # gradients are still all-reduced in fp32.
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
           if train.precision == "bf16" else {}),
        # rayft builds the optimizer itself (torch AdamW or bitsandbytes paged AdamW 8-bit).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default, for its own speed reports, which rayft does
        # not print) synchronizes the device at every forward and step: on a GPU the host would wait
        # for all queued work twice per micro-batch. rayft times its steps itself (train/loop.py).
        "timers": {"throughput": {"enabled": False}},
    }


def skip_the_inference_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op (deepspeed_shm_comm: ~35 s of
    C++ on a fresh machine, and again for each virtual environment) when its process group starts.
    Only DeepSpeed's inference all-reduce (tensor-parallel inference) uses that op, and falls back
    to torch.distributed without it; ZeRO's collectives never touch it. Called before anything in the
    process starts DeepSpeed's communication backend (deepspeed.initialize, or zero.Init when a
    model is built under ZeRO-3)."""
    import importlib

    # by name: `import deepspeed.comm.torch` binds the torch package, which deepspeed.comm imports
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None
