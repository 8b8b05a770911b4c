"""Training under Ray Train with 2 workers and DeepSpeed ZeRO, through the real CLI and the
in-process entry point, on the tiny model. Each output is reloaded and re-evaluated: its eval
loss must equal the one measured inside the distributed run."""

import json
import math
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import RAYFT, assert_quiet_console, base_config, registered_checkpoints, run_cli, wait_for, write_config
from rayft.config import parse_config
from rayft.data.dataset import RowFile, prepare_data
from rayft.data.packing import collate
from rayft.models import rayft_home
from rayft.train.loop import token_losses

pytestmark = pytest.mark.usefixtures("ray_address")


def reload_output(cfg, output_dir: Path):
    """The trained artifact loaded the way a user would load it."""
    from transformers import AutoModelForCausalLM

    from rayft.methods import get_method

    if get_method(cfg.method.type).output == "model":
        return AutoModelForCausalLM.from_pretrained(output_dir / "model", dtype=torch.float32)
    method = get_method(cfg.method.type)
    kwargs = method.load_kwargs(cfg.method.options, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32, **kwargs)
    return method.load_output(output_dir / "adapter", base)


def eval_loss_of(model, cfg) -> float:
    from rayft.methods import get_method

    virtual_tokens = get_method(cfg.method.type).virtual_tokens(cfg.method.options)
    data = prepare_data(cfg.data, Path(cfg.model.name_or_path), rayft_home() / "datasets", cfg.train.seed)
    rows = RowFile(data.val_file)
    loss_sum = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = collate(rows.rows(list(range(start, min(start + 4, len(rows))))), 2)
            loss, count = token_losses(model, batch, "fp32", virtual_tokens)
            loss_sum, tokens = loss_sum + loss.item(), tokens + count.item()
    return loss_sum / tokens


def train_in_process(tmp_path, tiny_model, alpaca_file, **sections):
    from rayft.train.runner import run_training

    cfg = parse_config(base_config(tmp_path, tiny_model, alpaca_file, **sections))
    return cfg, run_training(cfg)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_deepspeeds_engine_keeps_the_loss_steps_autocast_on(tmp_path, tiny_model, alpaca_file, monkeypatch,
                                                            precision):
    """rayft's bf16 is torch.autocast around the loss step. DeepSpeed's engine forward turns an
    enclosing CUDA autocast off unless its own torch_autocast section is on: on an H200 bf16 runs
    computed in fp32 and failed on LoRA's bf16-stored weights. CI has no GPU, so DeepSpeed's
    context manager runs here with the enclosing autocast reported on, as CUDA's is on a GPU.
    Under rayft's bf16 config the autocast stays on in bf16 inside it; under the fp32 config
    (which has no autocast to keep) the engine turns it off, as it did to bf16 runs before."""
    from types import SimpleNamespace

    import deepspeed.runtime.torch_autocast as ds_autocast
    from deepspeed.runtime.config import DeepSpeedConfig

    from rayft.train.deepspeed_config import deepspeed_config

    cfg = parse_config(base_config(tmp_path, tiny_model, alpaca_file, train={"precision": precision}))
    ds = DeepSpeedConfig(deepspeed_config(cfg, 1, on_gpu=True))
    engine = SimpleNamespace(torch_autocast_enabled=lambda: ds.torch_autocast_enabled,
                             torch_autocast_dtype=lambda: ds.torch_autocast_dtype)
    if precision == "bf16":  # and no module's gradients are marked for bf16 communication
        assert ds.torch_autocast_lower_precision_safe_modules == []
    is_enabled = torch.is_autocast_enabled
    # DeepSpeed asks without a device, which means CUDA; its one-time log asks torch.distributed
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: is_enabled(*device) if device else True)
    monkeypatch.setattr(ds_autocast, "_WARNED_NESTED_AUTOCAST", True)
    with torch.autocast("cpu", dtype=torch.bfloat16), ds_autocast.autocast_if_enabled(engine):
        inside = is_enabled("cpu"), torch.get_autocast_dtype("cpu")
    assert inside == ((True, torch.bfloat16) if precision == "bf16" else (False, torch.bfloat16))


