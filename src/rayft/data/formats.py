"""Read records (JSON array or JSONL) and normalise alpaca / sharegpt / messages to conversations.

A conversation is chat messages in OpenAI's shape, and the tools the record offers:
  {"role": "system" | "user" | "assistant", "content": str}
  {"role": "assistant", "content": str, "tool_calls": [{"type": "function", "function": {"name", "arguments": dict}}]}
  {"role": "tool", "content": str}  (a tool's result: read, never learned)
sharegpt's `function_call` turns become assistant tool calls and its `observation` turns tool
results (LLaMA-Factory's glaive_toolcall form); messages records may carry `tool_calls` and the
`tool` role directly. data/tools.py renders them.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rayft.errors import DataError

Messages = list[dict[str, Any]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    messages: Messages
    tools: Optional[list[dict]] = None  # function schemas, [{"type": "function", "function": {...}}]


class BadRecord(Exception):
    """Why one record cannot be read; to_conversations counts them per reason."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


SKIPPED = object()  # a record iter_records was asked not to decode


def iter_records(path: str | Path, skip: Optional[Callable[[int], bool]] = None) -> Iterator[Any]:
    """The file's JSON values in order, streamed: JSONL line by line, a JSON array an element at a
    time. A JSONL record whose position `skip` names is not decoded: SKIPPED stands in for it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _array_values(path)
        return
    offset, position = 0, -1
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, line_number, raw[exc.start], offset + exc.start) from None
            offset += len(raw)
            if not line.strip():
                continue
            position += 1
            if skip is not None and skip(position):
                yield SKIPPED
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: malformed JSON ({exc.msg})") from None


def _not_utf8(path: Path, line: int, byte: int, offset: int) -> DataError:
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at offset {offset}); save the file as UTF-8")


_BLOCK = 1 << 20
_SPACE = " \t\n\r"


def _array_values(path: Path) -> Iterator[Any]:
    """The elements of a file that holds one JSON array, decoded one by one from a window of the
    file (a corpus in one array needs no more memory than one of its records and a block)."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    window = _Window()
    with open(path, "rb") as handle:
        def more() -> bool:
            """Read the next block into the window; False at the end of the file."""
            if window.eof:
                return False
            block = handle.read(_BLOCK)
            try:
                window.add(utf8.decode(block, final=not block), not block)
            except UnicodeDecodeError as exc:  # exc.object: the decoder's pending bytes, then this block
                at = window.bytes_read - (len(exc.object) - len(block)) + exc.start
                line = window.byte_lines + exc.object[:exc.start].count(b"\n") + 1
                raise _not_utf8(path, line, exc.object[exc.start], at) from None
            window.bytes_read += len(block)
            window.byte_lines += block.count(b"\n")
            return True

        def skip_space() -> Optional[str]:
            """The next character that is not white space (None at the end of the file)."""
            while True:
                while window.at < len(window.text) and window.text[window.at] in _SPACE:
                    window.at += 1
                if window.at < len(window.text):
                    return window.text[window.at]
                if not more():
                    return None

        def malformed(message: str) -> DataError:
            line = window.lines_before + window.text.count("\n", 0, window.at) + 1
            return DataError(f"{path}:{line}: malformed JSON ({message})")

        skip_space()
        window.at += 1  # the "[" that iter_records saw
        first = True
        while True:
            char = skip_space()
            if char == "]":
                window.at += 1
                if skip_space() is not None:
                    raise malformed("Extra data")
                return
            if not first:
                if char != ",":
                    raise malformed("Expecting ',' delimiter" if char else "Expecting ']'")
                window.at += 1
                skip_space()
            while True:  # an element: decoded once the window holds all of it
                try:
                    value, end = decoder.raw_decode(window.text, window.at)
                    after = end
                    while after < len(window.text) and window.text[after] in _SPACE:
                        after += 1
                    # whole once "," or "]" follows: a number at the window's edge ("12", "1.", "1e")
                    # may go on in the next block
                    if window.eof or (after < len(window.text) and window.text[after] in ",]"):
                        break
                except json.JSONDecodeError as exc:
                    if window.eof:
                        window.at = exc.pos
                        raise malformed(exc.msg) from None
                more()
            window.at, first = end, False
            window.forget()
            yield value


