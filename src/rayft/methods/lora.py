"""LoRA through peft: rsLoRA and DoRA switches, PiSSA/OLoRA initialisation, LoRA+ learning rates.

PiSSA and OLoRA start the adapter from the base weight's principal (or QR) directions and take
them out of the base (W_res = W - s B0 A0), so their raw output applies only to that modified
base. It is saved converted: the change s (B A - B0 A0) is one LoRA of rank 2r, A' = [A; A0] and
B' = [B, -B0], which applies to the unmodified base. LoRA+ trains B with a higher learning rate
than A (plus_lr_ratio x lr); its output is a plain LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import Field, field_validator

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import Method, Preset, host_copy, register
from rayft.models.loading import release_checkpoint_map


class LoraOptions(Strict):
    r: int = Field(16, gt=0, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" (every linear layer but the output head) or a list of module names
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output column
    # gaussian: A random, B zero (outputs unchanged at init); pissa / olora: see the module docstring
    init: Literal["gaussian", "pissa", "olora"] = "gaussian"
    plus_lr_ratio: Optional[float] = Field(None, gt=0)  # LoRA+: B's learning rate = ratio x lr

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if value == []:
            raise ValueError("names no module; list at least one, or use all-linear")
        return value


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (the output head excluded)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = full_name.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return sorted(names)


def check_target_modules(block: str, targets, model) -> None:
    if targets == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"method.{block}.target_modules: {missing} not in the model; "
                          f"linear modules are: {', '.join(available)}")


def base_weight_numel(layer) -> int:
    """Elements of a wrapped layer's base weight (4-bit weights by their unpacked shape)."""
    base = layer.get_base_layer()
    return base.in_features * base.out_features


def adapted_base_params(model) -> int:
    """Base weights a merge would change: every weight that a LoRA-style layer wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(base_weight_numel(m) for m in model.modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "get_base_layer"))


def lora_layer_activations(layer, tokens: int, compute_bytes: int) -> tuple[float, set[str]]:
    """What peft's LoRA layers (LoRA, DoRA, AdaLoRA's SVD form, PLoRA) in one decoder layer keep for
    the backward pass: A's output (for B's gradient), the dropout's mask, and DoRA's extra base
    output (for its magnitude's gradient); A keeps its layer's input."""
    from peft.tuners.lora import LoraLayer

    kept_bytes, reads = 0.0, set()
    for name, module in layer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, rank in module.r.items():
            reads.add(name.rsplit(".", 1)[-1])
            kept_bytes += tokens * rank * compute_bytes
            if getattr(module.lora_dropout[adapter], "p", 0):
                kept_bytes += tokens * module.in_features  # a bool mask
            if module.use_dora.get(adapter):
                kept_bytes += 2 * tokens * module.out_features * compute_bytes
    return kept_bytes, reads


def half_rank(block: str, opts):
    """Options with half the rank r (and alpha, so the scaling stays), or None at rank 1."""
    if opts.r <= 1:
        return None
    changed = opts.model_dump()
    changed.update(r=opts.r // 2, alpha=opts.alpha * (opts.r // 2) / opts.r)
    return f"method.{block}.r={opts.r // 2}", changed


def peft_lora_config(opts):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
        target_modules=opts.target_modules, use_rslora=opts.use_rslora, use_dora=opts.use_dora,
        init_lora_weights=True if opts.init == "gaussian" else opts.init,
    )


def keep_adapter_inputs_in_autocast_dtype(model) -> None:
    """peft casts a LoRA layer's input to the adapter's dtype (fp32) and autocast casts it back to
    bf16 for the matmul: two copies of an activation per layer, forward and backward, that change
    no number (bf16 -> fp32 -> bf16 is exact). Only for forwards under autocast, and only plain
    LoRA layers: DoRA's extra terms do change with the input's dtype."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False


def store_frozen_linear_weights_in(model, dtype: torch.dtype) -> int:
    """Frozen linear weights (the output head excepted) are stored in `dtype`, autocast's compute
    dtype: every use of one under autocast is a matmul that casts it to `dtype` first, so the
    numbers stay the same, bit for bit (tested), where autocast otherwise keeps no copy of a
    frozen weight and casts every one anew in each forward, keeping the copy for the backward
    beside the fp32 original. Left alone: trainable weights, quantised ones, meta ones (the
    estimate's model: estimate.py counts them from the method's frozen_linear_dtype), the output
    head (rayft's fused head casts it itself), and a weight that a module other than a linear one
    also holds (tied embeddings feed the fp32 residual stream). Returns how many were converted."""
    head = model.get_output_embeddings()
    shared = {id(param) for module in model.modules() if not isinstance(module, torch.nn.Linear)
              for param in module.parameters(recurse=False)}
    converted = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is torch.nn.Linear and module is not head and weight is not None
                    and not weight.requires_grad and weight.dtype == torch.float32 and not weight.is_meta
                    and id(weight) not in shared):
                weight.data = weight.data.to(dtype)
                converted += 1
    if converted:  # the fp32 originals were views of the checkpoint file: let it go
        release_checkpoint_map(model, keep=lambda tensor: tensor.dtype == dtype or tensor.requires_grad)
    return converted


