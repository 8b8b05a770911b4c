"""Batched LoRA: every row of a batch may use a different adapter (or none) in one forward pass.

Each linear layer of the base model is wrapped once. The running rows' adapters are stacked per
layer into two tensors (A: rows x in x r, B: rows x r x out, the scaling folded into B; a row
without an adapter gets zeros), so a layer adds its LoRA term with one batched matmul pair
whatever the mix of adapters (the S-LoRA / Punica idea). The stacks change only when rows join
or leave, and then only in the rows that change; never per decoding step."""

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
    """The running rows' adapters, stacked per wrapped layer with room for more rows.

    Continuous batching changes the rows every few steps, so they change in place: `append`
    writes the weights of joining rows after the others, `keep` moves only the rows that change
    place, and `use(start, stop)` points every layer at the rows the next forward pass runs (a
    view, no copy). A layer no row adapts stays plain; ranks are zero-padded to the largest.
    """

    def __init__(self, layers: dict[str, MultiLoRALinear]):
        self.layers = layers
        self.adapters: list[Optional[LoadedAdapter]] = []  # per row
        self.rank = 0
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # A: cap x in x rank, B: cap x rank x out

    def append(self, row_adapters: Sequence[Optional[LoadedAdapter]]) -> None:
        first = len(self.adapters)
        self.adapters.extend(row_adapters)
        rank = max([self.rank, *(a.rank for a in row_adapters if a is not None)])
        capacity = next(iter(self._stacks.values()))[0].shape[0] if self._stacks else 0
        if rank > self.rank or len(self.adapters) > capacity:  # regrow: every row is written again
            self.rank, first = rank, 0
            self._stacks = {}
        adapted = {name for a in self.adapters[first:] if a is not None for name in a.weights}
        for name in adapted - self._stacks.keys():
            self._stacks[name] = self._zeros(name, max(capacity, _next_power_of_two(len(self.adapters))))
        for name, (a_rows, b_rows) in self._stacks.items():
            a_new, b_new = zip(*[self._padded(adapter, name) for adapter in self.adapters[first:]])
            a_rows[first:len(self.adapters)] = torch.stack(a_new)
            b_rows[first:len(self.adapters)] = torch.stack(b_new)

    def keep(self, order: Sequence[int]) -> None:
        """Keeps the rows `order` names, row j taking row order[j]'s place."""
        for j, source in enumerate(order):
            if source != j:
                for a_rows, b_rows in self._stacks.values():
                    a_rows[j].copy_(a_rows[source])
                    b_rows[j].copy_(b_rows[source])
        self.adapters = [self.adapters[i] for i in order]

    def use(self, start: int, stop: int) -> dict:
        """Points each layer at rows start..stop; no extra forward arguments are needed."""
        for name, layer in self.layers.items():
            stacks = self._stacks.get(name)
            layer.rows = None if stacks is None else (stacks[0][start:stop], stacks[1][start:stop])
        return {}

    def clear(self) -> None:
        self.adapters, self.rank, self._stacks = [], 0, {}
        for layer in self.layers.values():
            layer.rows = None

    def _padded(self, adapter: Optional[LoadedAdapter], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's (A, B) of a layer at the stacks' rank: zero-padded (the extra terms add exactly
        zero), or zeros for a row whose adapter does not adapt the layer."""
        a_rows, b_rows = self._stacks[name]
        if adapter is None or name not in adapter.weights:
            return a_rows.new_zeros(a_rows.shape[1:]), b_rows.new_zeros(b_rows.shape[1:])
        a, b = adapter.weights[name]
        if a.shape[1] == self.rank:
            return a, b
        pad = self.rank - a.shape[1]
        return torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))

    def _zeros(self, name: str, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.layers[name].base
        like = next(a.weights[name][0] for a in self.adapters if a is not None and name in a.weights)
        return (like.new_zeros(capacity, base.in_features, self.rank),
                like.new_zeros(capacity, self.rank, base.out_features))


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


