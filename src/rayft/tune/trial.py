"""One sweep trial: a Tune function that runs the same training as `rayft train` (run_training,
hence a TorchTrainer on Ray Train workers), with its evaluations forwarded to Tune. A comparison
(`rayft compare`) then measures the peak tensor memory of the trial's config (rayft.measure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from rayft.config import TrainJobConfig, parse_config
from rayft.train.runner import FINISHED_MARKER, run_training, write_atomic
from rayft.tune.space import SearchSpace, apply_values


class EvalToTune(TuneReportCallback):
    """Forwards rank 0's reports that carry an evaluation to Tune, where the scheduler reads them.

    Checkpoint-only reports carry no metric to compare. The final evaluation is held back and
    reported by run_trial once the adapter is published: a scheduler that stops a trial on its
    last result must not interrupt the publishing.
    """

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        result = metrics[0] if metrics else {}
        if "eval_loss" in result and result.get("step") != result.get("total_steps"):
            super().after_report(run_context, metrics, checkpoint)


def trial_config(sweep: dict[str, Any], sampled: dict[str, Any], trial_id: str) -> TrainJobConfig:
    space: SearchSpace = sweep["space"]
    base = parse_config(sweep["base_raw"], source="base")
    raw = apply_values(sweep["base_raw"], space.config_values(sampled, base))
    raw["name"] = f"{sweep['name']}-{trial_id}"
    raw["output_dir"] = str(Path(sweep["output_dir"]) / "trials" / trial_id)
    return parse_config(raw, source=f"trial {trial_id}")


def final_result(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's last evaluation (every eval_* metric its stage reports) for Tune."""
    evaluation = {key: value for key, value in metrics.items()
                  if key.startswith("eval_") and not key.endswith("_before") and value is not None}
    return {**evaluation, "step": metrics["steps"], "total_steps": metrics["steps"], "completed": True}


def run_trial(sampled: dict[str, Any], sweep: dict[str, Any]) -> None:
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep, sampled, trial_id)
    output_dir = Path(cfg.output_dir)
    finished = output_dir / FINISHED_MARKER
    if not finished.is_file():
        # A trial restarted by `rayft sweep --resume` continues its own run from its checkpoint.
        resume = (output_dir / "run.json").is_file()
        run_training(cfg, resume=resume, overwrite=not resume, parent_run_id=sweep["parent_run_id"],
                     callbacks=[EvalToTune()], verbose=sweep.get("verbose", False))
    result = final_result(json.loads(finished.read_text()))
    if sweep.get("measure_peak_steps"):
        result["peak_memory_bytes"] = measured_peak(cfg, sweep["measure_peak_steps"])
    tune.report(result)


PEAK_FILE = "peak_memory.json"


def measured_peak(cfg: TrainJobConfig, steps: int) -> int:
    """The trial's config measured at one rank (rayft.measure) once its run has finished; kept in
    the trial's PEAK_FILE and logged to its MLflow run."""
    from rayft.measure import measure_peak_on_ray
    from rayft.tracking import mlflow_run
    from rayft.train.runner import resolve_use_gpu

    output_dir = Path(cfg.output_dir)
    peak_file = output_dir / PEAK_FILE
    if not peak_file.is_file():  # a resumed trial keeps its measurement
        measured = measure_peak_on_ray(cfg, steps, resolve_use_gpu(cfg))
        record = {"peak_bytes": measured.peak_bytes, "loaded_bytes": measured.loaded_bytes, "steps": steps,
                  "ranks": 1, "micro_batch": f"{cfg.train.micro_batch_size} x {cfg.data.cutoff_len} tokens"}
        run_id = json.loads((output_dir / "run.json").read_text())["mlflow_run_id"]
        mlflow_run.client(mlflow_run.tracking_uri(cfg)).log_metric(run_id, "peak_memory_bytes", measured.peak_bytes)
        write_atomic(peak_file, json.dumps(record))
    return json.loads(peak_file.read_text())["peak_bytes"]
