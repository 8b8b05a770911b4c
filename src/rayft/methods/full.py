"""Full-parameter fine-tuning: every weight trains."""

from rayft.methods.base import Method, register


@register
class FullMethod(Method):
    name = "full"
    output = "model"

    def apply(self, cfg, model):
        model.requires_grad_(True)
        return model
