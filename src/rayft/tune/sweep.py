"""The driver side of `rayft sweep`: check the sweep, run its trials on Ray Tune (each one the
same training as `rayft train`), then write what it found.

output_dir while running: sweep.json (the MLflow parent run), tune/ (Tune's experiment state,
for --resume), trials/<trial_id>/ (each trial's run, as `rayft train` writes it). When finished:
results.csv, sweep.png, best_adapter/ (or best_model/), and best.yaml written last.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rayft.config import (SweepConfig, TrainJobConfig, apply_overrides, dump_config, map_data_paths, parse_config,
                          parse_sweep, read_yaml, split_sweep_overrides)
from rayft.errors import ConfigError, RayftError
from rayft.train.runner import FINISHED_MARKER, write_atomic
from rayft.tune.space import SearchSpace, apply_values, parse_space

SWEEP_FINISHED = "best.yaml"
STEP_KEYS = ("train.max_steps", "train.epochs")


@dataclass
class Sweep:
    cfg: SweepConfig
    base_raw: dict[str, Any]  # the base training config as the user wrote it (+ --set)
    base: TrainJobConfig
    space: SearchSpace
    num_samples: int

    @property
    def planned_trials(self) -> int:
        return self.num_samples * (self.space.grid_size() if self.cfg.search.algorithm == "grid" else 1)


# ---------------------------------------------------------------- reading and checking
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    path = Path(path)
    sweep_overrides, base_overrides = split_sweep_overrides(overrides or [])
    cfg = parse_sweep(apply_overrides(read_yaml(path), sweep_overrides), source=str(path))
    if isinstance(cfg.base, str):
        base_path = Path(cfg.base)
        if not base_path.is_file() and not base_path.is_absolute() and (path.parent / base_path).is_file():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise ConfigError(f"{path}: base={cfg.base!r}: no such training config file")
        base_raw, source = read_yaml(base_path), str(base_path)
    else:
        base_raw, source = dict(cfg.base), f"{path}: base"
    base_raw = apply_overrides(base_raw, base_overrides)
    # Each trial gets its own name and output_dir; the base needs none of its own.
    base_raw["name"], base_raw["output_dir"] = cfg.name, str(Path(cfg.output_dir) / "trials")
    base = parse_config(base_raw, source=source)
    search = cfg.search
    from rayft.objectives import get_objective

    # the stage's own, and each eval set's loss; a task's loss (eval_task_<task>_loss) depends on
    # the records, which are read later
    reported = (*get_objective(base.stage).eval_metrics, *(f"eval_{name}_loss" for name in base.data.eval_sets))
    if search.metric not in reported and not search.metric.startswith("eval_task_"):
        raise ConfigError(f"{path}: search.metric={search.metric}: stage {base.stage} reports {', '.join(reported)}")
    space = parse_space(search.space, base_raw, base, search.algorithm)
    if search.scheduler.type == "asha":
        for key in STEP_KEYS:
            if key in space.keys:
                raise ConfigError(f"search.space.{key}: ASHA compares trials at equal steps; "
                                  f"search it with scheduler: none")
    if search.algorithm == "grid":
        num_samples = search.num_samples or 1
    elif search.num_samples is None:
        raise ConfigError(f"{path}: search.num_samples is required with algorithm {search.algorithm}")
    else:
        num_samples = search.num_samples
    return Sweep(cfg, base_raw, base, space, num_samples)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool, finished_marker: str = SWEEP_FINISHED,
                     noun: str = "sweep") -> None:
    """`noun` names what the directory holds in the messages (a sweep, a comparison)."""
    started = (output_dir / "sweep.json").is_file()
    finished = (output_dir / finished_marker).is_file()
    if overwrite:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        return
    if resume:
        if not started:
            raise RayftError(f"--resume: {output_dir} holds no {noun} to resume")
        if finished:
            raise RayftError(f"--resume: the {noun} in {output_dir} has already finished (use --overwrite to start over)")
        return
    if finished:
        raise RayftError(f"output_dir {output_dir} already holds a finished {noun}; pass --overwrite to replace it")
    if started or (output_dir.exists() and any(output_dir.iterdir())):
        raise RayftError(f"output_dir {output_dir} holds an unfinished {noun}; pass --resume to continue it "
                         f"or --overwrite to start over")


def absolute_paths(base_raw: dict[str, Any], base: TrainJobConfig, uri: str) -> dict[str, Any]:
    """Trials run in other working directories: give them absolute paths and the resolved URI."""
    values = {"data": map_data_paths(base_raw.get("data") or {}, lambda _key, path: str(Path(path).resolve())),
              "tracking.mlflow_uri": uri}
    if Path(base.model.name_or_path).exists():
        values["model.name_or_path"] = str(Path(base.model.name_or_path).resolve())
    return apply_values(base_raw, values)


def trial_capacity(base: TrainJobConfig, use_gpu: bool, requested: Optional[int]) -> tuple[int, str]:
    """How many trials the cluster holds at once; check_placement has refused a trial that fits nowhere."""
    import ray

    resources = ray.cluster_resources()
    dist = base.distributed
    fits = int(resources.get("CPU", 0) // (dist.num_workers * dist.cpus_per_worker))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // dist.num_workers))
    note = ""
    if requested and requested > fits:
        note = (f"search.max_concurrent_trials={requested}, but the cluster holds {fits} trial(s) at once "
                f"({dist.num_workers} workers x {dist.cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''} each, "
                f"{resources.get('CPU', 0):g} CPUs): running {fits} at a time")
    return max(1, min(fits, requested or fits)), note


def build_scheduler(sweep: Sweep, total_steps: int):
    sched = sweep.cfg.search.scheduler
    if sched.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = sched.grace_period or sweep.base.train.eval_steps
    if grace >= total_steps:
        raise ConfigError(f"search.scheduler.grace_period={grace} steps: a trial has only {total_steps} steps, "
                          f"so ASHA could stop nothing")
    return ASHAScheduler(time_attr="step", max_t=total_steps, grace_period=grace,
                         reduction_factor=sched.reduction_factor)


def build_search_alg(sweep: Sweep, concurrency: int):
    algorithm, seed = sweep.cfg.search.algorithm, sweep.base.train.seed
    if algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a variant generator: it takes its own.
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrency)


# ---------------------------------------------------------------- the sweep
def run_sweep(sweep: Sweep, resume: bool = False, overwrite: bool = False, console=None,
              verbose: Optional[bool] = None) -> dict[str, Any]:
    """Run every trial; returns the summary (best trial, rows of results.csv).

    The console shows the sweep's start line, the live trial table and the summary; the driver's
    other output (Tune's, and what Ray forwards from trials) goes to output_dir/logs/driver.log,
    and each trial's to its own trials/<id>/logs/, unless `verbose` (default: RAYFT_VERBOSE)."""
    from rayft.console import RunConsole, verbose_from_env

    verbose = verbose_from_env() if verbose is None else verbose
    with RunConsole(verbose) as run_console:
        return _run_sweep(sweep, resume, overwrite, console, run_console)


def _run_sweep(sweep: Sweep, resume: bool, overwrite: bool, console, run_console) -> dict[str, Any]:
    from rayft.tracking import mlflow_run
    from rayft.tune.table import print_summary

    what = (f"{sweep.planned_trials} trials ({sweep.cfg.search.algorithm}, scheduler {sweep.cfg.search.scheduler.type}) "
            f"of method {sweep.base.method.type}")
    trials = run_trials(sweep, resume, overwrite, console, run_console, "resuming" if resume else "sweeping", what)
    try:
        summary = summarize(sweep, trials.grid, trials.output_dir)
        print_summary(trials.console, sweep.space.keys, summary["rows"], summary["best"])
        write_outputs(sweep, summary, trials.output_dir, trials.uri, trials.parent_run_id)
    except BaseException:
        mlflow_run.fail_run(trials.uri, trials.parent_run_id)
        raise
    return summary


@dataclass
class Trials:
    """What run_trials leaves for the caller's outputs; the MLflow parent run is still open."""
    grid: Any  # Tune's ResultGrid
    output_dir: Path
    uri: str
    parent_run_id: str
    console: Any


def run_trials(sweep: Sweep, resume: bool, overwrite: bool, console, run_console, verb: str, what: str,
               measure_peak_steps: int = 0, parent_tags: Optional[dict[str, str]] = None,
               finished_marker: str = SWEEP_FINISHED, noun: str = "sweep") -> Trials:
    """The Ray Tune run shared by `rayft sweep` and `rayft compare`: the base's pre-flight, the MLflow
    parent run (sweep.json), then every trial (each a `rayft train` run, a child of the parent) under
    Tune with the live table. `measure_peak_steps`: each trial then measures its config's peak memory."""
    from ray import tune
    from rich.console import Console

    from rayft.console import LOG_DIR, say
    from rayft.tracking import mlflow_run
    from rayft.train.runner import preflight
    from rayft.train.schedule import StepPlan
    from rayft.tune.table import TrialTable
    from rayft.tune.trial import run_trial

    cfg, base = sweep.cfg, sweep.base
    output_dir = Path(cfg.output_dir).resolve()
    check_output_dir(output_dir, resume, overwrite, finished_marker, noun)
    _, uri, _, batches, use_gpu = preflight(base)  # also tokenizes the data once, for every trial
    scheduler = build_scheduler(sweep, StepPlan.build(base.train, batches).total_steps)
    concurrency, note = trial_capacity(base, use_gpu, cfg.search.max_concurrent_trials)

    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = run_console.move_to(output_dir / LOG_DIR)
    console = console or (Console() if run_console.verbose else Console(file=run_console.terminal))
    dist = base.distributed
    say(f"[rayft] {verb} {cfg.name}: {what} on {base.model.name_or_path}, {concurrency} at a time on "
        f"{dist.num_workers} {'GPU' if use_gpu else 'CPU'} workers each"
        + (f"; logs in {log_dir.parent}/, each trial's in trials/<id>/logs/" if log_dir else ""))
    if note:
        console.print(f"[yellow]note:[/] {note}")
    state_file = output_dir / "sweep.json"
    if resume:
        parent_run_id = json.loads(state_file.read_text())["mlflow_parent_run_id"]
    else:
        parent_run_id = mlflow_run.start_parent_run(uri, base.tracking.experiment, cfg.name,
                                                    params=sweep_params(sweep),
                                                    tags={"rayft.sweep": cfg.name, "rayft.base_model": base.model.name_or_path,
                                                          **(parent_tags or {})})
        write_atomic(state_file, json.dumps({"mlflow_parent_run_id": parent_run_id, "tracking_uri": uri}))
    try:
        write_atomic(output_dir / "sweep.yaml", _dump_sweep(sweep))
        payload = {"base_raw": absolute_paths(sweep.base_raw, base, uri), "space": sweep.space, "name": cfg.name,
                   "output_dir": str(output_dir), "parent_run_id": parent_run_id, "verbose": run_console.verbose,
                   "measure_peak_steps": measure_peak_steps}
        # The trial function only drives a TorchTrainer, whose workers hold the CPUs/GPUs. Tune
        # refuses an empty request, so a trial asks for a token amount of memory and no CPU.
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=payload), {"memory": 2**20})
        table = TrialTable(sweep.space, base, sweep.planned_trials, str(output_dir / "trials"))
        tune_dir = output_dir / "tune"
        if resume and tune.Tuner.can_restore(str(tune_dir)):
            # Tune keeps finished trials and restarts unfinished ones, which continue their own
            # runs from their last checkpoints (run_trial). The scheduler's rungs start empty.
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=sweep.space.tune_space(
                    cfg.search.algorithm, grid_seed=base.train.seed if cfg.search.shuffle_grid else None),
                tune_config=tune.TuneConfig(metric=cfg.search.metric, mode=cfg.search.mode,
                                            search_alg=build_search_alg(sweep, concurrency), scheduler=scheduler,
                                            num_samples=sweep.num_samples),
                run_config=tune.RunConfig(name=tune_dir.name, storage_path=str(output_dir), verbose=0,
                                          callbacks=[table]))
        with table.live(console):
            grid = tuner.fit()
    except BaseException:
        mlflow_run.fail_run(uri, parent_run_id)
        raise
    return Trials(grid, output_dir, uri, parent_run_id, console)


