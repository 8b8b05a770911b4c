"""Step plan and learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayft.config import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int

    @classmethod
    def build(cls, train: TrainConfig, batches_per_epoch: int) -> "StepPlan":
        steps_per_epoch = batches_per_epoch // train.grad_accum
        total = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, math.ceil(train.warmup_ratio * total))


def lr_factor(step: int, plan: StepPlan, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
