"""Forgetting (issue 18): replay sources keep a general set's loss down, EWC's penalty, and
`rayft data replay --from-base` (self-generated replay data from the base model, on Ray)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _free_port, base_config, write_config


# ---------------------------------------------------------------- EWC, in-process
def test_ewc_penalty_is_zero_at_the_anchor_and_the_formula_away_from_it_and_pulls_back():
    from rayft.train.ewc import ElasticWeightConsolidation

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    fisher = {"weight": torch.rand(2, 3), "bias": torch.tensor([0.0, 2.0])}  # bias[0]: no Fisher, no pull
    ewc = ElasticWeightConsolidation(0.5, fisher)
    ewc.anchor(model)
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert ewc.penalty(model).item() == 0.0

    with torch.no_grad():
        model.weight.add_(torch.randn(2, 3))
        model.bias.add_(torch.tensor([1.0, -0.3]))
    penalty = ewc.penalty(model)
    delta = {name: p.detach() - anchor[name] for name, p in model.named_parameters()}
    expected = 0.5 / 2 * sum((fisher[name] * delta[name] ** 2).sum() for name in fisher)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()
    for name, p in model.named_parameters():
        # d/dtheta of weight/2 F (theta - theta*)^2 = weight F (theta - theta*): a step against it moves toward theta*
        assert torch.allclose(p.grad, 0.5 * fisher[name] * delta[name], atol=1e-7)
    assert model.bias.grad[0] == 0 and model.bias.grad[1] < 0  # bias[1] moved down: pulled up
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    after_step = ewc.penalty(model).item()
    assert after_step < penalty.item()
    # the logged metric: the mean of the penalties since the last log
    assert ewc.window_metrics() == {"ewc_penalty": pytest.approx((0.0 + penalty.item() + after_step) / 3)}
    assert ewc.window_metrics() == {}  # the window restarts after each log


class Rows:
    """A RowFile's interface over token rows in memory."""

    def __init__(self, rows):
        self._rows = rows

    def __len__(self):
        return len(self._rows)

    def rows(self, indices):
        return [self._rows[i] for i in indices]


def test_ewc_fisher_is_the_mean_squared_gradient_of_each_rows_loss(tiny_model):
    """Per row, not per batch: the mean of squared gradients, not the square of the mean gradient;
    only trainable parameters; dropout off while it is estimated."""
    from transformers import AutoModelForCausalLM

    from rayft.train.ewc import ElasticWeightConsolidation
    from rayft.train.loop import token_losses

    # with dropout, a Fisher estimated in training mode would differ from the reference below
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attention_dropout=0.5)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad = "layers.1.mlp" in name
    rng = np.random.default_rng(0)
    rows = []
    for length in (12, 9, 15, 7):
        ids = rng.integers(10, 2000, length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "position_ids": list(range(length))})

    def loss_fn(m, batch):
        return token_losses(m, batch, "fp32", fused_head=False)

    ewc = ElasticWeightConsolidation.estimate(2.0, 3, model, Rows(rows), loss_fn, pad_id=0, device=torch.device("cpu"),
                                              seed=5)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert ewc.rows_used == 3 and set(ewc.fisher) == {n for n, p in model.named_parameters() if p.requires_grad}

    from rayft.data.packing import collate

    picked = np.random.default_rng([5, 7]).permutation(len(rows))[:3]
    model.eval()
    squares = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    for i in picked:
        loss_sum, count = loss_fn(model, collate([rows[i]], 0))
        grads = torch.autograd.grad(loss_sum / count, [p for p in model.parameters() if p.requires_grad])
        for name, g in zip(squares, grads):
            squares[name] += g ** 2 / 3
    for name in squares:
        assert torch.allclose(ewc.fisher[name], squares[name], rtol=1e-5, atol=1e-12), name
    assert sum(f.sum() for f in ewc.fisher.values()) > 0