def test_deepspeeds_engine_does_not_make_gpu_workers_wait_for_the_device(tmp_path, tiny_model, alpaca_file):
    """Under the DeepSpeed config rayft builds for a GPU worker, DeepSpeed's engine never calls its
    accelerator's synchronize over forwards, backwards and optimizer steps (counted, the
    accelerator answering as CUDA's does); with DeepSpeed's default throughput timer, which rayft
    switches off, it would at every micro-batch. ZeRO-1/2's overlap_comm synchronizes after every
    backward (a CPU has no streams to run it on, so the probe cannot show it): rayft asks for it
    only with more than one GPU, and under ZeRO-3, which waits there either way. (Left, not counted
    here: with gradient clipping, DeepSpeed's norm is copied and read back once per optimizer step.)"""
    import subprocess
    import sys

    from rayft.train.deepspeed_config import deepspeed_config

    def overlap(zero_stage: int, world: int, on_gpu: bool) -> bool:
        cfg = parse_config(base_config(tmp_path, tiny_model, alpaca_file, distributed={"zero_stage": zero_stage}))
        return deepspeed_config(cfg, world, on_gpu)["zero_optimization"]["overlap_comm"]

    assert [overlap(2, 1, True), overlap(2, 2, True), overlap(1, 2, True), overlap(3, 1, True), overlap(2, 2, False)] \
        == [False, True, True, True, False]

    probe = Path(__file__).parent / "device_wait_probe.py"
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-3000:]
    assert json.loads(lines[-1]) == {"rayft": 0, "deepspeed_timers": 8}


def test_a_training_steps_loss_is_worked_out_without_reading_the_device(monkeypatch):
    """Which positions are learned (the head's rows, their targets, their count, and for DPO each
    sequence's tokens) is worked out from the batch's host copy: on a GPU, a boolean selection on
    the device makes the host wait for every queued kernel. On the meta device, where no value can
    be read, the SFT loss (forward and backward) and DPO's sequence log-probabilities still run.
    (The fused head asks autocast about the batch's device, which the meta device is not: the
    head's plain path stands in; it selects the rows the same way.)"""
    from test_attention import TWO_ROWS_WITH_PROMPTS
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayft.train import loop
    from rayft.train.attention import register

    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = register()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    batch = loop.with_rows(collate(TWO_ROWS_WITH_PROMPTS, 0), [0, 1], 0, torch.device("meta"))
    batch["row_weight"] = torch.ones(2, device="meta")
    loss, count = loop.token_losses(model, batch, "fp32", fused_head=False)
    loss.backward()
    assert loss.is_meta and count.is_meta and count.shape == ()
    monkeypatch.setattr(loop, "fused_head_loss_applies", lambda *args: False)
    sums, tokens, row_of = loop.sequence_logps(model, batch, "fp32")
    assert sums.is_meta and sums.shape == tokens.shape == row_of.shape == (3,)  # row 0's two samples, row 1's one


def test_learned_positions_select_what_the_labels_mark():
    """The flat learned positions pick, from hidden states with soft-prompt positions before each
    row, exactly the positions whose next label is learned, in the order of their targets."""
    from rayft.train.head_loss import Learned
    from rayft.train.loop import IGNORE_INDEX, learned_positions

    labels = torch.tensor([[-100, 4, 5, -100, 6], [-100, -100, 7, -100, -100], [-100] * 5])
    virtual = 3
    hidden = torch.randn(3, virtual + 5, 2)
    marked = torch.zeros(3, virtual + 5, dtype=torch.bool)
    marked[:, virtual:-1] = labels[:, 1:] != IGNORE_INDEX
    index, targets = learned_positions(labels, virtual)
    learned = Learned(index, virtual + 5)
    assert torch.equal(learned.rows_of(hidden), hidden[marked]) and targets.tolist() == [4, 5, 6, 7]
    assert learned.rows().tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="over 8 positions per row, hidden states have 5"):
        learned.rows_of(hidden[:, virtual:])  # the soft prompt's positions left out


