"""Batched LoRA: every row of a batch may use a different adapter (or none) in one forward pass.

Each linear layer of the base model is wrapped once. Before a batch runs, the adapters of its rows
are gathered per layer into two stacked tensors (A: rows x in x r, B: rows x r x out, the scaling
folded into B; a row without an adapter gets zeros), so a layer adds its LoRA term with one
batched matmul pair whatever the mix of adapters (the S-LoRA / Punica idea). The gather happens
once per batch, not per decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from rayft.serve.validate import WEIGHTS_FILE, AdapterSpec


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (A rows, B rows) of the running batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rows is None:
            return out
        a_rows, b_rows = self.rows
        # out += (x @ A) @ B, row by row of the batch: x (rows, tokens, in); in place, out is ours
        return out.baddbmm_(torch.bmm(x, a_rows), b_rows)


def wrap_linear_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Wrap every linear layer but the output head; returns them by their original module path."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name != "lm_head"]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        wrapper = MultiLoRALinear(module)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter's weights, laid out for batching: per module (A^T: in x r, scaling * B^T: r x out)."""
    model_id: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def load_adapter(spec: AdapterSpec, model_id: str, dtype: torch.dtype, device: torch.device) -> LoadedAdapter:
    from safetensors.torch import load_file

    tensors = load_file(str(spec.path / WEIGHTS_FILE), device="cpu")
    weights = {}
    for module in spec.shapes:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]  # (r, in)
        b = tensors[f"base_model.model.{module}.lora_B.weight"]  # (out, r)
        weights[module] = (a.t().contiguous().to(device, dtype), (b.t() * spec.scaling).contiguous().to(device, dtype))
    return LoadedAdapter(model_id, spec.rank, weights)


class BatchLoRA:
    """Sets the per-row adapters of the next batch on every wrapped layer."""

    def __init__(self, layers: dict[str, MultiLoRALinear]):
        self.layers = layers

    def prepare(self, row_adapters: Sequence[Optional[LoadedAdapter]]) -> dict:
        """Returns no extra forward arguments: the wrapped layers hold the rows themselves."""
        distinct = list(dict.fromkeys(a for a in row_adapters if a is not None))
        if not distinct:
            self.clear()
            return {}
        rank = max(a.rank for a in distinct)
        for name, layer in self.layers.items():
            users = [a for a in distinct if name in a.weights]
            if not users:
                layer.rows = None
                continue
            a_any, b_any = users[0].weights[name]
            zero_a = a_any.new_zeros(a_any.shape[0], rank)
            zero_b = b_any.new_zeros(rank, b_any.shape[1])
            padded = {id(a): _pad(a.weights[name], rank) for a in users}
            a_rows, b_rows = zip(*[padded.get(id(a), (zero_a, zero_b)) if a is not None else (zero_a, zero_b)
                                   for a in row_adapters])
            layer.rows = (torch.stack(a_rows), torch.stack(b_rows))
        return {}

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.rows = None


def _pad(weights: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a smaller rank up to the batch's rank: the extra terms add exactly zero."""
    a, b = weights
    if a.shape[1] == rank:
        return a, b
    return torch.nn.functional.pad(a, (0, rank - a.shape[1])), torch.nn.functional.pad(b, (0, 0, 0, rank - b.shape[0]))
