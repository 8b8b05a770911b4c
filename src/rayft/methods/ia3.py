"""IA3 (Liu et al. 2022): learned vectors that rescale keys, values and the feed-forward input,
through peft. They start at ones, so outputs are unchanged at init; they fold into the weights."""

from __future__ import annotations

from pydantic import Field, model_validator

from rayft.config import Strict
from rayft.methods.base import Method, register
from rayft.methods.lora import adapted_base_params, check_target_modules


class Ia3Options(Strict):
    # rescaled outputs (keys, values) and, for feed-forward modules, rescaled inputs
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1)
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])

    @model_validator(mode="after")
    def _feedforward_among_targets(self):
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ValueError(f"method.ia3.feedforward_modules: {stray} not in method.ia3.target_modules")
        return self


@register
class Ia3Method(Method):
    adapters_can_be_disabled = True
    name = "ia3"
    usual_lr = 3e-3  # rescaling vectors start at one and need larger steps than LoRA's factors
    options = Ia3Options
    output = "adapter"
    mergeable = True

    def serve_kind(self, opts):
        return "ia3"

    def check(self, opts, model):
        check_target_modules(self.name, opts.target_modules, model)

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        """Each vector's gradient needs what it rescales: a feed-forward module's input, another
        module's output."""
        from peft.tuners.ia3 import IA3Layer

        kept = sum(tokens * (m.in_features if m.is_feedforward else m.out_features) * compute_bytes
                   for m in layer.modules() if isinstance(m, IA3Layer))
        return kept, set()

    def apply(self, opts, model, run):
        from peft import IA3Config, TaskType, get_peft_model

        return get_peft_model(model, IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=opts.target_modules,
                                               feedforward_modules=opts.feedforward_modules))

    def changed_base_params(self, opts, model):
        return adapted_base_params(model)
