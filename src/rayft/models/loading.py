"""Load a base model for training, the method's way, on the worker's device."""

from __future__ import annotations

from pathlib import Path

import torch

from rayft.config import MethodConfig


def attention_implementation(attention: str, model_config) -> str:
    """The transformers attn_implementation for train.attention (see TrainConfig)."""
    from rayft.train import attention as packed

    if attention == "packed" or (attention == "auto" and packed.supports(model_config)):
        return packed.register()
    return "sdpa" if attention == "auto" else attention


def load_for_training(model_dir: str | Path, method_cfg: MethodConfig, device: torch.device, attention: str = "auto",
                      run=None, gradient_checkpointing: bool = False):
    """The base model with the method applied. `run` (rayft.methods.Run): the run's steps and
    resolved precision; the default suits a model built for a check or a test."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayft.methods import Run, get_method

    if gradient_checkpointing not in (True, False):  # `auto` is decided by the driver's pre-flight (estimate.py)
        raise ValueError(f"train.gradient_checkpointing={gradient_checkpointing!r} reached a worker unresolved")
    method = get_method(method_cfg.type)
    if not method.packs and attention == "auto":
        attention = "sdpa"  # rows hold one sample each: no packed layout to attend over
    config = AutoConfig.from_pretrained(model_dir)  # read once: it picks the attention and builds the model
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation=attention_implementation(attention, config),
        **method.load_kwargs(method_cfg.options, device))
    # The KV cache would make transformers ignore packed position ids (and is useless in training).
    model.config.use_cache = False
    if gradient_checkpointing:
        # Before the method is applied: peft reads it (and refuses prefix tuning). Non-reentrant
        # checkpointing needs no input that requires grad (frozen embeddings under LoRA) and
        # passes keyword arguments (rayft's packed layout) to the recomputed layer.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return method.apply(method_cfg.options, model, run or Run())


def release_checkpoint_map(model, keep=lambda tensor: False) -> None:
    """Copy the CPU parameters and buffers (but those `keep` names: tensors a method built anew)
    so that none is a view of the checkpoint file any more.

    transformers loads a CPU model from a memory map of its safetensors file, and a tensor it
    keeps in the file's dtype stays a view of that map; one such view keeps the whole file mapped,
    and the loader has read every page of it. A method that replaces most weights (QLoRA's 4-bit
    ones, LoRA's bf16 ones) would otherwise leave the process holding the whole file (4 bytes per
    weight of an fp32 checkpoint: 513 MiB for SmolLM2-135M) beside them. Once the rest are copies,
    the map is released. On a GPU they are copies already (moved off the file): nothing runs there.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # tied weights are listed once: they stay tied
            if tensor.device.type == "cpu" and not keep(tensor):
                tensor.data = tensor.data.clone()


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (train.compile); returns how many.

    The unit is the layer, not the model: the layers share one code object, so one graph (with
    the token count dynamic) serves them all, where a whole-model graph would be traced per row
    width and per batch's packed layout. Inside, inductor fuses what eager runs as separate
    passes over the activations: RMSNorm, RoPE, SwiGLU, the residual adds and autocast's casts.
    rayft's packed attention runs eager within it (train/attention.py: its layout is data).
    The first steps pay the compilation (seconds to a minute on a CPU; cached on disk after)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def load_on_meta(model_dir: str | Path):
    """The model's structure without its weights: for config checks on the driver."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):  # peft knows how to count packed weights
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
