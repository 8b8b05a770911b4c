"""One MLflow run per training job."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from rayft.config import TrainJobConfig, flatten
from rayft.errors import RayftError

DEFAULT_DB = "mlflow.db"


def tracking_uri(cfg: TrainJobConfig) -> str:
    """The configured URI, or a SQLite file in the working directory, as an absolute URI (Ray
    workers run in other directories)."""
    if cfg.tracking.mlflow_uri:
        uri = cfg.tracking.mlflow_uri
        if "://" not in uri:  # a plain path means a file store at that path
            return Path(uri).resolve().as_uri()
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def _artifact_root(uri: str) -> Optional[str]:
    # A SQLite store keeps artifacts beside the database file, not in the caller's directory.
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str) -> None:
    """Fail before training starts when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            if response.status != 200:
                raise RayftError(f"tracking.mlflow_uri={uri}: /health answered {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RayftError(f"tracking.mlflow_uri={uri} is unreachable ({reason})") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:  # created meanwhile by a concurrent sweep trial
        return mlflow_client.get_experiment_by_name(name).experiment_id


JOB_ID_TAG = "rayft.job_id"


def job_tags() -> dict[str, str]:
    """Runs started inside a submitted job carry its id (set by `rayft submit` / the service)."""
    job_id = os.environ.get("RAYFT_JOB_ID")
    return {JOB_ID_TAG: job_id} if job_id else {}


def start_run(uri: str, cfg: TrainJobConfig, model_path: str, parent_run_id: Optional[str] = None) -> str:
    tags = {"rayft.method": cfg.method.type, "rayft.base_model": cfg.model.name_or_path,
            "rayft.base_model_path": model_path, "rayft.output_dir": str(Path(cfg.output_dir).resolve()), **job_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # shows the run nested under its sweep
    run = client(uri).create_run(experiment_id(uri, cfg.tracking.experiment), run_name=cfg.name, tags=tags)
    log_params(uri, run.info.run_id, flatten(cfg.to_dict()))
    return run.info.run_id


def start_parent_run(uri: str, experiment: str, name: str, params: dict, tags: dict) -> str:
    run = client(uri).create_run(experiment_id(uri, experiment), run_name=name, tags={**tags, **job_tags()})
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(batch), 100):
        client(uri).log_batch(run_id, params=batch[start:start + 100])


def log_artifacts(uri: str, run_id: str, files: list[Path], directory: Path, logs: list[Path] = ()) -> None:
    """Log the run's files, its adapter/model directory and its log files, then mark the run finished."""
    mlflow_client = client(uri)
    for path in files:
        mlflow_client.log_artifact(run_id, str(path))
    for path in logs:
        mlflow_client.log_artifact(run_id, str(path), artifact_path="logs")
    mlflow_client.log_artifacts(run_id, str(directory), artifact_path=directory.name)
    mlflow_client.set_terminated(run_id, "FINISHED")


def _job_runs(uri: str, job_id: str) -> list:
    """Every MLflow run tagged with a submitted job's id (its run, or a sweep's parent and trials)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # the job has not created its store yet; opening it would create an empty one
    mlflow_client = client(uri)
    return mlflow_client.search_runs(experiment_ids=[e.experiment_id for e in mlflow_client.search_experiments()],
                                     filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")


def job_run(uri: str, job_id: str):
    """The top-level MLflow run of a submitted job (a sweep's parent run), or None."""
    try:
        runs = _job_runs(uri, job_id)
    except Exception:  # tracking store unreachable: the job record still answers without metrics
        return None
    top = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return (top or runs or [None])[0]


def end_job_runs(uri: str, job_id: str, status: str) -> None:
    """Mark the runs a stopped or failed job did not finish as `status` (KILLED for a stop: its
    driver may have marked them FAILED on the way down, or left them RUNNING)."""
    try:
        for run in _job_runs(uri, job_id):
            if run.info.status == "RUNNING" or (status == "KILLED" and run.info.status == "FAILED"):
                client(uri).set_terminated(run.info.run_id, status)
    except Exception:  # the job's record is right either way; the tracking store may be down
        pass


def fail_run(uri: str, run_id: str) -> None:
    try:
        client(uri).set_terminated(run_id, "FAILED")
    except Exception:  # reporting a failure must not hide the failure itself
        pass



def register_adapter(uri: str, run_id: str, model_name: str, tags: dict) -> str:
    """A model version in the MLflow Model Registry for a published adapter, whose source is the
    adapter artifact of its training run (so the version links back to that run)."""
    mlflow_client = client(uri)
    try:
        mlflow_client.get_registered_model(model_name)
    except Exception:  # not registered yet
        mlflow_client.create_registered_model(model_name, description="LoRA adapter published by rayft")
    version = mlflow_client.create_model_version(model_name, source=f"runs:/{run_id}/adapter", run_id=run_id,
                                                 tags={k: str(v) for k, v in tags.items()})
    return version.version