@dataclass
class _Window:
    """The decoded text of a file not yet consumed, and where it lies in the file."""

    text: str = ""
    at: int = 0  # the next character to read in text
    lines_before: int = 0  # line breaks in the text already dropped
    bytes_read: int = 0
    byte_lines: int = 0  # line breaks in the bytes read
    eof: bool = False

    def add(self, text: str, eof: bool) -> None:
        self.text, self.eof = self.text + text, eof

    def forget(self) -> None:
        """Drop the consumed text once it is a block's worth (not per element: each drop copies the rest)."""
        if self.at >= _BLOCK:
            self.lines_before += self.text.count("\n", 0, self.at)
            self.text, self.at = self.text[self.at:], 0


def read_records(path: str | Path) -> list[dict[str, Any]]:
    records = list(iter_records(path))
    bad = [i for i, record in enumerate(records) if not isinstance(record, dict)]
    if bad:
        raise DataError(f"{path}: {len(bad)} records are not JSON objects (first at index {bad[0]})")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _json_value(value: Any, reason: str) -> Any:
    """A value that may be given as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise BadRecord(reason) from None
    return value


def _tool_call(call: Any) -> dict:
    """One call as {"type": "function", "function": {"name", "arguments": dict}}, from OpenAI's
    form or the bare {"name", "arguments"} of sharegpt function_call turns."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not (isinstance(function, dict) and _text(function.get("name"))):
        raise BadRecord("tool_call")
    arguments = _json_value(function.get("arguments", {}), "tool_arguments")
    if not isinstance(arguments, dict):
        raise BadRecord("tool_arguments")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(record: dict) -> Optional[list[dict]]:
    if record.get("tools") in (None, "", []):
        return None
    tools = _json_value(record["tools"], "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BadRecord("tools")
    wrapped = [t if t.get("type") == "function" and isinstance(t.get("function"), dict) else
               {"type": "function", "function": t} for t in tools]
    if not all(_text(t["function"].get("name")) for t in wrapped):
        raise BadRecord("tools")
    return wrapped


def _check_order(messages: Messages) -> Messages:
    turns = [m for m in messages if m["role"] != "system"]
    if turns and turns[0]["role"] == "tool":
        raise BadRecord("observation_first")
    return messages


def _alpaca(r: dict) -> Conversation:
    if not (_text(r.get("instruction")) and _text(r.get("output")) and _text(r.get("input", "") or "")
            and isinstance(r.get("history") or [], list)):
        raise BadRecord("fields")
    messages: Messages = []
    if r.get("system"):
        messages.append({"role": "system", "content": str(r["system"])})
    for turn in r.get("history") or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise BadRecord("fields")
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
    return Conversation(messages, _tools(r))


def sharegpt_turns(turns: Any) -> Messages:
    """sharegpt turns ({from, value}) as messages; function_call turns as assistant tool calls."""
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and _text(t.get("value")) for t in turns)):
        raise BadRecord("fields")
    messages: Messages = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise BadRecord("role", repr(turn.get("from")))
        if role == "tool_call":
            calls = _json_value(turn["value"], "tool_arguments")
            calls = [_tool_call(call) for call in (calls if isinstance(calls, list) else [calls])]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return _check_order(messages)


def _sharegpt(r: dict) -> Conversation:
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return Conversation(messages + sharegpt_turns(r.get("conversations")), _tools(r))


def _messages(r: dict) -> Conversation:
    turns = r.get("messages")
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns)):
        raise BadRecord("fields")
    messages: Messages = []
    for turn in turns:
        if turn.get("role") not in MESSAGE_ROLES:
            raise BadRecord("role", repr(turn.get("role")))
        content = turn.get("content")
        if turn.get("tool_calls") and turn["role"] == "assistant":
            if not (content is None or _text(content)) or not isinstance(turn["tool_calls"], list):
                raise BadRecord("fields")
            messages.append({"role": "assistant", "content": content or "",
                             "tool_calls": [_tool_call(call) for call in turn["tool_calls"]]})
            continue
        if not _text(content):
            raise BadRecord("fields")
        messages.append({"role": turn["role"], "content": content})
    return Conversation(_check_order(messages), _tools(r))


# format name -> (record -> conversation, fields named in errors)
FORMATS: dict[str, tuple[Callable[[dict], Conversation], str]] = {
    "alpaca": (_alpaca, "instruction, output (strings)"),
    "sharegpt": (_sharegpt, "conversations: [{from, value}]"),
    "messages": (_messages, "messages: [{role, content}]"),
}


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise DataError(f"cannot detect the data format from keys {sorted(record)}; set data.format")