def test_ewc_under_zero3_takes_the_steps_the_whole_parameters_take(tiny_model):
    """Two ZeRO-3 ranks, every parameter partitioned: each adds its partition's penalty gradient at
    the accumulation boundary. After 3 steps (2 micro-batches each, clipped) the gathered LoRA
    weights equal those of the same steps with the penalty in each micro-batch's loss, and the
    logged penalties agree; without EWC they would differ by far more."""
    import subprocess
    import sys

    port = str(_free_port())
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "ewc_zero3_probe.py"), str(tiny_model), port],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(lines) == 1, done.stderr[-3000:]
    result = json.loads(lines[0])
    assert result["partitioned"] and result["names"]
    assert result["partition_numel"] * 2 >= result["whole_numel"] > result["partition_numel"]  # half each, padded
    assert result["ewc_effect"] > 1e-3 and result["max_difference"] < 5e-6, result
    assert result["expected_penalties"][0] == 0.0 and result["expected_penalties"][-1] > 0
    assert result["penalties"] == pytest.approx(result["expected_penalties"], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"train": {"ewc": {"weight": 1.0, "set": "generl"}}},
     r"train.ewc.set: 'generl' is not one of data.eval_sets \(general\)"),
    ({"train": {"ewc": {"weight": 0, "set": "general"}}}, r"train.ewc.weight=0: Input should be greater than 0"),
])
def test_ewc_config_refusals_name_the_key(tmp_path, change, message):
    from rayft.config import parse_config
    from rayft.errors import ConfigError

    raw = base_config(tmp_path, Path("model"), Path("data.jsonl"))
    raw["data"]["eval_sets"] = {"general": "g.jsonl"}
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ConfigError) as error:
        parse_config(raw, "c.yaml")
    assert re.search(message, str(error.value)) and "\n" not in str(error.value), str(error.value)


# ---------------------------------------------------------------- data built to cause forgetting
WORDS = ["river", "garden", "morning", "quiet", "market", "window", "letter", "summer", "forest", "teacher",
         "bridge", "kitchen", "music", "travel", "winter", "village", "yellow", "gentle", "story", "harbor"]


