"""The method interface and its registry.

A method is one module under rayft/methods/ that defines its options (the `method.<name>` block
of the config), registers itself once, and answers everything the trainer asks of it. The loop,
runner, sweep and jobs never name a method: they call these hooks and read these capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import create_model

from rayft.config import Strict

_REGISTRY: dict[str, "Method"] = {}


@dataclass(frozen=True)
class Run:
    """What a method may need to know of the run it joins."""
    total_steps: int = 1
    precision: str = "fp32"  # resolved: bf16 | fp16 | fp32
    zero_stage: int = 0


class NoOptions(Strict):
    """A method without options: its block may be absent or empty."""


@dataclass(frozen=True)
class Preset:
    """A named variant of a method, as `rayft compare --methods` takes it: the method's block
    (`method.<name>`, over the method's defaults) and the learning rate the family usually trains at."""
    options: dict[str, Any]
    lr: float


class Method:
    """How one fine-tuning method loads, prepares, trains and saves a model."""

    name: str = ""
    options: type[Strict] = NoOptions  # the schema of method.<name>
    # "adapter": only the trained weights are saved (next to a reference to their base);
    # "model": a whole model directory is saved.
    output: Literal["adapter", "model"] = "model"

    # the learning rate this method usually trains at (its presets' default; `rayft compare`)
    usual_lr: float = 1e-3

    def presets(self) -> dict[str, Preset]:
        """Named variants of this method (`rayft compare --methods dora,pissa`): name -> Preset.
        The method's own name, at its defaults and usual_lr, is one unless listed here otherwise.
        A name belongs to one method only (preset_names() refuses a name defined twice)."""
        return {}

    # ---- capabilities the loop and the pre-flight read instead of branching on names
    # May several samples share a packed row? False turns data.packing off (with a note), for
    # methods whose extra tokens or state are per row, not per sample.
    packs: bool = True
    # May the output head return the loss itself (train/head_loss.py)?
    fused_head: bool = True
    # Can `rayft merge` fold the output into the base?
    mergeable: bool = False
    # Why train.gradient_checkpointing cannot run with this method ("": it can)
    checkpointing_refusal: str = ""
    # Why train.compile cannot run with this method ("": it can)
    compile_refusal: str = ""
    # Does the model compute exactly what the base does before the first step? (Then the policy at
    # step 0 is a preference stage's reference.) Soft prompts and AdapterFusion do not.
    equals_base_at_init: bool = True
    # Can the base be run with the method's weights switched off (peft's disable_adapter)?
    adapters_can_be_disabled: bool = False

    def can_disable_adapters(self, opts) -> bool:
        return self.adapters_can_be_disabled

    def disabled_adapters(self, model):
        """A context in which `model` computes what its base does (a preference stage's reference)."""
        from rayft.train.loop import unwrapped

        if not self.adapters_can_be_disabled:
            raise RuntimeError(f"method {self.name} cannot switch its weights off")
        return unwrapped(model).disable_adapter()

    def serve_kind(self, opts) -> Optional[str]:
        """The adapter kind a server would load (recorded in rayft.json), or None where the output is
        not an adapter of the base. Whether `rayft serve` loads that kind is serving's own check."""
        return None

    @classmethod
    @lru_cache(maxsize=None)
    def block_schema(cls):
        """A model with one field, the method's block, so that errors name method.<name>.<key>."""
        return create_model(f"{cls.name}_block", __base__=Strict, **{cls.name: (cls.options, ...)})

    # ---- checks, before anything is loaded
    def check_job(self, opts, job) -> None:
        """Raise ValueError for a job this method cannot run (ZeRO stage, offload, precision, packing):
        called when the config is read. `job` is the whole TrainJobConfig."""

    def check(self, opts, model) -> None:
        """Raise ConfigError when `opts` cannot apply to `model` (on the meta device)."""

    def check_steps(self, opts, total_steps: int) -> None:
        """Raise ConfigError when `opts` does not fit the run's number of optimizer steps."""

    # ---- setup on each worker
    def load_kwargs(self, opts, device) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` (quantization, device map)."""
        return {}

    def apply(self, opts, model, run: Run):
        """Make the model trainable the method's way; returns the model to train."""
        raise NotImplementedError

    def virtual_tokens(self, opts) -> int:
        """Positions the model's output has before each row's own tokens (soft prompts)."""
        return 0

    def extra_positions(self, opts) -> int:
        """Positions a row takes beyond its own tokens, out of the model's context (virtual tokens,
        or prefix tuning's key/value prefixes, which shift the row's positions)."""
        return self.virtual_tokens(opts)

    def param_groups(self, opts, model, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (a group may carry its own lr)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def lr_scale(self, opts, step: int) -> float:
        """A factor on the schedule's learning rate at optimizer step `step` (PLoRA's re-warmup)."""
        return 1.0

    def extra_loss(self, opts, model) -> Optional[torch.Tensor]:
        """A regularisation term added to each micro-batch's mean loss, or None."""
        return None

    # ---- per optimizer step, at the gradient-accumulation boundary
    def before_optimizer_step(self, opts, model, step: int) -> None:
        """Gradients of this step are complete (under ZeRO read them with deepspeed.utils.safe_get_full_grad)."""

    def after_optimizer_step(self, opts, engine, step: int) -> None:
        """The weights of step `step` are updated; `engine` is the DeepSpeed engine."""

    # ---- state of the method's own that a checkpoint must carry (beyond DeepSpeed's)
    def save_state(self, opts, engine, directory: Path) -> None:
        """Write it into the checkpoint `directory` (rank 0 only; safetensors or JSON, never pickle)."""

    def load_state(self, opts, engine, directory: Path) -> None:
        """Restore it on every rank, after DeepSpeed has loaded its own state."""

    # ---- what `rayft estimate` (estimate.py) asks beyond the parameters of the model as apply()
    # left it on the meta device
    def quantized_weight_bytes(self, opts) -> Optional[float]:
        """Bytes per element of the base's linear weights (the output head excepted) as this method
        loads them, quantisation state included; None: they stay in the loaded dtype. A quantised
        weight is dequantised for each use and not kept for the backward pass."""
        return None

    def frozen_linear_dtype(self, opts, run) -> Optional[torch.dtype]:
        """The dtype in which apply() stores the base's frozen linear weights (the output head
        excepted), rounded: only where every use of them rounds them to it anyway (a matmul under
        autocast); None: they stay in the loaded dtype."""
        return None

    def smaller(self, opts) -> Optional[tuple[str, dict]]:
        """A smaller version of the method for a run that does not fit (e.g. half the rank): (what
        changes, as method.<name>.<key>=value, the options with it), or None."""
        return None

    def layer_activations(self, opts, layer, tokens: int, compute_bytes: int) -> tuple[float, set[str]]:
        """What the method's own modules in one decoder layer keep for the backward pass, for a
        micro-batch of `tokens` tokens whose matmuls run in `compute_bytes` per element: (bytes,
        short names of the base linear layers whose input they keep, e.g. LoRA's A reads q_proj's)."""
        return 0.0, set()

    # ---- outputs
    def changed_base_params(self, opts, model) -> int:
        """How many of the base model's parameters the output changes once merged or applied."""
        return 0

    def export(self, opts, module, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Write the output (safetensors and its config) into `directory`; rank 0 only. `state`
        holds the gathered weights: the trainable ones for adapters, every one for models."""
        # peft's save_pretrained keeps only the adapter's keys of `state`; transformers' writes them all.
        module.save_pretrained(directory, state_dict=state, safe_serialization=True)

    def load_output(self, output_dir: Path, base):
        """`base` with the saved output applied, ready to evaluate (peft's format by default)."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, output_dir)

    def merge(self, output_dir: Path, base):
        """The base with the output folded in; refuses (RayftError) where the method cannot merge."""
        from rayft.errors import RayftError

        if not self.mergeable:
            raise RayftError(f"{output_dir}: a {self.name} output cannot be merged into its base model "
                             f"({self.merge_refusal})")
        applied = self.load_output(output_dir, base)
        return applied.merge_and_unload() if hasattr(applied, "merge_and_unload") else applied

    # why merge refuses, for methods that cannot merge
    merge_refusal = "it adds computation that no weight of the base can express"


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a weight kept for later (e.g. what the export subtracts); a meta tensor (`rayft
    estimate` applies methods on the meta device) stays one, of the same shape."""
    if tensor.is_meta:
        return torch.empty_like(tensor, device="meta")
    return tensor.detach().to("cpu", copy=True)


def register(method_cls: type[Method]) -> type[Method]:
    if not method_cls.name:
        raise ValueError(f"{method_cls.__name__} has no name")
    if method_cls.name in _REGISTRY:
        raise ValueError(f"method {method_cls.name!r} is registered twice")
    _REGISTRY[method_cls.name] = method_cls()
    return method_cls


def get_method(name: str) -> Method:
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def named_presets() -> dict[str, tuple[str, Preset]]:
    """Every name `rayft compare --methods` knows -> (method.type, Preset): each method's own name at
    its defaults and usual lr, and the variants it names itself."""
    named: dict[str, tuple[str, Preset]] = {}
    for method_name in method_names():
        method = _REGISTRY[method_name]
        presets = {method_name: Preset({}, method.usual_lr), **method.presets()}
        for preset_name, preset in presets.items():
            if preset_name in named and named[preset_name][0] != method_name:
                raise ValueError(f"preset {preset_name!r} is named by methods {named[preset_name][0]} and {method_name}")
            named[preset_name] = (method_name, preset)
    return named


def trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]
