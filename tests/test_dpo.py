"""The preference stage (stage: dpo): records in every accepted form, pairs tokenized and packed,
each loss against a direct implementation of its formula from plain logits, and real runs on
Ray Train that raise the preference accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import base_config, run_cli, write_config
from rayft.config import MethodConfig, parse_config
from rayft.data.dataset import RowFile, prepare_data
from rayft.data.packing import collate
from rayft.errors import ConfigError, DataError
from rayft.methods import get_method
from rayft.models.loading import load_for_training
from rayft.objectives.dpo import DirectPreference, DpoOptions, parse_pairs, tokenize_pair

CPU = torch.device("cpu")
PAIR = {"prompt": "Name the capital of France.", "chosen": "Paris.", "rejected": "I am not sure, maybe Lyon?"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory) -> Path:
    from rayft.demo import write_preference_data

    return write_preference_data(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", 160)


# ---------------------------------------------------------------- records
def test_every_record_form_gives_the_same_pair():
    forms = [
        PAIR,
        {"instruction": PAIR["prompt"], "input": "", "chosen": PAIR["chosen"], "rejected": PAIR["rejected"]},
        {"conversations": [{"from": "human", "value": PAIR["prompt"]}],
         "chosen": {"from": "gpt", "value": PAIR["chosen"]}, "rejected": {"from": "gpt", "value": PAIR["rejected"]}},
        {"chosen": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["chosen"]}],
         "rejected": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["rejected"]}]},
    ]
    expected = ([{"role": "user", "content": PAIR["prompt"]}], PAIR["chosen"], PAIR["rejected"])
    assert parse_pairs(forms, "f") == [expected] * 4
    with_system = parse_pairs([{**PAIR, "system": "Be brief."}], "f")[0]
    assert with_system[0][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("records, message", [
    ([PAIR, {"prompt": "x", "chosen": "a"}, {"prompt": "y", "rejected": "b"}], "2 records lack chosen or rejected; first at index 1"),
    ([PAIR, {**PAIR, "prompt": "  "}], "1 records have an empty prompt; first at index 1"),
    ([PAIR, {"prompt": 3, "chosen": "a", "rejected": "b"}], "1 records are not preference pairs"),
])
def test_bad_preference_records_are_one_line(records, message):
    with pytest.raises(DataError, match=message):
        parse_pairs(records, "f")


def test_a_long_prompt_is_cut_from_the_left_and_both_answers_kept(tokenizer):
    from rayft.data.tokenize import IGNORE_INDEX

    prompt = [{"role": "user", "content": "word " * 300 + "Name the capital of France."}]
    chosen, rejected = tokenize_pair(tokenizer, prompt, "Paris.", "Maybe Lyon, or Paris, hard to say.", 64)
    for sequence, answer in ((chosen, "Paris."), (rejected, "Maybe Lyon, or Paris, hard to say.")):
        assert len(sequence.input_ids) <= 64
        learned = [t for t in sequence.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(learned).startswith(answer) and tokenizer.decode(learned).endswith("<|im_end|>\n")
    assert chosen.input_ids[:-len([t for t in chosen.labels if t != -100])] == \
        rejected.input_ids[:-len([t for t in rejected.labels if t != -100])]  # the same prompt tokens
    assert tokenize_pair(tokenizer, prompt, "x " * 100, "y", 64) is None  # the answers alone do not fit


def test_identical_pairs_are_dropped_and_counted(tmp_path, tiny_model):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [PAIR, {**PAIR, "rejected": PAIR["chosen"]}] * 10))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(PAIR))
    raw = base_config(tmp_path, tiny_model, path)
    raw["data"]["val"] = str(val)
    cfg = parse_config({**raw, "stage": "dpo"})
    data = prepare_data(cfg.data, tiny_model, tmp_path / "cache", 0, "dpo")
    assert data.notes == {"identical_pairs": 10} and data.train_samples == 10
    rows = RowFile(data.train_file)
    starts = sum(row["position_ids"].count(0) for row in rows.rows(list(range(len(rows)))))
    assert starts == 2 * data.train_samples  # two sequences per pair


def test_each_stage_refuses_the_others_records(tmp_path, tiny_model, alpaca_file, preference_file):
    sft = parse_config(base_config(tmp_path, tiny_model, preference_file))
    with pytest.raises(DataError, match="stage sft cannot train on these records .fields: chosen, prompt, rejected.; "
                                        "they are dpo records: set stage: dpo"):
        prepare_data(sft.data, tiny_model, tmp_path / "cache", 0, "sft")
    dpo = parse_config({**base_config(tmp_path, tiny_model, alpaca_file), "stage": "dpo"})
    with pytest.raises(DataError, match="stage dpo cannot train on these records .fields: input, instruction, output.; "
                                        "they are sft records"):
        prepare_data(dpo.data, tiny_model, tmp_path / "cache", 0, "dpo")


def test_no_pair_left_after_truncation(tmp_path, tiny_model):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({**PAIR, "chosen": "yes " * 40, "rejected": "no " * 40}) for _ in range(10)))
    raw = base_config(tmp_path, tiny_model, path)
    raw["data"]["cutoff_len"] = 16
    cfg = parse_config({**raw, "stage": "dpo"})
    with pytest.raises(DataError, match="no preference pair is left after truncation at data.cutoff_len=16"):
        prepare_data(cfg.data, tiny_model, tmp_path / "cache", 0, "dpo")


@pytest.mark.parametrize("stage_block, method, message", [
    ({"beta": 0}, {"type": "lora"}, "dpo.beta=0"),
    ({"loss": "ipo", "label_smoothing": 0.1}, {"type": "lora"}, "label_smoothing applies to the sigmoid loss only"),
    ({"loss": "simpo", "reference": "precomputed"}, {"type": "lora"}, "dpo.loss=simpo uses no reference"),
    ({"reference": "model"}, {"type": "lora"}, "an adapter method's reference is its base with the adapter switched off"),
    ({"reference": "adapter_disabled"}, {"type": "full"}, "adapter_disabled with method.type=full: its output is a whole model"),
    ({}, {"type": "prompt_tuning"}, "puts virtual tokens at the start of each row"),
])
def test_bad_dpo_configs_are_one_line(tmp_path, tiny_model, stage_block, method, message):
    raw = {**base_config(tmp_path, tiny_model, tmp_path / "d.jsonl", method=method), "stage": "dpo", "dpo": stage_block}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


# ---------------------------------------------------------------- the losses
def _policy(tiny_model):
    """A tiny LoRA policy moved off its init (so policy and reference differ)."""
    torch.manual_seed(0)
    model = load_for_training(tiny_model, MethodConfig.model_validate({"type": "lora", "lora": {"r": 4, "dropout": 0.0}}),
                              CPU, "sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def _pairs(tokenizer):
    pairs = [([{"role": "user", "content": f"Question {i}: name a colour."}], "Blue." * (i + 1), f"I think {i} is odd.")
             for i in range(3)]
    return [tokenize_pair(tokenizer, *pair, 96) for pair in pairs]


def _direct_logps(model, sequence) -> tuple[torch.Tensor, int]:
    """A sequence alone, full logits: the summed log-probability of its learned tokens."""
    ids = torch.tensor([sequence.input_ids])
    labels = torch.tensor(sequence.labels[1:])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    learned = labels != -100
    return logps[learned].gather(-1, labels[learned][:, None]).sum(), int(learned.sum())


def _direct_loss(opts: DpoOptions, c, r, nc, nr, rc, rr) -> torch.Tensor:
    """Each loss as its paper (and TRL) writes it."""
    b = opts.beta
    if opts.loss == "sigmoid":
        z = b * ((c - rc) - (r - rr))
        return -(1 - opts.label_smoothing) * F.logsigmoid(z) - opts.label_smoothing * F.logsigmoid(-z)
    if opts.loss == "hinge":
        return torch.relu(1 - b * ((c - rc) - (r - rr)))
    if opts.loss == "ipo":
        return ((c / nc - rc / nc) - (r / nr - rr / nr) - 1 / (2 * b)) ** 2
    if opts.loss == "simpo":
        return -F.logsigmoid(b * (c / nc - r / nr) - opts.simpo_gamma)
    odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731  log(p / (1 - p)) of the mean token probability
    return -c / nc - b * F.logsigmoid(odds(c / nc) - odds(r / nr))


LOSS_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0),
              ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0), ("simpo", 2.0, 0.0), ("simpo", 0.5, 0.0), ("orpo", 0.1, 0.0),
              ("orpo", 1.0, 0.0)]


@pytest.mark.parametrize("loss, beta, smoothing", LOSS_CASES)
def test_packed_loss_and_gradients_match_the_formula_pair_by_pair(tokenizer, tiny_model, loss, beta, smoothing):
    """rayft's loss over a packed batch (two pairs in one row, one in another, the reference the
    base with the adapter off) and its gradients equal the formula applied pair by pair to each
    sequence's own plain logits."""
    from rayft.data.packing import pack_units

    opts = DpoOptions(beta=beta, loss=loss, label_smoothing=smoothing, sft_weight=0.3 if loss == "sigmoid" else 0.0)
    model = _policy(tiny_model)
    units = _pairs(tokenizer)
    rows = list(pack_units(units, max(sum(len(s.input_ids) for s in unit) for unit in units) * 2))
    assert len(rows) < len(units)  # some pairs really share a row
    batch = collate(rows, 0)
    stage = DirectPreference()
    stage.reference_kind = None if loss in ("simpo", "orpo") else "adapter_disabled"
    stage.method = get_method("lora")
    loss_sum, pairs, metrics = stage.loss(opts, model, batch, "fp32", stage.method, None)
    model.zero_grad()
    (loss_sum / pairs).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # packing reorders pairs (largest first): compare sums over all pairs, order-free
    model.zero_grad()
    direct = []
    for chosen, rejected in units:
        (c, nc), (r, nr) = _direct_logps(model, chosen), _direct_logps(model, rejected)
        with torch.no_grad(), model.disable_adapter():
            (rc, _), (rr, _) = _direct_logps(model, chosen), _direct_logps(model, rejected)
        value = _direct_loss(opts, c, r, nc, nr, rc, rr) + opts.sft_weight * (-c / nc)
        direct.append(value)
    expected = torch.stack(direct).mean()
    expected.backward()
    assert pairs.item() == len(units)
    # fp32 rounding differs between a packed row's masked attention and a sequence alone (~1e-6 per
    # log-probability), and beta and the losses' curvature scale it: tolerances well below any formula slip
    assert (loss_sum / pairs).item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    assert 0 <= metrics["pref_accuracy"].item() <= len(units)


