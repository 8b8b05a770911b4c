"""QLoRA: LoRA on a base model stored in 4 bits (bitsandbytes NF4, double quantization)."""

from __future__ import annotations

from typing import Literal

import torch

from rayft.methods.base import register
from rayft.methods.lora import LoraMethod, LoraOptions
from rayft.models.loading import release_checkpoint_map

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@register
class QloraMethod(LoraMethod):
    name = "qlora"
    options = QloraOptions
    output = "adapter"
    # seen on CPU (torch 2.13, bitsandbytes 0.50.2): inductor's stride check fails on the 4-bit
    # matmul's output in the first compiled forward
    compile_refusal = "bitsandbytes' 4-bit layers do not compile"

    def presets(self):
        return {}  # LoRA's variants are LoRA's: not inherited

    def check_job(self, opts, job):
        if job.distributed.zero_stage == 3:
            raise ValueError("method.type=qlora cannot run with distributed.zero_stage=3: ZeRO-3 would "
                             "partition the packed 4-bit weights; use zero_stage 0, 1 or 2")
        if job.distributed.offload_params:
            raise ValueError("method.type=qlora cannot offload 4-bit params (distributed.offload_params)")
        if opts.init != "gaussian":
            raise ValueError(f"method.qlora.init={opts.init}: PiSSA/OLoRA would decompose the 4-bit weights; "
                             "use init gaussian (or method lora)")

    def load_kwargs(self, opts, device):
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=opts.quant_type,
            bnb_4bit_use_double_quant=opts.double_quant,
            bnb_4bit_compute_dtype=DTYPES[opts.compute_dtype],
        )
        return {"quantization_config": quant, "device_map": {"": device}}

    def quantized_weight_bytes(self, opts):
        # bitsandbytes packs two 4-bit values per byte, with an absmax per block of 64 weights: 8-bit
        # under double quantisation (plus an fp32 one per 256 of those), else fp32
        absmax = 1 + 4 / 256 if opts.double_quant else 4
        return 0.5 + absmax / 64

    def frozen_linear_dtype(self, opts, run):
        return None  # the base's linear weights are bitsandbytes' 4-bit ones

    def apply(self, opts, model, run):
        from bitsandbytes.nn import Params4bit
        from peft import prepare_model_for_kbit_training

        release_checkpoint_map(model, keep=lambda tensor: isinstance(tensor, Params4bit))  # the 4-bit weights are new
        # Norms to fp32 and input grads on; checkpointing stays the trainer's choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(opts, model, run)
