"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form (P diag(E) Q) whose rank budget is reallocated
during training by the importance of each singular triplet, through peft's rank allocator.

peft calls its allocator after optimizer.step() and before zero_grad(); DeepSpeed's step does
both at once, and under ZeRO-1/2 the gradients live in partitioned buffers and the weights that
the optimizer updates are its own fp32 copies. So the allocator is driven from two hooks here:
before the step it reads the whole gradients (deepspeed.utils.safe_get_full_grad) to update the
importance scores; after the step it masks the pruned triplets in the model's weights and in
DeepSpeed's fp32 copies (safe_set_full_fp32_param), so that the next step starts masked.
(peft scores |w * grad| with the weights after the step; here they are those before it.)
ZeRO-3 is refused: the allocator needs whole lora_E/A/B tensors on every rank.

The output is a plain LoRA with a rank pattern: each module keeps the triplets that survived,
B' = B[:, kept] * alpha / init_r and A' = (A * E)[kept] at scaling 1, so that it serves and merges
as any LoRA does; modules with no triplet left are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import Method, register
from rayft.methods.lora import (adapted_base_params, check_target_modules, keep_adapter_inputs_in_autocast_dtype,
                               lora_layer_activations)

ADAPTER = "default"
ALLOCATOR_FILE = "adalora_scores.safetensors"
RANK_PATTERN_FILE = "adalora_rank_pattern.json"


def allocator_device(model) -> torch.device:
    return next(p.device for n, p in model.named_parameters() if "lora_E" in n)


class AdaloraOptions(Strict):
    init_r: int = Field(12, gt=0, le=1024)
    target_r: int = Field(8, gt=0, le=1024)  # the average rank the budget shrinks to
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    tinit: int = Field(0, ge=0)  # steps before the budget starts to shrink
    tfinal: int = Field(0, ge=0)  # steps at the end with the final budget fixed
    delta_t: int = Field(1, gt=0)  # steps between two reallocations
    beta1: float = Field(0.85, gt=0, lt=1)  # smoothing of the importance scores
    beta2: float = Field(0.85, gt=0, lt=1)  # smoothing of their uncertainty
    orth_reg_weight: float = Field(0.5, ge=0)  # keeps P and Q near-orthogonal

    @model_validator(mode="after")
    def _prunes_only(self):
        if self.target_r >= self.init_r:
            raise ValueError(f"method.adalora.target_r={self.target_r} is not below init_r={self.init_r}: "
                             "AdaLoRA prunes ranks (with target_r = init_r it has no budget to reallocate: use lora)")
        return self


class _Tensors:
    """Stand-in for a model in peft's rank allocator: whole tensors under their peft names."""

    def __init__(self, pairs):
        self.pairs = pairs

    def named_parameters(self):
        return iter(self.pairs)


def _lora_params(peft_model):
    return [(n, p) for n, p in peft_model.base_model.model.named_parameters() if "lora_" in n and ADAPTER in n]


