"""`rayft submit` and `rayft jobs`: a thin layer over Ray's JobSubmissionClient.

A job carries its resolved config (overrides applied, validated here with the same errors as
`rayft train` / `rayft sweep`) in a small working_dir; its entrypoint is `python -m rayft train
rayft-job.yaml` (or `sweep`). Local relative paths are made absolute: the cluster must see them
at the same place (shared storage), which is how data, outputs and checkpoints reach every node.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from rayft.config import map_data_paths
from rayft.errors import RayftError

JOB_FILE = "rayft-job.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _absolute(path: Optional[str], base: Path) -> Optional[str]:
    if path is None or "://" in path:
        return path
    return str((base / Path(path).expanduser()).resolve())


def _train_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    from rayft.tracking.mlflow_run import DEFAULT_DB

    raw["output_dir"] = _absolute(raw.get("output_dir"), base)
    if isinstance(raw.get("data"), dict):
        raw["data"] = map_data_paths(raw["data"], lambda _key, path: _absolute(path, base))
    model = raw.get("model", {})
    if model.get("name_or_path") and (base / Path(model["name_or_path"]).expanduser()).is_dir():
        model["name_or_path"] = _absolute(model["name_or_path"], base)
    # The job runs in a throw-away working_dir: its default SQLite store must live where it was asked for.
    tracking = raw.setdefault("tracking", {})
    uri = tracking.get("mlflow_uri") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///"):
        tracking["mlflow_uri"] = "sqlite:///" + _absolute(uri.removeprefix("sqlite:///"), base)
    elif "://" not in uri:  # a plain path: a file store
        tracking["mlflow_uri"] = _absolute(uri, base)
    return raw


def resolve_job(config: Path, overrides: list[str], base_dir: Optional[Path] = None) -> tuple[str, dict[str, Any]]:
    """("train" | "sweep", the config to run), validated exactly as the local commands do, with
    relative paths made absolute against base_dir (default: the working directory)."""
    from rayft.config import dump_config, load_config, read_yaml

    base = Path(base_dir or Path.cwd())
    if "search" in read_yaml(config):
        from rayft.tune.sweep import load_sweep

        sweep = load_sweep(config, overrides)
        resolved = sweep.cfg.model_dump(mode="json")
        resolved["output_dir"] = _absolute(resolved["output_dir"], base)
        resolved["base"] = _train_paths(dict(sweep.base_raw), base)
        return "sweep", resolved
    cfg = load_config(config, overrides)
    return "train", _train_paths(yaml.safe_load(dump_config(cfg)), base)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; the address
    # named here (--address or default_address()) must be the one used.
    saved = {key: os.environ.pop(key) for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if key in os.environ}
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # unreachable or not a Ray dashboard
        raise RayftError(f"--address {address}: no Ray job server answers ({str(exc).splitlines()[0]})") from None
    finally:
        os.environ.update(saved)


def new_job_id(name: str) -> str:
    return f"rayft-{name}-{uuid.uuid4().hex[:8]}"


def submit_resolved(address: str, kind: str, resolved: dict[str, Any], job_id: Optional[str] = None,
                    metadata: Optional[dict[str, str]] = None, verbose: bool = False) -> str:
    """Hand a resolved config to Ray's job server; returns the job (submission) id. The job's own
    output is what `rayft train` / `rayft sweep` show on a console: rayft's lines, or everything
    when `verbose`."""
    client = _client(address)
    job_id = job_id or new_job_id(resolved["name"])
    # RAYFT_JOB_ID tags the job's MLflow runs, so a job's metrics can be found from its id
    env = {"PYTHONUNBUFFERED": "1", "RAYFT_JOB_ID": job_id, **({"RAYFT_VERBOSE": "1"} if verbose else {})}
    with tempfile.TemporaryDirectory(prefix="rayft-job-") as folder:
        (Path(folder) / JOB_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
        return client.submit_job(
            entrypoint=f"python -m rayft {kind} {JOB_FILE}", submission_id=job_id,
            runtime_env={"working_dir": folder, "env_vars": env},
            metadata={"rayft.kind": kind, "rayft.name": resolved["name"], "rayft.output_dir": resolved["output_dir"],
                      **(metadata or {})})


def submit(config: Path, address: str, overrides: list[str], verbose: bool = False) -> str:
    kind, resolved = resolve_job(config, overrides)
    return submit_resolved(address, kind, resolved, verbose=verbose)


def list_jobs(address: str) -> list[dict[str, Any]]:
    jobs = []
    for job in _client(address).list_jobs():
        if (job.metadata or {}).get("rayft.kind"):
            jobs.append({"id": job.submission_id, "kind": job.metadata["rayft.kind"], "name": job.metadata["rayft.name"],
                         "status": str(job.status.value), "output_dir": job.metadata.get("rayft.output_dir"),
                         "start_time": job.start_time, "message": job.message})
    return sorted(jobs, key=lambda j: j["start_time"] or 0)


def job_info(address: str, job_id: str):
    try:
        return _client(address).get_job_info(job_id)
    except RuntimeError as exc:
        raise RayftError(f"job {job_id}: not found on {address} ({str(exc).splitlines()[0]})") from None


def logs(address: str, job_id: str, follow: bool, verbose: bool = False) -> Iterator[str]:
    """The job's own output (rayft's lines); with `verbose`, then the run's log files."""
    client = _client(address)
    info = job_info(address, job_id)
    if not follow:
        yield client.get_job_logs(job_id)
    else:
        stream = client.tail_job_logs(job_id)  # ends when the job ends
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    break
        finally:
            loop.close()
    if verbose:
        yield run_logs((info.metadata or {}).get("rayft.output_dir"))


def run_logs(output_dir: Optional[str]) -> str:
    """A run's log files (output_dir/logs/, and each sweep trial's trials/<id>/logs/), each headed
    by its path. They are on the storage the job wrote to: read here when this machine sees it."""
    if not output_dir:
        return "(this job names no output_dir: no run logs)\n"
    files = sorted(Path(output_dir).glob("logs/*.log")) + sorted(Path(output_dir).glob("trials/*/logs/*.log"))
    if not files:
        return f"(no log files under {output_dir}/logs/ on this machine: they are on the storage the job ran on)\n"
    parts = []
    for path in files:
        text = path.read_text(errors="replace")
        parts.append(f"==> {path} <==\n{text}" + ("" if text.endswith("\n") or not text else "\n"))
    return "".join(parts)


def stop(address: str, job_id: str) -> bool:
    job_info(address, job_id)
    return _client(address).stop_job(job_id)


def default_address() -> str:
    return os.environ.get("RAYFT_JOBS_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
