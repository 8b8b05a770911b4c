"""Shared fixtures: one real Ray instance for the whole run, a tiny model, small data sets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Ray binds to a "remotely reachable" interface unless told this is a one-machine cluster;
# the tests keep every listener on 127.0.0.1. Set before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from tiny import build_tiny_model, write_alpaca  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAYFT = str(Path(sys.executable).parent / "rayft")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """A Ray head on 127.0.0.1 started once for the whole test run, and stopped by its own pid."""
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # Everything listens on 127.0.0.1 and lives for this test run only: no auth tokens to share.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"127.0.0.1:{port}"
    lines = []
    for line in head.stdout:  # wait for the event that the head is up, not a fixed sleep
        lines.append(line)
        if "Ray runtime started" in line or "--block" in line:
            break
        if head.poll() is not None:
            raise RuntimeError("ray start failed:\n" + "".join(lines))
    os.environ["RAY_ADDRESS"] = address
    yield address
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.killpg(head.pid, signal.SIGTERM)  # --block: the head process stops the node it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


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
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RAYFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
