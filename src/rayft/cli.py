"""The `rayft` command line: parses, then delegates. Bad input exits with code 2 and one line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from rayft.errors import RayftError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed LLM fine-tuning and adapter serving on Ray.")
models_app = typer.Typer(no_args_is_help=True, help="Base models: list aliases, prepare them.")
app.add_typer(models_app, name="models")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter registry that rayft serve loads from.")
app.add_typer(adapters_app, name="adapters")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the serving API and the training service.")
app.add_typer(keys_app, name="keys")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster with rayft submit.")
app.add_typer(jobs_app, name="jobs")
data_app = typer.Typer(no_args_is_help=True, help="Training data: checks, scores from the base model, replay sets.")
app.add_typer(data_app, name="data")
ADDRESS_HELP = "Ray job server (dashboard) address; default $RAYFT_JOBS_ADDRESS or http://127.0.0.1:8265."

SET_HELP = "Override a config key: --set train.lr=1e-4 (repeatable)."


def user_errors(command):
    """Print a RayftError as one line and exit 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RayftError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)

    return wrapper


@app.command()
@user_errors
def train(
    config: Path = typer.Argument(..., help="Training config (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in output_dir."),
    verbose: bool = typer.Option(False, "--verbose", help="Show every library's and worker's output (also RAYFT_VERBOSE=1)."),
    force: bool = typer.Option(False, "--force", help="Train even where the memory estimate predicts it does not fit the GPUs."),
):
    """Fine-tune a model on Ray Train workers as CONFIG says."""
    from rayft.config import load_config
    from rayft.console import DRIVER_LOG, LOG_DIR, verbose_from_env
    from rayft.errors import TrainingFailed
    from rayft.train.runner import run_training

    cfg = load_config(config, set_ or [])
    if resume and overwrite:
        raise RayftError("--resume and --overwrite exclude each other")
    verbose = verbose or verbose_from_env()
    logs = Path(cfg.output_dir) / LOG_DIR
    try:
        metrics = run_training(cfg, resume=resume, overwrite=overwrite, verbose=verbose, force=force)
    except RayftError:
        raise
    except TrainingFailed as exc:  # a worker failed past max_failures: its traceback is in its log
        typer.echo(f"error: training failed: {exc}", err=True)
        raise typer.Exit(1)
    except Exception as exc:  # the driver itself failed
        _runtime_failure("training", exc, verbose, logs / DRIVER_LOG)
    _print_summary(metrics, cfg)
    if not verbose:
        typer.echo(f"logs: {logs}")


