"""Tool calls in and out of text: how a conversation with tools is rendered for training and for
serving, and how a generated reply is read back as calls. One module for both, so the model is
served in the form it was trained on.

A chat template that knows tools (it reads `tools` and the messages' `tool_calls`, as Qwen2.5's
and Llama 3.1's do) renders them itself. Any other template gets rayft's fallback, the Hermes
convention that most open tool-calling models were trained on:
  - the tools as JSON lines inside <tools></tools> in the system message (after the record's own
    system text, if any);
  - each call as <tool_call>{"name": ..., "arguments": {...}}</tool_call> in the assistant's reply;
  - each tool result as a user turn wrapped in <tool_response></tool_response> (templates
    without tool support rarely accept a `tool` role).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional

from rayft.data.formats import Messages

TOOLS_PREAMBLE = ("You may call one or more functions to assist with the user query. The functions are listed "
                  "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, reply with "
                  '<tool_call>{{"name": <function-name>, "arguments": <args-json-object>}}</tool_call>.')
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def template_knows_tools(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates: the default one renders
        template = template.get("default", "")
    return "tools" in template and "tool_calls" in template


def call_text(call: dict) -> str:
    function = call["function"]
    return "<tool_call>\n" + json.dumps({"name": function["name"], "arguments": function["arguments"]},
                                        ensure_ascii=False) + "\n</tool_call>"


def fallback_messages(messages: Messages, tools: Optional[list[dict]]) -> Messages:
    """The conversation in plain system/user/assistant turns that any template renders."""
    out: Messages = []
    if tools:
        listing = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + listing})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for message in messages:
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            parts = ([message["content"]] if message.get("content") else []) + \
                [call_text(call) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


def uses_tools(messages: Messages, tools: Optional[list[dict]]) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def render(tokenizer, messages: Messages, tools: Optional[list[dict]] = None,
           add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the template's tool support where it has it."""
    if not uses_tools(messages, tools):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if template_knows_tools(tokenizer):
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside calls, OpenAI tool_calls) of a generated reply. A reply that is a bare JSON
    object with a name and arguments (how some native templates emit calls) is one call; text
    that does not parse stays text."""
    calls = []
    for body in _CALL.findall(text):
        call = _as_call(body)
        if call is None:
            return text, []  # a malformed call: the reply is returned as it is
        calls.append(call)
    if calls:
        return _CALL.sub("", text).strip(), calls
    bare = _as_call(text.strip(), bare=True)
    return ("", [bare]) if bare is not None else (text, [])


def _as_call(body: str, bare: bool = False) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
        return None
    if bare and not ("arguments" in value or "parameters" in value):
        return None  # a JSON answer that happens to have a name, such as {"name": "Alice", "age": 30}
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
