"""The training service: a REST API through which many users submit, watch and stop rayft jobs.

    user --HTTP--> service (this file) --Ray Jobs API--> Ray cluster (python -m rayft train|sweep)
                      |
                      +-- job records (store.py: SQLite or PostgreSQL)   +-- metrics (MLflow)

Ray's job server runs the jobs (client.py, the same path as `rayft submit`); the service adds
tenants (API keys), a per-tenant limit on active jobs, and durable records, so a restarted service
re-attaches to the jobs it submitted. Runs standalone (`rayft service`, uvicorn) or as a Ray Serve
application (`build_service_app`, services/training.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from rayft.config import load_yaml, map_data_paths
from rayft.errors import ConfigError, RayftError
from rayft.jobs import client as jobs_client
from rayft.jobs.store import ACTIVE, FINAL, JobRecord, JobStore
from rayft.serve.keys import Caller, KeyStore

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


@dataclass
class ServiceSettings:
    db_url: str = "sqlite:///rayft-jobs.db"
    ray_address: str = jobs_client.DEFAULT_ADDRESS  # Ray's job server (dashboard)
    # Relative paths in job configs (data, models) are read against root; every job's output_dir
    # is placed under <root>/outputs/<tenant>/. On a cluster root is shared storage.
    root: str = "."
    keys_file: Optional[str] = None  # None: no auth, every caller is tenant "default"
    max_active_jobs_per_tenant: int = 2
    mlflow_uri: Optional[str] = None  # for jobs whose config names no tracking.mlflow_uri
    max_body_bytes: int = 1_000_000
    poll_s: float = 5.0  # how often active jobs are refreshed in the background


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, key: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.key = status, message, kind, key

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "key": self.key}}


class ErrorBody(BaseModel):
    message: str
    type: str
    key: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Progress(BaseModel):
    step: Optional[int] = None
    total_steps: Optional[int] = None
    fraction: Optional[float] = None
    trials_started: Optional[int] = None
    trials_finished: Optional[int] = None


class JobView(BaseModel):
    id: str
    tenant: str
    kind: Literal["train", "sweep"]
    name: str
    status: Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]
    message: str
    created_at: float
    ended_at: Optional[float] = None
    output_dir: str
    output_complete: bool
    progress: Optional[Progress] = None
    metrics: dict[str, float] = {}
    mlflow_run_id: Optional[str] = None
    mlflow_run_url: Optional[str] = None


class JobList(BaseModel):
    jobs: list[JobView]


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


# ---------------------------------------------------------------- submitting
def _relative_output_dir(raw: dict, key: str) -> str:
    value = raw.get("output_dir")
    if not isinstance(value, str) or not value.strip():
        raise APIError(422, f"{key}: missing required key (a path relative to the tenant's output area)",
                       "invalid_config", key)
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "://" in value:
        raise APIError(422, f"{key}={value!r}: must be a relative path without '..' (the service places it under "
                       f"outputs/<tenant>/)", "invalid_config", key)
    return value


def prepare_job(raw: Any, tenant: str, settings: ServiceSettings) -> tuple[str, dict[str, Any]]:
    """Validate a posted config exactly as `rayft submit` does, inside the tenant's output area."""
    if not isinstance(raw, dict):
        raise APIError(422, "body: expected a training or sweep config (a mapping of keys)", "invalid_config")
    raw = json.loads(json.dumps(raw))  # a private copy, plain JSON types
    raw["output_dir"] = f"outputs/{tenant}/{_relative_output_dir(raw, 'output_dir')}"
    if settings.mlflow_uri:
        target = raw.get("base") if "search" in raw else raw
        if isinstance(target, dict) and isinstance(target.get("tracking", {}), dict):
            target.setdefault("tracking", {}).setdefault("mlflow_uri", settings.mlflow_uri)
    with tempfile.TemporaryDirectory(prefix="rayft-post-") as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            kind, resolved = jobs_client.resolve_job(path, [], base_dir=Path(settings.root).resolve())
        except ConfigError as exc:
            raise APIError(422, str(exc).replace(str(path), "body"), "invalid_config", exc.key) from None
        except RayftError as exc:
            raise APIError(422, str(exc).replace(str(path), "body"), "invalid_config") from None
    # The service's root is storage the cluster shares: a data file missing here is missing there.
    prefix = "base.data" if kind == "sweep" else "data"
    data = (resolved["base"] if kind == "sweep" else resolved)["data"]

    def must_exist(key: str, path: str) -> str:
        if "://" not in path and not Path(path).exists():
            raise APIError(422, f"{prefix}.{key}={path!r}: no such file under the service root", "invalid_config",
                           f"{prefix}.{key}")
        return path

    map_data_paths(data, must_exist)
    return kind, resolved


