"""`rayft merge`: fold a LoRA adapter into its base model, written as a plain HF directory."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from rayft.errors import RayftError


def adapter_base(adapter_dir: Path) -> Path:
    """The base model an adapter was trained on, from its rayft.json metadata."""
    from rayft.models import resolve_model_path

    meta_path = adapter_dir / "rayft.json"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RayftError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    if not meta_path.is_file():
        raise RayftError(f"{adapter_dir}: no rayft.json naming the base model")
    meta = json.loads(meta_path.read_text())
    return resolve_model_path(meta["base_model"])


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RayftError(f"{out_dir} exists and is not empty")
    base_dir = adapter_base(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
