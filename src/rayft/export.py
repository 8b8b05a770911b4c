"""`rayft merge`: fold a trained output into its base model, written as a plain HF directory.

Which outputs can merge is the method's own answer (rayft/methods/); the method is read from the
output's rayft.json.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from rayft.errors import RayftError


def output_metadata(adapter_dir: Path) -> dict:
    """rayft.json of a trained output: base model and method."""
    meta_path = adapter_dir / "rayft.json"
    if not adapter_dir.is_dir():
        raise RayftError(f"{adapter_dir}: not a directory")
    if not meta_path.is_file():
        raise RayftError(f"{adapter_dir}: no rayft.json naming the base model and method (not a rayft output)")
    try:
        return json.loads(meta_path.read_text())
    except ValueError:
        raise RayftError(f"{meta_path}: not valid JSON") from None


def adapter_base(adapter_dir: Path) -> Path:
    """The base model an adapter was trained on, from its rayft.json metadata."""
    from rayft.models import resolve_model_path

    return resolve_model_path(output_metadata(adapter_dir)["base_model"])


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.methods import get_method, method_names

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RayftError(f"{out_dir} exists and is not empty")
    meta = output_metadata(adapter_dir)
    if meta.get("method") not in method_names():
        raise RayftError(f"{adapter_dir}/rayft.json: unknown method {meta.get('method')!r}")
    method = get_method(meta["method"])
    if not method.mergeable:
        method.merge(adapter_dir, None)  # refuses, in one line that names the method
    base = AutoModelForCausalLM.from_pretrained(adapter_base(adapter_dir), dtype=torch.float32)
    merged = method.merge(adapter_dir, base)
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