@app.command()
@user_errors
def estimate(
    config: Path = typer.Argument(..., help="Training config (YAML)."),
    device: Optional[str] = typer.Option(None, "--device", help="Each worker's device: cuda:80GB or cpu:24GB "
                                         "(GB = 2^30 bytes). Default: this machine's first GPU, else its memory "
                                         "shared by distributed.num_workers."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="The device's dense matmul TFLOP/s in "
                                                "the run's precision (on CPU measured when not given)."),
    utilisation: float = typer.Option(0.4, "--utilisation", help="The fraction of that peak a step reaches."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the libraries' output (also RAYFT_VERBOSE=1)."),
):
    """Predict per-device memory (and time) of a training config before anything is loaded; when it
    does not fit, name the changes that make it fit."""
    from rayft.config import load_config
    from rayft.console import RunConsole, verbose_from_env
    from rayft.estimate import check_options, estimate_command, render

    cfg = load_config(config, set_ or [])
    target = check_options(device, peak_tflops, utilisation)
    with RunConsole(verbose or verbose_from_env()):  # DeepSpeed's and transformers' lines stay off the console
        result = estimate_command(cfg, target, peak_tflops, utilisation)
    render(cfg, result)


def _runtime_failure(what: str, exc: Exception, verbose: bool, log: Path):
    """A failure after the run started: one line (the traceback is in the driver's log), exit 1."""
    if verbose:
        import traceback

        traceback.print_exc()
    from rayft.errors import one_line

    where = "" if verbose else f" (traceback in {log})"
    typer.echo(f"error: {what} failed: {one_line(exc)}{where}", err=True)
    raise typer.Exit(1)


def _print_summary(metrics: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rayft train: {cfg.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("eval_loss_before", "eval_loss", "train_loss", "steps", "tokens_per_s", "train_seconds",
                "trainable_params", "total_params", "changed_base_params", "output_bytes", "mlflow_run_id", "output"):
        value = metrics.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


@app.command()
@user_errors
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep file (YAML): a base training config and a search section."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: search.num_samples=4 or "
                                             "train.lr=1e-4 (name, output_dir and search.* are the sweep's; "
                                             "every other key, or base.KEY, is the base training config's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep; finished trials are kept."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a sweep already in output_dir."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Tune's, every trial's and worker's output (also RAYFT_VERBOSE=1)."),
):
    """Search training hyperparameters with Ray Tune; every trial is a real `rayft train` run."""
    from rayft.console import DRIVER_LOG, LOG_DIR, verbose_from_env
    from rayft.tune.sweep import load_sweep, run_sweep

    if resume and overwrite:
        raise RayftError("--resume and --overwrite exclude each other")
    spec = load_sweep(sweep_file, set_ or [])
    verbose = verbose or verbose_from_env()
    try:
        summary = run_sweep(spec, resume=resume, overwrite=overwrite, verbose=verbose)
    except RayftError:
        raise
    except Exception as exc:
        _runtime_failure("sweep", exc, verbose, Path(spec.cfg.output_dir) / LOG_DIR / DRIVER_LOG)
    best = summary["best"]
    values = "  ".join(f"{k}={best[k]}" for k in spec.space.keys)
    typer.echo(f"best trial {best['trial_id']}: eval_loss {best['final_eval_loss']:.4f}  {values}")
    out = Path(summary["output_dir"])
    typer.echo(f"wrote {out / 'results.csv'}, {out / 'best.yaml'}, {out / 'sweep.png'} and the best trial's weights")


@app.command()
@user_errors
def compare(
    config: Path = typer.Argument(..., help="Training config (YAML): the data, steps, seed and evaluation every method shares."),
    methods: str = typer.Option(..., "--methods", help="Comma-separated methods or their named variants, e.g. "
                                "lora,dora,ia3,prompt_tuning (an unknown name lists the known ones)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per method (default: the config's train.max_steps)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key for every method: "
                                             "--set train.lr=1e-4 (then every method uses it); "
                                             "--set method.lora.r=8 (every method of type lora)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Where compare.csv, compare.png and the "
                                              "runs go (default: the config's output_dir + '-compare')."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted comparison; finished methods are kept."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a comparison already in the output directory."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Tune's, every trial's and worker's output (also RAYFT_VERBOSE=1)."),
):
    """Train each method on the same data, steps, seed and evaluation (trials of one Ray Tune sweep)
    and tabulate parameters, adapter size, peak memory, speed and losses (compare.csv, compare.png)."""
    from rayft.console import DRIVER_LOG, LOG_DIR, verbose_from_env
    from rayft.tune.compare import load_comparison, run_comparison, summary_lines

    if resume and overwrite:
        raise RayftError("--resume and --overwrite exclude each other")
    comparison = load_comparison(config, methods, steps, set_ or [], output_dir)
    verbose = verbose or verbose_from_env()
    out = Path(comparison.sweep.cfg.output_dir)
    try:
        result = run_comparison(comparison, resume=resume, overwrite=overwrite, verbose=verbose)
    except RayftError:
        raise
    except Exception as exc:
        _runtime_failure("comparison", exc, verbose, out / LOG_DIR / DRIVER_LOG)
    rows = result["rows"]
    for line in summary_lines(rows, result["output_dir"]):
        typer.echo(line, err=line.startswith("error:"))
    if any(row["status"] == "refused" for row in rows):
        raise typer.Exit(2)  # bad input for those methods; the others ran
    if any(row["status"] != "completed" for row in rows):
        raise typer.Exit(1)


@app.command()
@user_errors
def merge(
    adapter_dir: Path = typer.Argument(..., help="An output of rayft train (adapter/): LoRA family, IA3, BitFit or LN deltas."),
    out_dir: Path = typer.Argument(..., help="Where to write the merged HF model."),
):
    """Fold a trained output into its base model and write a plain HF model directory (methods that
    add computation, such as soft prompts and bottleneck adapters, are refused in one line)."""
    from rayft.export import merge_adapter

    path = merge_adapter(adapter_dir, out_dir)
    typer.echo(f"merged model written to {path}")


@models_app.command("list")
def models_list():
    """List the model aliases and whether each is prepared."""
    from rayft.models.resolve import KNOWN_ALIASES, alias_dir

    for alias, bundle in KNOWN_ALIASES.items():
        prepared = (alias_dir(alias) / "config.json").is_file()
        typer.echo(f"{alias}\t{'prepared at ' + str(alias_dir(alias)) if prepared else 'not prepared'}\t(from {bundle.pip_name})")


@models_app.command("prepare")
@user_errors
def models_prepare(alias: str = typer.Argument("smollm2-135m-instruct")):
    """Convert a bundled model once into a cached HF directory."""
    from rayft.models.resolve import KNOWN_ALIASES, prepare_alias

    if alias not in KNOWN_ALIASES:
        raise RayftError(f"unknown model alias {alias!r}; known: {', '.join(KNOWN_ALIASES)}")
    typer.echo(str(prepare_alias(alias)))


@app.command()
@user_errors
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), help="Where the demo writes its data and run."),
    data_only: bool = typer.Option(False, "--data-only", help="Only write the demo data sets (people.jsonl for the "
                                   "sweep pipeline, preferences.jsonl for pipelines/dpo_lora.yaml)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Another demo pipeline, e.g. pipelines/dpo_lora.yaml."),
):
    """Fine-tune SmolLM2-135M with LoRA on 2 workers (ZeRO-2) and show before/after
    (--config pipelines/dpo_lora.yaml: preference alignment instead)."""
    from rayft.demo import run_demo, write_demo_data

    if data_only:
        from rayft.demo import write_preference_data

        typer.echo(str(write_demo_data(output_dir / "data" / "people.jsonl")))
        typer.echo(str(write_preference_data(output_dir / "data" / "preferences.jsonl")))
        return
    run_demo(output_dir, config) if config else run_demo(output_dir)


