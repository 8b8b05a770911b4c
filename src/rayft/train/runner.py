"""The driver side of `rayft train`: check everything that can be checked before a worker
starts, run the Ray Train job, then publish its outputs into output_dir.

output_dir while running: config.yaml, run.json (MLflow run id), ray/ (Ray Train storage:
checkpoints). When finished: adapter/ or model/, loss.png, and metrics.json written last, so a
run that failed never looks finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

from rayft.config import TrainJobConfig, dump_config
from rayft.console import LOG_DIR, RunConsole, say, verbose_from_env, worker_log
from rayft.errors import ConfigError, RayftError, TrainingFailed, one_line
from rayft.raycluster import connect_ray

FINISHED_MARKER = "metrics.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


# ---------------------------------------------------------------- atomic writes
def write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(text)
    os.replace(staging, path)


# ---------------------------------------------------------------- pre-flight checks
def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    for path in (output_dir, *output_dir.parents):
        if path.exists() and not path.is_dir():
            where = " is an existing file" if path == output_dir else f": {path} is a file"
            raise ConfigError(f"output_dir {output_dir}{where}, not a directory", key="output_dir")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        if resume:
            raise RayftError(f"--resume: {output_dir} holds no run to resume")
        return
    finished = (output_dir / FINISHED_MARKER).is_file()
    if overwrite:
        shutil.rmtree(output_dir)
        return
    if resume:
        if finished:
            raise RayftError(f"--resume: the run in {output_dir} has already finished (use --overwrite to start over)")
        if not (output_dir / "run.json").is_file():
            raise RayftError(f"--resume: {output_dir} holds no rayft run")
        return
    if finished:
        raise RayftError(f"output_dir {output_dir} already holds a finished run; pass --overwrite to replace it")
    raise RayftError(f"output_dir {output_dir} holds an unfinished run; pass --resume to continue it "
                     f"or --overwrite to start over")


def check_method(cfg: TrainJobConfig, model_dir: Path) -> None:
    from rayft.methods import get_method
    from rayft.models.loading import load_on_meta
    from rayft.train import attention

    model = load_on_meta(model_dir)
    method = get_method(cfg.method.type)
    context = getattr(model.config, "max_position_embeddings", None)
    virtual = method.extra_positions(cfg.method.options)
    if context and cfg.data.cutoff_len + virtual > context:
        extra = f" plus method's {virtual} virtual tokens" if virtual else ""
        raise ConfigError(f"data.cutoff_len={cfg.data.cutoff_len}{extra} exceeds the model's context of {context} "
                          f"tokens (max_position_embeddings of {model_dir})", key="data.cutoff_len")
    method.check(cfg.method.options, model)
    if cfg.data.packing and not method.packs:
        # the resolved config (config.yaml) then says so too
        say(f"[rayft] note: method.type={cfg.method.type} keeps one sample per row; data.packing is turned off")
        cfg.data.packing = False
    if cfg.train.attention == "packed" and not attention.supports(model.config):
        raise ConfigError(f"train.attention: packed does not fit model type {model.config.model_type!r} "
                          f"(it needs plain causal attention: one of {', '.join(sorted(attention.SUPPORTED_MODEL_TYPES))}, "
                          f"no sliding window or soft-capping); use auto or sdpa")


def resolve_use_gpu(cfg: TrainJobConfig) -> bool:
    import ray

    if cfg.distributed.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return bool(cfg.distributed.use_gpu)


def check_placement(cfg: TrainJobConfig, use_gpu: bool) -> None:
    """Train V2 waits forever for workers it cannot place: refuse up front instead."""
    import ray

    dist = cfg.distributed
    resources = ray.cluster_resources()
    cpus_needed = dist.num_workers * dist.cpus_per_worker
    if resources.get("CPU", 0) < cpus_needed:
        raise ConfigError(
            f"distributed.num_workers={dist.num_workers} x cpus_per_worker={dist.cpus_per_worker} needs "
            f"{cpus_needed:g} CPUs; the Ray cluster has {resources.get('CPU', 0):g}")
    if use_gpu and resources.get("GPU", 0) < dist.num_workers:
        raise ConfigError(f"distributed.num_workers={dist.num_workers} needs {dist.num_workers} GPUs; "
                          f"the Ray cluster has {resources.get('GPU', 0):g}")
    if dist.placement_strategy == "STRICT_SPREAD":
        nodes = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= dist.cpus_per_worker)
        if nodes < dist.num_workers:
            raise ConfigError(f"distributed.placement_strategy=STRICT_SPREAD puts each of num_workers={dist.num_workers} "
                              f"workers on its own node; the Ray cluster has {nodes} node(s) that fit one")
    if cfg.train.precision == "fp16" and not use_gpu:
        raise ConfigError("train.precision=fp16 needs GPUs (loss scaling of half-precision weights); "
                          "on CPU use bf16 or fp32")


def check_steps(cfg: TrainJobConfig, train_rows: int) -> int:
    from rayft.data.dataset import batches_per_epoch
    from rayft.methods import get_method
    from rayft.train.schedule import StepPlan

    batches = batches_per_epoch(train_rows, cfg.distributed.num_workers, cfg.train.micro_batch_size)
    if batches // cfg.train.grad_accum == 0:
        raise ConfigError(
            f"data.train has {train_rows} rows after tokenization"
            f"{' and packing' if cfg.data.packing else ''}: too few for one step of "
            f"{cfg.distributed.num_workers} workers x micro_batch_size={cfg.train.micro_batch_size} "
            f"x grad_accum={cfg.train.grad_accum}")
    get_method(cfg.method.type).check_steps(cfg.method.options, StepPlan.build(cfg.train, batches).total_steps)
    return batches


def preflight(cfg: TrainJobConfig, force: bool = False):
    """Every check that can fail before a worker starts (shared by train and sweep); returns
    (model_dir, tracking uri, prepared data, batches per epoch, use_gpu). The memory estimate
    decides train.gradient_checkpointing `auto` and refuses a GPU run predicted not to fit
    (`force`: runs it anyway)."""
    from rayft.data.dataset import check_paths, prepare_data
    from rayft.data.sources import resolve_sources
    from rayft.estimate import preflight_estimate
    from rayft.models import rayft_home, resolve_model_path
    from rayft.tracking import mlflow_run

    model_dir = resolve_model_path(cfg.model.name_or_path)
    check_paths(cfg.data, resolve_sources(cfg.data))  # a missing file in a second, before the model is read
    check_method(cfg, model_dir)
    uri = mlflow_run.tracking_uri(cfg)
    mlflow_run.check_reachable(uri)
    data = prepare_data(cfg.data, model_dir, rayft_home() / "datasets", cfg.train.seed, cfg.stage)
    names = ", ".join(source["name"] for source in data.sources)
    for what, count in data.notes.items():
        say(f"[rayft] note: {count} {what.replace('_', ' ')} dropped from {names}")
    if len(data.sources) > 1:
        say(f"[rayft] data ({cfg.data.mix}): " + ", ".join(
            f"{s['name']} {s['train']} train / {s['val']} val records" for s in data.sources)
            + f" -> {data.train_samples} training samples")
    batches = check_steps(cfg, data.train_rows)
    connect_ray(cfg.distributed.ray_address)
    use_gpu = resolve_use_gpu(cfg)
    check_placement(cfg, use_gpu)
    preflight_estimate(cfg, model_dir, use_gpu, force, say)
    return model_dir, uri, data, batches, use_gpu


# ---------------------------------------------------------------- progress bar
class Progress:
    """Shows rank 0's step metrics (sent through a Ray queue actor) as a console progress bar."""

    def __init__(self, queue, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
        from rich.table import Column

        self.queue = queue
        # the metrics shrink (with an ellipsis) before the step count does, on a narrow console
        info = TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1))
        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(), info,
                                TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
                                expand=True, refresh_per_second=1)  # rich's 10 took ~1.5% of a core
        self.task = self.bar.add_task("train", total=None, info="")
        self.latest: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)

    def _pump(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Exception:
                continue
            if "message" in item:  # one of rayft's lines from rank 0
                self.bar.console.print(item["message"], markup=False, highlight=False, soft_wrap=True)
                continue
            self.latest.update(item)
            # the eval sets' losses (data.eval_sets, by name) beside the validation loss: forgetting
            # shows as it happens
            sets = {k: k.removeprefix("eval_").removesuffix("_loss") for k in sorted(self.latest)
                    if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss" and not k.startswith("eval_task_")}
            labels = {"loss": "loss", "ewc_penalty": "ewc", "eval_loss": "eval", **sets, "tokens_per_s": "tok/s"}
            info = "  ".join(f"{label} {self.latest[k]:.4g}" for k, label in labels.items() if k in self.latest)
            self.bar.update(self.task, completed=item["step"], total=item.get("total_steps"), info=info)

    def __enter__(self):
        self.bar.start()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=2)
        self.bar.stop()


# ---------------------------------------------------------------- outputs
def plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    staging = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(staging, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(staging, path)


def adapter_metadata(cfg: TrainJobConfig, model_dir: Path, run_id: str) -> dict[str, Any]:
    from rayft.methods import get_method
    from rayft.models import base_fingerprint

    method = get_method(cfg.method.type)
    return {"base_model": cfg.model.name_or_path, "base_model_path": str(model_dir),
            "base_fingerprint": base_fingerprint(model_dir), "method": cfg.method.type,
            "options": cfg.method.options.model_dump(mode="json"),
            "serve_kind": method.serve_kind(cfg.method.options), "name": cfg.name, "mlflow_run_id": run_id}


def weights_bytes(directory: Path) -> int:
    """The output's size on disk: its weight files (safetensors), tokenizer and configs excluded."""
    return sum(f.stat().st_size for f in directory.rglob("*.safetensors"))


def publish_outputs(checkpoint_dir: Path, output_dir: Path, output_kind: str, cfg: TrainJobConfig,
                    model_dir: Path, run_id: str) -> Path:
    """export/ of the final checkpoint -> output_dir/adapter (or model), with tokenizer and metadata."""
    from rayft.train.checkpoint import EXPORT_DIR

    staging = output_dir / f".export-{uuid.uuid4().hex[:8]}"
    shutil.copytree(checkpoint_dir / EXPORT_DIR, staging)
    try:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        (staging / "rayft.json").write_text(json.dumps(adapter_metadata(cfg, model_dir, run_id), indent=2))
        target = output_dir / output_kind
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- the job
def run_training(cfg: TrainJobConfig, resume: bool = False, overwrite: bool = False, console=None,
                 parent_run_id: Optional[str] = None, callbacks: Optional[list] = None,
                 verbose: Optional[bool] = None, force: bool = False) -> dict[str, Any]:
    """Train as `cfg` says; returns metrics.json's content. `force`: train even where the memory
    estimate predicts the run does not fit its GPUs.

    The console shows rayft's own lines; everything else goes to output_dir/logs/ (console.py),
    unless `verbose` (default: RAYFT_VERBOSE). A sweep trial passes its sweep's MLflow run as
    `parent_run_id` and Ray Train callbacks that forward the reported metrics to Tune; it then
    gets no progress bar, and its own lines go to the sweep driver's log.
    """
    with RunConsole(verbose_from_env() if verbose is None else verbose) as run_console:
        return _run_training(cfg, resume, overwrite, console, parent_run_id, callbacks, run_console, force)


def _run_training(cfg, resume, overwrite, console, parent_run_id, callbacks, run_console, force=False):
    from rich.console import Console

    from rayft.methods import get_method
    from rayft.tracking import mlflow_run

    output_dir = Path(cfg.output_dir).resolve()
    check_output_dir(output_dir, resume, overwrite)
    model_dir, uri, data, _, use_gpu = preflight(cfg, force)

    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = output_dir / LOG_DIR if run_console and run_console.move_to(output_dir / LOG_DIR) else None
    if run_console and console is None and not run_console.verbose:
        console = Console(file=run_console.terminal, stderr=True)
    dist = cfg.distributed
    say(f"[rayft] {'resuming' if resume else 'training'} {cfg.name}: method {cfg.method.type} on "
        f"{cfg.model.name_or_path}, {dist.num_workers} {'GPU' if use_gpu else 'CPU'} workers, ZeRO-{dist.zero_stage}"
        + (f"; logs in {log_dir}/" if log_dir else ""))
    run_file = output_dir / "run.json"
    if resume:
        run_id = json.loads(run_file.read_text())["mlflow_run_id"]
    else:
        run_id = mlflow_run.start_run(uri, cfg, str(model_dir), parent_run_id)
        write_atomic(run_file, json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))
    write_atomic(output_dir / "config.yaml", dump_config(cfg))
    try:
        result = _fit(cfg, data, model_dir, uri, run_id, use_gpu, output_dir, console, callbacks, log_dir)
        metrics = _finish(cfg, result, output_dir, model_dir, uri, run_id, get_method(cfg.method.type).output)
    except BaseException:
        mlflow_run.fail_run(uri, run_id)
        raise
    return metrics


def _fit(cfg, data, model_dir, uri, run_id, use_gpu, output_dir, console, callbacks, log_dir):
    import contextlib

    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from rayft.train.loop import train_loop_per_worker

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            # Ray Train starts a DatasetManager actor (a process) for Ray Data datasets even when a
            # run has none; rayft's workers read the prepared Arrow files themselves
            return [c for c in super()._create_default_callbacks() if type(c).__name__ != "DatasetsCallback"]

    queue = None if callbacks else Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    dist = cfg.distributed
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data": data.__dict__, "model_dir": str(model_dir),
                           "mlflow_uri": uri, "mlflow_run_id": run_id, "progress_queue": queue,
                           "log_dir": str(log_dir) if log_dir else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dist.num_workers, use_gpu=use_gpu,
                                     placement_strategy=dist.placement_strategy,
                                     resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.name, storage_path=dist.storage_path or str(output_dir / "ray"),
            # a worker group that cannot start within start_timeout_s fails the run (Ray's default retries forever)
            failure_config=FailureConfig(max_failures=dist.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or []),
    )
    # Ray Train reads these in its controller (it propagates the driver's values there)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(dist.start_timeout_s)
    # Its preemption watcher (an actor polling the nodes' drain state) only records a notice for
    # the training function to read; rayft's loop does not read it (it checkpoints every save_steps)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with Progress(queue, console) if queue is not None else contextlib.nullcontext():  # an empty Queue is falsy
        try:
            return trainer.fit()
        except WorkerGroupError as exc:
            raise TrainingFailed(worker_failure_line(exc, log_dir)) from exc
        except ControllerError as exc:
            if isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
                raise RuntimeError(
                    f"the {dist.num_workers} workers ({dist.placement_strategy}) could not be (re)started within "
                    f"{dist.start_timeout_s:g} s (distributed.start_timeout_s): the cluster lacks their resources "
                    "(a lost node?)") from exc
            raise


