"""Each task's loss weight in a multi-task run.

`data.task_weights` are static. With `data.task_weighting: dwa` they are multiplied by Dynamic
Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019):

    w_k = K exp(r_k / T) / sum_i exp(r_i / T),   r_k = L_k(t-1) / L_k(t-2)

with K tasks and temperature T (`data.dwa_temperature`, the paper's 2). A task whose loss fell
less since the last measurement gets more weight; equal rates give every task weight 1. The paper
takes L_k from the training loss of the last two epochs; here it is each task's validation loss
(`eval_task_<task>_loss`) at the last two evaluations, `train.eval_steps` apart: every rank has
it (training losses are per rank), it is not noise from one batch, and it lives in the trainer
state, so a resumed run weights its steps exactly as an uninterrupted one. Until two evaluations
exist (the one before training is the first), and for a task without validation rows, r_k = 1.
"""

from __future__ import annotations

import math
from typing import Optional

# the evaluations DWA reads: the last two
KEPT_EVALUATIONS = 2


def task_loss_weights(tasks: list[str], static: dict[str, float], scheme: str, temperature: float,
                      evaluations: list[dict[str, float]]) -> Optional[list[float]]:
    """One weight per task, in `tasks` order; None when every weight is 1 and stays so (no
    weighting: the loss takes the plain path). `evaluations`: each task's validation loss at the
    last evaluations, oldest first."""
    weights = [static.get(task, 1.0) for task in tasks]
    if scheme != "dwa":
        return weights if static else None
    ratios = [1.0] * len(tasks)
    if len(evaluations) >= KEPT_EVALUATIONS:
        previous, last = evaluations[-2], evaluations[-1]
        ratios = [last[task] / previous[task] if task in last and previous.get(task, 0) > 0 else 1.0
                  for task in tasks]
    exps = [math.exp(r / temperature) for r in ratios]
    return [w * len(tasks) * e / sum(exps) for w, e in zip(weights, exps)]


def remember_evaluation(evaluations: list[dict[str, float]], task_losses: dict[str, float]) -> list[dict[str, float]]:
    """The kept evaluations after one more (each task's validation loss)."""
    return (evaluations + [task_losses])[-KEPT_EVALUATIONS:]
