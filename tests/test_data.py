import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rayft.config import DataConfig
from rayft.data.dataset import RowFile, prepare_data, shard_indices
from rayft.data.formats import read_records, to_messages
from rayft.data.packing import collate, pack, single_row
from rayft.data.tokenize import IGNORE_INDEX, tokenize_conversation
from rayft.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_three_formats_normalise_to_the_same_messages():
    alpaca = {"system": "Be brief.", "history": [["Hi", "Hello"]], "instruction": "Add", "input": "2+2", "output": "4"}
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Add\n\n2+2"}, {"from": "gpt", "value": "4"}]}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Add\n\n2+2"},
                             {"role": "assistant", "content": "4"}]}
    converted = [to_messages([record], "auto", "f")[0] for record in (alpaca, sharegpt, messages)]
    assert converted[0] == converted[1] == converted[2] == messages["messages"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        read_records(path)


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_a_json_array_streams_element_by_element(tmp_path, monkeypatch, block):
    """A JSON array file is decoded an element at a time from a window of `block` characters: the
    values equal json.loads' (numbers, escapes and multi-byte characters cut at any block edge),
    the elements before a malformed one come out before its error, and errors name the line."""
    import random

    from rayft.data import formats
    from rayft.data.formats import iter_records

    monkeypatch.setattr(formats, "_BLOCK", block)
    rng = random.Random(block)

    def value(depth=0):
        kind = rng.randint(0, 5 if depth < 2 else 3)
        return [lambda: rng.randint(-10**6, 10**6), lambda: rng.random() * 1e3 * rng.choice([1, 1e-9, 1e12]),
                lambda: "".join(rng.choice('ab é日\n"\\{}[],') for _ in range(rng.randint(0, 20))),
                lambda: rng.choice([True, False, None]), lambda: [value(depth + 1) for _ in range(rng.randint(0, 3))],
                lambda: {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}][kind]()

    for trial in range(15):
        values = [value() for _ in range(rng.randint(0, 8))]
        path = tmp_path / f"{trial}.json"
        path.write_text(" \n" + json.dumps(values, indent=trial % 3 or None, ensure_ascii=trial % 2 == 0) + "\n")
        assert list(iter_records(path)) == values

    path = tmp_path / "tail.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}\n {"x": 1}]')
    read = iter_records(path)
    assert next(read) == {"instruction": "a", "output": "b"} and next(read)["output"] == "d"
    with pytest.raises(DataError, match=r"tail.json:3: malformed JSON \(Expecting ',' delimiter\)"):
        next(read)
    for text, line in [('[1, 2,]', 1), ('[\n1, 2', 2), ('[1]\n x', 2), ('[\n\n{"a": tru}]', 3)]:
        path.write_text(text)
        with pytest.raises(DataError, match=rf"tail.json:{line}: malformed JSON"):
            list(iter_records(path))
    path.write_bytes(b'[{"a": "x"},\n{"a": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"tail.json:2: not UTF-8 text \(byte 0xe9 at offset 23\)"):
        list(iter_records(path))


def test_missing_fields_are_counted_with_first_index():
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "c", "output": 3}]
    with pytest.raises(DataError, match=r"2 records lack the alpaca fields .* first at index 1"):
        to_messages(records, "alpaca", "d.jsonl")


def test_only_assistant_tokens_are_learned(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]
    sample = tokenize_conversation(tokenizer, messages, cutoff_len=512, train_on_prompt=False)
    learned = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Four.<|im_end|>\n"
    everything = tokenize_conversation(tokenizer, messages, cutoff_len=512, train_on_prompt=True)
    assert sum(label != IGNORE_INDEX for label in everything.labels) == len(everything.input_ids) - 1


@pytest.mark.parametrize("template", ["own", "trims contents"])
def test_one_render_per_conversation_masks_as_the_prefix_renders_do(tokenizer, monkeypatch, template):
    """A conversation of plain turns is rendered once and its spans come from its shape's
    skeleton; the samples equal those of rendering every prefix, for system prompts, several
    turns, contents with edge whitespace, template markers and the skeleton's own stand-in
    characters, at a cutoff inside them. A template that trims contents fails the skeleton's
    check on such contents and takes the prefix renders."""
    import copy
    import random

    from rayft.data import tokenize

    tokenizer = copy.deepcopy(tokenizer)
    if template != "own":
        tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                   "{% endif %}")
    rng = random.Random(0)
    pieces = ["hello", " world", "\n", "  ", "é", "日本", "<|im_end|>", "\ue000", "\ue0011\ue001", "a", ""]

    def text():
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))

    conversations = []
    for _ in range(150):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        conversations.append((messages, None))
    renders = []
    real_render = tokenize.render
    monkeypatch.setattr(tokenize, "render", lambda *args, **kwargs: renders.append(1) or real_render(*args, **kwargs))
    one_render = tokenize.tokenize_conversations(tokenizer, conversations, 24, False)
    calls = len(renders)
    monkeypatch.setattr(tokenize._Skeleton, "of", classmethod(lambda cls, *args: None))
    by_prefixes = tokenize.tokenize_conversations(tokenizer, conversations, 24, False)
    assert [(list(s.input_ids), list(s.labels)) for s in one_render] == \
        [(list(s.input_ids), list(s.labels)) for s in by_prefixes]
    if template == "own":  # one render each, plus the shapes' skeletons (a few renders per shape)
        assert calls < len(conversations) + 60
    else:
        assert calls > len(conversations) + 100  # the contents with edge whitespace took the prefix renders


