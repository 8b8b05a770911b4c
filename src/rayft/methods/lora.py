"""LoRA through peft, with the rsLoRA and DoRA switches."""

from __future__ import annotations

import torch

from rayft.errors import ConfigError
from rayft.methods.base import Method, register


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (the output head excluded)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = full_name.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return sorted(names)


def peft_lora_config(cfg):
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
    )


@register
class LoraMethod(Method):
    name = "lora"
    output = "adapter"

    def check(self, cfg, model):
        targets = cfg.lora.target_modules
        if targets == "all-linear":
            return
        available = linear_module_names(model)
        missing = [t for t in targets if t not in available]
        if missing:
            raise ConfigError(f"method.lora.target_modules: {missing} not in the model; "
                              f"linear modules are: {', '.join(available)}")

    def apply(self, cfg, model):
        from peft import get_peft_model

        return get_peft_model(model, peft_lora_config(cfg))
