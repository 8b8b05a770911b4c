"""The OpenAI-compatible HTTP API: auth, limits, adapter resolution, tokenizing, responses.

Chats with tools are rendered by data/tools.py, as training renders them, and replies that parse
as calls are returned as OpenAI tool_calls.

Every error is an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}} with a 4xx
status that says what is wrong: 400 bad request, 401 unknown key, 403 not an admin, 404 unknown
model (another tenant's adapter answers exactly the same), 413 body too large, 429 too many
requests in flight.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from rayft.config import ServeConfig
from rayft.data.tools import parse_tool_calls, render
from rayft.errors import RayftError
from rayft.serve.keys import Caller, KeyStore
from rayft.serve.registry import SHARED_TENANT, AdapterRef, AdapterRegistry, adapter_dir_of, publish_adapter
from rayft.serve.validate import AdapterError, BaseShape, check_name

# engine(model_id or None for the base, payload) -> events: ("token", id, row) ... ("end", reason, row)
# for each prompt (row) of the payload, or one ("error", kind, message)
EngineStream = Callable[[Optional[str], dict], AsyncIterator[tuple]]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs...)
    model: str
    max_tokens: Optional[int] = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)  # what torch's generators take


class CompletionBody(_Body):
    # one prompt (text or token ids), or a batch of them: each is a row of one batch and a choice
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, gt=0)  # OpenAI's default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None  # parts of other types (images...) carry no text and are left out


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: Union[str, dict[str, Any]] = "{}"  # OpenAI sends a JSON string; an object is taken too


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant turns: the calls it made
    tool_call_id: Optional[str] = None  # tool turns: which call this answers (the rendering, as training's, ignores it)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionSpec


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, gt=0)
    tools: Optional[list[Tool]] = None
    # "auto" (the default) and "none" are served; "required" and a named function are refused (400)
    tool_choice: Union[str, dict[str, Any], None] = None
    _raw_tools: Optional[list[dict]] = None  # the tools as sent: rendered as they are, key order included

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_tools(cls, data: Any, handler):
        body = handler(data)
        body._raw_tools = data.get("tools") if isinstance(data, dict) and body.tools else None
        return body


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    # a training output dir or adapter dir on the server's storage, "registry:<tenant>/<name>",
    # or an MLflow URI (runs:/<run_id>/adapter, models:/<name>/<version>)
    source: str
    tenant: Optional[str] = None  # default: the caller's tenant; "shared" for every tenant


def _parse(schema: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise APIError(400, f"{where}: {error['msg']}", param=where) from None


# ------------------------------------------------------------------ the frontend
class Frontend:
    def __init__(self, cfg: ServeConfig, tokenizer, base_id: str, base: BaseShape, engine: EngineStream,
                 mlflow_uri: Optional[str] = None):
        self.cfg = cfg
        self.limits = cfg.limits
        self.tokenizer = tokenizer
        self.base_id = base_id
        self.base = base
        self.engine = engine
        self.registry = AdapterRegistry(cfg.registry)
        self.keys = KeyStore(cfg.auth.keys_file)
        self.mlflow_uri = mlflow_uri
        self.in_flight = 0
        self.eos_ids = {tokenizer.eos_token_id}

    # ------------------------------------------------------------ request checks
    def caller(self, authorization: Optional[str]) -> Caller:
        caller = self.keys.caller(authorization)
        if caller is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return caller

    def check_size(self, content_length: Optional[str], body: Optional[bytes] = None) -> None:
        size = len(body) if body is not None else int(content_length or 0)
        if size > self.limits.max_body_bytes:
            raise APIError(413, f"request body is {size} bytes, above the limit of {self.limits.max_body_bytes}",
                           code="request_too_large")

    def admit(self, rows: int = 1) -> None:
        """At most max_concurrent_requests rows (prompts) in flight on this ingress replica; beyond
        it 429. Each admit(rows) is paired with one release(rows), when the response (or its stream) ends."""
        if self.in_flight + rows > self.limits.max_concurrent_requests:
            raise APIError(429, f"too many requests in flight (limit {self.limits.max_concurrent_requests}); "
                           "retry later", type="rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += rows

    def release(self, rows: int = 1) -> None:
        self.in_flight -= rows

    def resolve(self, caller: Caller, model: str) -> Optional[AdapterRef]:
        """None for the base model, else the adapter the caller may use; 404 otherwise."""
        if model == self.base_id:
            return None
        ref = self.registry.resolve(caller.tenant, model)
        if ref is None:
            raise not_found(model)
        return ref

    def prompts(self, body: Union[CompletionBody, ChatBody]) -> list[list[int]]:
        """The token ids of each prompt: one for chat, one or a batch for completions."""
        if isinstance(body, ChatBody):
            text = self.chat_text(body)
            return [self._checked(self.tokenizer(text, add_special_tokens=False)["input_ids"], "prompt")]
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]  # one prompt, as text or as token ids
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompt) > self.limits.max_concurrent_requests:
            raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is above the limit of "
                           f"{self.limits.max_concurrent_requests}", param="prompt")
        where = (lambda i: "prompt") if len(prompt) == 1 else (lambda i: f"prompt[{i}]")
        return [self._checked(self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p), where(i))
                for i, p in enumerate(prompt)]

    def chat_text(self, body: ChatBody) -> str:
        """The chat as the prompt text, rendered by data/tools.py as training renders it: through
        the template's own tool support where it has it, else rayft's Hermes-style fallback."""
        from jinja2 import TemplateError

        try:
            return render(self.tokenizer, chat_messages(body), offered_tools(body), add_generation_prompt=True)
        except TemplateError as exc:  # e.g. a template that raises on the order of roles
            raise APIError(400, f"messages: the model's chat template cannot render them ({exc})",
                           param="messages") from None

    def _checked(self, ids: list[int], where: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{where} is empty", param=where)
        if max(ids) >= len(self.tokenizer) or min(ids) < 0:
            raise APIError(400, f"{where}: token ids outside the vocabulary", param=where)
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{where} is {len(ids)} tokens, above the limit of {self.limits.max_prompt_tokens}",
                           param=where, code="context_length_exceeded")
        return ids

    def max_new_tokens(self, body: Union[CompletionBody, ChatBody], prompts: list[list[int]],
                       ref: Optional[AdapterRef] = None) -> int:
        """The tokens each row may generate: what the caller asked (within the limit and the model's
        context), or by default the limit, cut to the context the longest prompt leaves (with the
        adapter's virtual tokens, which come before it)."""
        asked = (body.max_completion_tokens or body.max_tokens) if isinstance(body, ChatBody) else body.max_tokens
        if asked is not None and asked > self.limits.max_new_tokens:
            raise APIError(400, f"max_tokens={asked} is above the limit of {self.limits.max_new_tokens}",
                           param="max_tokens")
        virtual = int(ref.meta().get("virtual_tokens") or 0) if ref is not None else 0
        context, longest = self.base.context_tokens, virtual + max(len(ids) for ids in prompts)
        if context is None:
            return asked or self.limits.max_new_tokens
        if asked is None:
            asked = min(self.limits.max_new_tokens, context - longest)
            if asked <= 0:
                raise APIError(400, f"prompt is {longest} tokens, which leaves no room in the model's context "
                               f"length of {context} tokens", param="prompt", code="context_length_exceeded")
        elif longest + asked > context:
            raise APIError(400, f"prompt is {longest} tokens and max_tokens is {asked}: {longest + asked} tokens, "
                           f"above the model's context length of {context}", param="max_tokens",
                           code="context_length_exceeded")
        return asked

    # ------------------------------------------------------------ generation
    async def generate(self, ref: Optional[AdapterRef], body: Union[CompletionBody, ChatBody],
                       prompts: list[list[int]], max_new_tokens: int) -> AsyncIterator[tuple]:
        """The engine's events for `prompts`, one row each; the first event is already awaited, so a
        failure to load the adapter becomes an error status, not a broken stream."""
        payload = {"prompts": prompts, "max_new_tokens": max_new_tokens,
                   "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
                   "model": body.model if ref is None else f"{ref.tenant}/{ref.name}"}
        events = self.engine(ref.model_id if ref else None, payload).__aiter__()
        first = await events.__anext__()
        if first[0] == "error":
            raise APIError(400 if first[1] == "adapter" else 500, first[2],
                           type="invalid_request_error" if first[1] == "adapter" else "server_error",
                           code="adapter_invalid" if first[1] == "adapter" else None)
        return _prepend(first, events)

    async def texts(self, events: AsyncIterator[tuple], stop: list[str],
                    rows: int = 1) -> AsyncIterator[tuple[int, str, Optional[str], int]]:
        """Decoded text pieces: (row, new text, finish reason or None, the row's tokens so far).
        Stop strings end a row; text that could be the start of one is held back until it is known.
        Each token is decoded once, with the few before it (see _Detokenizer), not the whole output."""
        hold = max((len(s) for s in stop), default=1) - 1
        states = [_RowText(_Detokenizer(self.tokenizer)) for _ in range(rows)]
        running = rows
        async for kind, value, row in events:
            state = states[row]
            if state.finished:  # cut by a stop string while other rows run on: its later tokens are dropped
                continue
            if kind == "token":
                state.produced += 1
                state.pending += state.decoder.add(value)
                reason = None
            elif kind == "end":
                state.pending += state.decoder.flush()
                reason = "stop" if value == "stop" else "length"
            else:
                continue
            cut = min((i for i in (state.pending.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0 or reason:
                state.finished, running = True, running - 1
                if running == 0 and not reason:
                    await events.aclose()  # cancels the engine's rows
                yield row, state.pending[:cut] if cut >= 0 else state.pending, \
                    "stop" if cut >= 0 else reason, state.produced
                if running == 0:
                    return
                continue
            ready = len(state.pending) - hold  # without stop strings hold is 0: all of it
            if ready > 0:
                yield row, state.pending[:ready], None, state.produced
                state.pending = state.pending[ready:]

    # ------------------------------------------------------------ adapters
    def add_adapter(self, caller: Caller, body: AdapterBody) -> dict:
        tenant = self._managed_tenant(caller, body.tenant)
        try:
            check_name(body.name)
            if body.name == self.base_id:
                raise AdapterError(f"adapter name {body.name!r} is the served base model's name")
            with tempfile.TemporaryDirectory(prefix="rayft-adapter-") as scratch:
                source = self._fetch_source(body.source, Path(scratch))
                ref = publish_adapter(self.registry, source, tenant, body.name, self.base,
                                      self.limits.max_lora_rank, self.limits.max_adapter_bytes,
                                      {"source": body.source})
        except RayftError as exc:
            raise APIError(400, str(exc), code="adapter_invalid", param="source") from None
        return adapter_json(ref)

    def _fetch_source(self, source: str, scratch: Path) -> Path:
        if source.startswith("registry:"):
            tenant, _, name = source.removeprefix("registry:").partition("/")
            ref = self.registry.get(tenant, name) if tenant and name else None
            if ref is None:
                raise AdapterError(f"source {source!r}: no such registry entry (expected registry:<tenant>/<name>)")
            return ref.path
        if source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            import mlflow

            try:
                return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch),
                                                                tracking_uri=self.mlflow_uri))
            except Exception as exc:  # unknown run, model or artifact
                raise AdapterError(f"source {source!r}: cannot be fetched from MLflow ({exc})") from None
        path = Path(source).expanduser()
        if not path.is_dir():
            raise AdapterError(f"source {source!r}: no such directory on the server")
        return adapter_dir_of(path)

    def delete_adapter(self, caller: Caller, name: str, tenant: Optional[str]) -> dict:
        owner = self._managed_tenant(caller, tenant)
        if not self.registry.delete(owner, name):
            raise APIError(404, f"adapter {owner}/{name} does not exist", code="adapter_not_found")
        return {"id": name, "tenant": owner, "object": "adapter", "deleted": True}

    def list_adapters(self, caller: Caller) -> dict:
        self._require_admin(caller)
        return {"object": "list", "data": [adapter_json(ref) for ref in self.registry.list()]}

    def list_models(self, caller: Caller) -> dict:
        models = [{"id": self.base_id, "object": "model", "created": 0, "owned_by": "rayft"}]
        for ref in self.registry.list(caller.tenant):
            if ref.name != self.base_id and (ref.tenant == caller.tenant or not any(
                    m["id"] == ref.name for m in models)):  # a tenant's own adapter hides a shared namesake
                meta = ref.meta()
                models.append({"id": ref.name, "object": "model", "created": int(meta.get("published_at", 0)),
                               "owned_by": ref.tenant, "parent": self.base_id, "root": self.base_id})
        return {"object": "list", "data": models}

    def _require_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise APIError(403, "this API key may not manage adapters (admin keys only)", code="admin_required")

    def _managed_tenant(self, caller: Caller, tenant: Optional[str]) -> str:
        self._require_admin(caller)
        tenant = tenant or caller.tenant
        try:
            return check_name(tenant, "tenant")
        except AdapterError as exc:
            raise APIError(400, str(exc), param="tenant") from None


def adapter_json(ref: AdapterRef) -> dict:
    meta = ref.meta()
    return {"id": ref.name, "object": "adapter", "tenant": ref.tenant, "version": ref.version,
            "shared": ref.tenant == SHARED_TENANT, "kind": meta.get("serve_kind"), "rank": meta.get("rank"),
            "source": meta.get("source"),
            "mlflow_run_id": meta.get("mlflow_run_id"), "created": int(meta.get("published_at", 0))}


def offered_tools(body: ChatBody) -> Optional[list[dict]]:
    """The tools to render and to parse replies for: None without tools or with tool_choice "none".
    Forcing a call ("required", a named function) is refused: nothing here can make the model call."""
    choice = body.tool_choice
    if choice == "required" or isinstance(choice, dict):
        shown = '"required"' if choice == "required" else "a named function"
        raise APIError(400, f'tool_choice: {shown} is not supported (only "auto" and "none"): rayft serve cannot '
                       "force the model to call a tool", param="tool_choice")
    if choice not in (None, "auto", "none"):
        raise APIError(400, f'tool_choice: {choice!r} is not one of "auto", "none", "required" or a named function',
                       param="tool_choice")
    if not body.tools or choice == "none":
        return None
    return body._raw_tools or [tool.model_dump(exclude_unset=True) for tool in body.tools]


def chat_messages(body: ChatBody) -> list[dict]:
    """The request's messages in data/formats.py's canonical form, as training has them: text
    content; an assistant's tool_calls as {"type": "function", "function": {"name", "arguments":
    dict}}; a tool turn as its result text (its tool_call_id is not rendered)."""
    messages = []
    for i, message in enumerate(body.messages):
        content = _text_of(message.content)
        if message.role == "tool" and not content:
            raise APIError(400, f"messages.{i}.content: a tool message needs content (the tool's result)",
                           param=f"messages.{i}.content")
        if not message.tool_calls:
            messages.append({"role": message.role, "content": content})
            continue
        if message.role != "assistant":
            raise APIError(400, f"messages.{i}.tool_calls: only assistant messages carry tool calls",
                           param=f"messages.{i}.tool_calls")
        calls = [{"type": "function", "function": {"name": call.function.name,
                                                   "arguments": _arguments(call.function.arguments,
                                                                           f"messages.{i}.tool_calls.{j}")}}
                 for j, call in enumerate(message.tool_calls)]
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})
    return messages


