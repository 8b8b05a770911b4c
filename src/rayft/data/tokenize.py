"""Chat-template rendering with a loss mask: only assistant tokens (answers and tool calls) are
learned from; prompts and tool results are read, never learned."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

from rayft.data.formats import Messages
from rayft.data.tools import render
from rayft.errors import DataError

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def assistant_char_spans(tokenizer, messages: Messages, tools: Optional[list[dict]] = None
                         ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with its
    end-of-turn marker), found by rendering growing prefixes of the conversation."""
    def _render(part: Messages, add_generation_prompt: bool = False) -> str:
        return render(tokenizer, part, tools, add_generation_prompt)

    full_text = _render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(messages[:i], add_generation_prompt=True)
        turn_text = full_text if i == len(messages) - 1 else _render(messages[: i + 1])  # the last turn: no re-render
        if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "cannot locate assistant turns for the loss mask")
        spans.append((len(prompt_text), len(turn_text)))
    return full_text, spans


def _encode(texts: list[str], tokenizer) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, character offsets) of each text, no special tokens added. A fast tokenizer's
    Rust side is called directly: transformers' conversion of its output to Python dicts costs
    as much as the tokenizing."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoded["input_ids"], encoded["offset_mapping"]))


def tokenize_conversation(tokenizer, messages: Messages, cutoff_len: int, train_on_prompt: bool,
                          tools: Optional[list[dict]] = None) -> TokenizedSample:
    return tokenize_conversations(tokenizer, [(messages, tools)], cutoff_len, train_on_prompt)[0]


def tokenize_conversations(tokenizer, conversations: list[tuple[Messages, Optional[list[dict]]]], cutoff_len: int,
                           train_on_prompt: bool) -> list[TokenizedSample]:
    """(messages, tools) pairs as samples. The texts go to the tokenizer in one call (its Rust
    side batches them: a call per text costs more in Python overhead than in tokenizing)."""
    rendered = [assistant_char_spans(tokenizer, messages, tools) for messages, tools in conversations]
    if not rendered:
        return []
    samples = []
    for (_, spans), (ids, offsets) in zip(rendered, _encode([text for text, _ in rendered], tokenizer)):
        input_ids = list(ids[:cutoff_len])
        if train_on_prompt:
            labels = list(input_ids)
        else:
            # tokens start in increasing order: each span's tokens are one slice, found by bisection
            starts = [start for start, _ in offsets[:cutoff_len]]
            labels = [IGNORE_INDEX] * len(input_ids)
            for lo, hi in spans:
                first, end = bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)
                labels[first:end] = input_ids[first:end]
        # Nothing predicts a sequence's first token; masking it also keeps packed samples from
        # learning to predict their neighbour's start.
        if labels:
            labels[0] = IGNORE_INDEX
        samples.append(TokenizedSample(input_ids, labels))
    return samples