class Problems:
    """A source's bad records, counted per reason over all its chunks (which may be read in other
    processes and merged): one error at the end, for the reason met first in the file, with how
    many records have it and the first one's index."""

    def __init__(self):
        self.cases: dict[str, list] = {}  # message template -> [count, first index, detail]

    def add(self, template: str, index: int, detail: str = "") -> None:
        """`template` has {count}, {first} (and {detail}) to fill in."""
        case = self.cases.setdefault(template, [0, index, detail])
        case[0] += 1
        if index < case[1]:
            case[1], case[2] = index, detail

    def merge(self, other: "Problems") -> None:
        for template, (count, first, detail) in other.cases.items():
            case = self.cases.setdefault(template, [0, first, detail])
            case[0] += count
            if first < case[1]:
                case[1], case[2] = first, detail

    def raise_first(self, source: str) -> None:
        if self.cases:
            template, (count, first, detail) = min(self.cases.items(), key=lambda item: item[1][1])
            raise DataError(f"{source}: " + template.format(count=count, first=first, detail=detail))


def _reason_template(reason: str, fmt: str) -> str:
    where = "first at index {first}"
    roles = ", ".join(sorted(SHAREGPT_ROLES) if fmt == "sharegpt" else MESSAGE_ROLES)
    return {
        "fields": f"{{count}} records lack the {fmt} fields ({FORMATS[fmt][1]}); {where}",
        "role": f"{{count}} records have a turn whose role is not one of {roles}; {where} (role {{detail}})",
        "tool_arguments": f"{{count}} records have a tool call whose arguments are not a JSON object; {where}",
        "tool_call": f"{{count}} records have a tool call without a function name; {where}",
        "tools": f"{{count}} records have a tools field that is not a JSON list of functions with names; {where}",
        "observation_first": f"{{count}} records start with an observation (a tool result) before any call; {where}",
        "no_answer": f"{{count}} records have no assistant turn; {where}",
    }[reason]


def to_conversations(records: list[dict[str, Any]], fmt: str, source: str, offset: int = 0,
                     problems: Optional[Problems] = None) -> list[Optional[Conversation]]:
    """The records as conversations (None for a bad one). Bad records go to `problems`, or,
    without it, raise one error counting them."""
    if fmt == "auto":
        fmt = detect_format(records[0])
    convert = FORMATS[fmt][0]
    collected = problems if problems is not None else Problems()
    conversations: list[Optional[Conversation]] = []
    for i, record in enumerate(records, start=offset):
        try:
            conversation = convert(record)
            if not any(m["role"] == "assistant" for m in conversation.messages):
                raise BadRecord("no_answer")
            conversations.append(conversation)
        except BadRecord as exc:
            collected.add(_reason_template(exc.reason, fmt), i, exc.detail)
            conversations.append(None)
    if problems is None:
        collected.raise_first(source)
    return conversations


def to_messages(records: list[dict[str, Any]], fmt: str, source: str) -> list[Messages]:
    """to_conversations without the tools."""
    return [conversation.messages for conversation in to_conversations(records, fmt, source)]


def with_task_prompt(record: dict, template: str, task: str) -> dict:
    """The record with its task written into its first user prompt (data.task_template)."""
    record = dict(record)

    def fill(text: str) -> str:
        return template.format(task=task, prompt=text)

    if _text(record.get("instruction")):
        record["instruction"] = fill(record["instruction"])
    elif _text(record.get("prompt")):
        record["prompt"] = fill(record["prompt"])
    else:
        for key, role_key, content_key, user in (("conversations", "from", "value", ("human", "user")),
                                                 ("messages", "role", "content", ("user",)),
                                                 ("chosen", "role", "content", ("user",)),
                                                 ("rejected", "role", "content", ("user",))):
            turns = record.get(key)
            if isinstance(turns, list):
                turns = [dict(t) if isinstance(t, dict) else t for t in turns]
                first = next((t for t in turns if isinstance(t, dict) and t.get(role_key) in user
                              and _text(t.get(content_key))), None)
                if first is not None:
                    first[content_key] = fill(first[content_key])
                record[key] = turns
    return record
