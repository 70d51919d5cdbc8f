"""The OpenAI-compatible HTTP API over the continuous-batching engine, with FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the project's one chat template),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text) and the playground page at ``/``.
Responses follow OpenAI's shapes (``choices``, ``usage``, ``finish_reason``); with ``"stream": true`` they are
server-sent events of OpenAI's chunk objects, ending with ``data: [DONE]`` — so the official ``openai`` client works
unchanged (the tests use it). Mistakes get a 4xx with OpenAI's error object naming the field, never a 500.

Why FastAPI rather than LitServe: LitServe batches requests that arrive together and runs each batch to the end;
continuous batching needs one loop that owns the model across requests (``engine.py``), and FastAPI lets each
request simply wait on its own queue of events from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmfoundry_pl.chat import ChatFormat, Message
from llmfoundry_pl.config import ConfigError, ServeConfig, check_stop_strings
from llmfoundry_pl.inference.text import encode_prompt
from llmfoundry_pl.serve.engine import Engine, QueueFull, SamplingParams
from llmfoundry_pl.serve.engine import Request as EngineRequest
from llmfoundry_pl.tokenizer import check_encodable


# ------------------------------------------------------------------------------------------------------------------
# Request bodies (pydantic checks types; the error handler names the field)
# ------------------------------------------------------------------------------------------------------------------
def _utf8(text: str) -> str:
    """A 400 for text without a UTF-8 form: JavaScript's JSON.stringify sends an emoji cut in two as a lone
    ``\\ud83d``, and the tokenizer failed on it with a 500."""
    try:
        check_encodable(text, "the text")
    except ConfigError as e:
        raise PydanticCustomError("unicode", str(e)) from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False  # a last chunk with the usage and no choices, before [DONE]


MAX_STOP_STRINGS = 4  # OpenAI's limit: fifty thousand in one request slowed every stream beside it 25-fold

# Fields whose null OpenAI's API reads as "the default" (its SDKs and LangChain send them so): they were a 400.
_NULL_IS_DEFAULT = ("temperature", "top_p", "n", "stream", "stream_options")


class _Sampling(BaseModel):
    # Fields this class does not name are kept (not dropped), for _refuse_unsupported to look at. Strict types:
    # pydantic's default took "max_tokens": true as 1 and "temperature": "0.5" as a number, answering a request
    # other than the one sent (a number is still taken where a float goes).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)  # Infinity was taken: uniform sampling
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # top_k and min_p are not OpenAI's but vLLM's (lfpl-generate's too), top_k -1 or 0 meaning no limit as there
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    # one choice per request; an int, not Literal[1], which took `"n": true` (True == 1) even in strict mode
    n: int = Field(default=1, ge=1, le=1)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _NULL_IS_DEFAULT)}
        return data


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]


class TextPart(BaseModel):
    """A part of a message's content in OpenAI's list form; only text parts (no images) for a text model."""

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def as_message(self) -> Message:
        """The message for the chat template: OpenAI's newer ``developer`` role is the system message, and text
        parts are joined with newlines (as vLLM does)."""
        content = self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens in chat

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> ChatRequest:
        self.max_tokens = self.max_completion_tokens or self.max_tokens
        return self


# OpenAI request fields for what this server does not do, with the values that ask for nothing (clients such as
# LangChain send some of them at these values). Any other value gets a 400 naming the field: ignoring it would
# answer a different request than the one asked (no logprobs, no echo, no penalty) without saying so.
_NOT_ASKING = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),  # vLLM's
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # "auto" without tools asks for nothing either
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


def _refuse_unsupported(body: _Sampling) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _NOT_ASKING and value not in _NOT_ASKING[name]:
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server; leave {name} out",
                           name)


class APIError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, message and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status: int, message: str, param: str | None, kind: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, cfg: ServeConfig, model_name: str) -> FastAPI:
    """The server for ``engine`` (started and stopped with the app) under the name ``model_name``."""
    chat = _chat_format(engine)
    context = engine.model.config.max_seq_len
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:  # the engine's thread lives as long as the server
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llmfoundry-pl", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key, before any parsing."""
        if cfg.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):  # constant time
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)", None,
                              "authentication_error")
        return await call_next(request)

    # A middleware added later runs first. CORS outside the key check: a browser's pre-flight (OPTIONS) carries no
    # key, and was refused with a 401 without CORS headers, so a web page could not call a server with an api_key.
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)  # added last: the outermost, before the key check

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no such path, another method, a body it cannot parse) in OpenAI's error object
        too: their {"detail": ...} left clients that read error.message with nothing to show."""
        message = {
            404: f"there is no {request.url.path} here; this server has /v1/completions, /v1/chat/completions and "
                 "/v1/models",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(e.status_code, str(e.detail))
        if e.detail == "There was an error parsing the body":  # bytes that are not UTF-8, say (a cp1252 file)
            message = "the body could not be read as JSON in UTF-8"
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, message, None, kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        # The deepest complaint is the most specific one: a union field (content: str | list[TextPart]) reports
        # each member it tried, and an image part is better named by its "type" than by "not a valid string".
        first = max(e.errors(), key=lambda error: len(error["loc"]))
        if first["type"] == "json_invalid":
            return _error(400, "the body is not valid JSON", None, "invalid_request_error")
        # loc is ("body", field, ...); a union field adds the member type it tried ("str", "list[str]"): not a field
        path = [p for p in first["loc"][1:] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_NAMES)]
        field = ".".join(map(str, path)) or None
        if field is None and "json" not in request.headers.get("content-type", ""):  # curl -d without -H: a form
            return _error(400, "the body must be JSON, sent with the header 'Content-Type: application/json'", None,
                          "invalid_request_error")
        return _error(400, f"{field or 'the body'}: {first['msg']}", field, "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and what the playground shows about the server."""
        return {"status": "ok", "model": model_name, "context": context, "max_batch": engine.max_batch,
                "running": len(engine.running), "waiting": len(engine.waiting), "chat": chat is not None}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmfoundry-pl"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        lines = [
            ("lfpl_requests_total", "counter", "Requests accepted.", engine.requests_total),
            ("lfpl_generated_tokens_total", "counter", "Tokens generated.", engine.tokens_total),
            ("lfpl_failed_requests_total", "counter", "Requests ended by an error in the model's step.",
             engine.failed_total),
            ("lfpl_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.", engine.tokens_per_second),
            ("lfpl_queue_depth", "gauge", "Requests waiting for a slot.", len(engine.waiting)),
            ("lfpl_running_batch_size", "gauge", "Requests being decoded together.", len(engine.running)),
        ]
        return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return resources.files("llmfoundry_pl.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else _single(body.prompt)
        return await _generate(body, request, *encode_prompt(engine.tokenizer, prompt, None), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if chat is None:
            raise APIError(400, "this model's tokenizer has no chat tokens; use /v1/completions", "messages")
        messages = [m.as_message() for m in body.messages]
        return await _generate(body, request, *encode_prompt(engine.tokenizer, messages, chat), chat=True)

    async def _generate(body: _Sampling, http: Request, prompt_ids: list[int], end_ids: tuple[int, ...], chat: bool):
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}", "model",
                           "not_found_error")
        _refuse_unsupported(body)
        room = context - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) fills the model's context of {context} "
                                "tokens: shorten it", "messages" if chat else "prompt")
        # Without max_tokens, as OpenAI and vLLM do: up to what the context leaves (here also default_max_tokens).
        max_tokens = body.max_tokens or min(cfg.default_max_tokens, room)
        if max_tokens > room:
            asked = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus {asked} ({max_tokens}) exceed the "
                                f"model's context of {context} tokens", asked)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:  # each token is checked against each, on the thread every request shares
            raise APIError(400, f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS} (OpenAI's limit)", "stop")
        try:
            check_stop_strings(stop)
        except ConfigError as e:
            raise APIError(400, str(e), "stop") from None
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options applies to a streamed answer: add stream=true, or leave it out",
                           "stream_options")
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                top_p=None if body.top_p >= 1.0 else body.top_p,
                                top_k=body.top_k if body.top_k and body.top_k > 0 else None, min_p=body.min_p,
                                stop=stop, seed=body.seed, timeout_s=cfg.request_timeout_s)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = EngineRequest(prompt_ids, params, end_ids, engine.tokenizer,
                                lambda delta, reason: loop.call_soon_threadsafe(events.put_nowait, (delta, reason)))
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry shortly", None, "rate_limit_error",
                           {"Retry-After": "1"}) from None
        except ConfigError as e:
            raise APIError(400, str(e), None) from None
        response = _Response(chat, model_name, len(prompt_ids))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(response, request, events, usage), media_type="text/event-stream")
        text, reason = "", None
        gone = asyncio.ensure_future(_client_gone(http))
        try:
            while reason is None:
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client went away: nobody reads the answer, free the slot
                    event.cancel()
                    engine.cancel(request)
                    return Response(status_code=499)  # nginx's "client closed request"; no one receives it
                delta, reason = event.result()
                text += delta
        except asyncio.CancelledError:
            engine.cancel(request)
            raise
        finally:
            gone.cancel()
        if reason == "error":
            raise APIError(500, f"generation failed: {request.error}", None, "server_error")
        return response.whole(text, reason, len(request.output_ids))

    async def _sse(response: _Response, request: EngineRequest, events: asyncio.Queue,
                   usage: bool) -> AsyncIterator[str]:
        """Server-sent events; a client that disconnects cancels its request (its slot frees at the next step).
        With ``usage`` (``stream_options.include_usage``), as OpenAI: a last chunk with no choices holds it."""
        try:
            if response.chat:
                yield _event(response.chunk({"role": "assistant", "content": ""}, None))
            reason = None
            while reason is None:
                delta, reason = await events.get()
                if delta:
                    yield _event(response.chunk(delta, None))
            if reason == "error":  # OpenAI's error object as an event: its client raises it
                yield _event({"error": {"message": f"generation failed: {request.error}", "type": "server_error",
                                        "param": None, "code": None}})
            else:
                yield _event(response.chunk("", reason))
                if usage:
                    yield _event(response.usage_chunk(len(request.output_ids)))
            yield "data: [DONE]\n\n"
        finally:
            if request.finish_reason is None:
                engine.cancel(request)

    return app


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


