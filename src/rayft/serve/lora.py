"""Batched LoRA: every row of a batch may use a different adapter (or none) in one forward pass.

Each linear layer of the base model is wrapped once, and adds the LoRA terms of all rows in one
call whatever the mix of adapters (the S-LoRA / Punica idea), in one of two ways:
- on CPU in fp32, the kernel of kernel.py: per layer a plan lists, for each adapter of the batch,
  its weights and its rows, and the adapters are read in place, each once per step;
- elsewhere (GPUs, half precision, no C compiler), per-row stacks: the running rows' adapters
  stacked per layer into two tensors (A: rows x in x r, B: rows x r x out, the scaling folded into
  B; a row without an adapter gets zeros) and one batched matmul pair. The stacks change only when
  rows join or leave, and then only in the rows that change; never per decoding step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from rayft.serve import kernel as cpu_kernel
from rayft.serve.validate import WEIGHTS_FILE, AdapterSpec


class MultiLoRALinear(nn.Module):
    """A base linear layer plus each row's adapter (serve/kinds/): y = s * (W (x * i) + B A x) + t,
    where a row without that part of an adapter has i = s = 1, t = 0 and no B A term."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (A rows, B rows) of the running batch
        self.plan: Optional[tuple[Callable, torch.Tensor, int]] = None  # or (kernel, its work items, rows)
        # per-row (i: rows x 1 x in | None, s: rows x 1 x out | None, t: rows x 1 x out | None)
        self.scales: Optional[tuple[Optional[torch.Tensor], ...]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_rows, out_rows, shift_rows = self.scales or (None, None, None)
        if in_rows is not None:
            x = x * in_rows
        out = self.base(x)
        if self.plan is not None:
            # in place, unseen by autograd: BatchLoRA plans only under inference mode
            kernel, items, rows = self.plan
            if x.dim() != 3 or x.shape[0] != rows or x.dtype != torch.float32 or out.dtype != torch.float32:
                raise RuntimeError(f"batched LoRA planned for {rows} fp32 rows, got {x.dtype} {tuple(x.shape)}")
            x = x.contiguous()  # the kernel reads raw memory: a mismatch above would read out of bounds
            kernel(x.data_ptr(), out.data_ptr(), x.shape[1], x.shape[2], out.shape[2], items.data_ptr(), items.shape[0])
        elif self.rows is not None:
            a_rows, b_rows = self.rows
            # out += (x @ A) @ B, row by row of the batch: x (rows, tokens, in); in place, out is ours
            out = out.baddbmm_(torch.bmm(x, a_rows), b_rows)
        if out_rows is not None:
            out = out.mul_(out_rows)
            if shift_rows is not None:
                out = out.add_(shift_rows)
        return out


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
    """One adapter laid out for batching, per module: LoRA's (A^T: in x r, scaling * B^T: r x out),
    an input scale (in,), an output scale (out,) with its shift (out,) or None (serve/kinds/)."""
    model_id: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    in_scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    out_scales: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict, repr=False)
    kind: str = "lora"
    prompt_embeddings: Optional[torch.Tensor] = field(default=None, repr=False)  # (virtual tokens, hidden)

    @functools.cached_property
    def pointers(self) -> dict[str, tuple[int, int, int]]:
        """Per module (A address, B address, rank), for the CPU kernel: fp32, contiguous, on CPU."""
        pointers = {}
        for module, (a, b) in self.weights.items():
            if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" \
                    or not (a.is_contiguous() and b.is_contiguous()) or a.shape[1] > cpu_kernel.MAX_RANK:
                raise ValueError(f"adapter {self.model_id}: {module} is not laid out for the CPU kernel")
            pointers[module] = (a.data_ptr(), b.data_ptr(), a.shape[1])
        return pointers

    @property
    def scaled_modules(self) -> set[str]:
        return set(self.in_scales) | set(self.out_scales)

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.weights.values() for t in pair] + list(self.in_scales.values()) + \
            [t for pair in self.out_scales.values() for t in pair if t is not None] + \
            ([self.prompt_embeddings] if self.prompt_embeddings is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def load_adapter(spec: AdapterSpec, model_id: str, dtype: torch.dtype, device: torch.device,
                 base_layers: Optional[dict[str, "MultiLoRALinear"]] = None) -> LoadedAdapter:
    """The adapter's weights in its kind's per-row form; `base_layers` (the served base's wrapped
    layers by module path): what a kind computes from the base at load (DoRA's column norms)."""
    from safetensors.torch import load_file

    from rayft.serve import kinds

    tensors = load_file(str(spec.path / WEIGHTS_FILE), device="cpu")
    bases = None if base_layers is None else {name: layer.base for name, layer in base_layers.items()}
    parts = kinds.SERVED[spec.kind].load(spec, tensors, dtype, device, bases)
    return LoadedAdapter(model_id, spec.rank, parts.get("weights", {}), parts.get("in_scales", {}),
                         parts.get("out_scales", {}), spec.kind, parts.get("prompt_embeddings"))


class BatchLoRA:
    """The running rows' adapters, laid out for the wrapped layers.

    Continuous batching changes the rows every few steps: `append` adds joining rows after the
    others, `keep` keeps the rows it names (row j taking row order[j]'s place), and `use(start,
    stop)` points every layer at the rows the next forward pass runs. With `kernel` (CPU, fp32)
    `use` builds each layer's plan for those rows, once per change of rows. Without, the stacks
    change in place: `append` writes the joining rows' weights after the others, `keep` moves only
    the rows that change place, and `use` hands out views; a layer no row adapts stays plain and
    ranks are zero-padded to the largest.
    """

    def __init__(self, layers: dict[str, MultiLoRALinear], kernel: Optional[Callable] = None):
        self.layers = layers
        self.kernel = kernel
        self.adapters: list[Optional[LoadedAdapter]] = []  # per row
        self.rank = 0
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # A: cap x in x rank, B: cap x rank x out
        self._planned: Optional[tuple[int, int]] = None  # the rows the layers' plans are for
        self._scaled: Optional[tuple[int, int]] = None  # the rows the layers' per-row scales are for

    def append(self, row_adapters: Sequence[Optional[LoadedAdapter]]) -> None:
        first = len(self.adapters)
        self.adapters.extend(row_adapters)
        self._scaled = None
        if self.kernel is not None:
            self._planned = None
            return
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
        self._planned = self._scaled = None

    def use(self, start: int, stop: int) -> dict:
        """Points each layer at rows start..stop; no extra forward arguments are needed."""
        if self._scaled != (start, stop):
            self._scale(start, stop)
        if self.kernel is not None:
            if self._planned != (start, stop):
                self._plan(start, stop)
            return {}
        for name, layer in self.layers.items():
            stacks = self._stacks.get(name)
            layer.rows = None if stacks is None else (stacks[0][start:stop], stacks[1][start:stop])
        return {}

    def clear(self) -> None:
        self.adapters, self.rank, self._stacks, self._planned, self._scaled = [], 0, {}, None, None
        for layer in self.layers.values():
            layer.rows = layer.plan = layer.scales = None

    def _scale(self, start: int, stop: int) -> None:
        """Per layer, the rows' input and output scales (DoRA, IA3), stacked once per change of
        rows; a layer that no row scales gets none, and costs nothing."""
        rows = self.adapters[start:stop]
        scaled = {name for adapter in rows if adapter is not None for name in adapter.scaled_modules}
        for name, layer in self.layers.items():
            layer.scales = self._scales_of(rows, name, layer.base) if name in scaled else None
        self._scaled = (start, stop)

    @staticmethod
    def _scales_of(rows: Sequence[Optional[LoadedAdapter]], name: str, base: nn.Module) -> tuple:
        like = next(t for a in rows if a is not None for t in
                    ([a.in_scales[name]] if name in a.in_scales else []) + ([a.out_scales[name][0]] if name in a.out_scales else []))
        ones_in, ones_out = like.new_ones(base.in_features), like.new_ones(base.out_features)
        zeros_out = like.new_zeros(base.out_features)
        has = lambda part: any(a is not None and name in part(a) for a in rows)  # noqa: E731
        in_rows = out_rows = shift_rows = None
        if has(lambda a: a.in_scales):
            in_rows = torch.stack([a.in_scales.get(name, ones_in) if a else ones_in for a in rows])[:, None]
        if has(lambda a: a.out_scales):
            out_rows = torch.stack([a.out_scales[name][0] if a and name in a.out_scales else ones_out for a in rows])[:, None]
            shifts = [a.out_scales[name][1] if a and name in a.out_scales else None for a in rows]
            if any(shift is not None for shift in shifts):
                shift_rows = torch.stack([zeros_out if shift is None else shift for shift in shifts])[:, None]
        return in_rows, out_rows, shift_rows

    def _plan(self, start: int, stop: int) -> None:
        """Per layer, the kernel's work items for rows start..stop: each adapter's weights (read in
        place: the rows hold the adapter, so its tensors outlive the plan) with up to ITEM_ROWS of
        its rows, numbered from `start`."""
        if torch.is_grad_enabled():
            raise RuntimeError("the batched-LoRA kernel adds in place and has no backward: run under torch.inference_mode()")
        rows_of: dict[int, tuple[LoadedAdapter, list[int]]] = {}
        for row, adapter in enumerate(self.adapters[start:stop]):
            if adapter is not None:
                rows_of.setdefault(id(adapter), (adapter, []))[1].append(row)
        for name, layer in self.layers.items():
            items = []
            for adapter, rows in rows_of.values():
                if name in adapter.weights:
                    a_ptr, b_ptr, rank = adapter.pointers[name]
                    for first in range(0, len(rows), cpu_kernel.ITEM_ROWS):
                        chunk = rows[first:first + cpu_kernel.ITEM_ROWS]
                        items.append([a_ptr, b_ptr, rank, len(chunk), *chunk, *[0] * (cpu_kernel.ITEM_ROWS - len(chunk))])
            layer.plan = (self.kernel, torch.tensor(items, dtype=torch.int64), stop - start) if items else None
        self._planned = (start, stop)

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


