"""Checks and scoring before training (issue 18): rayft data check's report on planted problems,
rayft data score's scored copy against the training loss, and data.filter when data is prepared."""

import json
import random
import re

import pytest
from typer.testing import CliRunner

from conftest import base_config, write_config
from rayft.cli import app
from rayft.config import DataConfig, parse_config
from rayft.data.check import check_data
from rayft.data.dataset import RowFile, prepare_data
from rayft.data.tokenize import IGNORE_INDEX, tokenize_conversation
from rayft.errors import DataError

WORDS = ("amber basalt cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow nickel orchid "
         "pewter quartz raven saffron tundra umber velvet willow xenon yarrow zephyr anchor bramble copper dune "
         "falcon glacier hazel iris jasper kelp lantern marble nectar onyx pepper quill ridge sorrel thistle "
         "walnut birch canyon dahlia egret fennel grotto heron ivory jade lotus mesa nutmeg opal prairie").split()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def distinct_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records of random words: no two share more than chance 3-grams; each answer ends
    with its own marker word."""
    rng = random.Random(seed)
    return [{"instruction": f"Describe {' '.join(rng.sample(WORDS, 8))}.",
             "output": " ".join(rng.sample(WORDS, 30)) + f" marker{i}"} for i in range(n)]


def config(tmp_path, model, train, **data):
    raw = base_config(tmp_path, model, train)
    raw["data"].update(data)
    return parse_config(raw)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def planted(tmp_path):
    """Eight distinct records, then: an exact duplicate of 1, a near one of 2 (a word added), an
    empty answer, an answer that repeats its prompt, a prompt far past cutoff_len, a bad record."""
    records = distinct_records(8)
    records += [dict(records[1]), {**records[2], "output": records[2]["output"] + " indeed"},
                {"instruction": "Say nothing at all.", "output": ""},
                {"instruction": "Repeat: quartz raven saffron", "output": "Repeat: quartz raven saffron"},
                {"instruction": "Summarise " + " ".join(WORDS * 4), "output": "Too long."},
                {"instruction": 5, "output": "not a string prompt"}]
    return write_jsonl(tmp_path / "planted.jsonl", records), records


def test_check_reports_duplicates_answers_truncation_and_bad_records(tmp_path, tiny_model, tokenizer):
    path, records = planted(tmp_path)
    general = write_jsonl(tmp_path / "general.jsonl", distinct_records(3, seed=1) * 2)  # three repeated
    cfg = config(tmp_path, tiny_model, path, eval_sets={"general": str(general)})
    source, eval_set = check_data(cfg, tiny_model)

    assert (source.records, source.format) == (14, "alpaca")
    assert (source.exact_duplicates, source.near_duplicates) == (1, 1)
    assert dict(source.answer_issues) == {"empty answer": 1, "answer equals its prompt": 1}
    assert (source.bad_records, source.truncated, source.lost) == (1, 1, 1)  # the long prompt leaves no answer
    assert "records lack the alpaca fields" in source.first_problem and "first at index 13" in source.first_problem
    # lengths as training renders them, untruncated
    from rayft.data.formats import to_conversations

    lengths = [len(tokenize_conversation(tokenizer, c.messages, 10**6, False).input_ids)
               for c in to_conversations(records[:13], "alpaca", "t")]
    assert source.percentiles()[3] == max(lengths) > 128 and sorted(source.lengths) == sorted(lengths)
    assert (eval_set.records, eval_set.exact_duplicates, eval_set.near_duplicates) == (6, 3, 0)
    assert eval_set.name.endswith("(eval set general)")
    assert (source.exact_across, source.near_across, eval_set.exact_across) == (0, 0, 0)


def test_check_counts_duplicates_of_an_earlier_source_apart(tmp_path, tiny_model):
    """A second source holding a copy of a record of the first, a near copy of another, and one
    repeat of its own: dedup (data.filter) drops all three, as it spans the sources; the report
    tells the repeat within the source from the records of the earlier one."""
    first = distinct_records(6)
    own = distinct_records(4, seed=5)
    second = [dict(first[0]), {**first[1], "output": first[1]["output"] + " indeed"}, *own, dict(own[0])]
    a, b = write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)
    val = str(write_jsonl(tmp_path / "val.jsonl", distinct_records(2, seed=9)))  # every record above is training's
    raw = base_config(tmp_path, tiny_model, a)
    raw["data"]["train"] = [{"path": str(a), "val": val}, {"path": str(b), "val": val}]
    cfg = parse_config(raw)
    reports = check_data(cfg, tiny_model)
    by_name = {r.name.split(" (")[0].rsplit("/", 1)[-1]: r for r in reports if "(val)" not in r.name}
    assert (by_name["a.jsonl"].exact_across, by_name["a.jsonl"].near_across) == (0, 0)
    assert (by_name["b.jsonl"].exact_across, by_name["b.jsonl"].near_across) == (1, 1)
    assert (by_name["b.jsonl"].exact_duplicates, by_name["b.jsonl"].near_duplicates) == (1, 0)


def test_check_flags_identical_preference_pairs(tmp_path, tiny_model):
    pairs = [{"prompt": f"Pick {' '.join(WORDS[i:i + 4])}", "chosen": f"yes {WORDS[i]}", "rejected": f"no {WORDS[i]}"}
             for i in range(4)] + [{"prompt": "Pick one", "chosen": "same", "rejected": "same"}]
    raw = base_config(tmp_path, tiny_model, write_jsonl(tmp_path / "pairs.jsonl", pairs), stage="dpo")
    (report,) = check_data(parse_config(raw), tiny_model)
    assert report.records == 5 and dict(report.answer_issues) == {"chosen equals rejected": 1}
    assert len(report.lengths) == 4  # the identical pair is no sample


def test_check_cli_prints_the_report_and_refuses_bad_filters(tmp_path, tiny_model):
    path, _ = planted(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["data", "check", str(write_config(tmp_path, base_config(tmp_path, tiny_model, path)))])
    assert done.exit_code == 0, done.output
    assert all(text in done.output for text in ("[1] planted.jsonl", "1 answer equals its prompt", "1 empty answer",
                                                "(1 lost)", "records lack the alpaca fields (instruction, output "
                                                "(strings)); first at index 13"))
    for override, expected in (("data.filter={min_score: 2, max_score: 1}", "min_score=2.0 is above max_score=1.0"),
                               ("data.filter.dedup=fuzzy", "data.filter.dedup='fuzzy'"),
                               ("data.filter.max_tokens=1000", "data.filter.max_tokens=1000 is above")):
        done = runner.invoke(app, ["data", "check", str(tmp_path / "config.yaml"), "--set", override])
        assert done.exit_code == 2 and expected in done.output and len(done.output.strip().splitlines()) == 1


def loss_of(model, sample) -> float:
    """The training loss function's mean over a sample's learned tokens."""
    from rayft.data.packing import collate, single_row
    from rayft.train.loop import token_losses

    loss_sum, tokens = token_losses(model, collate([single_row(sample)], 0), "fp32")
    return (loss_sum / tokens).item()


def test_score_writes_a_scored_copy_with_the_training_loss(tmp_path, tiny_model, tokenizer, ray_address):
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.data.formats import to_conversations
    from rayft.scoring import score_data

    records = distinct_records(5, seed=2) + [{"instruction": "Summarise " + " ".join(WORDS * 4), "output": "No."}]
    source = write_jsonl(tmp_path / "train.jsonl", [{**r, "id": i} for i, r in enumerate(records)])
    cfg = config(tmp_path, tiny_model, source)
    cfg.distributed.num_workers = 1
    ((_, path, n),) = score_data(cfg, tmp_path / "scored", batch_rows=4)
    assert path == tmp_path / "scored" / "train.scored.jsonl" and n == 6
    scored = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == [{**r, "id": i} for i, r in
                                                                             enumerate(records)]
    assert scored[5]["score"] == {"loss": None, "ifd": None}  # the prompt fills cutoff_len: no answer left

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for record, conversation in zip(scored[:5], to_conversations(records[:5], "alpaca", "t")):
            with_prompt = loss_of(model, tokenize_conversation(tokenizer, conversation.messages, 128, False))
            bare = [m if m["role"] == "assistant" else {**m, "content": ""} for m in conversation.messages]
            without = loss_of(model, tokenize_conversation(tokenizer, bare, 128, False))
            assert record["score"]["loss"] == pytest.approx(with_prompt, rel=1e-4)
            assert record["score"]["ifd"] == pytest.approx(with_prompt / without, rel=1e-4)


def test_dpo_scores_the_chosen_answer(tiny_model, tokenizer):
    from rayft.objectives import get_objective

    pair = ([{"role": "user", "content": "Pick a colour"}], "amber please", "no")
    ((with_prompt, without),) = get_objective("dpo").score_samples(tokenizer, [pair], DataConfig(train="x"))
    learned = [[t for t, label in zip(s.input_ids, s.labels) if label != IGNORE_INDEX] for s in (with_prompt, without)]
    assert learned[0] == learned[1] and "amber please" in tokenizer.decode(learned[0])
    assert len(without.input_ids) < len(with_prompt.input_ids)  # the prompt's words are gone


def kept_markers(tokenizer, prepared) -> list[str]:
    """The marker words in the prepared training rows, each as often as it is there."""
    rows = RowFile(prepared.train_file)
    return sorted(re.findall(r"marker\d+", " ".join(tokenizer.decode(row["input_ids"])
                                                   for row in rows.rows(list(range(len(rows)))))))


def test_filter_drops_by_score_duplicates_and_length_with_counts_in_notes(tmp_path, tiny_model, tokenizer):
    records = distinct_records(10)
    for i, record in enumerate(records):
        record["score"] = {"loss": 1.0, "ifd": 0.1 * i}  # ifd 0.0 .. 0.9
    records += [dict(records[5]),  # exact duplicate of 5
                {**records[6], "output": records[6]["output"] + " indeed"},  # near duplicate of 6
                {**records[7], "output": " ".join(WORDS * 2) + " marker12", "score": {"loss": 1.0, "ifd": 0.7}},
                # longer than max_tokens (the others are 91 to 101 tokens)
                {**records[8], "output": "marker13", "score": {"loss": None, "ifd": None}}]  # nothing was scored
    train = write_jsonl(tmp_path / "train.scored.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", distinct_records(2, seed=3))
    rules = {"min_score": 0.25, "max_score": 0.85, "score": "ifd", "dedup": "near", "max_tokens": 110}
    cfg = config(tmp_path, tiny_model, train, val=str(val), filter=rules).data
    prepared = prepare_data(cfg, tiny_model, tmp_path / "cache", seed=0)
    assert prepared.notes == {"records_outside_the_score_range": 5, "exact_duplicates": 1, "near_duplicates": 1,
                              "samples_over_max_tokens": 1}  # ifd 0.0, 0.1, 0.2, 0.9 and the null score
    assert prepared.train_samples == 6 and prepared.val_rows > 0  # the validation file is not filtered
    assert kept_markers(tokenizer, prepared) == [f"marker{i}" for i in range(3, 9)]  # the duplicates' firsts, once

    # a source taken twice is a repeat, not a duplicate; the filter is part of the cache key
    extra = write_jsonl(tmp_path / "extra.jsonl", distinct_records(3, seed=4))
    twice = DataConfig(train=[{"path": str(train), "weight": 2.0, "val": str(val)},
                              {"path": str(extra), "val": str(val)}], cutoff_len=128, filter={"dedup": "exact"})
    repeated = prepare_data(twice, tiny_model, tmp_path / "cache", seed=0)
    assert repeated.notes == {"exact_duplicates": 2} and repeated.train_samples == 2 * 13 + 3
    assert repeated.cache_dir != prepared.cache_dir


def test_filter_needs_scores_and_names_the_first_record_without_one(tmp_path, tiny_model):
    records = distinct_records(4)
    records[2]["score"] = {"loss": 1.0, "ifd": 0.5}
    train = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = config(tmp_path, tiny_model, train, val_size=0.25, filter={"max_score": 1.0}).data
    with pytest.raises(DataError) as error:
        prepare_data(cfg, tiny_model, tmp_path / "cache", seed=0)
    message = str(error.value)
    assert message.startswith(str(train)) and "records have no score.ifd" in message and "\n" not in message
    first = min(i for i in range(4) if i != 2 and i not in _val_positions(cfg, train))
    assert f"first at index {first}" in message


def _val_positions(cfg, train) -> set[int]:
    from rayft.data.dataset import _val_positions as positions

    return set(positions(4, cfg.val_size, 0, str(train)).tolist())