async def _client_gone(http: Request) -> None:
    """Returns once the client has closed its connection. Starlette cancels a streaming response then, but not a
    handler that is still waiting for its whole answer: without this, a client that hangs up holds its slot until
    max_tokens."""
    while (await http.receive())["type"] != "http.disconnect":  # the body is read already: only the hang-up comes
        pass


class _BodyLimit:
    """A 413 for a request body over ``limit`` bytes: by its Content-Length when it gives one, else by the bytes as
    they arrive (a chunked body gives none), before anything parses it. Plain ASGI, since a body is only seen
    through the ``receive`` it wraps."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body larger than {self.limit} bytes", None, "invalid_request_error")
        headers = dict(scope["headers"])
        if int(headers.get(b"content-length") or 0) > self.limit:
            return await too_large(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        async def unless_too_large(message: dict) -> None:  # FastAPI answers a body it could not read with a 400
            if received <= self.limit:
                await send(message)

        with contextlib.suppress(_BodyTooLarge):  # raised while the app read the body, before it answered
            await self.app(scope, counted, unless_too_large)
        if received > self.limit:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _single(prompts: list[str]) -> str:
    if len(prompts) != 1:
        raise APIError(400, "prompt must be one string (batches of prompts are not supported)", "prompt")
    return prompts[0]


def _chat_format(engine: Engine) -> ChatFormat | None:
    """The chat template for the model's tokenizer, or None if it lacks the chat tokens (chat requests then 400)."""
    try:
        return ChatFormat(engine.tokenizer)
    except ConfigError:
        return None


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Response:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self._usage(completion_tokens)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self._usage(completion_tokens)}

    def chunk(self, delta: str | dict, reason: str | None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            body = {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": content, "finish_reason": reason}]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}]}
        return body

    def usage_chunk(self, completion_tokens: int) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self._usage(completion_tokens)}
