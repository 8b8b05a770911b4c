"""`rayft adapters publish`: a trained adapter into the registry, and into MLflow's Model Registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rayft.errors import RayftError


def publish_from_cli(source: Path, name: str, tenant: str, registry_dir: Path, base: Optional[str],
                     mlflow_uri: Optional[str]) -> list[str]:
    from rayft.config import ServeLimits
    from rayft.models import resolve_model_path
    from rayft.serve.registry import AdapterRegistry, adapter_dir_of, publish_adapter
    from rayft.serve.validate import CONFIG_FILE, META_FILE, BaseShape

    source = Path(source)
    adapter_dir = adapter_dir_of(source)
    meta = json.loads((adapter_dir / META_FILE).read_text()) if (adapter_dir / META_FILE).is_file() else {}
    if base is None:
        base = meta.get("base_model")
        if base is None and (adapter_dir / CONFIG_FILE).is_file():
            base = json.loads((adapter_dir / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if not base:
        raise RayftError(f"{adapter_dir}: does not record its base model; pass --base")
    limits = ServeLimits()
    ref = publish_adapter(AdapterRegistry(registry_dir), adapter_dir, tenant, name,
                          BaseShape.of_model_dir(resolve_model_path(base)), limits.max_lora_rank,
                          limits.max_adapter_bytes)
    lines = [f"published {tenant}/{name} version {ref.version} at {ref.path}"]

    run_id = meta.get("mlflow_run_id")
    run_file = source / "run.json"  # a training output dir records where its run is tracked
    if mlflow_uri is None and run_file.is_file():
        mlflow_uri = json.loads(run_file.read_text()).get("tracking_uri")
    if run_id and mlflow_uri:
        from rayft.tracking.mlflow_run import register_adapter

        model_name = f"{tenant}.{name}"
        version = register_adapter(mlflow_uri, run_id, model_name, {"rayft.registry_path": ref.path,
                                                                     "rayft.registry_version": ref.version})
        lines.append(f"registered MLflow model {model_name} version {version} (run {run_id})")
    else:
        lines.append("not registered in MLflow: no training run recorded (rayft.json mlflow_run_id, run.json)")
    return lines
