"""rayft sweep: the search space is checked before any trial, and a real sweep on Ray Tune (every
trial a 2-worker Ray Train run of the tiny model) stops bad trials early, survives a killed driver
and leaves results.csv, best.yaml, the best adapter and MLflow parent/child runs that agree."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import RAYFT, assert_quiet_console, base_config, run_cli
from rayft.config import load_config
from rayft.errors import ConfigError
from rayft.tune.space import parse_space
from rayft.tune.sweep import load_sweep


def sweep_file(tmp_path: Path, model: Path, data: Path, search: dict, **base_sections) -> Path:
    base = base_config(tmp_path, model, data, **base_sections)
    sweep = {"base": base, "name": "sw", "output_dir": str(tmp_path / "sweep"), "search": search}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


GRID = {"space": {"train.lr": {"choice": [5e-3, 1e-6]}}, "algorithm": "grid"}


# ---------------------------------------------------------------- checks before any trial
@pytest.mark.parametrize("space, algorithm, message", [
    ({"method.lora.rank": {"choice": [4, 8]}}, "random", "unknown key 'method.lora.rank'"),
    ({"method.lora": {"choice": [4]}}, "random", "a section"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "random", "loguniform needs low > 0"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "random", "needs low < high"),
    ({"train.lr": {"normal": [0, 1]}}, "random", "expected exactly one of"),
    ({"train.lr": [1e-4, 1e-3]}, "random", "expected a distribution"),
    ({"method.lora.r": {"choice": []}}, "grid", "empty grid"),
    ({"train.lr": {"loguniform": [1e-5, 1e-3]}}, "grid", "algorithm grid needs a choice list"),
    ({"method.lora.r": {"choice": [8, 0]}}, "random", "method.lora.r=0"),
    ({"method.lora.r": {"choice": [8]}, "method.lora.alpha": {"ratio_of": "method.lora.rnk", "factor": 2}},
     "random", "ratio_of 'method.lora.rnk' is not another key"),
    ({"output_dir": {"choice": ["a", "b"]}}, "random", "not searchable"),
])
def test_bad_search_space_is_one_line_naming_the_key(tmp_path, space, algorithm, message):
    base_raw = base_config(tmp_path, Path("model"), Path("data.jsonl"))
    base = load_config(_write(tmp_path, base_raw))
    with pytest.raises(ConfigError) as err:
        parse_space(space, base_raw, base, algorithm)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method, space, message", [
    ({"type": "bottleneck"}, {"method.lora.r": {"choice": [4, 8]}}, "unknown key 'method.lora.r'"),
    ({"type": "bottleneck"}, {"method.bottleneck.reduction_factor": {"choice": [8, 0]}},
     "method.bottleneck.reduction_factor=0"),
    ({"type": "adalora"}, {"method.adalora.target_r": {"choice": [4, 16]}}, "method.adalora.target_r=16 is not below init_r=12"),
])
def test_a_space_over_method_keys_is_checked_like_any_other(tmp_path, method, space, message):
    base_raw = base_config(tmp_path, Path("model"), Path("data.jsonl"), method=method)
    with pytest.raises(ConfigError) as err:
        parse_space(space, base_raw, load_config(_write(tmp_path, base_raw)), "grid")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method, space", [
    ({"type": "prompt_tuning"}, {"method.prompt_tuning.num_virtual_tokens": {"randint": [4, 32]},
                                 "method.prompt_tuning.init": {"choice": ["random", "vocab"]}}),
    ({"type": "adalora"}, {"method.adalora.init_r": {"choice": [8, 12]},
                           "method.adalora.target_r": {"ratio_of": "method.adalora.init_r", "factor": 0.5}}),
    ({"type": "plora", "plora": {"merge_every": 2, "rewarm_steps": 1}}, {"method.plora.merge_every": {"choice": [2, 3]}}),
    ({"type": "compacter"}, {"method.compacter.phm_dim": {"choice": [2, 4]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}),
])
def test_any_methods_key_can_be_searched(tmp_path, method, space):
    base_raw = base_config(tmp_path, Path("model"), Path("data.jsonl"), method=method)
    base = load_config(_write(tmp_path, base_raw))
    parsed = parse_space(space, base_raw, base, "random")
    assert sorted(parsed.keys) == sorted(space)


def test_tied_key_follows_the_sampled_one(tmp_path):
    base_raw = base_config(tmp_path, Path("model"), Path("data.jsonl"))
    base = load_config(_write(tmp_path, base_raw))
    space = parse_space({"method.lora.r": {"choice": [4, 16]},
                         "method.lora.alpha": {"ratio_of": "method.lora.r", "factor": 2}}, base_raw, base, "grid")
    assert space.resolve({"method.lora.r": 16}, base) == {"method.lora.r": 16, "method.lora.alpha": 32.0}
    assert space.grid_size() == 2


def test_grid_order_is_a_seeded_shuffle(tmp_path):
    """Every listed value once, in an order fixed by the seed (a resumed sweep sees the same grid)."""
    base_raw = base_config(tmp_path, Path("model"), Path("data.jsonl"))
    base = load_config(_write(tmp_path, base_raw))
    lrs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    space = parse_space({"train.lr": {"choice": lrs}}, base_raw, base, "grid")
    listed = space.tune_space("grid")["train.lr"]["grid_search"]
    shuffled = space.tune_space("grid", grid_seed=42)["train.lr"]["grid_search"]
    assert listed == lrs and sorted(shuffled) == lrs and shuffled != lrs
    assert space.tune_space("grid", grid_seed=42)["train.lr"]["grid_search"] == shuffled


def test_sweep_file_errors(tmp_path, tiny_model, alpaca_file):
    path = sweep_file(tmp_path, tiny_model, alpaca_file, {"space": {"train.lr": {"uniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="search.num_samples is required with algorithm random"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="ASHA compares trials at equal steps"):
        load_sweep(path, ["search.space={train.max_steps: {choice: [4, 8]}}", "search.algorithm=grid"])
    with pytest.raises(ConfigError, match="unknown key search.algo"):
        load_sweep(path, ["search.algo=grid"])
    # --set: sweep keys go to the sweep, every other key (or base.KEY) to the base config
    sweep = load_sweep(path, ["search.num_samples=3", "train.max_steps=9", "base.train.lr=0.01"])
    assert (sweep.num_samples, sweep.base.train.max_steps, sweep.base.train.lr) == (3, 9, 0.01)


def test_cli_rejects_a_bad_sweep_with_exit_code_2(tmp_path, tiny_model, alpaca_file):
    path = sweep_file(tmp_path, tiny_model, alpaca_file,
                      {"space": {"method.lora.rank": {"choice": [4]}}, "algorithm": "grid"})
    result = run_cli("sweep", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: search.space: unknown key 'method.lora.rank': not a key of the training config"]
    assert not (tmp_path / "sweep").exists()


def test_trials_that_cannot_fit_fail_at_once(tmp_path, tiny_model, alpaca_file, ray_address):
    path = sweep_file(tmp_path, tiny_model, alpaca_file, GRID, distributed={"num_workers": 8})
    result = run_cli("sweep", str(path), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "distributed.num_workers=8 x cpus_per_worker=1 needs 8 CPUs; the Ray cluster has 4" in result.stderr


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_search_algorithms_sample_inside_the_space(tmp_path, tiny_model, alpaca_file, ray_address, algorithm):
    """The space as each algorithm receives it (a stand-in trial function: sampling, not training)."""
    import ray
    from ray import tune

    from rayft.tune.sweep import build_search_alg

    search = {"space": {"method.lora.r": {"choice": [4, 8]}, "train.lr": {"loguniform": [1e-5, 1e-3]},
                        "train.warmup_ratio": {"uniform": [0.0, 0.2]}, "train.grad_accum": {"randint": [1, 3]},
                        "method.lora.alpha": {"ratio_of": "method.lora.r", "factor": 2}},
              "algorithm": algorithm, "num_samples": 4}
    sweep = load_sweep(sweep_file(tmp_path, tiny_model, alpaca_file, search))
    ray.init(address=ray_address, ignore_reinit_error=True)
    grid = tune.Tuner(
        tune.with_resources(lambda config: tune.report({"eval_loss": config["train.lr"]}), {"memory": 2**20}),
        param_space=sweep.space.tune_space(algorithm),
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", num_samples=4,
                                    search_alg=build_search_alg(sweep, 4)),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    sampled = [sweep.space.resolve(result.config, sweep.base) for result in grid]
    assert len(sampled) == 4 and not grid.errors
    for values in sampled:
        assert values["method.lora.r"] in (4, 8) and values["method.lora.alpha"] == 2 * values["method.lora.r"]
        assert 1e-5 <= values["train.lr"] <= 1e-3 and 0.0 <= values["train.warmup_ratio"] <= 0.2
        assert values["train.grad_accum"] in (1, 2, 3)
    assert len({v["train.lr"] for v in sampled}) == 4


# ---------------------------------------------------------------- a real sweep
def test_sweep_asha_resume_and_outputs(tmp_path, tiny_model, alpaca_file, ray_address):
    # Two good learning rates and a hopeless one, run one trial at a time in the listed order: the
    # driver is killed after the first; after --resume (ASHA's rungs start empty again) the second
    # good trial gives ASHA the result to stop the hopeless one against.
    search = {"space": {"train.lr": {"choice": [5e-3, 4e-3, 1e-6]}, "method.lora.r": {"choice": [4]},
                        "method.lora.alpha": {"ratio_of": "method.lora.r", "factor": 2}},
              "algorithm": "grid", "shuffle_grid": False, "max_concurrent_trials": 1,
              "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}}
    path = sweep_file(tmp_path, tiny_model, alpaca_file, search,
                      train={"max_steps": 8, "eval_steps": 2, "save_steps": 4, "scheduler": "constant"},
                      distributed={"zero_stage": 0, "num_workers": 1},
                      tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})  # its own store: all runs listed below
    out = tmp_path / "sweep"

    # Kill the driver as soon as the first trial has finished.
    log = tmp_path / "driver.log"
    with log.open("w") as log_file:  # a file, not a pipe nobody reads while we wait
        driver = subprocess.Popen([RAYFT, "sweep", str(path)], stdout=log_file, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first_done = _wait_for(lambda: next(iter((out / "trials").glob("*/metrics.json")), None), driver, log, 300)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_trial = first_done.parent.name
    finished_mtime = first_done.stat().st_mtime_ns
    assert not (out / "best.yaml").exists()

    again = run_cli("sweep", str(path))
    assert again.returncode == 2 and "unfinished sweep; pass --resume" in again.stderr

    resumed = run_cli("sweep", str(path), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "sweep trials (* best)" in resumed.stdout + resumed.stderr  # rayft's console lines are on stderr
    # the console: rayft's lines and the trial table; Tune's, Ray's and each trial's output in the logs
    assert_quiet_console(resumed.stdout + resumed.stderr, trainable_lines=0)
    assert "TrainController" in (out / "logs" / "driver.log").read_text()  # what Ray forwards from trials
    for trial in (out / "trials").iterdir():
        assert "Setting accelerator to CPU" in (trial / "logs" / "worker-0.log").read_text()

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3
    by_lr = {float(r["train.lr"]): r for r in rows}
    assert set(by_lr) == {5e-3, 4e-3, 1e-6}
    assert all(r["method.lora.alpha"] in ("8", "8.0") for r in rows)  # tied: 2 x r
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped, "ASHA stopped no trial"
    assert all(float(r["train.lr"]) < 1e-5 and int(r["steps"]) < 8 for r in stopped)
    completed = [r for r in rows if r["status"] == "completed"]
    assert all(int(r["steps"]) == 8 for r in completed)
    # the trial that finished before the kill was not run again
    assert first_done.stat().st_mtime_ns == finished_mtime
    assert finished_trial in {r["trial_id"] for r in completed}

    best_row = min(completed, key=lambda r: float(r["final_eval_loss"]))
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.train.lr == float(best_row["train.lr"])
    assert best_cfg.method.lora.alpha == 8 and best_cfg.method.lora.r == 4
    assert best_cfg.output_dir == str(out / "best_run")
    trial_dir = out / "trials" / best_row["trial_id"]
    assert (out / "best_adapter" / "adapter_model.safetensors").read_bytes() == \
        (trial_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert float(best_row["final_eval_loss"]) == json.loads((trial_dir / "metrics.json").read_text())["eval_loss"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("rayft.sweep") == "sw")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["train.lr"]) == best_cfg.train.lr
    assert parent.data.metrics["eval_loss"] == pytest.approx(float(best_row["final_eval_loss"]))
    assert {"results.csv", "sweep.png", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(children) == 3  # one per trial: resumed trials continued their own runs
    for child in children:
        row = next(r for r in rows if r["mlflow_run_id"] == child.info.run_id)
        assert float(child.data.params["train.lr"]) == float(row["train.lr"])
        assert child.info.status == ("KILLED" if row["stopped_early"] == "True" else "FINISHED")
        evals = client.get_metric_history(child.info.run_id, "eval_loss")
        assert max(m.step for m in evals) >= int(row["steps"])
        if row["status"] == "completed":
            assert evals[-1].value == pytest.approx(float(row["final_eval_loss"]))


def test_a_failed_trial_is_one_error_line_naming_its_log(tmp_path, broken_model, alpaca_file, ray_address):
    path = sweep_file(tmp_path, broken_model, alpaca_file, {"space": {"train.lr": {"choice": [5e-3]}}, "algorithm": "grid"},
                      distributed={"zero_stage": 0, "num_workers": 1, "max_failures": 0})
    done = run_cli("sweep", str(path))
    assert done.returncode == 1
    console = done.stdout + done.stderr
    errors = [line for line in console.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in console, console[-3000:]
    trial, sweep = errors
    assert "failed: TrainingFailed: rank 0: SafetensorError: Error while deserializing header" in trial
    log = Path(trial.rsplit("traceback in ", 1)[1])
    assert log.parent.parent.parent == tmp_path / "sweep" / "trials" and "Traceback (most recent" in log.read_text()
    assert "no trial completed" in sweep and sweep.endswith(f"(traceback in {tmp_path / 'sweep' / 'logs' / 'driver.log'})")


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait_for(find, process: subprocess.Popen, log: Path, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError("the sweep ended early:\n" + log.read_text()[-3000:])
        time.sleep(0.5)  # polls for a file another process writes
    process.kill()
    raise AssertionError("no trial finished in time")