# LoRA under ZeRO-3 is the CLI run below; LoRA under ZeRO-2 runs in the jobs and service tests.
# train.compile's run: its evaluations run the compiled layers, its reload the eager ones.
@pytest.mark.parametrize("method, zero_stage, compiled", [("full", 3, False), ("freeze", 2, False), ("qlora", 2, False),
                                                          ("lora", 2, True)])
def test_method_under_zero_trains_and_reloads_to_the_same_numbers(tmp_path, tiny_model, alpaca_file, capfd, method,
                                                                   zero_stage, compiled):
    cfg, metrics = train_in_process(tmp_path, tiny_model, alpaca_file, method={"type": method},
                                    distributed={"zero_stage": zero_stage, "zero3_persistence_threshold": 0},
                                    train={"compile": compiled})
    compile_lines = [line for line in capfd.readouterr().err.splitlines() if "train.compile:" in line]  # the console
    assert compile_lines == (["[rayft] train.compile: 2 decoder layers compile in the first steps"] if compiled else [])
    out = Path(cfg.output_dir)
    assert metrics["steps"] == 6 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    kind = "adapter" if method in ("lora", "qlora") else "model"
    weights = out / kind / ("adapter_model.safetensors" if kind == "adapter" else "model.safetensors")
    tensors = load_file(weights)
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3 must not save empty shards
    if kind == "adapter":
        assert len([k for k in tensors if "lora_B" in k]) == 14 and any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    assert not list(out.rglob("*.bin")) and not list((out / kind).rglob("*.pt"))
    reloaded = eval_loss_of(reload_output(cfg, out), cfg)
    assert reloaded == pytest.approx(metrics["eval_loss"], rel=2e-4)


