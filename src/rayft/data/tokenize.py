"""Chat-template rendering with a loss mask: only assistant tokens (answers and tool calls) are
learned from; prompts and tool results are read, never learned."""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

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
    end-of-turn marker). A conversation of plain text turns takes one render: its shape's
    skeleton (_Skeleton) says where the spans are once the render is checked against it. Any
    other takes the renders of its growing prefixes."""
    skeleton = _Skeleton.of(tokenizer, messages, tools)
    if skeleton is not None:
        full_text = skeleton.render(tokenizer, messages)
        contents = [messages[i]["content"] for i in skeleton.order]
        if skeleton.fill(contents) == full_text:
            return full_text, skeleton.spans(contents)
    else:
        full_text = render(tokenizer, messages, tools)
    return full_text, _spans_by_prefix_renders(tokenizer, messages, tools, full_text)


def _spans_by_prefix_renders(tokenizer, messages: Messages, tools: Optional[list[dict]], full_text: str
                             ) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        turn_text = full_text if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], tools)
        if not (turn_text.startswith(prompt_text) and full_text.startswith(turn_text)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "cannot locate assistant turns for the loss mask")
        spans.append((len(prompt_text), len(turn_text)))
    return spans


_SENTINEL = "\ue000{}\ue001"  # private-use characters: a turn's stand-in content


@dataclass
class _Skeleton:
    """A conversation shape (its sequence of roles, plain text turns, no tools) rendered once with
    a stand-in for each turn's content: the template's own text between the contents, and where
    each assistant span starts and ends relative to them. Filling in a conversation's contents
    gives its render when the template copies contents verbatim, which a real render of the
    conversation confirms (a template that trims or rewrites a content fails the check and takes
    the prefix renders). The spans' prompt renders are the skeleton's: they differ from the
    conversation's only for a template whose prompt text depends on what a turn says.

    The check's render calls the compiled template directly where that renders the shape exactly
    as `apply_chat_template` does (compared on the stand-ins when the skeleton is built):
    transformers' per-call preparation of the messages costs as much as the render itself."""

    pieces: list[str]  # template text before each content, and after the last
    order: list[int]  # the message whose content follows pieces[k]
    bounds: list[tuple[int, int, int, int]]  # per assistant turn: start, contents before it, end, contents before it
    stand_in_lengths: list[int]
    direct: Optional[Callable[[Messages, bool], str]]  # the compiled template, where it renders as apply_chat_template

    # per tokenizer: (template, roles) -> _Skeleton, or None where the shape has none
    _cache: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, tokenizer, messages: Messages, tools) -> Optional["_Skeleton"]:
        if tools or not all(len(m) == 2 and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            return None
        template = tokenizer.chat_template
        if not isinstance(template, str):
            return None
        shapes = cls._cache.setdefault(tokenizer, {})
        key = (template, tuple(m["role"] for m in messages))
        if key not in shapes:
            if len(shapes) > 512:  # shapes of many-turn corpora: bounded
                shapes.clear()
            shapes[key] = cls._build(tokenizer, key[1])
        return shapes[key]

    @classmethod
    def _build(cls, tokenizer, roles: tuple[str, ...]) -> Optional["_Skeleton"]:
        stand_ins = [_SENTINEL.format(i) for i in range(len(roles))]
        messages = [{"role": role, "content": text} for role, text in zip(roles, stand_ins)]
        try:
            full = render(tokenizer, messages)
            places = sorted((full.index(text), i) for i, text in enumerate(stand_ins) if full.count(text) == 1)
            if len(places) != len(stand_ins):
                return None  # a turn rendered twice or not at all
            spans = _spans_by_prefix_renders(tokenizer, messages, None, full)
            direct = _direct_render(tokenizer)
            if direct is not None and direct(messages, False) != full:
                direct = None
        except Exception:  # noqa: BLE001 - the template refuses this shape: the records' own renders say why
            return None
        ends = [at + len(stand_ins[i]) for at, i in places]

        def before(position: int) -> Optional[int]:
            inside = any(at < position < end for (at, _), end in zip(places, ends))
            return None if inside else sum(end <= position for end in ends)

        bounds = []
        for start, end in spans:
            if before(start) is None or before(end) is None:
                return None
            bounds.append((start, before(start), end, before(end)))
        pieces, cursor = [], 0
        for (at, _), end in zip(places, ends):
            pieces.append(full[cursor:at])
            cursor = end
        pieces.append(full[cursor:])
        return cls(pieces, [i for _, i in places], bounds, [len(stand_ins[i]) for _, i in places], direct)

    def render(self, tokenizer, messages: Messages) -> str:
        """A conversation of this shape, rendered whole. (The tokenizer is passed, not kept: the
        cache holds skeletons by a weak reference to it.)"""
        return self.direct(messages, False) if self.direct is not None else render(tokenizer, messages)

    def fill(self, contents: list[str]) -> str:
        parts = [self.pieces[0]]
        for content, piece in zip(contents, self.pieces[1:]):
            parts += (content, piece)
        return "".join(parts)

    def spans(self, contents: list[str]) -> list[tuple[int, int]]:
        shift = [0]
        for content, stand_in in zip(contents, self.stand_in_lengths):
            shift.append(shift[-1] + len(content) - stand_in)
        return [(start + shift[n_start], end + shift[n_end]) for start, n_start, end, n_end in self.bounds]


def _direct_render(tokenizer) -> Optional[Callable[[Messages, bool], str]]:
    """The tokenizer's chat template, compiled by transformers, rendered with the special tokens
    as `apply_chat_template` passes them; None where this transformers has no such function."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    template, tokens = _compile_jinja_template(tokenizer.chat_template), dict(tokenizer.special_tokens_map)
    return lambda messages, add_generation_prompt: template.render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **tokens)


def _token_starts(encoding, positions: list[int], n_chars: int) -> Optional[list[int]]:
    """For each character position, the first token that starts at or after it (a bisection of
    the tokens' starts), asked of the tokenizer's Rust side one position at a time: converting
    every token's offsets to Python costs more. None where a position has no token (a
    normalizer dropped characters): the caller bisects the offsets."""
    n_tokens = len(encoding)
    firsts = []
    for position in positions:
        if position >= n_chars:
            firsts.append(n_tokens)
            continue
        token = encoding.char_to_token(position)
        if token is None:
            return None
        firsts.append(token if encoding.token_to_chars(token)[0] >= position else token + 1)
    return firsts


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
    texts = [text for text, _ in rendered]
    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust side, called directly
    if backend is not None and hasattr(backend, "encode_batch"):
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    else:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encodings = [None] * len(texts)
    samples = []
    for index, ((text, spans), encoding) in enumerate(zip(rendered, encodings)):
        ids = encoding.ids if encoding is not None else encoded["input_ids"][index]
        input_ids = ids[:cutoff_len]
        if train_on_prompt:
            labels = list(input_ids)
        else:
            edges = [edge for span in spans for edge in span]
            firsts = _token_starts(encoding, edges, len(text)) if encoding is not None else None
            if firsts is None:  # tokens start in increasing order: each edge's first token by bisection
                offsets = encoding.offsets if encoding is not None else encoded["offset_mapping"][index]
                starts = [start for start, _ in offsets]
                firsts = [bisect.bisect_left(starts, edge) for edge in edges]
            labels = [IGNORE_INDEX] * len(input_ids)
            for first, end in zip(firsts[::2], firsts[1::2]):
                labels[first:end] = input_ids[first:end]
        # Nothing predicts a sequence's first token; masking it also keeps packed samples from
        # learning to predict their neighbour's start.
        if labels:
            labels[0] = IGNORE_INDEX
        samples.append(TokenizedSample(input_ids, labels))
    return samples