def _arguments(arguments: Union[str, dict], where: str) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments: not a JSON object (a string holding one, in "
                       "OpenAI's form)", param=f"{where}.function.arguments")
    return arguments


def chat_choice(text: str, finish_reason: str, tools: Optional[list[dict]]) -> dict:
    """The chat choice of a generated reply: where tools were offered and the reply parses as
    calls (data/tools.py's parse_tool_calls) of offered tools, the calls as OpenAI tool_calls, the
    text around them as content (null when empty), and finish_reason "tool_calls". A call of a
    function not offered leaves the reply text: a JSON answer with a "name" key is no call."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tools:
        content, calls = parse_tool_calls(text)
        offered = {tool["function"]["name"] for tool in tools}
        if calls and all(call["function"]["name"] in offered for call in calls):
            message, finish_reason = {"role": "assistant", "content": content or None, "tool_calls": calls}, \
                "tool_calls"
    return {"index": 0, "message": message, "finish_reason": finish_reason}


def _text_of(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


class _Detokenizer:
    """The text of a growing list of token ids, decoded incrementally, as vLLM and transformers'
    TextStreamer do: each new token is decoded with the tokens since the last complete piece of
    text (the window keeps the context a tokenizer needs for spaces), so a token costs a few ids'
    decode, not the whole output's. The pieces join to the full decode of the ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]
        self.read = 0  # ids[start:read] are already given out as text

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before, now = self._text(self.ids[self.start:self.read]), self._text(self.ids[self.start:])
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new, or half a multi-byte character
            return ""
        self.start, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """The rest, a trailing incomplete character included (as the full decode shows it)."""
        before, now = self._text(self.ids[self.start:self.read]), self._text(self.ids[self.start:])
        self.start = self.read = len(self.ids)
        return now[len(before):]


