"""`rayft compare CONFIG --methods lora,dora,ia3,...`: every method on the same data, steps, seed
and evaluation, as the trials of one sweep (the Ray Tune run of `rayft sweep`, run_trials: one
MLflow parent run, a child run per method), then one table of what each cost and reached.

A name in --methods is a method's preset (methods/base.py, named_presets: each method names its
own variants and its usual learning rate). A case's method block is the config's block for that
method type (if the config's method is that type), then the preset's options, then the
`--set method.<type>.<key>=value` overrides; its learning rate is the preset's unless --set
train.lr is given. A method that refuses the job (its ZeRO stage, stage, steps or model) is
listed with its own refusal and the others still run.

output_dir: compare.csv (written last: it marks a finished comparison), compare.png, and what
run_trials leaves (sweep.json, trials/<trial_id>/ per method, tune/, logs/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rayft.config import TrainJobConfig, apply_overrides, parse_config, parse_sweep, read_yaml
from rayft.errors import ConfigError, RayftError, one_line
from rayft.tune.space import Dimension, SearchSpace
from rayft.tune.sweep import Sweep, trial_id_of

FINISHED = "compare.csv"
PEAK_STEPS = 2  # ZeRO-3 reaches its steady state in the second step (tests/peak_probe.py)


@dataclass
class Case:
    name: str  # as given in --methods
    method_type: str
    lr: float
    block: dict[str, Any]  # the whole `method` section of the case's config
    cfg: Optional[TrainJobConfig] = None  # None where refused
    refusal: str = ""  # the method's own refusal of this job


@dataclass
class Comparison:
    sweep: Sweep
    cases: list[Case]
    base_params: int  # the base model's own parameters
    eval_sets: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> list[Case]:
        return [case for case in self.cases if not case.refusal]


# ---------------------------------------------------------------- reading and checking
def parse_methods(text: str) -> list[str]:
    from rayft.methods import named_presets

    known = named_presets()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise RayftError(f"--methods {text!r}: name at least one method; known: {', '.join(sorted(known))}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RayftError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(sorted(known))}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RayftError(f"--methods: {repeated[0]!r} is named twice")
    return names


def split_method_overrides(overrides: list[str], method_types: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """--set method.<type>.<key>=value goes to the cases of that method type; the rest to the config."""
    by_type: dict[str, list[str]] = {}
    others = []
    for item in overrides:
        key = item.partition("=")[0].strip()
        parts = key.split(".")
        if parts[0] != "method":
            others.append(item)
        elif len(parts) < 3 or parts[1] not in method_types:
            raise RayftError(f"--set {item!r}: rayft compare sets each trial's method from --methods; a --set of "
                             f"method.<type>.<key> must name the type of a method in --methods "
                             f"({', '.join(sorted(method_types))})")
        else:
            by_type.setdefault(parts[1], []).append(item.removeprefix(f"method.{parts[1]}."))
    return by_type, others


def load_comparison(config_path: Path, methods: str, steps: Optional[int], overrides: list[str],
                    output_dir: Optional[Path]) -> Comparison:
    from rayft.methods import named_presets
    from rayft.models import resolve_model_path
    from rayft.models.loading import load_on_meta

    if steps is not None and steps <= 0:
        raise RayftError(f"--steps {steps}: must be a positive number of optimizer steps")
    names = parse_methods(methods)
    presets = named_presets()
    method_sets, config_sets = split_method_overrides(overrides, {presets[name][0] for name in names})
    raw = apply_overrides(read_yaml(config_path), config_sets)
    if steps is not None:
        raw.setdefault("train", {})["max_steps"] = steps
    base = parse_config(raw, source=str(config_path))  # the config as given must be a valid one
    name = f"{base.name}-compare"[:100]
    output_dir = Path(output_dir or f"{base.output_dir}-compare")
    # Each trial gets its own name and output_dir (trial_config); the base needs none of its own.
    raw["name"], raw["output_dir"] = name, str(output_dir / "trials")
    base = parse_config(raw, source=str(config_path))
    model_dir = resolve_model_path(base.model.name_or_path)
    lr_given = any(item.partition("=")[0].strip() == "train.lr" for item in config_sets)
    cases = [build_case(case_name, presets[case_name], raw, method_sets, lr_given, model_dir)
             for case_name in names]
    runnable = [case for case in cases if not case.refusal]
    if not runnable:
        raise RayftError("no method in --methods can run this job: " +
                         "; ".join(f"{case.name}: {case.refusal}" for case in cases))
    space = SearchSpace(searched=(Dimension("method", "case", values=tuple(case.name for case in runnable),
                                            settings=tuple((case.name, {"method": case.block, "train.lr": case.lr})
                                                           for case in runnable)),), tied=())
    cfg = parse_sweep({"base": raw, "name": name, "output_dir": str(output_dir),
                       "search": {"space": {"method": {"choice": [case.name for case in runnable]}},
                                  "algorithm": "grid", "shuffle_grid": False, "scheduler": "none",
                                  "metric": "eval_loss"}}, source="rayft compare")
    base_params = sum(p.numel() for p in load_on_meta(model_dir).parameters())
    return Comparison(Sweep(cfg, raw, base, space, num_samples=1), cases, base_params, sorted(base.data.eval_sets))


def build_case(name: str, preset_of: tuple, raw: dict[str, Any], method_sets: dict[str, list[str]], lr_given: bool,
               model_dir: Path) -> Case:
    """The case's method block and lr, and the method's own refusal of the job if it refuses."""
    from rayft.train.runner import check_method

    method_type, preset = preset_of
    configured = raw.get("method") or {}
    options = dict(configured.get(method_type) or {}) if configured.get("type", "lora") == method_type else {}
    options = apply_overrides({**options, **preset.options}, method_sets.get(method_type, []))
    block = {"type": method_type, method_type: options} if options else {"type": method_type}
    lr = float((raw.get("train") or {}).get("lr")) if lr_given else preset.lr
    case_raw = {**raw, "method": block, "train": {**(raw.get("train") or {}), "lr": lr}}
    case = Case(name, method_type, lr, block)
    try:
        cfg = parse_config(case_raw, source=f"--methods {name}")
        check_method(cfg, model_dir)  # the method against the model (on the meta device)
        if cfg.train.max_steps:
            from rayft.methods import get_method

            get_method(method_type).check_steps(cfg.method.options, cfg.train.max_steps)
        case.cfg = cfg
    except ConfigError as refused:
        case.refusal = str(refused).strip().splitlines()[0]
    return case


# ---------------------------------------------------------------- the comparison
def run_comparison(comparison: Comparison, resume: bool = False, overwrite: bool = False,
                   verbose: Optional[bool] = None) -> dict[str, Any]:
    """Run every method that accepts the job as a trial; returns {"rows", "output_dir", "console"}."""
    from rayft.console import RunConsole, verbose_from_env

    verbose = verbose_from_env() if verbose is None else verbose
    with RunConsole(verbose) as run_console:
        return _run_comparison(comparison, resume, overwrite, run_console)


def _run_comparison(comparison: Comparison, resume: bool, overwrite: bool, run_console) -> dict[str, Any]:
    from rayft.tracking import mlflow_run
    from rayft.tune.sweep import run_trials

    runnable = comparison.runnable
    steps = comparison.sweep.base.train.max_steps
    what = (f"{len(runnable)} methods ({', '.join(case.name for case in runnable)})"
            f"{f', {steps} steps each' if steps else ''}")
    trials = run_trials(comparison.sweep, resume, overwrite, None, run_console, "comparing", what,
                        measure_peak_steps=PEAK_STEPS, parent_tags={"rayft.compare": "true"},
                        finished_marker=FINISHED, noun="comparison")
    try:
        rows = collect_rows(comparison, trials.grid, trials.output_dir)
        print_table(trials.console, comparison, rows)
        write_outputs(comparison, rows, trials.output_dir, trials.uri, trials.parent_run_id)
    except BaseException:
        mlflow_run.fail_run(trials.uri, trials.parent_run_id)
        raise
    return {"rows": rows, "output_dir": trials.output_dir, "console": trials.console}


def columns(eval_sets: list[str]) -> list[str]:
    general = [f"eval_{name}_loss_{when}" for name in eval_sets for when in ("before", "after")]
    return ["method", "method_type", "lr", "status", "trainable_params", "changed_base_params", "base_params",
            "trainable_pct_of_base", "changed_pct_of_base", "adapter_bytes", "peak_memory_bytes", "tokens_per_s",
            "train_seconds", "steps", "eval_loss_before", "eval_loss_after", *general, "serve_kind",
            "mixed_batch_serving", "mlflow_run_id", "note"]


def mixed_batches(case: Case) -> tuple[str, bool]:
    """The adapter kind the method's output is and whether rayft serve batches that kind per row
    (its registry of kinds, serve/kinds/)."""
    from rayft.methods import get_method
    from rayft.serve.kinds import SERVED

    opts = case.cfg.method.options if case.cfg else None
    kind = get_method(case.method_type).serve_kind(opts) if case.cfg else None
    return kind or "", kind in SERVED


def collect_rows(comparison: Comparison, grid, output_dir: Path) -> list[dict[str, Any]]:
    """One row per method of --methods, in their order: each trial's metrics.json and peak memory."""
    import json

    from rayft.train.runner import FINISHED_MARKER
    from rayft.tune.trial import PEAK_FILE

    results = {(result.config or {}).get("method"): result for result in grid}
    rows = []
    for case in comparison.cases:
        kind, batched = mixed_batches(case)
        row = dict.fromkeys(columns(comparison.eval_sets))
        row.update(method=case.name, method_type=case.method_type, lr=case.lr, base_params=comparison.base_params,
                   serve_kind=kind, mixed_batch_serving="yes" if batched else "no", note="")
        result = results.get(case.name)
        if case.refusal or result is None:
            row.update(status="refused" if case.refusal else "not run", note=case.refusal)
            rows.append(row)
            continue
        trial_dir = output_dir / "trials" / (trial_id_of(result) or "?")
        metrics_file = trial_dir / FINISHED_MARKER
        if not metrics_file.is_file():
            error = one_line(result.error) if result.error is not None else "the trial ended before its run finished"
            row.update(status="failed", note=error[:300])
            rows.append(row)
            continue
        metrics = json.loads(metrics_file.read_text())
        peak_file = trial_dir / PEAK_FILE
        if not peak_file.is_file():  # trained, but the measurement after it failed
            error = one_line(result.error) if result.error is not None else "no measurement"
            row["note"] = f"peak memory not measured: {error}"[:300]
        base = comparison.base_params
        row.update(
            status="completed", trainable_params=metrics["trainable_params"],
            changed_base_params=metrics["changed_base_params"],
            trainable_pct_of_base=round(100 * metrics["trainable_params"] / base, 4),
            changed_pct_of_base=round(100 * (metrics["changed_base_params"] or 0) / base, 4),
            adapter_bytes=metrics["output_bytes"],
            peak_memory_bytes=json.loads(peak_file.read_text())["peak_bytes"] if peak_file.is_file() else None,
            tokens_per_s=_round(metrics.get("tokens_per_s"), 1), train_seconds=_round(metrics.get("train_seconds"), 1),
            steps=metrics.get("steps"), eval_loss_before=_round(metrics.get("eval_loss_before"), 5),
            eval_loss_after=_round(metrics.get("eval_loss"), 5), mlflow_run_id=metrics.get("mlflow_run_id"))
        for name in comparison.eval_sets:
            row[f"eval_{name}_loss_before"] = _round(metrics.get(f"eval_{name}_loss_before"), 5)
            row[f"eval_{name}_loss_after"] = _round(metrics.get(f"eval_{name}_loss"), 5)
        rows.append(row)
    return rows


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


