"""Data as teams have it: several weighted sources, LLaMA-Factory's dataset_info.json, tool-call
conversations, multi-task records and their loss weights; each bad input one line naming it."""

import json
import math
from collections import Counter

import pytest
import torch

from rayft.config import DataConfig
from rayft.data.dataset import NO_TASK, RowFile, mix, prepare_data
from rayft.data.formats import to_conversations
from rayft.data.tokenize import IGNORE_INDEX, tokenize_conversation
from rayft.data.tools import fallback_messages, parse_tool_calls, render
from rayft.errors import ConfigError, DataError


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def qa(prefix: str, n: int, **extra) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}", **extra} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def learned_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


# ---------------------------------------------------------------- mixing
def test_concat_takes_each_source_weight_times():
    a, b = [(f"a{i}", None) for i in range(10)], [(f"b{i}", None) for i in range(10)]
    mixed = list(mix(lambda i: iter([a, b][i]), [10, 10], [0.5, 2.0], "concat", "first_exhausted", seed=0))
    counts = Counter(item[0] for item, _ in mixed)
    assert counts == {"a": 5, "b": 20}
    assert len({item for item, _ in mixed if item.startswith("a")}) == 5  # a seeded half, no repeats
    assert mixed == list(mix(lambda i: iter([a, b][i]), [10, 10], [0.5, 2.0], "concat", "first_exhausted", seed=0))


def test_interleave_draws_by_weight_until_first_exhausted_or_all_seen():
    a, b = [(f"a{i}", None) for i in range(300)], [(f"b{i}", None) for i in range(100)]
    def interleaved(weights, until, seed):
        return list(mix(lambda i: iter([a, b][i]), [300, 100], weights, "interleave", until, seed))

    first = interleaved([3.0, 1.0], "first_exhausted", 1)
    counts = Counter(item[0] for item, _ in first)
    assert min(counts["a"], counts["b"]) < 300 and (counts["a"] == 300 or counts["b"] == 100)
    assert 0.6 < counts["a"] / len(first) < 0.9  # ~3:1
    ordered = [item for item, _ in first if item.startswith("b")]
    assert ordered == [f"b{i}" for i in range(len(ordered))]  # each source in its own order
    seen = interleaved([1.0, 1.0], "all_seen", 1)
    assert {item for item, _ in seen} == {item for item, _ in a + b}  # every record at least once
    assert interleaved([1.0, 1.0], "all_seen", 1) == seen
    assert interleaved([1.0, 1.0], "all_seen", 2) != seen


def test_sources_with_tasks_per_source_validation_and_eval_sets(tmp_path, tiny_model):
    extract = write_jsonl(tmp_path / "extract.jsonl", qa("extract", 30))
    greet = write_jsonl(tmp_path / "greet.jsonl", qa("greet", 12, task="greeting"))
    greet_val = write_jsonl(tmp_path / "greet_val.jsonl", qa("greet-val", 3))
    general = write_jsonl(tmp_path / "general.jsonl", qa("general", 6))
    cfg = DataConfig(train=[{"path": str(extract), "task": "extract", "val_size": 0.2},
                            {"path": str(greet), "weight": 2, "val": str(greet_val), "task": "other"}],
                     eval_sets={"general": str(general)}, cutoff_len=64, task_template="<{task}> {prompt}")
    data = prepare_data(cfg, tiny_model, tmp_path / "cache", seed=0)
    assert data.tasks == ["extract", "greeting", "other"]  # a record's own task wins over its source's
    assert data.sources == [{"name": str(extract), "train": 24, "val": 6}, {"name": str(greet), "train": 12, "val": 3}]
    assert data.train_samples == 24 + 2 * 12
    one = prepare_data(DataConfig(train=[{"path": str(extract), "weight": 1.5}], cutoff_len=64), tiny_model,
                       tmp_path / "cache", seed=0)
    assert one.train_samples == 27 + 14  # one source is taken `weight` times too: 27 train records + half
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for file in (data.train_file, data.val_file):
        rows = RowFile(file)
        for row in rows.table.to_pylist():  # a packed row holds one task's samples, its prompt saying so
            text = tokenizer.decode(row["input_ids"])
            prompts = [part.split("\n", 1)[1] for part in text.split("<|im_start|>user")[1:]]
            assert prompts and all(p.startswith(f"<{data.tasks[row['task']]}> ") for p in prompts), text
        assert set(rows.tasks().tolist()) <= {0, 1, 2}
    val_tasks = {data.tasks[t] for t in RowFile(data.val_file).tasks().tolist()}
    assert val_tasks == {"extract", "other"}  # greet_val's records name no task: their source's
    general_rows = RowFile(data.eval_set_file("general"))
    assert set(general_rows.tasks().tolist()) == {NO_TASK}
    assert "general question" in tokenizer.decode(general_rows.table.to_pylist()[0]["input_ids"])