@dataclass(eq=False)
class _RowText:
    decoder: _Detokenizer
    pending: str = ""  # decoded, not sent yet: at most a stop string's length
    produced: int = 0
    finished: bool = False


async def _prepend(first: tuple, rest) -> AsyncIterator[tuple]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # a caller that stops early (stop string, disconnect) ends the engine row


# ------------------------------------------------------------------ the FastAPI app
def create_app(frontend: Frontend):
    app = FastAPI(title="rayft serve", description="OpenAI-compatible multi-LoRA serving")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read(request: Request, schema: type[BaseModel]) -> tuple[Caller, Any]:
        caller = frontend.caller(request.headers.get("authorization"))
        frontend.check_size(request.headers.get("content-length"))
        raw = await request.body()
        frontend.check_size(None, raw)
        return caller, _parse(schema, raw)

    async def respond(request: Request, schema: type[_Body]):
        caller, body = await read(request, schema)
        chat = schema is ChatBody
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        ref = frontend.resolve(caller, body.model)
        prompts = frontend.prompts(body)
        tools = offered_tools(body) if chat else None
        max_new_tokens = frontend.max_new_tokens(body, prompts, ref)
        rows = len(prompts)
        frontend.admit(rows)
        streaming = False
        try:
            events = await frontend.generate(ref, body, prompts, max_new_tokens)
            if body.stream:
                streaming = True  # the stream releases its admission when it ends
                return StreamingResponse(_sse(frontend, events, stop, rows, chat, request_id, created, body.model,
                                              tools), media_type="text/event-stream")
            pieces, finish, produced = [[] for _ in prompts], ["length"] * rows, [0] * rows
            async for row, text, reason, row_tokens in frontend.texts(events, stop, rows):
                pieces[row].append(text)
                finish[row], produced[row] = reason or finish[row], row_tokens
        finally:
            if not streaming:
                frontend.release(rows)
        texts = ["".join(row_pieces) for row_pieces in pieces]
        choices = [chat_choice(texts[0], finish[0], tools)] \
            if chat else [{"index": row, "text": text, "logprobs": None, "finish_reason": finish[row]}
                          for row, text in enumerate(texts)]
        prompt_tokens, completion_tokens = sum(len(ids) for ids in prompts), sum(produced)
        return JSONResponse({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    # The handlers read their bodies themselves (auth and size come first, and bad input answers in
    # the error shape above); the OpenAPI document still describes each body by its model.
    def body_of(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    @app.post("/v1/completions", openapi_extra=body_of(CompletionBody))
    async def completions(request: Request):
        return await respond(request, CompletionBody)

    @app.post("/v1/chat/completions", openapi_extra=body_of(ChatBody))
    async def chat_completions(request: Request):
        return await respond(request, ChatBody)

    @app.get("/v1/models")
    async def models(request: Request):
        return frontend.list_models(frontend.caller(request.headers.get("authorization")))

    @app.get("/v1/adapters")
    async def adapters(request: Request):
        return frontend.list_adapters(frontend.caller(request.headers.get("authorization")))

    @app.post("/v1/adapters", status_code=201, openapi_extra=body_of(AdapterBody))
    async def add_adapter(request: Request):
        caller, body = await read(request, AdapterBody)
        return JSONResponse(frontend.add_adapter(caller, body), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, request: Request, tenant: Optional[str] = None):
        return frontend.delete_adapter(frontend.caller(request.headers.get("authorization")), name, tenant)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    _, schemas = models_json_schema([(model, "validation") for model in (CompletionBody, ChatBody, AdapterBody)],
                                    ref_template="#/components/schemas/{model}")
    build_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            build_openapi().setdefault("components", {}).setdefault("schemas", {}).update(schemas["$defs"])
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _sse(frontend: Frontend, events, stop, rows: int, chat: bool, request_id: str, created: int, model: str,
               tools: Optional[list[dict]] = None):
    """Server-sent events in OpenAI's chunk format (choice index = prompt index), ending with `data: [DONE]`.
    A chat with tools offered is sent once its reply is whole (whether it is a call is known only
    then): its content, then its tool_calls in OpenAI's delta form, each call whole in one delta."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(row: int, text: Optional[str], finish: Optional[str], delta: Optional[dict] = None) -> str:
        if chat:
            choice = {"index": row, "delta": delta or ({"content": text} if text else {}), "finish_reason": finish}
        else:
            choice = {"index": row, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(0, None, None, {"role": "assistant", "content": ""})
        if tools:
            pieces, finish = [], "length"
            async for _, text, reason, _ in frontend.texts(events, stop, rows):
                pieces.append(text)
                finish = reason or finish
            choice = chat_choice("".join(pieces), finish, tools)
            message = choice["message"]
            if message["content"]:
                yield chunk(0, message["content"], None)
            if message.get("tool_calls"):
                yield chunk(0, None, None, {"tool_calls": [{"index": i, **call}
                                                           for i, call in enumerate(message["tool_calls"])]})
            yield chunk(0, None, choice["finish_reason"])
        else:
            async for row, text, reason, _ in frontend.texts(events, stop, rows):
                if text or reason:
                    yield chunk(row, text, reason)
        yield "data: [DONE]\n\n"
    finally:
        frontend.release(rows)
