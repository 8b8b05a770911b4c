"""Full-parameter fine-tuning: every weight trains."""

from rayft.methods.base import Method, register


@register
class FullMethod(Method):
    name = "full"
    usual_lr = 5e-5  # every weight moves: a small step
    output = "model"
    merge_refusal = "its output is already a whole model"

    def apply(self, opts, model, run):
        model.requires_grad_(True)
        return model

    def changed_base_params(self, opts, model):
        return sum(p.numel() for p in model.parameters())