@app.command()
@user_errors
def serve(
    config: Path = typer.Argument(..., help="Serve config (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a serve config key (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's, Serve's and the replicas' output (also RAYFT_VERBOSE=1)."),
):
    """Serve the base model and its LoRA adapters behind an OpenAI-compatible API (Ctrl-C stops)."""
    from rayft.config import load_serve_config
    from rayft.console import verbose_from_env
    from rayft.serve.server import SERVE_LOG, run_server

    cfg = load_serve_config(config, set_ or [])
    verbose = verbose or verbose_from_env()
    try:
        run_server(cfg, verbose)
    except RayftError:
        raise
    except Exception as exc:
        _runtime_failure("serving", exc, verbose, Path(cfg.log_dir) / SERVE_LOG)


@adapters_app.command("publish")
@user_errors
def adapters_publish(
    source: Path = typer.Argument(..., help="A training output dir (holding adapter/) or an adapter dir."),
    name: str = typer.Option(..., "--name", help="The adapter's name: clients send it as `model`."),
    tenant: str = typer.Option("default", "--tenant", help="Owner; 'shared' for every tenant."),
    registry: Path = typer.Option(Path("adapters"), "--registry", help="Registry directory (serve config: registry)."),
    base: Optional[str] = typer.Option(None, "--base", help="Check against this base (default: the one it was trained on)."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="Model Registry (default: the training run's)."),
):
    """Check an adapter and put it into the registry as a new version; register it in MLflow."""
    from rayft.serve.publish import publish_from_cli

    for line in publish_from_cli(source, name, tenant, registry, base, mlflow_uri):
        typer.echo(line)