def mixture(tmp_path, alpaca_file) -> dict:
    """Two weighted sources of two tasks (one weighted in the loss, and both by Dynamic Weight
    Average) and a general eval set."""
    greet = tmp_path / "greet.jsonl"
    greet.write_text("\n".join(json.dumps({"instruction": f"Greet {name}.", "output": f"Hello, {name}!"})
                               for name in ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"] * 5) + "\n")
    general = tmp_path / "general.jsonl"
    general.write_text("\n".join(json.dumps({"instruction": f"What is {a} plus {a}?", "output": str(2 * a)})
                                 for a in range(8)) + "\n")
    return {"train": [{"path": str(alpaca_file), "task": "extract"}, {"path": str(greet), "task": "greet", "weight": 0.5}],
            "eval_sets": {"general": str(general)}, "task_weights": {"greet": 2.0}, "task_weighting": "dwa"}


# One LoRA run under ZeRO-3 with every tensor partitioned, on two sources of two tasks and a general
# eval set that EWC holds the weights to, checkpointed every 3 steps. The CLI run is the
# uninterrupted run: the run stopped and resumed, and the run that loses a worker (with gradient
# checkpointing on), must each end as it did.
LORA_ZERO3 = dict(method={"type": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}},
                  train={"max_steps": 12, "save_steps": 3, "eval_steps": 3, "logging_steps": 1,
                         "ewc": {"weight": 100.0, "samples": 3, "set": "general"}},
                  distributed={"zero_stage": 3, "zero3_persistence_threshold": 0})


@pytest.fixture(scope="module")
def cli_run(ray_address, tmp_path_factory, tiny_model, alpaca_file):
    """`rayft train` on LORA_ZERO3 given partly by --set, with a SQLite MLflow store as by default:
    (its folder, the config it ran, the finished process)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    raw = base_config(tmp_path, tiny_model, alpaca_file, train=LORA_ZERO3["train"],
                      tracking={"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    raw["data"].update(mixture(tmp_path, alpaca_file))
    config = write_config(tmp_path, raw)
    done = run_cli("train", str(config), "--set", "method.lora.r=4", "--set", "distributed.zero_stage=3",
                   "--set", "distributed.zero3_persistence_threshold=0", cwd=tmp_path,  # partition every tensor
                   COLUMNS="160")  # the progress line's metrics shrink to fit 80 columns
    assert done.returncode == 0, done.stderr[-3000:]
    ran = {**raw, "method": LORA_ZERO3["method"], "distributed": {**raw["distributed"], **LORA_ZERO3["distributed"]}}
    return tmp_path, ran, done


def same_run(tmp_path: Path, ran: dict, **train) -> dict:
    """The CLI run's config (its data files too), written to tmp_path/out and the test cluster's MLflow."""
    raw = base_config(tmp_path, Path(ran["model"]["name_or_path"]), Path(ran["data"]["train"][0]["path"]))
    return {**ran, "output_dir": raw["output_dir"], "tracking": raw["tracking"], "train": {**ran["train"], **train}}


def test_cli_lora_zero3_end_to_end_with_mlflow(cli_run, tiny_model):
    """Two sources of two tasks and a general eval set (data issue) through the whole CLI run."""
    tmp_path, raw, done = cli_run
    config = tmp_path / "config.yaml"
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss_before", "eval_loss", "tokens_per_s", "train_seconds", "steps",
                "trainable_params", "total_params", "mlflow_run_id"):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 12 and metrics["eval_loss"] < metrics["eval_loss_before"] and metrics["tokens_per_s"] > 0
    for key in ("eval_general_loss", "eval_task_extract_loss", "eval_task_greet_loss"):  # before, and after
        assert metrics[key] > 0 and metrics[f"{key}_before"] > 0 and metrics[key] != metrics[f"{key}_before"], key
    assert re.search(r"12/12 loss [\d.]+  ewc [\d.e+-]+  eval [\d.]+  general [\d.]+", done.stderr)  # the progress line
    # EWC under ZeRO-3: its Fisher of the LoRA factors, from the general set's 3 packed rows, whole on each rank
    assert re.search(r"ewc: empirical Fisher of 8,192 trainable parameters from 3 rows of eval set 'general'",
                     done.stderr), done.stderr[-3000:]
    assert "data (concat): " in done.stderr and "-> 162 training samples" in done.stderr  # 144 + 36 x 0.5
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    tensors = load_file(adapter / "adapter_model.safetensors")  # ZeRO-3 must not save empty shards
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(t.numel() > 0 for t in tensors.values()) and any(t.abs().sum() > 0 for t in lora_b)
    assert not list(out.rglob("*.bin")) and not list(adapter.rglob("*.pt"))
    assert (adapter / "tokenizer.json").is_file() and (adapter / "chat_template.jinja").is_file()
    assert json.loads((adapter / "rayft.json").read_text())["base_model"] == str(tiny_model)
    assert "r: 4" in (out / "config.yaml").read_text() and (out / "loss.png").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=raw["tracking"]["mlflow_uri"])
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.lora.r"] == "4" and run.data.tags["rayft.method"] == "lora"
    assert run.data.params["trainable_params"] == str(metrics["trainable_params"])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_general_loss", "eval_task_greet_loss"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")][-1] == pytest.approx(metrics["eval_loss"])

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    penalties = history("ewc_penalty")  # 0 before the first step (the weights are theta*), then above it
    assert sorted(penalties) == list(range(1, 13)) and penalties[1] == 0.0 and all(
        penalties[step] > 0 for step in range(2, 13)), penalties

    # DWA: at each evaluation (steps 0, 3, 6, 9, 12) the weights follow the tasks' validation losses
    # at the last two, times the static weights (greet 2); the first has no rate yet
    losses = {task: history(f"eval_task_{task}_loss") for task in ("extract", "greet")}
    weights = {task: history(f"task_weight_{task}") for task in ("extract", "greet")}
    static = {"extract": 1.0, "greet": 2.0}
    evaluated = sorted(losses["greet"])
    assert evaluated == [0, 3, 6, 9, 12] and sorted(weights["greet"]) == evaluated
    for task in static:
        assert weights[task][0] == pytest.approx(static[task])
    for previous, step in zip(evaluated, evaluated[1:]):
        exps = {task: math.exp(losses[task][step] / losses[task][previous] / 2.0) for task in static}
        for task in static:
            assert weights[task][step] == pytest.approx(static[task] * 2 * exps[task] / sum(exps.values()), rel=1e-5)
    assert metrics["task_weight_greet"] == pytest.approx(weights["greet"][12])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "loss.png", "adapter"} <= artifacts
    assert "train" in done.stderr and "12/12" in done.stderr  # the progress bar
    assert_quiet_console(done.stdout + done.stderr)
    logs = out / "logs"
    assert {p.name for p in logs.iterdir()} == {"driver.log", "worker-0.log", "worker-1.log"}
    assert "Setting accelerator to CPU" in (logs / "worker-0.log").read_text()  # the noise is kept, in its file
    assert {f"logs/{name}" for name in ("driver.log", "worker-0.log", "worker-1.log")} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "logs")}

    again = run_cli("train", str(config), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr

    merged = run_cli("merge", str(adapter), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    cfg = parse_config(raw)
    assert eval_loss_of(model, cfg) == pytest.approx(metrics["eval_loss"], rel=2e-4)
    assert eval_loss_of(reload_output(cfg, out), cfg) == pytest.approx(metrics["eval_loss"], rel=2e-4)


def test_a_failing_worker_is_one_error_line_naming_its_log(tmp_path, broken_model, alpaca_file):
    config = write_config(tmp_path, base_config(tmp_path, broken_model, alpaca_file, distributed={"max_failures": 0}))
    done = run_cli("train", str(config), cwd=tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert "SafetensorError: Error while deserializing header" in errors[0]
    log = Path(errors[0].rsplit("traceback in ", 1)[1])
    assert log.parent == tmp_path / "out" / "logs" and "Traceback (most recent call last)" in log.read_text()
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_verbose_shows_everything_on_the_console(tmp_path, broken_model, alpaca_file):
    config = write_config(tmp_path, base_config(tmp_path, broken_model, alpaca_file, distributed={"max_failures": 0}))
    done = subprocess.run([RAYFT, "train", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "RAYFT_VERBOSE": "1"})
    assert done.returncode == 1
    console = done.stdout + done.stderr
    assert "Setting accelerator to CPU" in console and "Traceback" in console  # the libraries' and Ray's output
    assert not (tmp_path / "out" / "logs").exists()


def loss_history(uri: str, run_id: str) -> dict[int, float]:
    """Each step's logged loss; a step logged twice (redone after a restart) by its last value."""
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in sorted(MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"),
                                            key=lambda m: m.timestamp)}