# ---------------------------------------------------------------- LLaMA-Factory's dataset_info.json
GLAIVE = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"temp_c": 3})},
        {"from": "gpt", "value": "It is 3 degrees in Oslo."}],
    "tools": json.dumps([{"name": "weather", "description": "Current weather",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])}


def lf_directory(tmp_path):
    """A LLaMA-Factory user's data directory: alpaca with renamed columns, the glaive tool-call
    demo in sharegpt, OpenAI-tagged sharegpt and a ranking set."""
    (tmp_path / "lf").mkdir()
    write_jsonl(tmp_path / "lf" / "alpaca_renamed.jsonl",
                [{"q": f"question {i}", "ctx": "", "a": f"answer {i}", "sys": "Be brief."} for i in range(20)])
    (tmp_path / "lf" / "glaive.json").write_text(json.dumps([GLAIVE] * 10))
    write_jsonl(tmp_path / "lf" / "openai.jsonl", [{"messages": [
        {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]} for i in range(10)])
    write_jsonl(tmp_path / "lf" / "ranked.jsonl", [{"conversations": [{"from": "human", "value": f"pick {i}"}],
                                                   "chosen": {"from": "gpt", "value": "good"},
                                                   "rejected": {"from": "gpt", "value": "bad"}} for i in range(10)])
    info = {
        "renamed": {"file_name": "alpaca_renamed.jsonl",
                    "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys"}},
        "glaive_toolcall_en_demo": {"file_name": "glaive.json", "formatting": "sharegpt",
                                    "columns": {"messages": "conversations", "tools": "tools"}},
        "openai_tagged": {"file_name": "openai.jsonl", "formatting": "sharegpt", "num_samples": 15,
                          "columns": {"messages": "messages"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}},
        "ranked": {"file_name": "ranked.jsonl", "formatting": "sharegpt", "ranking": True,
                   "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "hub_only": {"hf_hub_url": "someone/somewhere"},
    }
    (tmp_path / "lf" / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path / "lf" / "dataset_info.json"


def test_a_llama_factory_data_directory_reads_unchanged(tmp_path, tiny_model, tokenizer):
    info = lf_directory(tmp_path)
    cfg = DataConfig(dataset_info=str(info), datasets=["renamed", "glaive_toolcall_en_demo", "openai_tagged"],
                     cutoff_len=256, packing=False)
    data = prepare_data(cfg, tiny_model, tmp_path / "cache", seed=0)
    counts = {s["name"]: s["train"] + s["val"] for s in data.sources}
    assert counts == {"renamed": 20, "glaive_toolcall_en_demo": 10, "openai_tagged": 15}  # num_samples: 15 of 10
    texts = [tokenizer.decode(row["input_ids"]) for file in (data.train_file, data.val_file)
             for row in RowFile(file).table.to_pylist()]
    assert any("Be brief." in t and "question" in t and "answer" in t for t in texts)
    assert any("<tool_call>" in t and '"city": "Oslo"' in t and "<tools>" in t for t in texts)
    assert any("<|im_start|>user\nhi " in t for t in texts)
    ranked = DataConfig(dataset_info=str(info), datasets=["ranked"], cutoff_len=64)
    assert prepare_data(ranked, tiny_model, tmp_path / "cache", seed=0, stage="dpo").train_rows > 0
    with pytest.raises(DataError, match="ranked.*stage sft cannot train on these records.*set stage: dpo"):
        prepare_data(ranked, tiny_model, tmp_path / "cache", seed=0)


# ---------------------------------------------------------------- tool calls
def test_tool_calls_are_learned_and_observations_are_not(tokenizer):
    (conversation,) = to_conversations([GLAIVE], "sharegpt", "glaive")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    sample = tokenize_conversation(tokenizer, conversation.messages, 512, False, conversation.tools)
    learned = learned_text(tokenizer, sample)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in learned
    assert "It is 3 degrees in Oslo." in learned
    assert "temp_c" not in learned and "weather in Oslo?" not in learned and "<tools>" not in learned
    assert "temp_c" in tokenizer.decode(sample.input_ids)  # read, not learned
    openai = {"messages": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp_c": 3})},
        {"role": "assistant", "content": "It is 3 degrees in Oslo."}], "tools": json.loads(GLAIVE["tools"])}
    (same,) = to_conversations([openai], "auto", "openai")
    assert same == conversation  # both forms, one conversation


def test_a_template_with_tool_support_renders_tools_itself(tokenizer):
    native = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
              "{% for m in messages %}<{{ m.role }}>{% if m.tool_calls %}{% for c in m.tool_calls %}"
              "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}"
              "{% endif %}</{{ m.role }}>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
              "{# tool_calls #}")
    original = tokenizer.chat_template
    tokenizer.chat_template = native
    try:
        (conversation,) = to_conversations([GLAIVE], "sharegpt", "glaive")
        text = render(tokenizer, conversation.messages, conversation.tools)
        assert text.startswith("TOOLS:weather;") and 'CALL weather {"city": "Oslo"}' in text
        assert "<tool>" in text and "<tool_call>" not in text  # the template's form, not the fallback
        learned = learned_text(tokenizer, tokenize_conversation(tokenizer, conversation.messages, 512, False,
                                                                conversation.tools))
        assert 'CALL weather {"city": "Oslo"}' in learned and "temp_c" not in learned
    finally:
        tokenizer.chat_template = original


