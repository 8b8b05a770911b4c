"""Read records (JSON array or JSONL) and normalise alpaca / sharegpt / messages to chat messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rayft.errors import DataError

Messages = list[dict[str, str]]

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: malformed JSON ({exc.msg})") from None
    bad = [i for i, record in enumerate(records) if not isinstance(record, dict)]
    if bad:
        raise DataError(f"{path}: {len(bad)} records are not JSON objects (first at index {bad[0]})")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _alpaca_ok(r: dict) -> bool:
    return _text(r.get("instruction")) and _text(r.get("output")) and _text(r.get("input", "")) and (
        isinstance(r.get("history", []), list))


def _alpaca(r: dict) -> Messages:
    messages: Messages = []
    if r.get("system"):
        messages.append({"role": "system", "content": r["system"]})
    for turn in r.get("history") or []:
        messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
    return messages


def _sharegpt_ok(r: dict) -> bool:
    turns = r.get("conversations")
    return isinstance(turns, list) and bool(turns) and all(
        isinstance(t, dict) and t.get("from") in SHAREGPT_ROLES and _text(t.get("value")) for t in turns)


def _sharegpt(r: dict) -> Messages:
    messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return messages + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]


def _messages_ok(r: dict) -> bool:
    turns = r.get("messages")
    return isinstance(turns, list) and bool(turns) and all(
        isinstance(t, dict) and t.get("role") in ("system", "user", "assistant") and _text(t.get("content"))
        for t in turns)


def _messages(r: dict) -> Messages:
    return [{"role": t["role"], "content": t["content"]} for t in r["messages"]]


# format name -> (record is valid, record -> messages, fields named in errors)
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], Messages], str]] = {
    "alpaca": (_alpaca_ok, _alpaca, "instruction, output (strings)"),
    "sharegpt": (_sharegpt_ok, _sharegpt, "conversations: [{from, value}]"),
    "messages": (_messages_ok, _messages, "messages: [{role, content}]"),
}


def detect_format(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise DataError(f"cannot detect the data format from keys {sorted(record)}; set data.format")


def to_messages(records: list[dict[str, Any]], fmt: str, source: str) -> list[Messages]:
    """All records as chat messages; one error counting every invalid record."""
    if fmt == "auto":
        fmt = detect_format(records[0])
    is_valid, convert, fields = FORMATS[fmt]
    bad = [i for i, record in enumerate(records) if not is_valid(record)]
    if bad:
        raise DataError(f"{source}: {len(bad)} records lack the {fmt} fields ({fields}); first at index {bad[0]}")
    conversations = [convert(record) for record in records]
    no_answer = [i for i, c in enumerate(conversations) if not any(m["role"] == "assistant" for m in c)]
    if no_answer:
        raise DataError(f"{source}: {len(no_answer)} records have no assistant turn; first at index {no_answer[0]}")
    return conversations
