"""P-tuning v1 (Liu et al. 2021): virtual tokens produced by a trained prompt encoder (MLP or LSTM),
through peft. At inference the encoder's output is a fixed set of embeddings: that is what is saved."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rayft.config import Strict
from rayft.methods.base import register
from rayft.methods.soft_prompt import SoftPromptMethod


class PTuningOptions(Strict):
    num_virtual_tokens: int = Field(20, gt=0, le=1024)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden: int = Field(128, gt=0)


@register
class PTuningMethod(SoftPromptMethod):
    name = "p_tuning"
    usual_lr = 1e-2
    options = PTuningOptions

    def serve_kind(self, opts):
        return "prompt_tuning"  # served as its fixed embeddings, like prompt tuning

    def virtual_tokens(self, opts):
        return opts.num_virtual_tokens

    def peft_config(self, opts, model):
        from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType

        kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                   encoder_reparameterization_type=kind[opts.encoder],
                                   encoder_hidden_size=opts.encoder_hidden)
