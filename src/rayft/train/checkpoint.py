"""Checkpoints (resumable training state) and exported weights (safetensors).

A checkpoint directory holds DeepSpeed's own sharded state under `deepspeed/` (every rank writes
its optimizer partition; Ray Train merges the ranks' files into one directory) and
`trainer_state.json` (step, metric history). The final checkpoint also holds `export/`: the
adapter or model as safetensors, which the driver publishes into output_dir.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

DEEPSPEED_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
EXPORT_DIR = "export"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # real tokens over all ranks
    train_seconds: float = 0.0
    eval_loss_before: Optional[float] = None
    history: list[dict] = field(default_factory=list)  # one entry per logged / evaluated step
    resumed_from: list[int] = field(default_factory=list)  # checkpoint steps this run restarted from
    # each task's validation loss at the last evaluations (data.task_weighting dwa), the same on every rank
    task_evaluations: list[dict] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def save_training_state(engine, state: TrainerState, directory: Path, rank: int) -> None:
    """Collective: every rank must call it."""
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        state.save(directory)


def load_training_state(engine, directory: Path) -> TrainerState:
    engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
    return TrainerState.load(directory)


def gathered_state_dict(module, trainable_only: bool, rank: int) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) weights on rank 0; collective under ZeRO-3, where each parameter is
    gathered in turn so no rank ever holds more than one whole parameter beyond its shard."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    if not trainable_only and rank == 0:
        saved_keys = set(module.state_dict().keys())  # persistent buffers only (not rotary caches)
        for name, buffer in module.named_buffers():  # buffers are never partitioned
            if name in saved_keys:
                state[name] = buffer.detach().to("cpu").contiguous()
    return state


def export_weights(module, method, opts, directory: Path, rank: int) -> None:
    """Write the method's output (adapter or whole model, safetensors) into directory/export.
    Collective: every rank gathers; rank 0 writes."""
    state = gathered_state_dict(module, trainable_only=(method.output == "adapter"), rank=rank)
    if rank == 0:
        method.export(opts, module, state, directory / EXPORT_DIR)