def write_general(path: Path, n: int, seed: int) -> Path:
    """Plain English answers: none of the task's JSON, digits or names."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, c, d = rng.sample(WORDS, 4)
        records.append({"instruction": f"Write a sentence about the {a} and the {b}.",
                        "output": f"The {a} near the {b} was {c} and full of {d}, as it is every day."})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def forgetting_run(tmp_path: Path, name: str, model: Path, train, general: Path, mlflow_uri: str,
                   workers: int = 2, **train_section) -> tuple[dict, str]:
    """8 steps of full fine-tuning at a high learning rate (LoRA on the random tiny model barely
    moves in 8 steps: its losses change by hundredths; full fine-tuning moves them by nats), in
    this process (no CLI start-up: the three runs are most of this file's time). Returns
    metrics.json and what the console showed."""
    import io

    from rich.console import Console

    from rayft.config import parse_config
    from rayft.train.runner import run_training

    raw = base_config(tmp_path / name, model, Path("unused"), method={"type": "full"},
                      train={"max_steps": 8, "eval_steps": 8, "save_steps": 8, "logging_steps": 4, "lr": 1e-2,
                             "grad_accum": 2 // workers, **train_section},  # 8 rows a step whatever the workers
                      distributed={"num_workers": workers},
                      tracking={"mlflow_uri": mlflow_uri})  # the test cluster's server: no sqlite set-up per run
    raw["name"] = name
    raw["data"].update(train=train, eval_sets={"general": str(general)})
    console = io.StringIO()
    metrics = run_training(parse_config(raw), console=Console(file=console, width=200))
    return metrics, console.getvalue()


def untied_tiny_model(tiny_model: Path, target: Path) -> Path:
    """The tiny model with its own random output head: greedy answers that differ by prompt (the
    tied one answers every prompt by repeating its last token, a newline)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(target)
    return target


@pytest.mark.slow  # ~4 min: three training runs and a replay; make test-slow runs it
def test_replay_keeps_the_general_loss_down_ewc_holds_the_weights_and_replay_from_base(
        tmp_path, tiny_model, alpaca_file, local_cluster):
    """Three 8-step runs of the tiny model from the same start on the same task (JSON
    extraction): alone; with general replay records mixed in (English sentences, none of them in
    the general eval set); with EWC on the general set. Then `rayft data replay --from-base 4`."""
    general = write_general(tmp_path / "general.jsonl", 24, seed=1)  # the eval set
    replay = write_general(tmp_path / "replay.jsonl", 72, seed=2)  # other sentences of the same kind
    mlflow_uri = local_cluster.mlflow_uri
    task, _ = forgetting_run(tmp_path, "task", tiny_model, str(alpaca_file), general, mlflow_uri)
    # one worker (2 micro-batches a step): a run's cost is mostly its workers' start-up
    mixed, _ = forgetting_run(tmp_path, "replay", tiny_model, [{"path": str(alpaca_file)}, {"path": str(replay)}],
                              general, mlflow_uri, workers=1)
    ewc, ewc_console = forgetting_run(tmp_path, "ewc", tiny_model, str(alpaca_file), general, mlflow_uri,
                                      ewc={"weight": 1e6, "samples": 8, "set": "general"})
    runs = {"task": task, "replay": mixed, "ewc": ewc}
    print({name: {k: round(m[k], 3) for k in ("eval_general_loss_before", "eval_general_loss", "eval_loss_before",
                                              "eval_loss")} for name, m in runs.items()})

    # The same start. The random model has no general ability to lose (its loss starts at ln of the
    # vocabulary), so the task alone still lowers it a little; mixed-in replay lowers it by far more.
    before = task["eval_general_loss_before"]
    assert all(m["eval_general_loss_before"] == pytest.approx(before) for m in runs.values())
    assert mixed["eval_general_loss"] < task["eval_general_loss"] - 1.0, runs
    for m in (task, mixed):  # and the task is learned with and without replay
        assert m["eval_loss"] < m["eval_loss_before"] - 2.0, m

    # EWC: its Fisher line; its penalty in MLflow (> 0 once the weights have moved) and on the
    # progress line; and its gradient in the step: the same run without it (task) learns the task
    # much further, as the weights are held near where they started
    from mlflow.tracking import MlflowClient

    assert "ewc: empirical Fisher of 3,219,776 trainable parameters from 8 rows of eval set 'general'" in ewc_console
    assert re.search(r"8/8 loss [\d.]+  ewc [\d.]+  eval", ewc_console), ewc_console[-2000:]
    penalties = [m.value for m in MlflowClient(mlflow_uri).get_metric_history(ewc["mlflow_run_id"], "ewc_penalty")]
    assert len(penalties) == 2 and all(p > 0 for p in penalties), penalties
    assert ewc["eval_loss"] > task["eval_loss"] + 0.5, runs

    # rayft data replay: 4 distinct prompts of the training data with the base model's own greedy answers
    from typer.testing import CliRunner

    from rayft.cli import app

    base, out = untied_tiny_model(tiny_model, tmp_path / "untied"), tmp_path / "replay-from-base.jsonl"
    config = write_config(tmp_path, base_config(tmp_path, base, alpaca_file))
    made = CliRunner().invoke(app, ["data", "replay", str(config), "--from-base", "4", "--max-tokens", "6",
                                    "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert f"wrote 4 replay records (answers of {base}) to {out}" in made.output.splitlines()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = {r["instruction"] + "\n\n" + r["input"] for r in map(json.loads, alpaca_file.read_text().splitlines())}
    assert len(records) == 4 and len({r["messages"][0]["content"] for r in records}) == 4
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert all(r["messages"][0]["content"] in prompts for r in records)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    for record in records:
        ids = tokenizer.apply_chat_template(record["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        generated = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert record["messages"][1]["content"] == tokenizer.decode(generated, skip_special_tokens=True)
    assert len({r["messages"][1]["content"] for r in records}) > 1  # answers that depend on the prompt
    from rayft.data.formats import read_records, to_conversations

    assert len(to_conversations(read_records(out), "auto", str(out))) == 4  # trainable as a source


def test_data_replay_refuses_bad_input_in_one_line(tmp_path, tiny_model, alpaca_file):
    from typer.testing import CliRunner

    from rayft.cli import app

    config = write_config(tmp_path, base_config(tmp_path, tiny_model, alpaca_file))
    taken = tmp_path / "taken.jsonl"
    taken.write_text("{}\n")
    distinct = len({json.loads(line)["input"] for line in alpaca_file.read_text().splitlines()})
    for args, message in (
            (["--from-base", "0"], "error: --from-base 0: the number of records must be at least 1"),
            (["--from-base", "2", "--out", str(taken)],
             f"error: --out {taken}: exists; pass --overwrite to replace it"),
            (["--from-base", "500", "--out", str(tmp_path / "new.jsonl")],
             f"error: --from-base 500: the training data has {distinct} distinct user prompts")):
        done = CliRunner().invoke(app, ["data", "replay", str(config), *args])
        assert done.exit_code == 2 and done.output.strip() == message, (args, done.output)
    assert taken.read_text() == "{}\n" and not (tmp_path / "new.jsonl").exists()
