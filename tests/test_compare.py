"""`rayft compare`: methods as trials of one sweep, one table (issue 19). Bad input in one line with
exit code 2; one real comparison through the CLI on the tiny model."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

from conftest import RAYFT, base_config, run_cli, wait_for, write_config
from tiny import write_alpaca


# ---------------------------------------------------------------- presets, in-process
def test_every_preset_name_belongs_to_one_method_and_makes_a_valid_block():
    from rayft.config import parse_config
    from rayft.methods import named_presets

    presets = named_presets()
    assert {"lora", "dora", "rslora", "lora+", "pissa", "olora", "adapterdrop", "compacter", "ia3"} <= set(presets)
    assert presets["dora"][0] == "lora" and presets["adapterdrop"][0] == "bottleneck"
    for name, (method_type, preset) in presets.items():
        if method_type == "adapter_fusion":
            continue  # its adapters are the user's to name
        block = {"type": method_type, method_type: preset.options} if preset.options else {"type": method_type}
        cfg = parse_config({"name": "p", "output_dir": "o", "method": block, "data": {"train": "t.jsonl"},
                            "train": {"lr": preset.lr, "precision": "fp32"}}, source=name)
        assert cfg.train.lr == preset.lr > 0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, message", [
    (["--methods", "lora,nosuch"], r"--methods: unknown method 'nosuch'; known: .*adalora.*dora.*"),
    (["--methods", "lora", "--steps", "0"], r"--steps 0: must be a positive number of optimizer steps"),
    (["--methods", "lora,lora"], r"--methods: 'lora' is named twice"),
    (["--methods", "ia3", "--set", "method.lora.r=4"], r"--set 'method.lora.r=4': .* must name the type of a method in --methods \(ia3\)"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tiny_model, alpaca_file, args, message):
    import re

    path = write_config(tmp_path, base_config(tmp_path, tiny_model, alpaca_file))
    done = run_cli("compare", str(path), *args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), done.stderr


# ---------------------------------------------------------------- a real comparison
def test_compare_runs_methods_as_trials_and_reports_the_refused_one(tmp_path, tiny_model, alpaca_file, ray_address):
    """p_tuning and ia3 train under ZeRO-3 (tests/test_catalogue.py leaves both to this run);
    adalora refuses ZeRO-3 and is listed with its own refusal. The comparison is interrupted once
    one method has finished, and resumed."""
    import mlflow

    from rayft.config import parse_config
    from rayft.methods import Run, get_method
    from rayft.models.loading import load_on_meta

    general = write_alpaca(tmp_path / "general.jsonl", 24, seed=7)
    raw = base_config(tmp_path, tiny_model, alpaca_file, distributed={"num_workers": 2, "zero_stage": 3},
                      train={"eval_steps": 4, "save_steps": 4}, tracking={"experiment": "compare"})
    raw["data"]["eval_sets"] = {"general": str(general)}
    path = write_config(tmp_path, raw)
    out = tmp_path / "cmp"
    p_tuning = {"num_virtual_tokens": 8, "encoder_hidden": 32}  # small, as the tiny model is
    args = ["compare", str(path), "--methods", "p_tuning,ia3,adalora", "--steps", "4", "--output-dir", str(out),
            *[arg for key, value in p_tuning.items() for arg in ("--set", f"method.p_tuning.{key}={value}")]]

    # The driver is killed once a method has finished (the two run side by side on the 4-CPU test
    # cluster); --resume runs the rest only.
    log = tmp_path / "driver.log"
    with log.open("w") as log_file:  # a file, not a pipe nobody reads while we wait
        driver = subprocess.Popen([RAYFT, *args], stdout=log_file, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: next((out / "trials").glob("*/metrics.json"), None) or driver.poll() is not None, 300,
                 "the first method's run")
    finally:
        driver.kill()
        driver.wait()
    first_done = next((out / "trials").glob("*/metrics.json"), None)
    assert first_done is not None, log.read_text()[-3000:]
    first_mtime = first_done.stat().st_mtime_ns
    assert not (out / "compare.csv").exists()
    again = run_cli(*args)
    assert again.returncode == 2 and "holds an unfinished comparison; pass --resume" in again.stderr, again.stderr
    done = run_cli(*args, "--resume", timeout=600)
    # adalora's refusal is bad input for it: exit 2 after the others ran and the table was written
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert first_done.stat().st_mtime_ns == first_mtime  # the finished method was not run again
    assert "error: --methods adalora: refused: " in done.stderr and "zero_stage=3" in done.stderr

    with open(out / "compare.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["p_tuning", "ia3", "adalora"]
    first_run = json.loads(first_done.read_text())["mlflow_run_id"]
    assert first_run in (rows["p_tuning"]["mlflow_run_id"], rows["ia3"]["mlflow_run_id"])  # its row is the kept run
    for column in ("trainable_params", "changed_base_params", "trainable_pct_of_base", "adapter_bytes",
                   "peak_memory_bytes", "tokens_per_s", "train_seconds", "eval_loss_before", "eval_loss_after",
                   "eval_general_loss_before", "eval_general_loss_after", "mixed_batch_serving", "lr"):
        assert column in rows["p_tuning"]
    assert rows["adalora"]["status"] == "refused" and "zero_stage=3" in rows["adalora"]["note"]
    assert rows["p_tuning"]["lr"] == "0.01" and rows["ia3"]["lr"] == "0.003"  # each method's usual lr

    model_dir = tiny_model
    base_params = sum(p.numel() for p in load_on_meta(model_dir).parameters())
    blocks = {"p_tuning": {"type": "p_tuning", "p_tuning": p_tuning}, "ia3": {"type": "ia3"}}
    for name, block in blocks.items():
        row = rows[name]
        assert row["status"] == "completed", row
        # the trainable count is the method's own, applied here to the base
        cfg = parse_config({**raw, "method": block})
        model = get_method(block["type"]).apply(cfg.method.options, load_on_meta(model_dir), Run())
        own = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert int(row["trainable_params"]) == own
        assert float(row["trainable_pct_of_base"]) == pytest.approx(100 * own / base_params, abs=1e-4)
        assert float(row["eval_loss_after"]) < float(row["eval_loss_before"])
        assert float(row["eval_general_loss_before"]) > 0 and float(row["eval_general_loss_after"]) > 0
        assert int(row["adapter_bytes"]) > 0 and int(row["steps"]) == 4
        # measured peak: above the base's fp32 weights, which every rank holds at ZeRO-3's one rank
        assert int(row["peak_memory_bytes"]) > 4 * base_params
        assert row["mixed_batch_serving"] == "yes"  # prompt_tuning and ia3 are kinds of serve/kinds
    # each output reloads, as a user loads it, to the eval loss measured in its distributed run
    # (P-tuning and IA3 train under Ray and ZeRO-3 here only)
    from test_train import eval_loss_of, reload_output

    from rayft.config import load_config

    trial_dirs = {json.loads(f.read_text())["mlflow_run_id"]: f.parent for f in (out / "trials").glob("*/metrics.json")}
    for name, block in blocks.items():
        trial_dir = trial_dirs[rows[name]["mlflow_run_id"]]
        trial_cfg = load_config(trial_dir / "config.yaml")
        assert json.loads((trial_dir / "adapter" / "rayft.json").read_text())["method"] == block["type"]
        assert not [p for p in (trial_dir / "adapter").rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
        reloaded = eval_loss_of(reload_output(trial_cfg, trial_dir), trial_cfg)
        measured = json.loads((trial_dir / "metrics.json").read_text())["eval_loss"]
        assert reloaded == pytest.approx(measured, rel=2e-4) and float(rows[name]["eval_loss_after"]) == round(measured, 5)
    assert (out / "compare.png").stat().st_size > 0

    client = mlflow.MlflowClient(raw["tracking"]["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("compare").experiment_id])
    parents = [r for r in runs if r.data.tags.get("rayft.compare") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["rayft.compare.method"] for r in children) == ["ia3", "p_tuning"]
    assert {r.info.run_id for r in children} == {rows["p_tuning"]["mlflow_run_id"], rows["ia3"]["mlflow_run_id"]}
    assert all("peak_memory_bytes" in r.data.metrics for r in children)
    assert "zero_stage=3" in parents[0].data.tags["rayft.refused.adalora"]