def sweep_params(sweep: Sweep) -> dict[str, Any]:
    search = sweep.cfg.search
    return {"sweep.algorithm": search.algorithm, "sweep.num_samples": sweep.num_samples,
            "sweep.planned_trials": sweep.planned_trials, "sweep.metric": search.metric, "sweep.mode": search.mode,
            "sweep.scheduler": json.dumps(search.scheduler.model_dump()), "sweep.space": json.dumps(search.space)}


def _dump_sweep(sweep: Sweep) -> str:
    import yaml

    raw = sweep.cfg.model_dump(mode="json")
    raw["base"] = sweep.base_raw
    return yaml.safe_dump(raw, sort_keys=False)


# ---------------------------------------------------------------- results
def trial_id_of(result) -> Optional[str]:
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return trial_id
    import re

    match = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    return match.group(1) if match else None


def summarize(sweep: Sweep, grid, output_dir: Path) -> dict[str, Any]:
    """One row per trial, from Tune's results (what the scheduler saw) and the trial's run files."""
    from rayft.tune.trial import trial_config

    rows = []
    for result in grid:
        trial_id = trial_id_of(result)
        trial_dir = output_dir / "trials" / (trial_id or "?")
        history = result.metrics_dataframe
        evals = [] if history is None or "eval_loss" not in history else \
            [float(v) for v in history["eval_loss"].dropna()]
        metrics_file = trial_dir / FINISHED_MARKER
        run_file = trial_dir / "run.json"
        if metrics_file.is_file():
            status = "completed"
        elif result.error is not None:
            status = "error"
        else:
            status = "stopped_early"
        final = json.loads(metrics_file.read_text()) if status == "completed" else {}
        values = sweep.space.resolve(result.config, sweep.base)
        metric = sweep.cfg.search.metric
        metric_history = [] if history is None or metric not in history else [float(v) for v in history[metric].dropna()]
        extra = {} if metric in ("eval_loss", "eval_ppl") else \
            {f"final_{metric}": final.get(metric, metric_history[-1] if metric_history else None)}
        rows.append({
            "trial_id": trial_id, "status": status, **values,
            "final_eval_loss": final.get("eval_loss", evals[-1] if evals else None), **extra,
            "best_eval_loss": min(evals) if evals else None,
            "steps": int((result.metrics or {}).get("step") or 0),
            "stopped_early": status == "stopped_early",
            "wall_seconds": round(float((result.metrics or {}).get("time_total_s") or 0.0), 1),
            "mlflow_run_id": json.loads(run_file.read_text())["mlflow_run_id"] if run_file.is_file() else None,
            "error": (str(result.error).strip().splitlines() or [""])[0][:200] if result.error else "",
        })
    rows.sort(key=lambda r: r["trial_id"] or "")
    metric, sign = sweep.cfg.search.metric, (1 if sweep.cfg.search.mode == "min" else -1)
    column = "final_eval_loss" if metric in ("eval_loss", "eval_ppl") else f"final_{metric}"
    completed = [r for r in rows if r["status"] == "completed" and r[column] is not None]
    if metric == "eval_ppl":
        score = lambda r: sign * math.exp(min(r["final_eval_loss"], 50))  # noqa: E731
    else:
        score = lambda r: sign * r[column]  # noqa: E731
    best = min(completed, key=score) if completed else None
    best_cfg = None
    if best:
        best_cfg = trial_config({"base_raw": sweep.base_raw, "space": sweep.space, "name": sweep.cfg.name,
                                 "output_dir": sweep.cfg.output_dir}, {k: best[k] for k in best}, "best")
        best_cfg = best_cfg.model_copy(update={"name": f"{sweep.cfg.name}-best",
                                               "output_dir": str(Path(sweep.cfg.output_dir) / "best_run")})
    return {"rows": rows, "best": best, "best_config": best_cfg,
            "total_steps": sum(r["steps"] for r in rows), "output_dir": str(output_dir)}


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def plot_sweep(sweep: Sweep, rows: list[dict[str, Any]], path: Path) -> None:
    """Eval loss against each searched parameter: filled dots finished, crosses stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sweep.space.searched
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.6), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        for status, marker in (("completed", "o"), ("stopped_early", "x")):
            points = [(r[dim.key], r["final_eval_loss"]) for r in rows
                      if r["status"] == status and r["final_eval_loss"] is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            if not all(isinstance(x, (int, float)) for x in xs):
                xs = [str(x) for x in xs]
            ax.scatter(xs, ys, marker=marker, label=status.replace("_", " "))
        if dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel("eval loss (last evaluation)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"sweep {sweep.cfg.name}")
    staging = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(staging, dpi=110, bbox_inches="tight")
    plt.close(fig)
    staging.replace(path)


def write_outputs(sweep: Sweep, summary: dict[str, Any], output_dir: Path, uri: str, parent_run_id: str) -> None:
    from rayft.tracking import mlflow_run

    rows, best = summary["rows"], summary["best"]
    write_csv(rows, output_dir / "results.csv")
    plot_sweep(sweep, rows, output_dir / "sweep.png")
    _close_child_runs(uri, rows)
    client = mlflow_run.client(uri)
    client.set_tag(parent_run_id, "rayft.trials", str(len(rows)))
    for path in ("results.csv", "sweep.png"):
        client.log_artifact(parent_run_id, str(output_dir / path))
    if best is None:
        client.set_terminated(parent_run_id, "FAILED")
        raise RuntimeError(f"sweep {sweep.cfg.name}: no trial completed; see {output_dir / 'results.csv'}")

    trial_dir = output_dir / "trials" / best["trial_id"]
    output_kind = "adapter" if (trial_dir / "adapter").is_dir() else "model"
    _copy_atomic(trial_dir / output_kind, output_dir / f"best_{output_kind}")
    mlflow_run.log_params(uri, parent_run_id, {key: best[key] for key in sweep.space.keys})
    best_metrics = {"eval_loss": best["final_eval_loss"], "best_trial_steps": best["steps"],
                    **{key.removeprefix("final_"): value for key, value in best.items()
                       if key.startswith("final_eval_") and key != "final_eval_loss" and value is not None},
                    "trials_completed": sum(r["status"] == "completed" for r in rows),
                    "trials_stopped_early": sum(r["stopped_early"] for r in rows),
                    "total_steps": summary["total_steps"]}
    for key, value in best_metrics.items():
        client.log_metric(parent_run_id, key, float(value))
    client.set_tag(parent_run_id, "rayft.best_trial_id", best["trial_id"])
    client.set_tag(parent_run_id, "rayft.best_run_id", best["mlflow_run_id"] or "")
    best_yaml = f"# rayft train {Path(sweep.cfg.output_dir) / SWEEP_FINISHED}\n" + dump_config(summary["best_config"])
    pending = output_dir / ".pending"
    pending.mkdir(exist_ok=True)
    (pending / SWEEP_FINISHED).write_text(best_yaml)
    client.log_artifact(parent_run_id, str(pending / SWEEP_FINISHED))
    client.set_terminated(parent_run_id, "FINISHED")
    (pending / SWEEP_FINISHED).replace(output_dir / SWEEP_FINISHED)  # last: marks the sweep finished
    pending.rmdir()


def _close_child_runs(uri: str, rows: list[dict[str, Any]]) -> None:
    """A trial stopped by the scheduler dies mid-run: its MLflow run would stay RUNNING forever."""
    from rayft.tracking import mlflow_run

    client = mlflow_run.client(uri)
    for row in rows:
        if not row["mlflow_run_id"]:
            continue
        client.set_tag(row["mlflow_run_id"], "rayft.trial_id", row["trial_id"])
        client.set_tag(row["mlflow_run_id"], "rayft.trial_status", row["status"])
        if row["status"] == "stopped_early":
            client.set_terminated(row["mlflow_run_id"], "KILLED")


def _copy_atomic(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