def fuse_plain_lora_layers(model) -> None:
    """Plain LoRA layers (peft's `lora.Linear` without a variant such as DoRA) compute
    base(x) + s B(A(x)) as one addmm: the base output plus s (x A^T) B^T, accumulated in the
    matmul, where peft scales the adapter's output and adds it in two more passes over the
    layer's whole output (and two more in the backward). The result is the same sum, rounded once
    where peft rounds each part in bf16; tests/test_methods.py compares the two. Every other case
    (adapters disabled or merged, several adapters, mixed batches, a variant, an input that peft
    would cast, ZeRO-3's partitioned adapter weights) goes to peft's forward."""
    import types

    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear and isinstance(module.base_layer, torch.nn.Linear):
            module.forward = types.MethodType(_fused_lora_forward, module)


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    peft_forward = type(self).forward  # bound only to peft's own lora.Linear (fuse_plain_lora_layers)
    adapters = self.active_adapters
    adapter = adapters[0] if len(adapters) == 1 else None
    if not (adapter is not None and adapter in self.lora_A and adapter not in self.lora_variant
            and not self.disable_adapters and not self.merged and not args and not kwargs):
        return peft_forward(self, x, *args, **kwargs)
    down_layer, up_layer = self.lora_A[adapter], self.lora_B[adapter]
    if (up_layer.bias is not None or hasattr(up_layer.weight, "ds_id")  # ZeRO-3 gathers B only in its own forward
            or not (torch.is_autocast_enabled(x.device.type)
                    or x.dtype == down_layer.weight.dtype == self.base_layer.weight.dtype)):
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    down = down_layer(self.lora_dropout[adapter](x))
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                        up_layer.weight.t(), alpha=self.scaling[adapter])
    return fused.view(result.shape)


@register
class LoraMethod(Method):
    adapters_can_be_disabled = True  # peft's disable_adapter: the base alone

    def can_disable_adapters(self, opts) -> bool:
        return opts.init == "gaussian"  # PiSSA/OLoRA took their factors out of the base weights
    name = "lora"
    options = LoraOptions
    output = "adapter"
    mergeable = True
    usual_lr = 1e-3  # high for LoRA, fine for short runs; the initialisations from the base want half

    def presets(self):
        # PiSSA/OLoRA start from the base's principal directions: alpha = r keeps their scale 1, no dropout
        principal = {"alpha": 16, "dropout": 0.0}
        return {"rslora": Preset({"use_rslora": True}, 1e-3), "dora": Preset({"use_dora": True}, 1e-3),
                "lora+": Preset({"plus_lr_ratio": 8}, 5e-4),
                "pissa": Preset({**principal, "init": "pissa"}, 5e-4), "olora": Preset({**principal, "init": "olora"}, 5e-4)}

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}  # PiSSA/OLoRA: A0 and B0, for the export's conversion

    def serve_kind(self, opts) -> str:
        return "dora" if opts.use_dora else "lora"

    def check_job(self, opts, job):
        if opts.init != "gaussian" and opts.use_dora:
            raise ValueError(f"method.{self.name}.init={opts.init} with use_dora: the conversion to a LoRA "
                             "of the unmodified base is defined for plain LoRA only")

    def check(self, opts, model):
        check_target_modules(self.name, opts.target_modules, model)

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        return lora_layer_activations(layer, tokens, compute_bytes)

    def smaller(self, opts):
        return half_rank(self.name, opts)

    def apply(self, opts, model, run):
        from peft import get_peft_model

        model = get_peft_model(model, peft_lora_config(opts))
        self.initial = {name: host_copy(param) for name, param in model.named_parameters()
                        if opts.init != "gaussian" and ("lora_A" in name or "lora_B" in name)}
        if run.precision != "fp32":
            keep_adapter_inputs_in_autocast_dtype(model)
        stored = self.frozen_linear_dtype(opts, run)
        if stored is not None:
            store_frozen_linear_weights_in(model, stored)
        fuse_plain_lora_layers(model)
        return model

    def frozen_linear_dtype(self, opts, run):
        # Under bf16 autocast only (~5% of a one-thread CPU step; README, Benchmark). fp16 runs are
        # DeepSpeed's (it halves every weight itself); DoRA's weight norm reads the base weight
        # outside a matmul; ZeRO-3 would partition bf16 and fp32 parameters together, not run.
        if run.precision == "bf16" and not opts.use_dora and run.zero_stage != 3:
            return torch.bfloat16
        return None

    def param_groups(self, opts, model, lr):
        if opts.plus_lr_ratio is None:
            return super().param_groups(opts, model, lr)
        b_side = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
        return [{"params": rest, "lr": lr}, {"params": b_side, "lr": lr * opts.plus_lr_ratio}]

    def changed_base_params(self, opts, model):
        return adapted_base_params(model)

    def export(self, opts, module, state, directory: Path):
        if not self.initial:
            return super().export(opts, module, state, directory)
        converted = {}
        for name, tensor in state.items():
            if "lora_A" in name:
                converted[name] = torch.cat([tensor, self.initial[name].to(tensor.dtype)], dim=0)
            elif "lora_B" in name:
                converted[name] = torch.cat([tensor, -self.initial[name].to(tensor.dtype)], dim=1)
            else:
                converted[name] = tensor
        peft_config = module.peft_config["default"]
        saved = (peft_config.r, peft_config.lora_alpha, peft_config.init_lora_weights)
        # rank 2r at the same scaling: alpha/r -> 2 alpha / 2r; alpha/sqrt(r) -> sqrt(2) alpha / sqrt(2r)
        peft_config.r = 2 * opts.r
        peft_config.lora_alpha = opts.alpha * (math.sqrt(2) if opts.use_rslora else 2)
        peft_config.init_lora_weights = True
        try:
            module.save_pretrained(directory, state_dict=converted, safe_serialization=True)
        finally:
            peft_config.r, peft_config.lora_alpha, peft_config.init_lora_weights = saved
