"""QLoRA: LoRA on a base model stored in 4 bits (bitsandbytes NF4, double quantization)."""

from __future__ import annotations

import torch

from rayft.methods.base import register
from rayft.methods.lora import LoraMethod

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@register
class QloraMethod(LoraMethod):
    name = "qlora"
    output = "adapter"

    def load_kwargs(self, cfg, device):
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.qlora.quant_type,
            bnb_4bit_use_double_quant=cfg.qlora.double_quant,
            bnb_4bit_compute_dtype=DTYPES[cfg.qlora.compute_dtype],
        )
        return {"quantization_config": quant, "device_map": {"": device}}

    def apply(self, cfg, model):
        from peft import prepare_model_for_kbit_training

        # Norms to fp32 and input grads on; checkpointing stays the trainer's choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(cfg, model)
