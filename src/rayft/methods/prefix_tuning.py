"""Prefix tuning (Li & Liang 2021) / P-tuning v2 (deep prompts): trained key/value prefixes at every
layer, optionally produced by an MLP over a smaller embedding (projection), through peft. The
prefixes live in the attention's cache, not in the model's output positions."""

from __future__ import annotations

from pydantic import Field

from rayft.config import Strict
from rayft.methods.base import register
from rayft.methods.soft_prompt import SoftPromptMethod


class PrefixTuningOptions(Strict):
    num_virtual_tokens: int = Field(20, gt=0, le=1024)
    projection: bool = False  # reparametrise the prefixes through an MLP (more stable, more parameters)
    projection_hidden: int = Field(128, gt=0)


@register
class PrefixTuningMethod(SoftPromptMethod):
    name = "prefix_tuning"
    usual_lr = 1e-2
    options = PrefixTuningOptions
    # peft raises for it: the prefixes enter every layer through the KV cache, which a
    # recomputed layer would extend a second time
    checkpointing_refusal = "its key/value prefixes live in the attention cache, which peft cannot recompute"

    def serve_kind(self, opts):
        return "prefix_tuning"

    def extra_positions(self, opts):
        return opts.num_virtual_tokens  # the prefixes come first: the row's positions start after them

    def peft_config(self, opts, model):
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=opts.projection, encoder_hidden_size=opts.projection_hidden)
