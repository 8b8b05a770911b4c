"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"): train.ewc.

Before training, a diagonal Fisher F of the trainable parameters is estimated on rows of a general
set (one of data.eval_sets), and their values theta* are kept; every micro-batch's loss then gets

    weight/2 * sum_i F_i (theta_i - theta*_i)^2

so parameters that matter to the general set stay near where they started, and the others move
freely. F is the empirical Fisher: the mean over rows of the squared gradient of the row's mean
next-token loss on the set's own answers (not the true Fisher, whose targets would be sampled from
the model). One backward pass per row: squared gradients of a whole batch would square a sum and
underestimate it.

The Fisher is taken from the model as loaded, before DeepSpeed wraps it and before a checkpoint
moves it: a resumed run recomputes the same one instead of storing it.

Under ZeRO-3 each rank holds only its partition of every parameter, so the penalty cannot be a
term of the loss. Each rank keeps its partition's Fisher and theta*, and at each accumulation
boundary adds the penalty's gradient, weight * F (theta - theta*), to its partition of the reduced
gradient (DeepSpeed's safe_get/set_local_grad), before the step clips and applies it: the same
gradient the loss term gives under ZeRO 0-2, where it is added once per micro-batch and DeepSpeed
averages the micro-batches.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from rayft.data.packing import collate

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]  # (summed loss, learned tokens)


class ElasticWeightConsolidation:
    def __init__(self, weight: float, fisher: dict[str, torch.Tensor], rows_used: int = 0):
        self.weight = weight
        self.fisher = fisher  # parameter name -> its diagonal Fisher (fp32, on the parameter's device)
        self.rows_used = rows_used
        self.anchors: dict[str, torch.Tensor] = {}  # parameter name -> theta*
        self.partitioned = False  # ZeRO-3: fisher and anchors hold this rank's partitions only
        self._window: list[float] = []  # penalties of the micro-batches since the last log

    @classmethod
    def estimate(cls, weight: float, samples: int, model: torch.nn.Module, rows, loss_fn: LossFn, pad_id: int,
                 device, rank: int = 0, world: int = 1, seed: int = 0) -> "ElasticWeightConsolidation":
        """The Fisher over `samples` rows of `rows` (a seeded pick; all of them if fewer), each rank
        taking every world-th and the sums all-reduced. Dropout is off while it runs."""
        from rayft.train.loop import to_device  # the loop imports this module

        if next(model.parameters()).device != device:
            model.to(device)  # DeepSpeed would move it there anyway; quantized models already are
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        picked = np.random.default_rng([seed, 7]).permutation(len(rows))[:samples]
        was_training = model.training
        model.eval()
        try:
            for index in picked[rank::world]:
                batch = to_device(collate(rows.rows(np.array([index])), pad_id), device)
                loss_sum, count = loss_fn(model, batch)
                if count.item() == 0:
                    continue  # nothing learned in this row: no gradient to count
                (loss_sum / count).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach().float() ** 2
                        p.grad = None
        finally:
            model.train(was_training)
        if world > 1 and dist.is_initialized():
            flat = torch.cat([f.flatten() for f in fisher.values()])
            dist.all_reduce(flat)
            for f, part in zip(fisher.values(), flat.split([f.numel() for f in fisher.values()])):
                f.copy_(part.view_as(f))
        for f in fisher.values():
            f /= max(len(picked), 1)
        return cls(weight, fisher, len(picked))

    def anchor(self, model: torch.nn.Module) -> None:
        """Keep the parameters' values now as theta* (after DeepSpeed has cast them, so that the
        penalty is exactly 0 before the first step)."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.fisher) - set(params))
        if missing:
            raise RuntimeError(f"train.ewc: parameter {missing[0]} of the Fisher is not in the model")
        self.partitioned = any(hasattr(params[name], "ds_id") for name in self.fisher)
        if not self.partitioned:
            self.anchors = {name: params[name].detach().float().clone() for name in self.fisher}
            return
        from deepspeed.utils import safe_get_local_fp32_param

        for name in self.fisher:
            local = safe_get_local_fp32_param(params[name])  # this rank's fp32 partition, flat
            self.fisher[name] = _partition_of(self.fisher[name], params[name], local.numel())
            self.anchors[name] = local.detach().clone()

    def penalty(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """weight/2 * sum F (theta - theta*)^2 over the trainable parameters, with its gradient, to
        add to a micro-batch's loss; None under ZeRO-3 (before_optimizer_step adds its gradient)."""
        if self.partitioned:
            return None
        params = dict(model.named_parameters())
        terms = [(f * (params[name].float() - self.anchors[name]) ** 2).sum() for name, f in self.fisher.items()]
        penalty = 0.5 * self.weight * torch.stack(terms).sum()
        self._window.append(float(penalty.detach()))
        return penalty

    def before_optimizer_step(self, engine) -> None:
        """Under ZeRO-3, at an accumulation boundary (after backward, before engine.step()): add
        weight * F (theta - theta*) to this rank's partition of each gradient. An fp16 run's
        gradients are still scaled by its loss scale there, so the added one is too."""
        if not self.partitioned:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

        scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
        params = dict(engine.module.named_parameters())
        total = torch.zeros((), dtype=torch.float64, device=next(iter(self.fisher.values())).device)
        for name, f in self.fisher.items():
            param = params[name]
            moved = safe_get_local_fp32_param(param) - self.anchors[name]
            total += (f * moved ** 2).sum().double()
            safe_set_local_grad(param, safe_get_local_grad(param) + (scale * self.weight) * f * moved)
        if dist.is_initialized():
            dist.all_reduce(total)  # each rank summed its own partitions
        self._window.append(0.5 * self.weight * total.item())

    def window_metrics(self) -> dict[str, float]:
        """ewc_penalty: its mean over the micro-batches since the last call (the same on every rank)."""
        if not self._window:
            return {}
        mean = sum(self._window) / len(self._window)
        self._window = []
        return {"ewc_penalty": mean}

    def summary(self, set_name: str, samples: int) -> str:
        """A line for the console: the Fisher's scale is what a weight is chosen against."""
        values = torch.cat([f.flatten() for f in self.fisher.values()])
        rows = f"{self.rows_used} rows" + (f" (all it has; samples={samples})" if self.rows_used < samples else "")
        return (f"[rayft] ewc: empirical Fisher of {values.numel():,} trainable parameters from {rows} of eval set "
                f"{set_name!r}: mean {values.mean().item():.3g}, max {values.max().item():.3g}; weight {self.weight:g}")


def _partition_of(full: torch.Tensor, param, numel: int) -> torch.Tensor:
    """This rank's part of a tensor shaped as a ZeRO-3 parameter: DeepSpeed gives rank r the
    elements [r * numel, (r + 1) * numel) of the flattened parameter, zero-padded at the end."""
    rank = getattr(param, "ds_zero_partition_rank", None)
    if rank is None:
        rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
    flat = full.flatten()
    part = torch.zeros(numel, dtype=full.dtype, device=full.device)
    start = rank * numel
    if start < flat.numel():
        piece = flat[start:start + numel]
        part[:piece.numel()] = piece
    return part