def worker_failure_line(exc, log_dir: Optional[Path]) -> str:
    """The first failed rank's exception as one line, with where its traceback is."""
    rank = min(exc.worker_failures)
    where = f"; traceback in {worker_log(log_dir, rank)}" if log_dir else ""
    return f"rank {rank}: {one_line(exc.worker_failures[rank])}{where}"


def _finish(cfg, result, output_dir: Path, model_dir: Path, uri: str, run_id: str, output_kind: str) -> dict[str, Any]:
    from rayft.tracking import mlflow_run
    from rayft.train.checkpoint import TrainerState

    if result.checkpoint is None:
        raise RayftError("training ended without a final checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        checkpoint_dir = Path(checkpoint_dir)
        state = TrainerState.load(checkpoint_dir)
        publish_outputs(checkpoint_dir, output_dir, output_kind, cfg, model_dir, run_id)
    plot_losses(state.history, output_dir / "loss.png")
    last = lambda key: next((h[key] for h in reversed(state.history) if key in h), None)  # noqa: E731
    train_losses = [h["loss"] for h in state.history if "loss" in h]
    metrics = {
        "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss_before": state.eval_loss_before,
        "eval_loss": last("eval_loss"),
        "eval_ppl_before": math.exp(min(state.eval_loss_before, 50))
        if state.eval_loss_before is not None and last("eval_ppl") is not None else None,
        "eval_ppl": last("eval_ppl"),
        "tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else None,
        "train_seconds": state.train_seconds,
        "train_tokens": state.tokens_seen,
        "steps": state.step,
        "resumed_from_steps": state.resumed_from,
        "trainable_params": result.metrics.get("trainable_params"),
        "total_params": result.metrics.get("total_params"),
        "changed_base_params": result.metrics.get("changed_base_params"),
        "output_bytes": weights_bytes(output_dir / output_kind),
        "mlflow_run_id": run_id,
        "output": str(output_dir / output_kind),
    }
    # the stage's own evaluation metrics (e.g. eval_pref_accuracy): the last value, and before training
    evaluations = [h for h in state.history if "eval_loss" in h]
    for key in sorted({k for h in evaluations for k in h if k.startswith("eval_")} - {"eval_loss", "eval_ppl"}):
        metrics[key] = last(key)
        metrics[f"{key}_before"] = evaluations[0].get(key) if evaluations and evaluations[0]["step"] == 0 else None
    for key in sorted({k for h in evaluations for k in h if k.startswith("task_weight_")}):  # dwa's last weights
        metrics[key] = last(key)
    mlflow_run.log_params(uri, run_id, {key: metrics[key] for key in
                                        ("trainable_params", "total_params", "changed_base_params", "output_bytes")})
    pending = output_dir / ".pending"  # metrics.json lands last: its presence marks a finished run
    pending.mkdir(exist_ok=True)
    (pending / FINISHED_MARKER).write_text(json.dumps(metrics, indent=2))
    logs = sorted((output_dir / LOG_DIR).glob("*.log"))  # as they are when training has ended
    mlflow_run.log_artifacts(uri, run_id, [output_dir / "config.yaml", output_dir / "loss.png",
                                           pending / FINISHED_MARKER], output_dir / output_kind, logs)
    os.replace(pending / FINISHED_MARKER, output_dir / FINISHED_MARKER)
    pending.rmdir()
    return metrics
