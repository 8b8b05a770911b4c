"""Jobs on a cluster through Ray's job system: `rayft submit` and `rayft jobs` against the test's
Ray head (its dashboard is the job server)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import base_config, registered_checkpoints, run_cli, wait_for, write_config


def _rayft_jobs() -> list[str]:
    listed = run_cli("jobs", "list")
    assert listed.returncode == 0, listed.stderr
    return [line.split("\t")[0] for line in listed.stdout.splitlines() if line.strip()]


def test_bad_configs_never_reach_the_cluster(tmp_path, tiny_model, alpaca_file, ray_address):
    before = _rayft_jobs()
    bad = base_config(tmp_path, tiny_model, alpaca_file, train={"lr": -1})
    result = run_cli("submit", str(write_config(tmp_path, bad)))
    assert result.returncode == 2 and "train.lr=-1" in result.stderr
    result = run_cli("submit", str(write_config(tmp_path, base_config(tmp_path, tiny_model, alpaca_file))),
                     "--set", "method.lora.rank=4")
    assert result.returncode == 2 and "unknown key method.lora.rank" in result.stderr
    refused = base_config(tmp_path, tiny_model, alpaca_file, method={"type": "adalora"}, distributed={"zero_stage": 3})
    result = run_cli("submit", str(write_config(tmp_path, refused)))
    assert result.returncode == 2 and "adalora cannot run with distributed.zero_stage=3" in result.stderr
    unreachable = run_cli("submit", str(write_config(tmp_path, base_config(tmp_path, tiny_model, alpaca_file))),
                          "--address", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "no Ray job server answers" in unreachable.stderr
    assert _rayft_jobs() == before
    assert run_cli("jobs", "status", "rayft-no-such-job").returncode == 2


def _submit_and_kill_worker_node(tmp_path, tiny_model, alpaca_file, local_cluster, name: str, **distributed):
    """Submits a LoRA job with one worker on each node; SIGKILLs the worker node (its raylet and the
    training worker on it) once the job has a registered checkpoint. Returns the job id and output dir."""
    out = tmp_path / name
    config = write_config(tmp_path, base_config(
        tmp_path, tiny_model, alpaca_file, name=name, output_dir=str(out),
        train={"max_steps": 60, "save_steps": 10, "eval_steps": 30, "logging_steps": 10},
        distributed={"placement_strategy": "STRICT_SPREAD", **distributed},
        tracking={"mlflow_uri": local_cluster.mlflow_uri, "experiment": "node-failure"}))
    submitted = run_cli("submit", str(config))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith(f"rayft-{name}-") and job_id in _rayft_jobs()
    wait_for(lambda: registered_checkpoints(out, name) >= 1, 300, "the job's first checkpoint")
    local_cluster.script("kill-node", "worker-1")
    return job_id, out


def _ended(job_id: str) -> tuple[str, str]:
    """(status line, logs) of a job, once it has ended."""
    followed = run_cli("jobs", "logs", job_id, "--follow", timeout=600)  # returns when the job ends
    assert followed.returncode == 0
    return run_cli("jobs", "status", job_id).stdout, followed.stdout


def test_a_spread_job_survives_losing_a_node_that_comes_back(tmp_path, tiny_model, alpaca_file, local_cluster):
    """`rayft submit` of a LoRA job whose 2 workers must sit on different nodes (two raylets), tracked
    by the cluster's MLflow server; its worker node is SIGKILLed mid-run and started again."""
    try:
        job_id, out = _submit_and_kill_worker_node(tmp_path, tiny_model, alpaca_file, local_cluster, "node-back",
                                                   max_failures=2)
        local_cluster.script("up")  # the node rejoins: same address, a new raylet
        status, logs = _ended(job_id)
    finally:
        local_cluster.script("up")
    assert status.startswith("SUCCEEDED"), status[-3000:]
    # Ray Train's own report of where it placed the workers (in the run's driver log; the job's
    # console output holds rayft's lines): ranks on node 0 and node 1
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "node_rank=0" in driver_log and "node_rank=1" in driver_log, driver_log[-3000:]
    assert "[rayft] training node-back" in logs and "node_rank=0" not in logs
    everything = run_cli("jobs", "logs", job_id, "--verbose")  # then the run's log files, each headed by its path
    assert everything.returncode == 0 and everything.stdout.startswith(logs)
    assert f"==> {out / 'logs' / 'driver.log'} <==" in everything.stdout and "node_rank=1" in everything.stdout
    assert f"==> {out / 'logs' / 'worker-1.log'} <==" in everything.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["resumed_from_steps"] and metrics["resumed_from_steps"][0] >= 10
    assert Path(metrics["output"]).name == "adapter" and (out / "adapter" / "adapter_model.safetensors").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=local_cluster.mlflow_uri).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval_loss"] == metrics["eval_loss"]


def test_a_lost_worker_node_that_stays_away_fails_the_job_clearly(tmp_path, tiny_model, alpaca_file, local_cluster):
    """With the node gone, the workers cannot be placed again: the job fails once
    distributed.start_timeout_s has passed, saying so, instead of waiting forever."""
    try:
        job_id, out = _submit_and_kill_worker_node(tmp_path, tiny_model, alpaca_file, local_cluster, "node-gone",
                                                   max_failures=2, start_timeout_s=15)
        status, _ = _ended(job_id)
    finally:
        local_cluster.script("up")
    assert status.startswith("FAILED"), status[-3000:]
    assert "could not be (re)started within 15 s (distributed.start_timeout_s)" in status
    assert not (out / "metrics.json").exists()  # the partial output is not marked finished
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(tracking_uri=local_cluster.mlflow_uri).get_run(run_id).info.status == "FAILED"