@register
class AdaloraMethod(Method):
    adapters_can_be_disabled = True
    name = "adalora"
    usual_lr = 1e-3
    options = AdaloraOptions
    output = "adapter"
    mergeable = True

    def serve_kind(self, opts):
        return "lora_rank_pattern"  # exported as a LoRA whose modules have ranks of their own

    def check_job(self, opts, job):
        if job.train.precision == "fp16":
            raise ValueError("method.type=adalora cannot run with train.precision=fp16: its importance scores "
                             "would read loss-scaled (and, on overflowed steps, infinite) gradients; use bf16 or fp32")
        if job.distributed.zero_stage == 3:
            raise ValueError("method.type=adalora cannot run with distributed.zero_stage=3: its rank allocation "
                             "reads and masks whole lora_E/A/B tensors, which ZeRO-3 partitions; use 0, 1 or 2")

    def check(self, opts, model):
        check_target_modules(self.name, opts.target_modules, model)

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        return lora_layer_activations(layer, tokens, compute_bytes)

    def smaller(self, opts):
        if opts.init_r < 4:
            return None
        changed = opts.model_dump()  # the budget halved with the initial rank, so it stays below it
        changed.update(init_r=opts.init_r // 2, target_r=max(1, opts.target_r // 2))
        return f"method.adalora.init_r={opts.init_r // 2} with target_r={changed['target_r']}", changed

    def check_steps(self, opts, total_steps):
        if opts.tinit + opts.tfinal >= total_steps:
            raise ConfigError(f"method.adalora.tinit={opts.tinit} + tfinal={opts.tfinal} leave no step for the rank "
                              f"allocation in a run of {total_steps} steps")

    def apply(self, opts, model, run):
        from peft import AdaLoraConfig, TaskType, get_peft_model

        config = AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=opts.init_r, target_r=opts.target_r,
                               lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=opts.target_modules,
                               tinit=opts.tinit, tfinal=opts.tfinal, deltaT=opts.delta_t, beta1=opts.beta1,
                               beta2=opts.beta2, orth_reg_weight=opts.orth_reg_weight, total_step=run.total_steps)
        model = get_peft_model(model, config)
        if run.precision != "fp32":
            keep_adapter_inputs_in_autocast_dtype(model)
        return model

    def extra_loss(self, opts, model):
        """peft's orthogonal regularisation (its forward adds it only when given labels)."""
        if not opts.orth_reg_weight:
            return None
        terms = []
        for name, p in _lora_params(model):
            if "lora_A" in name or "lora_B" in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.norm(cov - torch.eye(*cov.shape, device=p.device, dtype=cov.dtype), p="fro"))
        return opts.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def before_optimizer_step(self, opts, model, step):
        from deepspeed.utils import safe_get_full_grad

        config = model.peft_config[ADAPTER]
        if step >= config.total_step - config.tfinal:
            return
        pairs = []
        for name, p in _lora_params(model):
            grad = safe_get_full_grad(p)  # collective under ZeRO-1/2: every rank calls it
            whole = p.detach().clone()
            whole.grad = grad.to(whole.dtype) if grad is not None else torch.zeros_like(whole)
            pairs.append((name, whole))
        model.base_model.rankallocator.update_ipt(_Tensors(pairs))

    def after_optimizer_step(self, opts, engine, step):
        model = engine.module
        config, allocator = model.peft_config[ADAPTER], model.base_model.rankallocator
        params = _lora_params(model)
        values = {name: p for name, p in params if "lora_E" in name}  # only E is masked
        copies = [(name, p.detach().clone()) for name, p in params]  # A and B name the triplets' scores
        if step < config.total_step - config.tfinal:
            budget, due = allocator.budget_schedule(step)
            if not due:
                return
            config.rank_pattern = allocator.mask_to_budget(_Tensors(copies), budget)
        elif step == config.total_step - config.tfinal:
            budget, _ = allocator.budget_schedule(step)
            config.rank_pattern = allocator.mask_to_budget(_Tensors(copies), budget)
            allocator.reset_ipt()
        else:
            allocator.mask_using_rank_pattern(_Tensors(copies), config.rank_pattern)
        self._write(engine, values, dict(copies))

    @staticmethod
    def _write(engine, params, masked):
        """The masked E into the model and into DeepSpeed's fp32 copies (ZeRO-1/2), or the optimizer's own params."""
        from deepspeed.utils import safe_set_full_fp32_param

        zero = engine.zero_optimization_stage()
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(masked[name])
                if zero >= 1:
                    safe_set_full_fp32_param(p, masked[name].float())

    def changed_base_params(self, opts, model):
        return adapted_base_params(model)

    # ---- checkpoints: the allocator's scores and the rank pattern, which a resumed run needs
    def save_state(self, opts, engine, directory: Path):
        allocator = engine.module.base_model.rankallocator
        tensors = {f"{kind}/{name}": t.detach().cpu().contiguous()
                   for kind, scores in (("ipt", allocator.ipt), ("avg", allocator.exp_avg_ipt), ("unc", allocator.exp_avg_unc))
                   for name, t in scores.items()}
        save_file(tensors, directory / ALLOCATOR_FILE, metadata={"format": "pt"})
        (directory / RANK_PATTERN_FILE).write_text(json.dumps(engine.module.peft_config[ADAPTER].rank_pattern))

    def load_state(self, opts, engine, directory: Path):
        if not (directory / ALLOCATOR_FILE).is_file():
            return
        allocator = engine.module.base_model.rankallocator
        stores = {"ipt": allocator.ipt, "avg": allocator.exp_avg_ipt, "unc": allocator.exp_avg_unc}
        for key, tensor in load_file(directory / ALLOCATOR_FILE).items():
            kind, name = key.split("/", 1)
            stores[kind][name] = tensor.to(allocator_device(engine.module))
        engine.module.peft_config[ADAPTER].rank_pattern = json.loads((directory / RANK_PATTERN_FILE).read_text())

    def export(self, opts, module, state, directory: Path):
        from peft import LoraConfig, TaskType

        scale = opts.alpha / opts.init_r  # peft AdaLoRA: scaling alpha over ranknum (= init_r)
        tensors, ranks = {}, {}
        for key in state:
            if ".lora_E." not in key:
                continue
            stem = key.split(".lora_E.")[0]  # base_model.model.<module path>
            e = state[key].float().view(-1)
            kept = (e != 0).nonzero().view(-1)
            if not len(kept):
                continue  # the allocator pruned every triplet: no change to this module
            a = state[f"{stem}.lora_A.{ADAPTER}"].float()
            b = state[f"{stem}.lora_B.{ADAPTER}"].float()
            tensors[f"{stem}.lora_A.weight"] = (a * e[:, None])[kept].contiguous()
            tensors[f"{stem}.lora_B.weight"] = (b[:, kept] * scale).contiguous()
            ranks[stem.removeprefix("base_model.model.")] = len(kept)
        if not ranks:
            raise RuntimeError("AdaLoRA pruned every triplet of every module: nothing to save")
        top = max(ranks.values())
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=top, lora_alpha=top, target_modules=sorted(ranks),
                            rank_pattern=ranks, alpha_pattern=dict(ranks),  # scaling 1 in every module
                            base_model_name_or_path=module.peft_config[ADAPTER].base_model_name_or_path)
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