def parse_body(body: bytes, content_type: str) -> Any:
    media = content_type.split(";")[0].strip().lower()
    try:
        if media in YAML_TYPES:
            return load_yaml(body.decode())
        if media in ("", "application/json"):
            return json.loads(body)
    except (ValueError, yaml.YAMLError) as exc:
        raise APIError(400, f"body: not valid {'YAML' if media in YAML_TYPES else 'JSON'} "
                       f"({str(exc).splitlines()[0]})", "invalid_request_error") from None
    raise APIError(415, f"Content-Type {media!r}: send application/json or application/yaml",
                   "invalid_request_error")


# ---------------------------------------------------------------- the service
# A job's record is written before Ray hears of it; until the submission returns, the cluster
# answers 404 for it, which must not read as "the cluster lost the job".
SUBMITTING = "submitting"
SUBMIT_GRACE_S = 300


class TrainingService:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.store = JobStore(settings.db_url)
        self.keys = KeyStore(settings.keys_file)
        # one submission at a time in this process (refresh, output_dir check, slot claim); across
        # replicas the database's unique slot index holds the per-tenant limit
        self.admission = threading.Lock()

    # -- who is calling
    def caller(self, authorization: Optional[str]) -> Caller:
        caller = self.keys.caller(authorization)
        if caller is None:
            raise APIError(401, "missing or unknown API key (Authorization: Bearer <key>)", "authentication_error")
        return caller

    def record_for(self, caller: Caller, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None or (record.tenant != caller.tenant and not caller.admin):
            raise APIError(404, f"job {job_id!r}: not found", "not_found")  # other tenants' jobs are invisible
        return record

    # -- Ray's view of a job, folded into the record
    def refresh(self, record: JobRecord) -> JobRecord:
        if record.status in FINAL:
            return record
        from ray.job_submission import JobStatus

        try:
            info = jobs_client._client(self.settings.ray_address).get_job_info(record.id)
        except RayftError:
            return record  # cluster unreachable: keep the last status seen
        except RuntimeError:  # the cluster does not know the job
            if record.message == SUBMITTING and time.time() - record.created_at < SUBMIT_GRACE_S:
                return record  # its submission (by this or another replica) is still on its way
            # it was restarted, or the service died before the job reached it
            return self._end(record, "FAILED", f"job unknown to the Ray cluster at {self.settings.ray_address}")
        status, message = str(info.status.value), info.message or ""
        if info.status in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
            return self._end(record, status, message)
        if info.status == JobStatus.RUNNING:
            reason = self._waiting_for_resources(info.job_id)
            if reason:
                status, message = "PENDING", reason
        elif info.status == JobStatus.PENDING:
            message = message or "waiting for the job driver to start"
        if (status, message) != (record.status, record.message):
            record = self.store.update(record.id, status=status, message=message)
        return record

    def _end(self, record: JobRecord, status: str, message: str) -> JobRecord:
        from rayft.tracking import mlflow_run

        if status in ("STOPPED", "FAILED"):  # its driver died: runs it left RUNNING did not finish
            mlflow_run.end_job_runs(record.mlflow_uri, record.id, "KILLED" if status == "STOPPED" else "FAILED")
        return self.store.update(record.id, status=status, message=message)

    def _waiting_for_resources(self, ray_job_id: Optional[str]) -> Optional[str]:
        """Why a running job's workers have not started: its placement groups wait for resources."""
        if not ray_job_id:
            return None
        from ray.util.state import list_placement_groups

        try:
            groups = [g for g in list_placement_groups(address=self.settings.ray_address, detail=True,
                                                       raise_on_missing_output=False)
                      if g.creator_job_id == ray_job_id and g.state != "REMOVED"]
        except Exception:  # the state API is best effort; the job status still answers
            return None
        if not groups or any(g.state == "CREATED" for g in groups):
            return None
        wanted: dict[str, float] = {}
        for group in groups:
            for bundle in group.bundles or []:
                for resource, amount in (bundle.get("unit_resources") or {}).items():
                    wanted[resource] = wanted.get(resource, 0) + amount
        needs = ", ".join(f"{amount:g} {resource}" for resource, amount in sorted(wanted.items()) if resource in ("CPU", "GPU"))
        return f"waiting for cluster resources: its workers need {needs or 'resources'} that are in use or absent"

    def view(self, record: JobRecord) -> JobView:
        from rayft.tracking import mlflow_run

        output = Path(record.output_dir)
        done_marker = output / ("metrics.json" if record.kind == "train" else "best.yaml")
        run = mlflow_run.job_run(record.mlflow_uri, record.id)
        progress, metrics, run_id, url = None, {}, None, None
        if run is not None:
            run_id = run.info.run_id
            metrics = {k: v for k, v in run.data.metrics.items() if isinstance(v, (int, float))}
            progress = self._progress(record, run)
            if record.mlflow_uri.startswith(("http://", "https://")):
                url = f"{record.mlflow_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
            else:
                url = f"runs:/{run_id} (tracking URI {record.mlflow_uri})"
        return JobView(id=record.id, tenant=record.tenant, kind=record.kind, name=record.name, status=record.status,
                       message=record.message, created_at=record.created_at, ended_at=record.ended_at,
                       output_dir=record.output_dir, output_complete=record.status == "SUCCEEDED" and done_marker.is_file(),
                       progress=progress, metrics=metrics, mlflow_run_id=run_id, mlflow_run_url=url)

    def _progress(self, record: JobRecord, run) -> Optional[Progress]:
        from rayft.tracking import mlflow_run

        client = mlflow_run.client(record.mlflow_uri)
        try:
            if record.kind == "sweep":
                children = client.search_runs([run.info.experiment_id],
                                              filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
                return Progress(trials_started=len(children),
                                trials_finished=sum(c.info.status != "RUNNING" for c in children))
            history = client.get_metric_history(run.info.run_id, "total_steps")
        except Exception:
            return None
        if not history:
            return Progress(step=0)
        latest = max(history, key=lambda m: m.step)
        total = int(latest.value)
        return Progress(step=latest.step, total_steps=total, fraction=round(latest.step / total, 4) if total else None)

    # -- actions
    def submit(self, caller: Caller, raw: Any) -> JobRecord:
        kind, resolved = prepare_job(raw, caller.tenant, self.settings)
        uri = (resolved["base"] if kind == "sweep" else resolved)["tracking"]["mlflow_uri"]
        with self.admission:
            # ended jobs free their slots when refreshed; the slot claim itself is the database's
            active = [self.refresh(r) for r in self.store.list(caller.tenant, active_only=True)]
            active = [r for r in active if r.status in ACTIVE]
            limit = self.settings.max_active_jobs_per_tenant
            at_limit = APIError(429, f"tenant {caller.tenant!r} has {max(limit, len(active))} active jobs (limit {limit}); "
                                f"wait for one to end or stop one", "rate_limit_error")
            if len(active) >= limit:
                raise at_limit
            if any(r.output_dir == resolved["output_dir"] for r in active):
                raise APIError(409, f"output_dir={raw['output_dir']!r}: an active job already writes there",
                               "conflict", "output_dir")
            job_id = jobs_client.new_job_id(resolved["name"])
            now = time.time()
            # the record first: a job Ray runs is never without one, even if the service dies now
            record = JobRecord(id=job_id, tenant=caller.tenant, kind=kind, name=resolved["name"], status="PENDING",
                               message=SUBMITTING, config=json.dumps(resolved), output_dir=resolved["output_dir"],
                               mlflow_uri=uri, created_at=now, updated_at=now)
            if not self.store.add_active(record, limit):  # another replica took the last slot
                raise at_limit
            try:
                jobs_client.submit_resolved(self.settings.ray_address, kind, resolved, job_id,
                                            metadata={"rayft.tenant": caller.tenant})
            except Exception as exc:
                self.store.update(job_id, status="FAILED", message=f"submission failed: {str(exc).splitlines()[0]}")
                raise APIError(503, f"the Ray cluster at {self.settings.ray_address} did not take the job "
                               f"({str(exc).splitlines()[0]})", "service_unavailable") from None
        return self.store.update(job_id, message="submitted")

    def stop(self, caller: Caller, job_id: str) -> JobRecord:
        record = self.refresh(self.record_for(caller, job_id))
        if record.status in FINAL:
            raise APIError(409, f"job {job_id!r} has already ended ({record.status})", "conflict")
        try:
            jobs_client._client(self.settings.ray_address).stop_job(job_id)
        except RayftError as exc:
            raise APIError(503, str(exc), "service_unavailable") from None
        return self.store.update(job_id, message="stop requested")

    def logs(self, caller: Caller, job_id: str, tail: Optional[int], verbose: bool = False) -> str:
        """The job's output (rayft's lines); `verbose` appends the run's log files, which the
        service reads from the job's output_dir (under its root, on the cluster's shared storage)."""
        record = self.record_for(caller, job_id)
        try:
            text = jobs_client._client(self.settings.ray_address).get_job_logs(job_id)
        except RayftError as exc:
            raise APIError(503, str(exc), "service_unavailable") from None
        except RuntimeError:
            raise APIError(404, f"job {job_id!r}: the Ray cluster has no logs for it", "not_found") from None
        if verbose:
            text += jobs_client.run_logs(record.output_dir)
        return "\n".join(text.splitlines()[-tail:]) + "\n" if tail else text

    def refresh_active(self) -> None:
        for record in self.store.list(active_only=True):
            self.refresh(record)


def create_service(settings: ServiceSettings) -> FastAPI:
    service = TrainingService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # re-attach: jobs recorded as active get their current status from the cluster, then stay fresh
        loop = asyncio.get_running_loop()

        async def poll():
            while True:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(None, service.refresh_active)
                await asyncio.sleep(settings.poll_s)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            task.cancel()
            service.store.close()

    app = FastAPI(title="rayft training service", version="1", lifespan=lifespan,
                  description="Submit, watch and stop rayft training and sweep jobs on a Ray cluster.")
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # one JSON shape for every error
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "internal_error").body(), 500)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse(APIError(422, f"{where}: {first['msg']}", "invalid_request_error", where).body(), 422)

    def caller_of(request: Request) -> Caller:
        return service.caller(request.headers.get("authorization"))

    body_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description": "a training config or a sweep config "
                                        "(see pipelines/); output_dir is relative to the tenant's area"}},
        "application/yaml": {"schema": {"type": "string"}}}}}

    @app.post("/v1/jobs", status_code=201, response_model=JobView, responses=ERRORS, openapi_extra=body_schema)
    async def create_job(request: Request):
        caller = caller_of(request)
        body = bytearray()
        async for chunk in request.stream():  # read no further than the limit
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise APIError(413, f"body larger than {settings.max_body_bytes} bytes", "invalid_request_error")
        raw = parse_body(bytes(body), request.headers.get("content-type", ""))
        return await asyncio.get_running_loop().run_in_executor(None, lambda: service.view(service.submit(caller, raw)))

    @app.get("/v1/jobs", response_model=JobList, responses=ERRORS)
    def list_jobs(request: Request, status: Optional[Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]] = None):
        caller = caller_of(request)
        records = [service.refresh(r) for r in service.store.list(None if caller.admin else caller.tenant)]
        return JobList(jobs=[service.view(r) for r in records if status is None or r.status == status])

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS)
    def get_job(job_id: str, request: Request):
        return service.view(service.refresh(service.record_for(caller_of(request), job_id)))

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=ERRORS)
    def job_logs(job_id: str, request: Request, tail: Optional[int] = Query(None, ge=1, le=100_000),
                 verbose: bool = Query(False, description="append the run's log files (driver, workers, trials)")):
        return PlainTextResponse(service.logs(caller_of(request), job_id, tail, verbose))

    @app.delete("/v1/jobs/{job_id}", status_code=202, response_model=JobView, responses=ERRORS)
    def stop_job(job_id: str, request: Request):
        return service.view(service.stop(caller_of(request), job_id))

    @app.get("/healthz")
    def health():
        return {"status": "ok"}

    return app


# ---------------------------------------------------------------- as a Ray Serve application
def build_service_app(args: dict):
    """`serve run rayft.jobs.service:build_service_app` (services/training.yaml): the service as one
    Serve replica beside the inference application."""
    from ray import serve

    @serve.deployment(name="TrainingService", ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class TrainingServiceDeployment:
        def __init__(self, settings: dict):
            self.settings = ServiceSettings(**settings)

        def __serve_build_asgi_app__(self):
            return create_service(self.settings)

    known = set(asdict(ServiceSettings()))
    unknown = set(args) - known
    if unknown:
        raise RayftError(f"training service args: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return TrainingServiceDeployment.bind(args)
