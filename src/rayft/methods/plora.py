"""PLoRA (periodic LoRA, Meng et al. 2024): LoRA merged into the base every `merge_every` steps and
started afresh (A re-initialised, B zero, their optimizer state reset), so that the run's total
update can have a rank above r while each phase trains only a rank-r adapter.

The accumulated update s (B_1 A_1 + ... + B_k A_k) is exactly one LoRA of rank k r: A' stacks the
A_i, B' concatenates the B_i. That is what is saved, so the output stays a small servable LoRA of
the unmodified base. The merged factors are also part of every checkpoint (merges.safetensors):
a resumed run re-applies them to the freshly loaded base before it trains on.

ZeRO-3 is refused: a merge writes whole base weights, which ZeRO-3 partitions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import Method, Preset, register
from rayft.methods.lora import (adapted_base_params, check_target_modules, half_rank,
                               keep_adapter_inputs_in_autocast_dtype, lora_layer_activations,
                               fuse_plain_lora_layers)

ADAPTER = "default"
MERGES_FILE = "merges.safetensors"


class PloraOptions(Strict):
    r: int = Field(8, gt=0, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    merge_every: int = Field(..., gt=0)  # optimizer steps between two merge-and-restarts
    # after a restart the learning rate climbs back linearly over these steps: the fresh adapter's
    # Adam moments start at zero while the optimizer's step count (its bias correction) goes on
    rewarm_steps: int = Field(2, ge=0)


def lora_layers(model):
    """(module path under the peft model, layer) for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


