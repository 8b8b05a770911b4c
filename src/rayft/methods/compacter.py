"""Compacter (Mahabadi et al. 2021): a bottleneck adapter whose two projections are parameterised
hypercomplex multiplication (PHM) layers, W = sum_i A_i (x) B_i over n = phm_dim Kronecker products.

The n small "rule" matrices A_i (n x n) are shared by every adapter of the model (one set for the
down-projections, one for the up-projections); each B_i (in/n x out/n) is the low-rank product
s_i t_i (rank phm_rank). Trainable parameters, exactly:
    2 n^3 + adapters x [(h k + k m + m) + (m k + k h + h)]
for hidden size h, bottleneck m = h / reduction_factor and k = phm_rank (the m and h terms are the
biases). The up-projection's t_i start at zero, so outputs are unchanged at init.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from rayft.config import Strict
from rayft.errors import ConfigError
from rayft.methods.base import register
from rayft.methods.bottleneck import ACTIVATIONS, AdapterMethod, DroppableAdapter, bottleneck_size

SHARED = {"down": "compacter_rules_down", "up": "compacter_rules_up"}


class CompacterOptions(Strict):
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = Field(16, gt=0)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    phm_dim: int = Field(4, gt=0)  # n: Kronecker products per projection, and the rules' size
    phm_rank: int = Field(1, gt=0)  # k: rank of each B_i
    drop_first_n: int = Field(0, ge=0)
    drop_prob: float = Field(0.0, ge=0, lt=1)


class PhmRules(torch.nn.Module):
    """The shared A_i. Called as a module, so that ZeRO-3 gathers them where they are used."""

    def __init__(self, n: int):
        super().__init__()
        self.rules = torch.nn.Parameter(torch.empty(n, n, n).normal_(0, 0.01) + torch.eye(n)[None])

    def forward(self):
        return self.rules


class PhmLinear(torch.nn.Module):
    def __init__(self, n: int, rank: int, in_features: int, out_features: int, rules: PhmRules, zero: bool):
        super().__init__()
        self.n = n
        object.__setattr__(self, "shared", rules)  # not a child: its parameters belong to the model root
        self.s = torch.nn.Parameter(torch.empty(n, in_features // n, rank))
        self.t = torch.nn.Parameter(torch.empty(n, rank, out_features // n))
        self.bias = torch.nn.Parameter(torch.zeros(out_features))
        torch.nn.init.normal_(self.s, 0, 1 / math.sqrt(in_features))
        if zero:
            torch.nn.init.zeros_(self.t)
        else:
            torch.nn.init.normal_(self.t, 0, 1 / math.sqrt(rank))

    def weight(self) -> torch.Tensor:
        """(in, out): sum_i kron(A_i, s_i t_i)."""
        blocks = torch.bmm(self.s, self.t)  # n x in/n x out/n
        return torch.einsum("nab,ncd->acbd", self.shared(), blocks).reshape(
            self.n * blocks.shape[1], self.n * blocks.shape[2])

    def forward(self, x):
        return x @ self.weight().to(x.dtype) + self.bias.to(x.dtype)


class CompacterAdapter(DroppableAdapter):
    def __init__(self, hidden: int, size: int, opts: CompacterOptions, shared: dict):
        super().__init__()
        self.widths = (hidden, size)
        self.down = PhmLinear(opts.phm_dim, opts.phm_rank, hidden, size, shared[SHARED["down"]], zero=False)
        self.act = ACTIVATIONS[opts.non_linearity]()
        self.up = PhmLinear(opts.phm_dim, opts.phm_rank, size, hidden, shared[SHARED["up"]], zero=True)

    def adapt(self, x):
        return self.up(self.act(self.down(x)))


def compacter_params(opts: CompacterOptions, hidden: int, adapters: int) -> int:
    """The formula of the module docstring."""
    n, k, m, h = opts.phm_dim, opts.phm_rank, hidden // opts.reduction_factor, hidden
    return 2 * n ** 3 + adapters * ((h * k + k * m + m) + (m * k + k * h + h))


@register
class CompacterMethod(AdapterMethod):
    name = "compacter"
    usual_lr = 3e-3
    options = CompacterOptions

    def check(self, opts, model):
        super().check(opts, model)
        hidden = model.config.hidden_size
        size = bottleneck_size(model.config, opts.reduction_factor)
        if hidden % opts.phm_dim or size % opts.phm_dim:
            raise ConfigError(f"method.compacter.phm_dim={opts.phm_dim} must divide the hidden size {hidden} and the "
                              f"bottleneck size {size} (hidden / reduction_factor={opts.reduction_factor})")

    def shared_modules(self, opts, model_config):
        return {name: PhmRules(opts.phm_dim) for name in SHARED.values()}

    def shared_names(self):
        return tuple(SHARED.values())

    def make_adapter(self, opts, model_config, shared):
        return CompacterAdapter(model_config.hidden_size, bottleneck_size(model_config, opts.reduction_factor),
                                opts, shared)