def test_resume_a_stopped_run(tmp_path, cli_run):
    """The CLI run's driver killed after a checkpoint, then --resume: it ends with the same adapter,
    so the data order, the partitioned optimizer states, the schedule and the DWA task weights all
    resume exactly (LoRA dropout is off)."""
    whole_dir, ran, _ = cli_run
    config = write_config(tmp_path, same_run(tmp_path, ran))
    driver = subprocess.Popen([RAYFT, "train", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "out"
    try:
        wait_for(lambda: registered_checkpoints(out, "t") >= 1, 300, "a registered checkpoint")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies: Ray tears its training job down
        driver.wait()
    assert not (out / "metrics.json").exists()
    refused = run_cli("train", str(config), cwd=tmp_path)
    assert refused.returncode == 2 and "unfinished run; pass --resume" in refused.stderr
    resumed = run_cli("train", str(config), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["resumed_from_steps"] and metrics["resumed_from_steps"][0] >= 3
    whole = json.loads((whole_dir / "out" / "metrics.json").read_text())
    resumed_weights = load_file(out / "adapter" / "adapter_model.safetensors")
    whole_weights = load_file(whole_dir / "out" / "adapter" / "adapter_model.safetensors")
    assert resumed_weights.keys() == whole_weights.keys()
    for name, tensor in resumed_weights.items():
        torch.testing.assert_close(tensor, whole_weights[name], rtol=0, atol=1e-6, msg=name)
    assert whole["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert whole["task_weight_greet"] == pytest.approx(metrics["task_weight_greet"], rel=1e-5)


def test_killed_worker_resumes_from_its_last_checkpoint_with_gradient_checkpointing(tmp_path, cli_run):
    """The CLI run again with train.gradient_checkpointing, one of its workers killed after a
    checkpoint: Ray Train restarts the workers from it, and the run ends as the CLI run did, with
    the same loss at every step (each layer's forward runs again in the backward pass, to the same
    numbers)."""
    import ray
    from ray.util.state import list_actors

    from rayft.raycluster import connect_ray
    from rayft.train.runner import run_training

    whole_dir, ran, _ = cli_run
    connect_ray(None)
    raw = same_run(tmp_path, ran, gradient_checkpointing=True)
    raw["distributed"] = {**raw["distributed"], "max_failures": 2}
    cfg = parse_config(raw)
    result = {}
    thread = threading.Thread(target=lambda: result.update(metrics=run_training(cfg)))
    thread.start()
    out = tmp_path / "out"
    wait_for(lambda: registered_checkpoints(out, "t") >= 1, 300, "a registered checkpoint")
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    metrics = result["metrics"]
    assert metrics["steps"] == 12
    assert len(metrics["resumed_from_steps"]) == 1 and metrics["resumed_from_steps"][0] % 3 == 0
    assert metrics["resumed_from_steps"][0] >= 3  # resumed from a checkpoint, not from scratch
    # every step logs its loss: the steps logged twice are the ones redone after the restart, at
    # most save_steps (the workers wait for Ray Train to commit each checkpoint before going on).
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(cfg.tracking.mlflow_uri).get_metric_history(metrics["mlflow_run_id"], "loss")]
    assert sorted(set(steps)) == list(range(1, 13)) and len(steps) - len(set(steps)) <= 3, steps
    whole = json.loads((whole_dir / "out" / "metrics.json").read_text())
    losses = loss_history(cfg.tracking.mlflow_uri, metrics["mlflow_run_id"])
    whole_losses = loss_history(ran["tracking"]["mlflow_uri"], whole["mlflow_run_id"])
    assert len(whole_losses) == 12 and losses == pytest.approx(whole_losses, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert ray.is_initialized()


def test_reporter_writes_mlflow_off_the_step_in_order_and_raises_a_failed_write(tmp_path):
    """Rank 0's MLflow writes run on their own thread: all of them land, in order, by close();
    a write that fails is raised, not lost."""
    from mlflow.tracking import MlflowClient

    from rayft.train.checkpoint import TrainerState
    from rayft.train.loop import Reporter

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("reporter")).info.run_id
    reporter, state = Reporter(0, uri, run_id, None), TrainerState()
    for step in range(1, 8):
        reporter.log(step, {"loss": 1.0 / step}, state)
    reporter.close()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(step, 1.0 / step) for step in range(1, 8)]
    assert [h["step"] for h in state.history] == list(range(1, 8))
    assert Reporter(1, uri, run_id, None).client is None  # other ranks write nothing

    failing = Reporter(0, uri, "no-such-run", None)
    failing.log(1, {"loss": 1.0}, state)
    with pytest.raises(Exception, match="no-such-run"):
        failing.close()
