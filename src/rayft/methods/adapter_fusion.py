"""AdapterFusion (Pfeiffer et al. 2021): N bottleneck adapters trained on other tasks stay frozen;
a fusion layer after each adapted sublayer learns, per token, how much of each to use on the
target task: attention with the sublayer's output h as query and the adapters' outputs a_i as
keys and values,

    out = h + sum_i softmax_i((Q h) . (K a_i)) V a_i,

with V starting at the identity (so training starts from the adapters' mean contribution).

The fused adapters must be rayft bottleneck outputs of this base (same fingerprint, placement and
AdapterDrop layers). The output holds only the fusion weights (fusion.safetensors) and names the
adapters it fuses by path and by the SHA-256 of their weights (adapter_fusion_config.json): it
loads only onto those same adapters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from rayft.config import Strict
from rayft.errors import ConfigError, RayftError
from rayft.methods.base import Method, get_method, register
from rayft.methods.bottleneck import WEIGHTS_FILE, adapted_layers

CHILD = "adapter_fusion"
FUSION_FILE = "fusion.safetensors"
CONFIG_FILE = "adapter_fusion_config.json"
FUSABLE = "bottleneck"


class AdapterFusionOptions(Strict):
    adapters: list[str] = Field(..., min_length=2)  # output directories of trained bottleneck adapters
    temperature: float = Field(1.0, gt=0)


def weights_digest(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def read_adapter(adapter_dir: Path, fingerprint: str | None) -> dict:
    """rayft.json of a fusable adapter, refused in one line if it is not one of this base."""
    meta_file = adapter_dir / "rayft.json"
    if not meta_file.is_file():
        raise ConfigError(f"method.adapter_fusion.adapters: {adapter_dir} is not a rayft output (no rayft.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("method") != FUSABLE:
        raise ConfigError(f"method.adapter_fusion.adapters: {adapter_dir} is a {meta.get('method')} output; "
                          f"AdapterFusion fuses {FUSABLE} adapters")
    if fingerprint is not None and meta.get("base_fingerprint") != fingerprint:
        raise ConfigError(f"method.adapter_fusion.adapters: {adapter_dir} was trained on another base model "
                          f"({meta.get('base_model')})")
    return meta


class FusionLayer(torch.nn.Module):
    def __init__(self, adapters: list[torch.nn.Module], hidden: int, temperature: float):
        super().__init__()
        self.adapters = torch.nn.ModuleList(adapters)
        self.query = torch.nn.Linear(hidden, hidden)
        self.key = torch.nn.Linear(hidden, hidden)
        self.value = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.eye_(self.value.weight)
        for projection in (self.query, self.key):  # near-zero scores: a near-uniform mix at init
            torch.nn.init.normal_(projection.weight, std=0.02)
            torch.nn.init.zeros_(projection.bias)
        self.temperature = temperature

    def forward(self, h):
        outs = torch.stack([adapter.adapt(h) for adapter in self.adapters], dim=-2)  # ... x N x hidden
        scores = torch.einsum("...d,...nd->...n", self.query(h), self.key(outs)) / self.temperature
        weights = scores.softmax(dim=-1)
        return h + torch.einsum("...n,...nd->...d", weights, self.value(outs))


def _run_fusion(sublayer, _inputs, output):
    fusion = getattr(sublayer, CHILD)
    if isinstance(output, tuple):
        return (fusion(output[0]), *output[1:])
    return fusion(output)


@register
class AdapterFusionMethod(Method):
    equals_base_at_init = False  # it mixes trained adapters from the start
    name = "adapter_fusion"
    usual_lr = 1e-3
    options = AdapterFusionOptions
    output = "adapter"
    merge_refusal = "it mixes non-linear adapters per token, which no weight of the base can express"

    def sources(self, opts, fingerprint):
        metas = [read_adapter(Path(d), fingerprint) for d in opts.adapters]
        shapes = {(m["options"]["placement"], m["options"]["drop_first_n"]) for m in metas}
        if len(shapes) > 1:
            raise ConfigError("method.adapter_fusion.adapters: the adapters differ in placement or drop_first_n "
                              f"({sorted(shapes)}); fusion needs every adapter at the same sublayers")
        return metas

    def check(self, opts, model):
        from rayft.models import base_fingerprint

        for adapter_dir in opts.adapters:
            if not (Path(adapter_dir) / WEIGHTS_FILE).is_file():
                raise ConfigError(f"method.adapter_fusion.adapters: {adapter_dir} holds no {WEIGHTS_FILE}")
        self.sources(opts, base_fingerprint(model.name_or_path))

    def build(self, opts, model):
        """The frozen adapters with their trained weights, and a fresh fusion layer, after each sublayer."""
        metas = self.sources(opts, None)
        bottleneck = get_method(FUSABLE)
        placement, drop_first_n = metas[0]["options"]["placement"], metas[0]["options"]["drop_first_n"]
        weights = [load_file(Path(d) / WEIGHTS_FILE) for d in opts.adapters]
        layer_paths = {id(sub): path for path, sub in model.named_modules()}
        for _, sublayer in adapted_layers(model, placement, drop_first_n, self.name):
            path = layer_paths[id(sublayer)]
            adapters = []
            for meta, saved in zip(metas, weights):
                adapter = bottleneck.make_adapter(bottleneck.options.model_validate(meta["options"]), model.config, {})
                prefix = f"{path}.bottleneck."
                adapter.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
                adapters.append(adapter.requires_grad_(False))
            sublayer.add_module(CHILD, FusionLayer(adapters, model.config.hidden_size, opts.temperature))
            sublayer.register_forward_hook(_run_fusion)
        return model

    def layer_activations(self, opts, layer, tokens, compute_bytes):
        """Per fusion layer: the sublayer's output and its query; per fused adapter, its
        bottleneck activation, its stacked output and that output's key and value projections."""
        kept = 0.0
        for module in layer.modules():
            if isinstance(module, FusionLayer):
                hidden, size = module.adapters[0].widths
                kept += tokens * compute_bytes * (2 * hidden + len(module.adapters) * (size + 3 * hidden))
        return kept, set()

    def apply(self, opts, model, run):
        model.requires_grad_(False)
        self.build(opts, model)
        for name, param in model.named_parameters():
            param.requires_grad_(f".{CHILD}." in name and ".adapters." not in name)
        return model

    def export(self, opts, module, state, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, directory / FUSION_FILE, metadata={"format": "pt"})
        sources = [{"path": str(Path(d).resolve()), "sha256": weights_digest(Path(d))} for d in opts.adapters]
        (directory / CONFIG_FILE).write_text(json.dumps(
            {"method": self.name, "options": opts.model_dump(mode="json"), "adapters": sources}, indent=2))

    def load_output(self, output_dir, base):
        output_dir = Path(output_dir)
        saved = json.loads((output_dir / CONFIG_FILE).read_text())
        for source in saved["adapters"]:
            if weights_digest(Path(source["path"])) != source["sha256"]:
                raise RayftError(f"{output_dir}: the fused adapter {source['path']} has changed since the fusion was trained")
        opts = self.options.model_validate(saved["options"])
        self.build(opts, base)
        missing, unexpected = base.load_state_dict(load_file(output_dir / FUSION_FILE), strict=False)
        if unexpected:
            raise RayftError(f"{output_dir}/{FUSION_FILE}: weights that fit no fusion layer ({unexpected[0]}, ...)")
        return base.eval()
