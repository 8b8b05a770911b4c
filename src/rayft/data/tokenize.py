"""Chat-template rendering with a loss mask: only assistant tokens (answers and tool calls) are
learned from; prompts and tool results are read, never learned."""

from __future__ import annotations

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
        turn_text = _render(messages[: i + 1])
        if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "cannot locate assistant turns for the loss mask")
        spans.append((len(prompt_text), len(turn_text)))
    return full_text, spans


def tokenize_conversation(tokenizer, messages: Messages, cutoff_len: int, train_on_prompt: bool,
                          tools: Optional[list[dict]] = None) -> TokenizedSample:
    text, spans = assistant_char_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:cutoff_len]
    labels = []
    for token_id, (start, _end) in zip(input_ids, encoded["offset_mapping"]):
        learned = train_on_prompt or any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if learned else IGNORE_INDEX)
    # Nothing predicts a sequence's first token; masking it also keeps packed samples from
    # learning to predict their neighbour's start.
    if labels:
        labels[0] = IGNORE_INDEX
    return TokenizedSample(input_ids, labels)
