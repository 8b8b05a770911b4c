"""Prompt tuning (Lester et al. 2021): n trained virtual-token embeddings before every input, through peft."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from rayft.config import Strict
from rayft.methods.base import register
from rayft.methods.soft_prompt import SoftPromptMethod


class PromptTuningOptions(Strict):
    num_virtual_tokens: int = Field(20, gt=0, le=1024)
    # random: normal noise; vocab: embeddings of random vocabulary tokens; text: of init_text's tokens
    init: Literal["random", "vocab", "text"] = "vocab"
    init_text: Optional[str] = None

    @model_validator(mode="after")
    def _text_given(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("method.prompt_tuning.init=text needs method.prompt_tuning.init_text")
        return self


@register
class PromptTuningMethod(SoftPromptMethod):
    name = "prompt_tuning"
    usual_lr = 3e-2  # a few embeddings carry the whole change: soft prompts train at high rates
    options = PromptTuningOptions

    def serve_kind(self, opts):
        return "prompt_tuning"

    def virtual_tokens(self, opts):
        return opts.num_virtual_tokens

    def cpu_encoder(self, module, encoder, weights):
        return torch.nn.Embedding.from_pretrained(weights["embedding.weight"])  # the embeddings are the weights

    def peft_config(self, opts, model):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        init = {"random": PromptTuningInit.RANDOM, "vocab": PromptTuningInit.SAMPLE_VOCAB,
                "text": PromptTuningInit.TEXT}[opts.init]
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens,
                                  prompt_tuning_init=init, prompt_tuning_init_text=opts.init_text,
                                  tokenizer_name_or_path=model.name_or_path if opts.init == "text" else None)