@adapters_app.command("list")
@user_errors
def adapters_list(
    registry: Path = typer.Option(Path("adapters"), "--registry", help="Registry directory."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="Only what this tenant may use."),
):
    """List published adapters (current versions)."""
    from rich.console import Console
    from rich.table import Table

    from rayft.serve.registry import AdapterRegistry

    table = Table("tenant", "name", "version", "kind", "rank", "mlflow run", "source")
    for ref in AdapterRegistry(registry).list(tenant):
        meta = ref.meta()
        table.add_row(ref.tenant, ref.name, str(ref.version), str(meta.get("serve_kind") or "lora"), str(meta.get("rank")),
                      str(meta.get("mlflow_run_id") or "-"),
                      str(meta.get("source")))
    Console().print(table)


@keys_app.command("create")
@user_errors
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant this key acts for."),
    admin: bool = typer.Option(False, "--admin", help="May publish and delete adapters through the API."),
    keys_file: Path = typer.Option(Path("tenants.yaml"), "--keys-file", help="Where key hashes are kept (serve config: auth.keys_file)."),
):
    """Create an API key; it is printed once, only its SHA-256 is stored."""
    from rayft.serve.keys import create_key

    typer.echo(create_key(keys_file, tenant, admin))


@data_app.command("replay")
@user_errors
def data_replay(
    config: Path = typer.Argument(..., help="Training config (YAML): its training sources give the prompts."),
    from_base: int = typer.Option(..., "--from-base", help="How many records: distinct prompts answered by the base model."),
    out: Optional[Path] = typer.Option(None, "--out", help="The JSONL file to write (default: replay-<name>.jsonl)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="The longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above: sampled, seeded per record."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Which prompts and samples (default: train.seed)."),
    format_: str = typer.Option("messages", "--format", help="messages or alpaca."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows the engine generates together."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's and the task's output (also RAYFT_VERBOSE=1)."),
):
    """Write self-generated replay data: prompts of CONFIG's training data with the base model's own
    answers (generated on Ray), to mix into data.train against forgetting."""
    from rayft.config import load_config
    from rayft.console import verbose_from_env
    from rayft.replay import write_replay

    cfg = load_config(config, set_ or [])
    path = write_replay(cfg, from_base, out or Path(f"replay-{cfg.name}.jsonl"), overwrite, max_tokens, temperature,
                        seed, format_, batch_size, verbose or verbose_from_env())
    typer.echo(f"wrote {from_base} replay records (answers of {cfg.model.name_or_path}) to {path}")