def test_truncation_and_empty_after_truncation(tmp_path, tokenizer, tiny_model):
    messages = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    sample = tokenize_conversation(tokenizer, messages, cutoff_len=32, train_on_prompt=False)
    assert len(sample.input_ids) == 32 and all(label == IGNORE_INDEX for label in sample.labels)
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 100, "output": "ok"}] * 10)
    with pytest.raises(DataError, match="no training sample keeps an assistant token after truncation"):
        prepare_data(DataConfig(train=str(path), cutoff_len=32), tiny_model, tmp_path / "cache", seed=1)


def test_packing_keeps_every_sample_once_intact_with_its_own_positions(tokenizer):
    samples = [tokenize_conversation(tokenizer, [{"role": "user", "content": f"q{i}" * (i + 1)},
                                                 {"role": "assistant", "content": "a" * (i % 3 + 1)}], 256, False)
               for i in range(12)]
    rows = list(pack(samples, max_len=256))
    assert len(rows) < len(samples)
    found = []
    for row in rows:
        assert len(row["input_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):  # each sample: positions 0..n-1, its tokens and labels as made
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            found.append((tuple(row["input_ids"][start:end]), tuple(row["labels"][start:end])))
    assert sorted(found) == sorted((tuple(s.input_ids), tuple(s.labels)) for s in samples)  # each exactly once


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
def test_packed_batch_gives_the_same_per_sample_loss_as_solo(tokenizer, tiny_model, attention):
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayft.models.loading import attention_implementation

    implementation = attention_implementation(attention, AutoConfig.from_pretrained(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=implementation).eval()
    samples = [tokenize_conversation(tokenizer, [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": answer}], 256, False)
               for text, answer in [("Name a colour.", "Blue"), ("Count to three please", "1 2 3"), ("Hi", "Hello there")]]

    def per_token_losses(batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="none")

    with torch.no_grad():
        solo = [per_token_losses(collate([single_row(s)], 2)) for s in samples]
        solo_sums = [loss.sum().item() for loss in solo]
        packed_rows = list(pack(samples, max_len=256))
        assert len(packed_rows) == 1
        packed = per_token_losses(collate(packed_rows, 2))
    # the packed row holds the samples longest-first; match each sample's losses by its span
    order = sorted(range(3), key=lambda i: len(samples[i].input_ids), reverse=True)
    at = 0
    for i in order:
        n = len(samples[i].input_ids)
        span = packed[at:at + n - 1].sum().item()
        assert span == pytest.approx(solo_sums[i], rel=1e-5, abs=1e-5)
        at += n


def test_padding_does_not_change_losses(tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    short = tokenize_conversation(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], 256, False)
    long = tokenize_conversation(tokenizer, [{"role": "user", "content": "Hello " * 20}, {"role": "assistant", "content": "Yo"}], 256, False)
    with torch.no_grad():
        alone = collate([single_row(short)], 2)
        padded = collate([single_row(short), single_row(long)], 2)
        a = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).logits[0]
        b = model(input_ids=padded["input_ids"], position_ids=padded["position_ids"]).logits[0, :a.shape[0]]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tokenized_once_and_cached(tmp_path, tiny_model, alpaca_file, monkeypatch):
    import rayft.data.dataset as dataset

    cfg = DataConfig(train=str(alpaca_file), cutoff_len=128)
    first = prepare_data(cfg, tiny_model, tmp_path / "cache", seed=3)
    written = (tmp_path / "cache" / Path(first.cache_dir).name / "train.arrow").stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(dataset, "_write_rows", no_tokenizing)
    second = prepare_data(cfg, tiny_model, tmp_path / "cache", seed=3)
    assert second == first and len(list((tmp_path / "cache").iterdir())) == 1
    assert Path(second.train_file).stat().st_mtime_ns == written
    monkeypatch.undo()
    changed = prepare_data(DataConfig(train=str(alpaca_file), cutoff_len=96), tiny_model, tmp_path / "cache", seed=3)
    assert changed.cache_dir != first.cache_dir


def test_seeded_split_is_reproducible_and_disjoint(tmp_path, tiny_model):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(train=str(path), cutoff_len=64, packing=False, val_size=0.2)
    a = prepare_data(cfg, tiny_model, tmp_path / "c1", seed=7)
    b = prepare_data(cfg, tiny_model, tmp_path / "c2", seed=7)
    assert (a.train_rows, a.val_rows) == (40, 10)
    rows_a = RowFile(a.val_file).table.to_pylist()
    assert rows_a == RowFile(b.val_file).table.to_pylist()
    train_ids = {tuple(r["input_ids"]) for r in RowFile(a.train_file).table.to_pylist()}
    assert not train_ids & {tuple(r["input_ids"]) for r in rows_a}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_worker_shards_are_disjoint_and_cover_the_data(world):
    n = 103
    for epoch in range(2):
        shards = [shard_indices(n, rank, world, epoch, seed=5, shuffle=True) for rank in range(world)]
        joined = np.concatenate(shards)
        assert len(set(joined.tolist())) == len(joined)  # disjoint
        assert len(joined) == n - n % world  # all but the remainder that keeps ranks in step
        assert len({len(s) for s in shards}) == 1
    assert not np.array_equal(shard_indices(n, 0, world, 0, 5, True), shard_indices(n, 0, world, 1, 5, True))


def test_loss_step_matches_full_logits(tokenizer, tiny_model):
    """token_losses runs the output head only on learned positions; the loss must not change."""
    from transformers import AutoModelForCausalLM

    from rayft.train.loop import token_losses

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    samples = [tokenize_conversation(tokenizer, [{"role": "user", "content": "Say hi " * (i + 1)},
                                                 {"role": "assistant", "content": "hi " * (i + 2)}], 256, False)
               for i in range(5)]
    batch = collate(list(pack(samples, 128)), 2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
        loss, count = token_losses(model, batch, "fp32")
    assert count.item() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)  # fp32 sums in another order
    # the hook is gone afterwards: a plain forward returns logits for every position again
    assert model(input_ids=batch["input_ids"]).logits.shape[1] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_chunked_head_loss_matches_the_plain_loss_and_gradients(monkeypatch, autocast, bias):
    """The fused head + loss over chunks (7 rows each here, the last one partial) gives the plain
    step's loss and gradients: exactly up to summation order in fp32, to bf16's rounding under
    autocast (both round the logits and their gradient to bf16, at different points)."""
    from rayft.train import head_loss

    vocab, rows = 997, 61
    monkeypatch.setitem(head_loss._CHUNK_ELEMENTS, "cpu", 7 * vocab)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=bias)
    hidden = torch.randn(rows, 32)
    targets = torch.randint(0, vocab, (rows,))

    def loss_and_grads(fused: bool):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = head_loss.linear_cross_entropy(h, head, targets)
            else:
                loss = torch.nn.functional.cross_entropy(head(h).float(), targets, reduction="sum")
        (loss / 37).backward()
        return [loss.detach(), h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    plain, fused = loss_and_grads(False), loss_and_grads(True)
    tolerance = 1e-2 if autocast else 1e-5
    for a, b in zip(plain, fused):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max() <= tolerance * a.abs().max()
    # evaluation: the loss alone, none of the gradients the head's trainable weight would ask for
    monkeypatch.setattr(head_loss.LinearCrossEntropy, "apply", None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert head_loss.linear_cross_entropy(hidden, head, targets).item() == pytest.approx(plain[0].item(), rel=1e-6)
    monkeypatch.undo()
    empty = head_loss.linear_cross_entropy(hidden[:0].requires_grad_(), head, targets[:0])
    assert empty.item() == 0.0


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_chunked_head_token_losses_match_the_plain_ones_under_any_incoming_gradient(monkeypatch, autocast):
    """The fused head's per-token losses (what DPO's per-sequence sums are made of) and their
    gradients for a per-token incoming gradient (a pair's losses weigh its tokens differently)
    equal the plain logits' cross-entropy, the bias and the head's weight included."""
    from rayft.train import head_loss

    vocab, rows = 997, 61
    monkeypatch.setitem(head_loss._CHUNK_ELEMENTS, "cpu", 7 * vocab)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=True)
    hidden, targets, incoming = torch.randn(rows, 32), torch.randint(0, vocab, (rows,)), torch.randn(rows)

    def losses_and_grads(fused: bool):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                losses = head_loss.linear_token_losses(h, head, targets)
            else:
                losses = torch.nn.functional.cross_entropy(head(h).float(), targets, reduction="none")
        (losses * incoming).sum().backward()
        return [losses.detach(), h.grad, head.weight.grad, head.bias.grad]

    plain, fused = losses_and_grads(False), losses_and_grads(True)
    tolerance = 1e-2 if autocast else 1e-5
    for a, b in zip(plain, fused):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max() <= tolerance * a.abs().max()
    with torch.no_grad():
        assert torch.allclose(head_loss.linear_token_losses(hidden, head, targets), plain[0], rtol=1e-2 if autocast else 1e-5)


def test_loss_step_gradients_equal_with_and_without_the_fused_head(monkeypatch, tokenizer, tiny_model):
    """token_losses through the fused head and through logits + cross-entropy give the same
    gradient for every weight, the tied embedding/head included (fp32, full model)."""
    from transformers import AutoModelForCausalLM

    from rayft.train import loop

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    samples = [tokenize_conversation(tokenizer, [{"role": "user", "content": "Name a city " * (i + 1)},
                                                 {"role": "assistant", "content": "Oslo " * (i + 2)}], 256, False)
               for i in range(4)]
    batch = collate(list(pack(samples, 96)), 2)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(loop, "fused_head_loss_applies", lambda *args: False)
        model.zero_grad()
        loss, count = loop.token_losses(model, batch, "fp32")
        (loss / count).backward()
        results.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