@register
class PloraMethod(Method):
    name = "plora"
    usual_lr = 1e-3

    def presets(self):
        return {"plora": Preset({"merge_every": 10}, self.usual_lr)}  # merge_every has no default
    options = PloraOptions
    output = "adapter"
    mergeable = True

    def __init__(self):
        self.merged: list[dict[str, torch.Tensor]] = []  # per merge: {"<layer>.A": ..., "<layer>.B": ...}
        self.total_steps = 0

    def serve_kind(self, opts):
        return "lora"

    def check_job(self, opts, job):
        if job.distributed.zero_stage == 3:
            raise ValueError("method.type=plora cannot run with distributed.zero_stage=3: a merge writes whole base "
                             "weights, which ZeRO-3 partitions; use 0, 1 or 2")
        if job.train.optimizer != "adamw":
            raise ValueError(f"method.type=plora needs train.optimizer=adamw: a restart resets the adapter's Adam "
                             f"moments, which {job.train.optimizer} keeps quantised under other names")
        if job.train.precision == "fp16" and job.distributed.zero_stage == 0:
            raise ValueError("method.type=plora cannot run with train.precision=fp16 at distributed.zero_stage=0: "
                             "DeepSpeed's fp16 optimizer there keeps fp32 copies a restart cannot reach; use ZeRO-1 or 2")
        if opts.rewarm_steps >= opts.merge_every:
            raise ValueError(f"method.plora.rewarm_steps={opts.rewarm_steps} must be below merge_every={opts.merge_every}")

    def check(self, opts, model):
        check_target_modules(self.name, opts.target_modules, model)

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        return lora_layer_activations(layer, tokens, compute_bytes)

    def smaller(self, opts):
        return half_rank(self.name, opts)

    def check_steps(self, opts, total_steps):
        if opts.merge_every >= total_steps:
            raise ConfigError(f"method.plora.merge_every={opts.merge_every} is not below the run's {total_steps} steps: "
                              "no merge-and-restart would happen (that is plain method lora)")

    def apply(self, opts, model, run):
        from peft import LoraConfig, TaskType, get_peft_model

        self.merged, self.total_steps = [], run.total_steps
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=opts.r, lora_alpha=opts.alpha,
                                                 lora_dropout=opts.dropout, target_modules=opts.target_modules))
        if run.precision != "fp32":
            keep_adapter_inputs_in_autocast_dtype(model)
        fuse_plain_lora_layers(model)
        return model

    def lr_scale(self, opts, step):
        since = step % opts.merge_every
        if step < opts.merge_every or not opts.rewarm_steps or since >= opts.rewarm_steps:
            return 1.0
        return (since + 1) / (opts.rewarm_steps + 1)

    def changed_base_params(self, opts, model):
        return adapted_base_params(model)

    # ---- merge and restart
    def after_optimizer_step(self, opts, engine, step):
        if step % opts.merge_every or step >= self.total_steps:
            return  # (a merge after the last step would only add a zero block to the output)
        model = engine.module
        factors = {}
        generator = torch.Generator().manual_seed(7919 * step)  # the same fresh A on every rank
        with torch.no_grad():
            for name, layer in lora_layers(model):
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                factors[f"{name}.A"], factors[f"{name}.B"] = a.detach().cpu().clone(), b.detach().cpu().clone()
                self._fold(layer, a, b)
                fresh_a = torch.empty_like(a, device="cpu")
                bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)), as peft initialises A
                fresh_a.uniform_(-bound, bound, generator=generator)
                self._reset(engine, a, fresh_a.to(a.device))
                self._reset(engine, b, torch.zeros_like(b))
        self.merged.append(factors)

    @staticmethod
    def _fold(layer, a, b):
        weight = layer.get_base_layer().weight
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
        weight.add_((delta.T if getattr(layer, "fan_in_fan_out", False) else delta).to(weight.dtype))

    @staticmethod
    def _reset(engine, param, value):
        """The parameter, DeepSpeed's fp32 copy of it (ZeRO-1/2) and its Adam moments, zeroed alike at
        every stage; the step count stays (under ZeRO-1/2 it belongs to a whole flat partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        param.data.copy_(value)
        if engine.zero_optimization_stage() >= 1:
            safe_set_full_fp32_param(param, value.float())
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, torch.zeros_like(value, dtype=torch.float32), key)
        else:
            optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in optimizer.state.get(param, {}):
                    optimizer.state[param][key].zero_()

    # ---- checkpoints
    def save_state(self, opts, engine, directory: Path):
        tensors = {f"{i}:{key}": t.contiguous() for i, factors in enumerate(self.merged) for key, t in factors.items()}
        save_file(tensors, directory / MERGES_FILE, metadata={"merges": json.dumps(len(self.merged))})

    def load_state(self, opts, engine, directory: Path):
        if not (directory / MERGES_FILE).is_file():
            return
        tensors = load_file(directory / MERGES_FILE)
        count = 1 + max((int(k.split(":")[0]) for k in tensors), default=-1)
        self.merged = [{k.split(":", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{i}:")} for i in range(count)]
        layers = dict(lora_layers(engine.module))
        with torch.no_grad():
            for factors in self.merged:
                for name, layer in layers.items():
                    self._fold(layer, factors[f"{name}.A"].to(layer.lora_A[ADAPTER].weight.device),
                               factors[f"{name}.B"].to(layer.lora_B[ADAPTER].weight.device))

    # ---- output: one LoRA of rank (merges + 1) r
    def export(self, opts, module, state, directory: Path):
        peft_config = module.peft_config[ADAPTER]
        phases = len(self.merged) + 1
        stacked = {}
        for name, _ in lora_layers(module):
            a_key, b_key = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
            stacked[a_key] = torch.cat([f[f"{name}.A"] for f in self.merged] + [state[a_key].cpu()], dim=0)
            stacked[b_key] = torch.cat([f[f"{name}.B"] for f in self.merged] + [state[b_key].cpu()], dim=1)
        saved = (peft_config.r, peft_config.lora_alpha)
        peft_config.r, peft_config.lora_alpha = phases * opts.r, phases * opts.alpha  # the same scaling alpha/r
        try:
            module.save_pretrained(directory, state_dict=stacked, safe_serialization=True)
        finally:
            peft_config.r, peft_config.lora_alpha = saved