def test_fallback_and_parse_round_trip():
    (conversation,) = to_conversations([GLAIVE], "sharegpt", "glaive")
    plain = fallback_messages(conversation.messages, conversation.tools)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user", "assistant"]
    content, calls = parse_tool_calls(plain[2]["content"])
    assert content == "" and calls[0]["function"]["name"] == "weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert parse_tool_calls("no call here") == ("no call here", [])
    assert parse_tool_calls('{"name": "Alice", "age": 30}') == ('{"name": "Alice", "age": 30}', [])  # an answer
    assert parse_tool_calls('{"name": "weather", "arguments": {"city": "Oslo"}}')[1][0]["function"]["name"] == "weather"
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])


# ---------------------------------------------------------------- multi-task loss weights
@pytest.mark.parametrize("fused", [True, False])
def test_task_weights_weight_each_rows_token_losses(tokenizer, tiny_model, fused):
    from transformers import AutoModelForCausalLM

    from rayft.data.packing import collate, single_row
    from rayft.train.loop import token_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rows = [single_row(tokenize_conversation(tokenizer, [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}], 64, False))
            for q, a in (("Name a colour.", "Blue"), ("Count to three", "1 2 3"))]
    batch = collate(rows, 2)
    grads = []
    for weights in (None, torch.tensor([0.25, 3.0])):
        model.zero_grad()
        if weights is not None:
            batch["row_weight"] = weights
        loss, count = token_losses(model, batch, "fp32", fused_head=fused)
        loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
        if weights is None:
            per_row = []
            for row in rows:
                solo, _ = token_losses(model, collate([row], 2), "fp32", fused_head=fused)
                per_row.append(solo.item())
    assert loss.item() == pytest.approx(0.25 * per_row[0] + 3.0 * per_row[1], rel=1e-5)
    assert count.item() == sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in rows)
    assert not torch.allclose(grads[0], grads[1])