# ---------------------------------------------------------------- outputs
def human_bytes(n_bytes: Optional[int]) -> str:
    if n_bytes is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


def _loss_pair(before, after) -> str:
    return "-" if after is None else f"{before:.3f} -> {after:.3f}" if before is not None else f"{after:.3f}"


def print_table(console, comparison: Comparison, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    base = comparison.sweep.base
    table = Table(title=f"rayft compare: {base.model.name_or_path}, {base.train.max_steps or '-'} steps, "
                        f"seed {base.train.seed}, ZeRO-{base.distributed.zero_stage}; peak: one rank, "
                        f"{base.train.micro_batch_size} x {base.data.cutoff_len} tokens")
    headers = ["method", "lr", "trainable (% of base)", "changed", "adapter", "peak mem", "tok/s", "train s",
               "eval loss", *[f"{name} loss" for name in comparison.eval_sets], "mixed batches"]
    for header in headers:
        table.add_column(header, justify="left" if header in ("method", "mixed batches") else "right")
    for row in rows:
        if row["status"] != "completed":
            table.add_row(row["method"], f"{row['lr']:g}", row["status"], *[""] * (len(headers) - 3))
            continue
        table.add_row(
            row["method"], f"{row['lr']:g}", f"{row['trainable_params']:,} ({row['trainable_pct_of_base']:.3f}%)",
            f"{row['changed_base_params']:,}", human_bytes(row["adapter_bytes"]), human_bytes(row["peak_memory_bytes"]),
            f"{row['tokens_per_s']:.0f}", f"{row['train_seconds']:.1f}",
            _loss_pair(row["eval_loss_before"], row["eval_loss_after"]),
            *[_loss_pair(row[f"eval_{name}_loss_before"], row[f"eval_{name}_loss_after"]) for name in comparison.eval_sets],
            f"yes ({row['serve_kind']})" if row["mixed_batch_serving"] == "yes" else "no")
    console.print(table)
    for row in rows:
        if row["note"]:
            console.print(f"{row['status']}: {row['method']}: {row['note']}", markup=False, highlight=False,
                          soft_wrap=True)


def plot_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Eval loss after training against trainable parameters, and against measured peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row["status"] == "completed" and row["eval_loss_after"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters"),
                           (axes[1], "peak_memory_bytes", "measured peak memory, one rank (MiB)")):
        points = [(row[key] / (2**20 if key == "peak_memory_bytes" else 1), row["eval_loss_after"], row["method"])
                  for row in done if row[key]]
        for x, y, name in points:
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        if key == "trainable_params" and points:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss after training")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    staging = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(staging, dpi=110, bbox_inches="tight")
    plt.close(fig)
    staging.replace(path)


def write_outputs(comparison: Comparison, rows: list[dict[str, Any]], output_dir: Path, uri: str,
                  parent_run_id: str) -> None:
    from rayft.tracking import mlflow_run
    from rayft.tune.sweep import write_csv

    base = comparison.sweep.base
    plot_comparison(rows, output_dir / "compare.png",
                    f"{base.model.name_or_path}: {base.train.max_steps or '-'} steps per method")
    client = mlflow_run.client(uri)
    for row in rows:
        if row["mlflow_run_id"]:
            client.set_tag(row["mlflow_run_id"], "rayft.compare.method", row["method"])
            client.set_tag(row["mlflow_run_id"], "rayft.trial_status", row["status"])
        elif row["note"]:
            client.set_tag(parent_run_id, f"rayft.{row['status']}.{_metric_name(row['method'])}", row["note"][:4000])
    completed = [row for row in rows if row["status"] == "completed"]
    for row in completed:
        client.log_metric(parent_run_id, f"eval_loss.{_metric_name(row['method'])}", float(row["eval_loss_after"]))
    pending = output_dir / ".pending"
    pending.mkdir(exist_ok=True)
    write_csv(rows, pending / FINISHED)
    client.log_artifact(parent_run_id, str(output_dir / "compare.png"))
    client.log_artifact(parent_run_id, str(pending / FINISHED))
    client.set_terminated(parent_run_id, "FINISHED" if completed else "FAILED")
    (pending / FINISHED).replace(output_dir / FINISHED)  # last: marks the comparison finished
    pending.rmdir()


def _metric_name(method: str) -> str:
    """MLflow metric names take letters, digits and _-./ (lora+ -> lora_plus)."""
    return method.replace("+", "_plus")


def summary_lines(rows: list[dict[str, Any]], output_dir: Path) -> list[str]:
    lines = [f"wrote {output_dir / FINISHED}, {output_dir / 'compare.png'}; each method's run in "
             f"{output_dir / 'trials'}/<trial_id>/"]
    refused = [row for row in rows if row["status"] == "refused"]
    return lines + [f"error: --methods {row['method']}: refused: {row['note']}" for row in refused]
