"""The training service (`rayft service`) over real HTTP, on the test run's 2-node Ray cluster:
validation, tenants, limits, re-attach after a restart, stop, PostgreSQL records, schemathesis."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import RAYFT, _free_port, base_config



class Service:
    """`rayft service` as a subprocess; restart() keeps its database."""

    def __init__(self, args: list[str], port: int):
        self.args, self.url, self.proc = args, f"http://127.0.0.1:{port}", None

    def start(self) -> "Service":
        self.proc = subprocess.Popen([RAYFT, "service", *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("rayft service exited:\n" + self.proc.stdout.read())
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)  # nothing to await across processes but the port
        raise RuntimeError("rayft service did not answer /healthz")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model, alpaca_file, local_cluster):
    from rayft.serve.keys import create_key

    root = tmp_path_factory.mktemp("service-root")
    shutil.copy(alpaca_file, root / "people.jsonl")
    keys_file = root / "keys.yaml"
    keys = {tenant: create_key(keys_file, tenant) for tenant in ("acme", "globex")}
    port = _free_port()
    svc = Service(["--db", f"sqlite:///{root / 'jobs.db'}", "--root", str(root), "--keys-file", str(keys_file),
                   "--max-active-jobs", "1", "--mlflow-uri", local_cluster.mlflow_uri, "--port", str(port)], port).start()
    svc.root, svc.keys, svc.model = root, keys, tiny_model
    yield svc
    svc.stop()


def job_config(svc, **sections) -> dict:
    config = base_config(svc.root, svc.model, Path("people.jsonl"), **sections)
    config["output_dir"] = config["name"]
    config.pop("tracking")  # the service's default tracking server
    return config


def call(svc, method: str, path: str, tenant: str | None = "acme", content_type: str | None = None,
         **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {svc.keys[tenant]}"} if tenant else {}
    if content_type:
        headers["Content-Type"] = content_type
    return httpx.request(method, f"{svc.url}{path}", headers=headers, timeout=60, **kwargs)


def wait_job(svc, job_id: str, until, timeout_s: float = 300, tenant: str = "acme") -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = call(svc, "GET", f"/v1/jobs/{job_id}", tenant).json()
        if until(job):
            return job
        time.sleep(0.5)  # polling the API is what a client does
    raise AssertionError(f"job {job_id} never reached the state asked for: {job}")


def test_bad_requests_are_4xx_json_naming_the_problem(service):
    assert call(service, "POST", "/v1/jobs", None, json={}).status_code == 401
    assert httpx.post(f"{service.url}/v1/jobs", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = call(service, "POST", "/v1/jobs", json=job_config(service, train={"lr": -1}))
    assert bad.status_code == 422 and bad.json()["error"]["key"] == "train.lr"
    assert "train.lr=-1" in bad.json()["error"]["message"]
    unknown = call(service, "POST", "/v1/jobs", json={**job_config(service), "epochs": 3})
    assert unknown.status_code == 422 and unknown.json()["error"]["message"].endswith("unknown key epochs")
    escape = call(service, "POST", "/v1/jobs", json={**job_config(service), "output_dir": "../../etc"})
    assert escape.status_code == 422 and escape.json()["error"]["key"] == "output_dir"
    missing = job_config(service)
    missing["data"]["train"] = "nope.jsonl"
    assert "nope.jsonl" in call(service, "POST", "/v1/jobs", json=missing).json()["error"]["message"]
    dpo = {**job_config(service), "stage": "dpo", "dpo": {"reference": "model"}}  # the stage's own check
    refused = call(service, "POST", "/v1/jobs", json=dpo)
    assert refused.status_code == 422 and "dpo.reference=model with method.type=lora" in refused.json()["error"]["message"]
    broken_yaml = call(service, "POST", "/v1/jobs", content=b"name: [", content_type="application/yaml")
    assert broken_yaml.status_code == 400 and "YAML" in broken_yaml.json()["error"]["message"]
    assert call(service, "GET", "/v1/jobs/rayft-nope-0").status_code == 404
    assert call(service, "GET", "/v1/jobs").json() == {"jobs": []}  # nothing reached the cluster


def test_job_lifecycle_tenants_limits_restart_and_stop(service, local_cluster):
    import yaml
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    # a YAML body runs to completion; the tenant's limit (1 active job) holds meanwhile. The service
    # names no method and no stage: an IA3 DPO job goes through it as a LoRA SFT one does (LoRA SFT
    # runs in the jobs tests, through the same jobs client as `rayft submit`)
    from rayft.demo import write_preference_data

    write_preference_data(service.root / "prefs.jsonl", 60)
    quick_config = job_config(service, name="quick", train={"max_steps": 6}, method={"type": "ia3"})
    quick_config["data"]["train"], quick_config["stage"], quick_config["dpo"] = "prefs.jsonl", "dpo", {"beta": 0.5}
    body = yaml.safe_dump(quick_config)
    created = call(service, "POST", "/v1/jobs", content=body, content_type="application/yaml")
    assert created.status_code == 201, created.text
    quick = created.json()
    assert quick["status"] in ("PENDING", "RUNNING") and quick["output_dir"] == str(service.root / "outputs/acme/quick")
    second = call(service, "POST", "/v1/jobs", json=job_config(service, name="second"))
    assert second.status_code == 429 and "limit 1" in second.json()["error"]["message"]
    assert call(service, "GET", f"/v1/jobs/{quick['id']}", "globex").status_code == 404  # tenants see their own
    assert call(service, "GET", "/v1/jobs", "globex").json() == {"jobs": []}

    service.stop()  # the service restarts while its job runs: the record survives, the job is re-attached
    service.start()
    done = wait_job(service, quick["id"], lambda job: job["status"] not in ("PENDING", "RUNNING"))
    assert done["status"] == "SUCCEEDED", call(service, "GET", f"/v1/jobs/{quick['id']}/logs?tail=40").text
    assert done["output_complete"] and done["progress"] == {"step": 6, "total_steps": 6, "fraction": 1.0,
                                                            "trials_started": None, "trials_finished": None}
    assert done["metrics"]["eval_loss"] > 0 and done["mlflow_run_url"].startswith(local_cluster.mlflow_uri)
    assert 0 <= done["metrics"]["eval_pref_accuracy"] <= 1 and "rewards/margins" in done["metrics"]
    before = MlflowClient(local_cluster.mlflow_uri).get_metric_history(done["mlflow_run_id"], "eval_loss")[0]
    assert before.step == 0 and before.value == pytest.approx(0.6931, abs=1e-3)  # ln 2: the policy is the reference
    job_output = call(service, "GET", f"/v1/jobs/{quick['id']}/logs").text
    assert "rayft train: quick" in job_output and "Setting accelerator to CPU" not in job_output
    everything = call(service, "GET", f"/v1/jobs/{quick['id']}/logs?verbose=true").text  # plus the run's log files
    assert everything.startswith(job_output) and "Setting accelerator to CPU" in everything
    assert f"==> {service.root / 'outputs/acme/quick/logs/worker-0.log'} <==" in everything

    # a long job is stopped through the service: STOPPED, no worker left, output not finished
    long = call(service, "POST", "/v1/jobs", json=job_config(
        service, name="long", train={"max_steps": 5000, "logging_steps": 1, "eval_steps": 1000, "save_steps": 1000})).json()
    wait_job(service, long["id"], lambda job: (job["progress"] or {}).get("step", 0) >= 2)
    ray_job_id = JobSubmissionClient(local_cluster.jobs_address).get_job_info(long["id"]).job_id
    workers = list_actors(filters=[("job_id", "=", ray_job_id), ("class_name", "=", "RayTrainWorker"),
                                   ("state", "=", "ALIVE")], address=local_cluster.jobs_address, detail=True)
    assert len(workers) == 2

    # meanwhile another tenant's job that cannot be placed yet shows PENDING with the reason
    blocked = call(service, "POST", "/v1/jobs", "globex", json=job_config(
        service, name="blocked", distributed={"num_workers": 3})).json()
    pending = wait_job(service, blocked["id"], lambda job: "waiting for cluster resources" in job["message"],
                       tenant="globex")
    assert pending["status"] == "PENDING" and "3 CPU" in pending["message"]
    assert call(service, "DELETE", f"/v1/jobs/{blocked['id']}", "globex").status_code == 202

    stopping = call(service, "DELETE", f"/v1/jobs/{long['id']}")
    assert stopping.status_code == 202
    stopped = wait_job(service, long["id"], lambda job: job["status"] == "STOPPED", timeout_s=120)
    assert not stopped["output_complete"] and not (Path(stopped["output_dir"]) / "metrics.json").exists()
    assert MlflowClient(local_cluster.mlflow_uri).get_run(stopped["mlflow_run_id"]).info.status == "KILLED"
    deadline = time.monotonic() + 60
    alive = [w.pid for w in workers]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)
    assert not alive, f"worker processes {alive} outlived their stopped job"
    assert call(service, "DELETE", f"/v1/jobs/{long['id']}").status_code == 409
    assert wait_job(service, blocked["id"], lambda job: job["status"] == "STOPPED", tenant="globex")
    listed = call(service, "GET", "/v1/jobs").json()["jobs"]
    assert [job["name"] for job in listed] == ["quick", "long"]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_openapi_passes_schemathesis_with_no_server_errors(service):
    run = subprocess.run(
        [str(Path(RAYFT).parent / "schemathesis"), "run", f"{service.url}/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "30", "--seed", "7", "-H", f"Authorization: Bearer {service.keys['acme']}"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]


# ---------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server from Debian's postgresql package, on 127.0.0.1, for this module."""
    import pwd
    import tempfile

    bin_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bin_dirs:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; `make test` installs it where it can)")
    bin_dir = bin_dirs[-1]
    home = Path(tempfile.mkdtemp(prefix="rayft-pg-"))  # outside pytest's root-only tmp: the server user must reach it
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(home, pwd.getpwnam("postgres").pw_uid, -1)
    data, port = home / "data", _free_port()
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "rayft", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "log"),
                        "-o", f"-h 127.0.0.1 -p {port} -k {home}", "start"], check=True, capture_output=True)
        yield f"postgresql+psycopg://rayft@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _replicas_race_for_slots(url: str, tenant: str, limit: int = 2, attempts: int = 8) -> list[int]:
    """Two stores on one database (two service replicas) add active jobs for one tenant at once."""
    import threading

    from rayft.jobs.store import JobRecord, JobStore

    stores = [JobStore(url), JobStore(url)]
    start, admitted = threading.Barrier(attempts), []

    def submit(i: int) -> None:
        now = time.time()
        record = JobRecord(id=f"rayft-race-{tenant}-{i}", tenant=tenant, kind="train", name="race", status="RUNNING",
                           message="", config="{}", output_dir=f"/o/{i}", mlflow_uri="", created_at=now, updated_at=now)
        start.wait()
        if stores[i % 2].add_active(record, limit):
            admitted.append(i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slots = sorted(r.slot for r in stores[0].list(tenant, active_only=True))
    stores[0].update(f"rayft-race-{tenant}-{admitted[0]}", status="SUCCEEDED")  # frees its slot
    assert stores[1].get(f"rayft-race-{tenant}-{admitted[0]}").slot is None
    assert stores[1].add_active(JobRecord(id=f"rayft-race-{tenant}-next", tenant=tenant, kind="train", name="race",
                                          status="PENDING", message="", config="{}", output_dir="/o/next",
                                          mlflow_uri="", created_at=time.time(), updated_at=time.time()), limit)
    for store in stores:
        store.close()
    assert len(admitted) == limit
    return slots


def test_replicas_on_one_sqlite_file_admit_no_more_than_the_limit(tmp_path):
    import sqlite3

    # a database from before slots existed gets the column and its unique index
    old = sqlite3.connect(tmp_path / "jobs.db")
    old.execute("CREATE TABLE rayft_jobs (id VARCHAR(200) PRIMARY KEY, tenant VARCHAR(100), kind VARCHAR(10), "
                "name VARCHAR(128), status VARCHAR(16), message TEXT, config TEXT, output_dir TEXT, mlflow_uri TEXT, "
                "created_at FLOAT, updated_at FLOAT, ended_at FLOAT)")
    old.commit()
    old.close()
    assert _replicas_race_for_slots(f"sqlite:///{tmp_path / 'jobs.db'}", "acme") == [0, 1]


def test_a_job_still_being_submitted_is_not_taken_for_lost(local_cluster, tmp_path):
    """The record is written before Ray hears of the job; a refresh meanwhile (the background poll,
    another replica) gets Ray's 404 and must not end the job or free its tenant's slot."""
    from rayft.jobs.service import SUBMIT_GRACE_S, SUBMITTING, ServiceSettings, TrainingService
    from rayft.jobs.store import JobRecord

    service = TrainingService(ServiceSettings(db_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                                              ray_address=local_cluster.jobs_address))
    now = time.time()

    def record(job_id: str, message: str, created_at: float) -> JobRecord:
        return JobRecord(id=job_id, tenant="acme", kind="train", name="n", status="PENDING", message=message,
                         config="{}", output_dir=f"/o/{job_id}", mlflow_uri=local_cluster.mlflow_uri, created_at=created_at,
                         updated_at=created_at)

    in_flight = service.store.add(record("rayft-in-flight-0", SUBMITTING, now))
    assert service.refresh(in_flight).status == "PENDING"
    # a submission that never reached the cluster (its service died) or a job the cluster forgot
    stale = service.store.add(record("rayft-stale-0", SUBMITTING, now - SUBMIT_GRACE_S - 1))
    forgotten = service.store.add(record("rayft-forgotten-0", "submitted", now))
    for lost in (stale, forgotten):
        ended = service.refresh(lost)
        assert ended.status == "FAILED" and "unknown to the Ray cluster" in ended.message
    service.store.close()


def test_job_records_in_postgresql_survive_a_new_service(postgres, tmp_path):
    from fastapi.testclient import TestClient

    from rayft.jobs.service import ServiceSettings, create_service
    from rayft.jobs.store import JobRecord, JobStore

    store = JobStore(postgres)
    now = time.time()
    for i, tenant in enumerate(("acme", "acme", "globex")):
        store.add(JobRecord(id=f"rayft-j{i}-0000", tenant=tenant, kind="train", name=f"j{i}", status="SUCCEEDED",
                            message="", config="{}", output_dir=str(tmp_path / f"j{i}"), mlflow_uri=f"sqlite:///{tmp_path}/m.db",
                            created_at=now + i, updated_at=now + i))
    store.update("rayft-j1-0000", status="FAILED")
    assert store.count_active("acme") == 0 and store.get("rayft-j1-0000").ended_at is not None
    store.close()
    # a fresh service on the same database (no keys file: the open tenant "default" is an admin)
    with TestClient(create_service(ServiceSettings(db_url=postgres, root=str(tmp_path)))) as client:
        jobs = client.get("/v1/jobs").json()["jobs"]
        assert [(j["id"], j["status"]) for j in jobs] == [("rayft-j0-0000", "SUCCEEDED"), ("rayft-j1-0000", "FAILED"),
                                                         ("rayft-j2-0000", "SUCCEEDED")]
        assert client.get("/v1/jobs?status=FAILED").json()["jobs"][0]["name"] == "j1"
        assert client.delete("/v1/jobs/rayft-j0-0000").status_code == 409
    bad = subprocess.run([RAYFT, "service", "--db", "postgresql+psycopg://rayft@127.0.0.1:9/none"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --db postgresql+psycopg://")
    assert _replicas_race_for_slots(postgres, "initech") == [0, 1]
