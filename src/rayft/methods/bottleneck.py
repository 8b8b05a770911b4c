"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) and AdapterDrop (Rücklé et al. 2021).

An adapter is down-projection -> non-linearity -> up-projection plus a residual, applied to a
sublayer's output before the decoder layer adds it to its residual stream: after the attention
and after the MLP (houlsby), or after the MLP only (pfeiffer). The up-projection starts at zero,
so outputs are unchanged at init.

AdapterDrop: `drop_first_n` puts no adapter in the first N layers, in training and inference
(those layers then run at the base's cost); `drop_prob` skips each adapter at random during
training only, with one draw per optimizer step that every rank makes alike (under ZeRO-3 a
skipped adapter gathers no weights, so the ranks must agree); a draw that would skip them all
keeps one.

The adapters are child modules of the sublayers they follow (`<sublayer>.bottleneck`), run by a
forward hook: the base's own parameter names do not change. Output: adapter_model.safetensors
(the adapters' weights) and bottleneck_config.json, which `load_output` reads to rebuild them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from rayft.config import Strict
from rayft.errors import ConfigError, RayftError
from rayft.methods.base import Method, Preset, register
from rayft.methods.freeze import decoder_layers

CHILD = "bottleneck"
WEIGHTS_FILE = "adapter_model.safetensors"
DROP_FILE = "adapterdrop_draw.json"
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
SUBLAYERS = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}


class BottleneckOptions(Strict):
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = Field(16, gt=0)  # bottleneck size = hidden size / reduction_factor
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    drop_first_n: int = Field(0, ge=0)  # AdapterDrop: no adapters in the first N layers
    drop_prob: float = Field(0.0, ge=0, lt=1)  # robust AdapterDrop: skip a layer's adapters at random in training


class DroppableAdapter(torch.nn.Module):
    """An adapter that AdapterDrop may skip for a training step."""

    skip = False  # set once per step by AdapterMethod.after_optimizer_step
    widths = (0, 0)  # (hidden size, bottleneck size): what `rayft estimate` reads

    def adapt(self, x):
        raise NotImplementedError

    def forward(self, x):
        if self.skip and self.training:
            return x
        return x + self.adapt(x)


class Bottleneck(DroppableAdapter):
    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.widths = (hidden, size)
        self.down = torch.nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(size, hidden)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def adapt(self, x):
        return self.up(self.act(self.down(x)))


def _run_adapter(sublayer, _inputs, output):
    adapter = getattr(sublayer, CHILD)
    if isinstance(output, tuple):  # attention returns (hidden states, weights)
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def adapted_layers(model, placement: str, drop_first_n: int, block: str):
    """(layer index, sublayer) pairs that get an adapter; `block` names the method in errors."""
    layers = decoder_layers(model, block)
    return [(i, getattr(layer, part)) for i, layer in enumerate(layers) if i >= drop_first_n
            for part in SUBLAYERS[placement]]


def insert_adapters(model, placement: str, drop_first_n: int, make: Callable[[], torch.nn.Module], block: str) -> list:
    """Put `make()` after each chosen sublayer; returns the adapters, in layer order."""
    adapters = []
    for _, sublayer in adapted_layers(model, placement, drop_first_n, block):
        adapter = make()
        sublayer.add_module(CHILD, adapter)
        sublayer.register_forward_hook(_run_adapter)
        adapters.append(adapter)
    return adapters


def bottleneck_size(model_config, reduction_factor: int) -> int:
    return model_config.hidden_size // reduction_factor


class AdapterMethod(Method):
    """What bottleneck-shaped adapters share: placement, AdapterDrop, save and reload."""

    output = "adapter"
    merge_refusal = "an adapter adds a non-linear module, which no weight of the base can express"

    def make_adapter(self, opts, model_config, shared) -> torch.nn.Module:
        raise NotImplementedError

    def shared_modules(self, opts, model_config) -> dict[str, torch.nn.Module]:
        """Modules shared by every adapter (registered once on the model root)."""
        return {}

    def check(self, opts, model):
        layers = len(decoder_layers(model, self.name))
        if opts.drop_first_n >= layers:
            raise ConfigError(f"method.{self.name}.drop_first_n={opts.drop_first_n}: the model has only {layers} "
                              "layers, so no adapter would remain")
        if bottleneck_size(model.config, opts.reduction_factor) < 1:
            raise ConfigError(f"method.{self.name}.reduction_factor={opts.reduction_factor} exceeds the hidden size "
                              f"{model.config.hidden_size}")

    def build(self, opts, model):
        shared = self.shared_modules(opts, model.config)
        for name, module in shared.items():
            model.add_module(name, module)
        insert_adapters(model, opts.placement, opts.drop_first_n, lambda: self.make_adapter(opts, model.config, shared),
                        self.name)
        return model

    def apply(self, opts, model, run):
        model.requires_grad_(False)
        self.build(opts, model)
        for name, param in model.named_parameters():
            param.requires_grad_(self.is_adapter_param(name))
        self.after_optimizer_step(opts, model, 0)
        return model

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        """Each adapter keeps its input (for the down-projection's gradient), and the down-projection's
        and the non-linearity's outputs."""
        kept = sum(tokens * (module.widths[0] + 2 * module.widths[1]) * compute_bytes
                   for module in layer.modules() if isinstance(module, DroppableAdapter))
        return kept, set()

    def is_adapter_param(self, name: str) -> bool:
        return f".{CHILD}." in name or any(name.startswith(f"{s}.") for s in self.shared_names())

    def shared_names(self) -> tuple[str, ...]:
        return ()

    def after_optimizer_step(self, opts, engine, step):
        """AdapterDrop's draw for the next step: the same generator state on every rank."""
        if not opts.drop_prob:
            return
        model = getattr(engine, "module", engine)
        generator = torch.Generator().manual_seed(1_000_003 * (step + 1))
        adapters = [m for m in model.modules() if isinstance(m, DroppableAdapter)]
        skips = (torch.rand(len(adapters), generator=generator, device="cpu") < opts.drop_prob).tolist()
        if all(skips):  # a step with no adapter would have nothing to train (and no gradient at all)
            skips[int(torch.randint(len(adapters), (), generator=generator, device="cpu"))] = False
        for adapter, skip in zip(adapters, skips):
            adapter.skip = skip

    def save_state(self, opts, engine, directory: Path):
        """AdapterDrop's draw for the step after this checkpoint, so that a resumed run makes the same."""
        skips = [a.skip for a in engine.module.modules() if isinstance(a, DroppableAdapter)]
        (directory / DROP_FILE).write_text(json.dumps(skips))

    def load_state(self, opts, engine, directory: Path):
        if (directory / DROP_FILE).is_file():
            adapters = [a for a in engine.module.modules() if isinstance(a, DroppableAdapter)]
            for adapter, skip in zip(adapters, json.loads((directory / DROP_FILE).read_text())):
                adapter.skip = skip

    def export(self, opts, module, state, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / f"{self.name}_config.json").write_text(json.dumps(
            {"method": self.name, "options": opts.model_dump(mode="json"), "hidden_size": module.config.hidden_size,
             "num_hidden_layers": module.config.num_hidden_layers}, indent=2))

    def load_output(self, output_dir, base):
        output_dir = Path(output_dir)
        config_file = output_dir / f"{self.name}_config.json"
        if not config_file.is_file():
            raise RayftError(f"{output_dir}: no {config_file.name}")
        saved = json.loads(config_file.read_text())
        if saved["hidden_size"] != base.config.hidden_size:
            raise RayftError(f"{output_dir}: adapters for hidden size {saved['hidden_size']}, the base has "
                             f"{base.config.hidden_size}")
        opts = self.options.model_validate(saved["options"])
        self.build(opts, base)
        weights = load_file(output_dir / WEIGHTS_FILE)
        missing, unexpected = base.load_state_dict(weights, strict=False)
        expected = {n for n, _ in base.named_parameters() if self.is_adapter_param(n)}
        if unexpected or expected - set(weights):
            raise RayftError(f"{output_dir}: its weights do not match the adapters of its config")
        return base.eval()


@register
class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    usual_lr = 1e-3

    def presets(self):
        # the default is Pfeiffer's (after the MLP only); AdapterDrop as its paper's Houlsby run on
        # SmolLM2's 30 layers: no adapters in the first 15 (a model of 15 layers or fewer refuses it)
        return {"houlsby": Preset({"placement": "houlsby"}, self.usual_lr),
                "adapterdrop": Preset({"placement": "houlsby", "drop_first_n": 15}, self.usual_lr)}
    options = BottleneckOptions

    def serve_kind(self, opts):
        return "bottleneck"

    def make_adapter(self, opts, model_config, shared):
        return Bottleneck(model_config.hidden_size, bottleneck_size(model_config, opts.reduction_factor),
                          opts.non_linearity)