@data_app.command("check")
@user_errors
def data_check(
    config: Path = typer.Argument(..., help="Training config (YAML): its sources, validation files and eval sets."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Report each data source as the stage reads it: records, format, token lengths, truncation at
    data.cutoff_len, exact and near duplicates, empty or identical answers, records that do not parse."""
    from rich.console import Console

    from rayft.config import load_config
    from rayft.data.check import check_data, report_table
    from rayft.models import resolve_model_path

    cfg = load_config(config, set_ or [])
    table, lines = report_table(check_data(cfg, resolve_model_path(cfg.model.name_or_path)), cfg.data.cutoff_len,
                                f"rayft data check: {cfg.name} (stage {cfg.stage})")
    Console().print(table)
    for line in lines:
        typer.echo(line)


@data_app.command("score")
@user_errors
def data_score(
    config: Path = typer.Argument(..., help="Training config (YAML): its training sources are scored."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory of the scored copies (default: beside each "
                                       "source, as <name>.scored.jsonl)."),
    batch: int = typer.Option(8, "--batch", help="Rows per forward pass on each worker."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's and the workers' output (also RAYFT_VERBOSE=1)."),
):
    """Score every training record with the base model on Ray workers (distributed.num_workers): the
    answer's loss and its instruction-following difficulty (IFD); write a scored copy per source."""
    from rayft.config import load_config
    from rayft.console import verbose_from_env
    from rayft.scoring import score_data

    cfg = load_config(config, set_ or [])
    for label, path, n in score_data(cfg, out, batch, verbose or verbose_from_env()):
        typer.echo(f"wrote {n} scored records of {label} to {path}")


@app.command()
@user_errors
def submit(
    config: Path = typer.Argument(..., help="Training or sweep config (YAML)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="The job's output shows every library's and worker's lines."),
):
    """Validate CONFIG here, then run it on a Ray cluster through Ray's job system."""
    from rayft.jobs.client import default_address, submit as submit_job

    typer.echo(submit_job(config, address or default_address(), set_ or [], verbose))


@jobs_app.command("list")
@user_errors
def jobs_list(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """rayft jobs on the cluster, oldest first."""
    from rayft.jobs.client import default_address, list_jobs

    for job in list_jobs(address or default_address()):
        typer.echo(f"{job['id']}\t{job['kind']}\t{job['status']}\t{job['output_dir']}")


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: str, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """A job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) and message."""
    from rayft.jobs.client import default_address, job_info

    info = job_info(address or default_address(), job_id)
    typer.echo(f"{info.status.value}\t{info.message or ''}")


@jobs_app.command("logs")
@user_errors
def jobs_logs(job_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
              address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
              verbose: bool = typer.Option(False, "--verbose", help="Then the run's log files (driver, workers, "
                                           "trials), where this machine sees its output_dir.")):
    """A job's output: rayft's lines (--verbose: then everything else the run logged)."""
    from rayft.jobs.client import default_address, logs

    for chunk in logs(address or default_address(), job_id, follow, verbose):
        typer.echo(chunk, nl=False)


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: str, address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)):
    """Stop a running job."""
    from rayft.jobs.client import default_address, stop

    typer.echo("stopping" if stop(address or default_address(), job_id) else "not running")


@app.command()
@user_errors
def service(
    db: str = typer.Option("sqlite:///rayft-jobs.db", "--db", help="Job records: a SQLAlchemy URL (sqlite:///FILE or postgresql+psycopg://...)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    root: Path = typer.Option(Path("."), "--root", help="Relative paths in job configs are read here; outputs go to ROOT/outputs/<tenant>/."),
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help="API keys (rayft keys create); none: no auth, one tenant 'default'."),
    max_active_jobs: int = typer.Option(2, "--max-active-jobs", min=1, help="Active (pending or running) jobs per tenant."),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="Tracking URI for jobs whose config names none."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8100, "--port"),
):
    """Run the multi-user training service (REST API; OpenAPI at /docs and /openapi.json)."""
    import uvicorn

    from rayft.jobs.client import default_address
    from rayft.jobs.service import ServiceSettings, create_service

    if keys_file is not None and not keys_file.is_file():
        raise RayftError(f"--keys-file {keys_file}: no such file (create keys with rayft keys create)")
    if not root.is_dir():
        raise RayftError(f"--root {root}: no such directory")
    settings = ServiceSettings(db_url=db, ray_address=address or default_address(), root=str(root.resolve()),
                               keys_file=str(keys_file.resolve()) if keys_file else None,
                               max_active_jobs_per_tenant=max_active_jobs, mlflow_uri=mlflow_uri)
    uvicorn.run(create_service(settings), host=host, port=port, log_level="warning")


def main() -> None:  # pragma: no cover
    sys.exit(app())