def test_sigmoid_loss_is_ln2_when_the_reference_is_the_policy(tokenizer, tiny_model):
    model = load_for_training(tiny_model, MethodConfig.model_validate({"type": "lora"}), CPU, "sdpa").eval()
    from rayft.data.packing import unit_row

    batch = collate([unit_row(unit) for unit in _pairs(tokenizer)], 0)
    stage = DirectPreference()
    stage.reference_kind, stage.method = "adapter_disabled", get_method("lora")
    loss_sum, pairs, metrics = stage.loss(DpoOptions(beta=0.3), model, batch, "fp32", stage.method, None)
    assert (loss_sum / pairs).item() == pytest.approx(math.log(2), rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- real runs
def _dpo_config(tmp_path, tiny_model, preference_file, **sections):
    sections.setdefault("train", {"max_steps": 12, "lr": 2e-2, "eval_steps": 6, "save_steps": 12})
    raw = base_config(tmp_path, tiny_model, preference_file, **sections)
    raw["stage"], raw["dpo"] = "dpo", raw.pop("dpo", {"beta": 0.5})
    return raw


@pytest.mark.usefixtures("ray_address")
@pytest.mark.parametrize("reference, zero_stage", [("precomputed", 3)])  # adapter_disabled, auto: the unit tests
def test_dpo_run_raises_the_preference_accuracy(tmp_path, tiny_model, preference_file, reference, zero_stage):
    """LoRA DPO on 2 workers under ZeRO-3 through the CLI, the reference precomputed before training
    (auto takes adapter_disabled for a run this short): the validation pairs' preference accuracy
    and reward margin rise, and metrics.json and MLflow hold them."""
    raw = _dpo_config(tmp_path, tiny_model, preference_file, distributed={"zero_stage": zero_stage})
    raw["dpo"] = {"beta": 0.5, "reference": reference}
    done = run_cli("train", str(write_config(tmp_path, raw)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reference {reference}" in (tmp_path / "out" / "logs" / "worker-0.log").read_text() + done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_loss_before"] == pytest.approx(math.log(2), rel=1e-4)  # reference == policy at init
    assert metrics["eval_pref_accuracy"] > metrics["eval_pref_accuracy_before"]
    assert metrics["eval_rewards/margins"] > 0.0 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["eval_ppl"] is None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=raw["tracking"]["mlflow_uri"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "pref_accuracy", "logps/chosen",
                "logps/rejected", "eval_pref_accuracy"):
        assert client.get_metric_history(metrics["mlflow_run_id"], key), key
    if reference == "precomputed":  # kept beside the tokenized data, for the next run on it
        from rayft.models import rayft_home

        assert list((rayft_home() / "datasets").glob("*/reference-*-fp32-*-train.safetensors"))


@pytest.mark.usefixtures("ray_address")
def test_a_sweep_over_beta_and_loss_picks_by_preference_accuracy(tmp_path, tiny_model, preference_file):
    """rayft sweep searches dpo.beta and dpo.loss like any key and picks the trial with the best
    eval_pref_accuracy (mode max); a metric the stage does not report is refused up front."""
    import csv

    import yaml

    base = _dpo_config(tmp_path, tiny_model, preference_file, train={"max_steps": 4, "lr": 2e-2, "eval_steps": 2,
                                                                      "save_steps": 4},
                       distributed={"num_workers": 1, "zero_stage": 0})
    search = {"space": {"dpo.beta": {"choice": [0.5]}, "dpo.loss": {"choice": ["sigmoid", "hinge"]}},
              "algorithm": "grid", "scheduler": "none", "metric": "eval_pref_accuracy", "mode": "max"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "name": "dpo-sweep", "output_dir": str(tmp_path / "sweep"),
                                    "search": {**search, "metric": "eval_ppl"}}))
    refused = run_cli("sweep", str(path))
    assert refused.returncode == 2 and "search.metric=eval_ppl: stage dpo reports eval_loss, eval_pref_accuracy" in refused.stderr
    path.write_text(yaml.safe_dump({"base": base, "name": "dpo-sweep", "output_dir": str(tmp_path / "sweep"),
                                    "search": search}))
    done = run_cli("sweep", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert sorted(r["dpo.loss"] for r in rows) == ["hinge", "sigmoid"] and all(r["status"] == "completed" for r in rows)
    best = max(rows, key=lambda r: float(r["final_eval_pref_accuracy"]))
    chosen = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert chosen["stage"] == "dpo" and chosen["dpo"]["loss"] == best["dpo.loss"]


def test_rayft_submit_and_the_service_take_a_dpo_config(tmp_path, tiny_model, preference_file):
    """The job path resolves a DPO config as rayft train reads it (and refuses a bad one before
    any cluster: exit 2)."""
    from rayft.jobs.client import resolve_job

    raw = _dpo_config(tmp_path, tiny_model, preference_file)
    kind, resolved = resolve_job(write_config(tmp_path, raw), [])
    assert kind == "train" and resolved["stage"] == "dpo" and resolved["dpo"]["beta"] == 0.5
    raw["dpo"] = {"beta": 0.5, "loss": "simpo", "reference": "precomputed"}
    refused = run_cli("submit", str(write_config(tmp_path, raw)), "--address", "http://127.0.0.1:9")
    assert refused.returncode == 2 and "dpo.loss=simpo uses no reference" in refused.stderr


def _full_dpo_run(tmp_path, name, tiny_model, preference_file, mlflow_uri, reference, zero_stage):
    """3 steps of full fine-tuning DPO (sigmoid, sft_weight 0) on 2 workers, in this process;
    (metrics.json, every step's loss, the console)."""
    import io

    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from rayft.train.runner import run_training

    raw = _dpo_config(tmp_path / name, tiny_model, preference_file, method={"type": "full"},
                      train={"max_steps": 3, "lr": 5e-3, "logging_steps": 1, "eval_steps": 3, "save_steps": 3},
                      distributed={"zero_stage": zero_stage, "zero3_persistence_threshold": 0},
                      tracking={"mlflow_uri": mlflow_uri})
    raw["name"], raw["dpo"] = name, {"beta": 0.5, "reference": reference}
    console = io.StringIO()
    metrics = run_training(parse_config(raw), console=Console(file=console, width=300))
    history = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(metrics["mlflow_run_id"], "loss")
    return metrics, [m.value for m in sorted(history, key=lambda m: m.step)], console.getvalue()


@pytest.mark.usefixtures("ray_address")
def test_a_frozen_model_reference_sharded_or_whole_gives_the_same_run(tmp_path, tiny_model, preference_file,
                                                                     local_cluster):
    """Full fine-tuning DPO with dpo.reference=model (a frozen copy of the initial model): sharded
    under ZeRO-3 (a DeepSpeed engine of its own), whole under ZeRO-2 (a plain module). Both give,
    step by step, the same losses: ln 2 at the first step (the copy equals the policy), then the
    same falling losses; the copy never trains (else the later losses would stay at ln 2). The
    precomputed reference is the one the CLI run above uses."""
    runs = {stage: _full_dpo_run(tmp_path, f"model-zero{stage}", tiny_model, preference_file,
                                 local_cluster.mlflow_uri, "model", stage)
            for stage in (3, 2)}
    _, expected, _ = runs[3]
    assert len(expected) == 3 and expected[0] == pytest.approx(math.log(2), abs=1e-5)
    assert expected[-1] < math.log(2) - 0.01  # the policy moved away from its reference
    for stage, (metrics, losses, console) in runs.items():
        assert "reference model" in console, console[-2000:]
        assert losses == pytest.approx(expected, rel=1e-3, abs=1e-4), stage
        assert metrics["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
        assert metrics["eval_loss"] < metrics["eval_loss_before"]


@pytest.mark.parametrize("method, max_steps, present, expected", [
    ({"type": "lora"}, 40, False, "precomputed"),     # the run passes over its data more than once
    ({"type": "lora"}, 1, False, "adapter_disabled"),  # a pass over the data costs more than the run
    ({"type": "full"}, 1, False, "model"),
    ({"type": "lora"}, 1, True, "precomputed"),       # kept from an earlier run: free
])
def test_auto_takes_the_reference_with_fewer_forward_rows(tmp_path, tiny_model, preference_file, method, max_steps,
                                                          present, expected):
    raw = _dpo_config(tmp_path, tiny_model, preference_file, method=method,
                      train={"max_steps": max_steps, "eval_steps": 1000, "save_steps": 1000})
    cfg = parse_config(raw)
    data = prepare_data(cfg.data, tiny_model, tmp_path / "cache", 0, "dpo")
    stage = DirectPreference()
    kind, why = stage.choose_reference(cfg.stage_options, cfg, get_method(cfg.method.type), data, 2, present, False)
    assert kind == expected and why.startswith("auto: ")
    if not present:  # both counts said
        rows = len(RowFile(data.train_file)) + len(RowFile(data.val_file))
        assert f"{rows} " in why and f"{max_steps} steps" in why
    explicit = parse_config({**raw, "dpo": {"reference": "adapter_disabled"}}) if method["type"] == "lora" else None
    if explicit:  # only auto is decided here
        assert stage.choose_reference(explicit.stage_options, explicit, get_method("lora"), data, 2, present,
                                      False) == ("adapter_disabled", "")
