"""Shared fixtures: one real Ray instance for the whole run, a tiny model, small data sets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Ray binds to a "remotely reachable" interface unless told this is a one-machine cluster;
# the tests keep every listener on 127.0.0.1. Set before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray Train's controller polls its workers every 2 s: it sees a run start and end, and commits each
# checkpoint (which the workers wait for), that late. Runs of a few seconds each add that up; the
# drivers pass it to their controllers, and the cluster's processes inherit it from here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from tiny import build_tiny_model, write_alpaca  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAYFT = str(Path(sys.executable).parent / "rayft")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """The test run's Ray cluster: cluster/local.sh with a head and one worker node (two raylets on
    127.0.0.1, 2 CPUs each) and an MLflow tracking server."""
    address: str
    jobs_address: str
    mlflow_uri: str
    state: Path
    agent_port: int  # each node's dashboard agent (Ray's default, 52365, may be another cluster's)

    def script(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(REPO / "cluster" / "local.sh"), *args], env=self.env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"cluster/local.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    @property
    def env(self) -> dict:
        return {**os.environ, "RAYFT_CLUSTER_DIR": str(self.state), "RAY_PORT": self.address.split(":")[1],
                "DASHBOARD_PORT": self.jobs_address.rsplit(":", 1)[1], "MLFLOW_PORT": self.mlflow_uri.rsplit(":", 1)[1],
                "AGENT_PORT": str(self.agent_port)}


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """Started once for the whole test run with cluster/local.sh and stopped by it (it ends only the
    processes it started, by their recorded pids)."""
    # Everything listens on 127.0.0.1 and lives for this test run only: no auth tokens to share.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = LocalCluster(address=f"127.0.0.1:{_free_port()}", jobs_address=f"http://127.0.0.1:{_free_port()}",
                           mlflow_uri=f"http://127.0.0.1:{_free_port()}", state=tmp_path_factory.mktemp("cluster"),
                           agent_port=_free_port())
    try:
        cluster.script("up")
        os.environ["RAY_ADDRESS"] = cluster.address
        os.environ["RAYFT_JOBS_ADDRESS"] = cluster.jobs_address  # Ray's job server
        os.environ["RAYFT_TEST_MLFLOW_URI"] = cluster.mlflow_uri  # base_config's tracking
        yield cluster
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.pop("RAYFT_JOBS_ADDRESS", None)
        os.environ.pop("RAYFT_TEST_MLFLOW_URI", None)
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.script("down")


@pytest.fixture(scope="session")
def ray_address(local_cluster) -> str:
    return local_cluster.address


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "people.jsonl", 160)


def base_config(tmp_path: Path, model: Path, data: Path, **sections) -> dict:
    config = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(model)},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": str(data), "cutoff_len": 128, "val_size": 0.1},
        "train": {"max_steps": 6, "micro_batch_size": 4, "lr": 5e-3, "logging_steps": 2, "eval_steps": 3,
                  "save_steps": 3, "precision": "fp32", "warmup_ratio": 0.0},
        "distributed": {"num_workers": 2, "zero_stage": 2},
        # the test cluster's MLflow server once it runs: a new SQLite store costs each run seconds
        # of schema set-up in the driver and again in the worker that logs
        "tracking": {"mlflow_uri": os.environ.get("RAYFT_TEST_MLFLOW_URI") or f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for section, values in sections.items():
        if section == "method" and values.get("type", "lora") != "lora":
            config["method"] = dict(values)  # another method: the lora block would be refused
        elif isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAYFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def registered_checkpoints(output_dir: Path, name: str) -> int:
    """Checkpoints Ray Train has registered (its snapshot), not folders still being written."""
    snapshot = output_dir / "ray" / name / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)  # polling the file system: there is no event to await across processes
    raise AssertionError(f"timed out waiting for {what}")


# Library noise that a successful run must not show on the console (issue 20); it stays in the logs.
NOISE = ("core_worker.cc", "Setting accelerator to CPU", "gemm_4bit_forward", "FutureWarning", "UserWarning",
         "Loading weights", "TrainingReport(", "Writing model shards", "Traceback", "(pid=", "INFO ", "WARNING ")


def assert_quiet_console(console: str, trainable_lines: int = 1) -> None:
    """Only rayft's lines: none of the libraries' noise, at most 15 lines besides the progress bar
    and rich tables."""
    lines = [line for line in console.splitlines() if line.strip()]
    assert not [line for line in lines if any(noise in line for noise in NOISE)], console[-3000:]
    ours = [line for line in lines if not line.startswith("train ")]
    tables = [line for line in ours if line[:1] in "┏┃┡│└" or line.strip().startswith(("rayft train:", "sweep trials"))]
    assert len(ours) - len(tables) <= 15, console[-3000:]
    assert sum("trainable of" in line for line in lines) == trainable_lines  # the parameter counts, once a run


@pytest.fixture
def broken_model(tmp_path, tiny_model):
    """The tiny model with its weights file cut short: the pre-flight (config, tokenizer) passes and
    every worker fails to load it."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    with open(broken / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)
    return broken