def test_dynamic_weight_average_follows_each_tasks_loss_ratio():
    """DWA (Liu et al. 2019): w_k = K exp(r_k/T) / sum exp(r_i/T), r_k = L_k(t-1)/L_k(t-2), times
    the static weight; 1 until two evaluations exist and for a task without validation rows."""
    from rayft.train.task_weights import remember_evaluation, task_loss_weights

    tasks = ["extract", "greet", "sum"]
    assert task_loss_weights(tasks, {}, "static", 2.0, []) is None  # no weighting: the plain path
    assert task_loss_weights(tasks, {"greet": 2.0}, "static", 2.0, []) == [1.0, 2.0, 1.0]
    evaluations = remember_evaluation([], {"extract": 4.0, "greet": 2.0, "sum": 3.0})
    assert task_loss_weights(tasks, {"greet": 2.0}, "dwa", 2.0, evaluations) == [1.0, 2.0, 1.0]  # one only
    evaluations = remember_evaluation(evaluations, {"extract": 1.0, "greet": 1.8, "sum": 3.0})
    evaluations = remember_evaluation(evaluations, {"extract": 0.5, "greet": 1.8})  # sum: no validation rows
    assert len(evaluations) == 2
    ratios = [0.5, 1.0, 1.0]
    for temperature in (2.0, 0.5):
        exps = [math.exp(r / temperature) for r in ratios]
        expected = [3 * e / sum(exps) for e in exps]
        weights = task_loss_weights(tasks, {"greet": 2.0}, "dwa", temperature, evaluations)
        assert weights == pytest.approx([expected[0], 2.0 * expected[1], expected[2]], rel=1e-12)
        assert weights[0] < expected[1]  # extract's loss halved: it gets less weight than the stalled tasks
    # equal rates give every task weight 1 (times the static one)
    same = [{"extract": 2.0, "greet": 1.0}, {"extract": 1.0, "greet": 0.5}]
    assert task_loss_weights(["extract", "greet"], {}, "dwa", 2.0, same) == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------- bad input: one line naming it
@pytest.mark.parametrize("data, match", [
    ({"train": [{"path": "a.jsonl", "weight": -1}, {"path": "b.jsonl"}]}, r"data.train.0.weight.*greater than or equal to 0"),
    ({"train": [{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl", "weight": 0}]}, "every source has weight 0"),
    ({"train": [{"path": "a.jsonl"}], "mix": "interleave"}, "interleave needs at least two sources"),
    ({"train": "a.jsonl", "mix": "interleave"}, "interleave needs at least two sources"),
    ({"train": "a.jsonl", "task_weights": {"x": -2}}, "weights must be >= 0"),
    ({"train": "a.jsonl", "task_template": "{task}"}, "must contain {prompt}"),
    ({"datasets": ["x"]}, "set data.dataset_info"),
])
def test_bad_mixture_configs_are_one_line(data, match):
    from rayft.config import parse_config

    with pytest.raises(ConfigError, match=match) as error:
        parse_config({"name": "t", "output_dir": "o", "data": data})
    assert "\n" not in str(error.value)


def test_bad_data_is_one_line_naming_source_and_record(tmp_path, tiny_model):
    info = lf_directory(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", qa("good", 10))

    def fails(match, **data):
        with pytest.raises(DataError, match=match) as error:
            prepare_data(DataConfig(cutoff_len=64, **data), tiny_model, tmp_path / "cache", seed=0)
        assert "\n" not in str(error.value)

    fails(r"data.datasets: 'nope' is not in .*dataset_info.json; it has: glaive_toolcall_en_demo, hub_only, "
          r"openai_tagged, ranked, renamed", dataset_info=str(info), datasets=["nope"])
    fails("dataset 'hub_only': hf_hub_url names a remote dataset", dataset_info=str(info), datasets=["hub_only"])
    fails(r"columns.instruction names field 'question', which no record has \(fields: instruction, output\)",
          train=[{"path": str(good), "columns": {"instruction": "question"}}, {"path": str(good)}])
    roles = write_jsonl(tmp_path / "roles.jsonl", [GLAIVE, {"conversations": [
        {"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}])
    fails(r"roles.jsonl: 1 records have a turn whose from is not one of the tags .*first at index 1 \(from 'robot'\)",
          train=[{"path": str(roles), "tags": {"user_tag": "human"}}, {"path": str(good)}])
    fails(r"roles.jsonl: 1 records have a turn whose role is not one of .*first at index 1 \(role 'robot'\)",
          train=str(roles))
    bad_args = dict(GLAIVE, conversations=[GLAIVE["conversations"][0],
                                           {"from": "function_call", "value": '{"name": "weather", "arguments": "{oops"}'},
                                           *GLAIVE["conversations"][2:]])
    args = write_jsonl(tmp_path / "args.jsonl", [GLAIVE, bad_args, GLAIVE, bad_args])
    fails(r"args.jsonl: 2 records have a tool call whose arguments are not a JSON object; first at index 1",
          train=str(args))
    first = write_jsonl(tmp_path / "first.jsonl", [dict(GLAIVE, conversations=GLAIVE["conversations"][2:]), GLAIVE, GLAIVE])
    fails(r"first.jsonl: 1 records start with an observation .*first at index 0", train=str(first))
    fails(r"data.eval_sets.general: file not found: .*missing.jsonl", train=str(good),
          eval_sets={"general": str(tmp_path / "missing.jsonl")})
    fails(r"data.task_weights: no record has task 'mathh' \(tasks: extract\)",
          train=[{"path": str(good), "task": "extract"}, {"path": str(good)}], task_weights={"mathh": 2.0})
    fails(r"data.train.1.path: file not found", train=[{"path": str(good)}, {"path": str(tmp_path / "gone.jsonl")}])
    fails(r"data.task_weighting=dwa weights tasks against each other: the records have 1 task \(extract\)",
          train=[{"path": str(good), "task": "extract"}, {"path": str(good)}], task_weighting="dwa")


def test_worker_processes_write_the_same_rows_as_one_process(tmp_path, tiny_model, monkeypatch):
    """A large corpus is tokenized in worker processes, chunk by chunk: the rows are those of the
    one-process path, in the same order."""
    import rayft.data.dataset as dataset

    path = write_jsonl(tmp_path / "d.jsonl", qa("q", 300) + [dict(r, task="other") for r in qa("t", 100)])
    cfg = DataConfig(train=str(path), cutoff_len=64)
    monkeypatch.setattr(dataset, "CHUNK_RECORDS", 64)
    alone = prepare_data(cfg, tiny_model, tmp_path / "one", seed=0)
    monkeypatch.setattr(dataset, "POOL_MIN_RECORDS", 0)
    monkeypatch.setattr(dataset.os, "cpu_count", lambda: 2)
    pooled = prepare_data(cfg, tiny_model, tmp_path / "pool", seed=0)
    assert (pooled.train_rows, pooled.train_samples, pooled.tasks) == (alone.train_rows, alone.train_samples, alone.tasks)
    for split in ("train_file", "val_file"):
        assert RowFile(getattr(pooled, split)).table.equals(RowFile(getattr(alone, split)).table)
