"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream: true`` as server-sent events).

Why this shape: scripts, chat UIs and eval harnesses already speak OpenAI's API (as exo, vLLM,
llama.cpp's server and Ollama do), so a placed model is useful to them without a client of our
own. Generation runs in the instance's continuous batch (``api.batcher``, ``api.batching``):
concurrent requests share the pipeline in the plan's micro-batches, and beyond the plan's batch
wait in a bounded queue (429 with ``Retry-After`` past it); this module turns HTTP bodies into
prompts and tokens into text.

A request's ``model`` names an instance id, or a model name (then the ready instance of it with
the fewest requests in flight serves). Ready means every stage reported ``loaded``.

Chat prompts: a GGUF model's ``tokenizer.chat_template`` that uses ChatML (``<|im_start|>``, as
SmolLM2's) is rendered as ChatML, with the default system message SmolLM2's template writes
in the form it writes it (no Jinja engine runs on the server); any other model gets the plain
template ``"<role>: <content>\\n"`` per message, then ``"assistant:"``. A message's ``content``
is text (not a list of parts); roles are system, user and assistant.

Errors answer OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, including
those raised before a handler runs (the bearer token check, unknown paths): see
:func:`errors_middleware`. The POST endpoints take the API's bearer token like every mutating
endpoint (``api.auth``), which is also what OpenAI clients send as their ``api_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta
from nats.aio.client import Client

from shardplane.agents.pipeline import PipelineClient, PipelineError, runnable
from shardplane.api.batcher import Batcher, PlanFigures, Ticket, plan_figures
from shardplane.api.batching import QueueFull, Seq
from shardplane.api.errors import ApiError
from shardplane.api.state import ClusterCache
from shardplane.bus.errors import ApiServerError
from shardplane.generate import GenerateError, TextCodec, model_hidden

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096  # one request's new tokens: decode runs ~25-40 ms a token here
MAX_STOPS = 4  # OpenAI's own limit on ``stop`` strings
DEFAULT_CHAT_MAX_TOKENS = 256
PLAIN_TEMPLATE = "plain"
T = TypeVar("T")

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False


class _Common(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1  # one choice per request
    user: str | None = None  # accepted (OpenAI clients send it) and not used


class CompletionRequest(_Common, frozen=True, kw_only=True):
    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[int], Meta(min_length=1)]
    max_tokens: MaxTokens = 16


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Common, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


# --- errors ----------------------------------------------------------------------------------

ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    kind = ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    doc = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return msgspec.json.encode(doc)


def _error_response(
    status: int,
    message: str,
    param: str | None,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(status, message, param, code)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/v1/`` every refusal (the token check's, the router's 404 and 405, a handler's)
    answers OpenAI's error shape; other paths pass through untouched."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc.status, exc.message, exc.field, exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        return _error_response(
            exc.status, f"{request.method} {request.path}: {message}", None, None
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug, never a dropped connection: logged, answered 500
        log.exception("%s %s failed", request.method, request.path)
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, None)


# --- pure parts ------------------------------------------------------------------------------


def decode_request(raw: bytes, kind: type[T]) -> T:
    """The body as ``kind``, or a 400 naming the field (msgspec says where: ``$.messages[0]``)."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        at = re.search(r"`\$\.?([^`]*)`", str(exc))
        named = re.search(r"field `([^`]*)`", str(exc))
        param = (at.group(1) if at else None) or (named.group(1) if named else None)
        raise ApiError(400, "invalid_request", f"invalid request body: {exc}", param) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_request", f"the body is not valid JSON: {exc}") from None


_CHATML_SYSTEM = re.compile(r"'<\|im_start\|>system\\n(.*?)<\|im_end\|>\\n'")


def render_chat(template: str | None, messages: Sequence[ChatMessage]) -> tuple[str, str]:
    """The prompt text for ``messages`` and the template's kind (``chatml`` or ``plain``)."""
    if template and "<|im_start|>" in template:
        parts: list[str] = []
        default = _CHATML_SYSTEM.search(template)
        if default and messages[0].role != "system":
            parts.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
        parts += [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
        return "".join(parts) + "<|im_start|>assistant\n", "chatml"
    text = "".join(f"{m.role}: {m.content}\n" for m in messages)
    return text + "assistant:", PLAIN_TEMPLATE


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become a stop string (kept back
    from a stream until the next token says), or may be half a UTF-8 character."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class TextCut:
    """Generated token ids as text, cut at the first stop string; ``take()`` returns the text
    that is final so far (nothing a later token could still retract)."""

    decode: Callable[[list[int]], str | None]
    stops: Sequence[str]
    ids: list[int] = field(default_factory=lambda: [])
    sent: int = 0
    stopped: bool = False
    text: str = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.text = self.decode(self.ids) or ""
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        end = (
            len(self.text)
            if final or self.stopped
            else len(self.text) - held_back(self.text, self.stops)
        )
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


def pick_instance(views: Sequence[dict[str, Any]], name: str, busy: Counter[str]) -> dict[str, Any]:
    """The instance ``name`` means: that instance id, or the least busy ready instance of the
    model ``name``; a 404 or 503 saying why none serves. Released instances are gone."""
    views = [v for v in views if v.get("state") != "released"]
    exact = [v for v in views if v.get("id") == name]
    if not exact:
        exact = [v for v in views if v.get("model") == name]
    if not exact:
        known = sorted({str(v.get("id")) for v in views} | {str(v.get("model")) for v in views})
        raise ApiError(
            404,
            "model_not_found",
            f"no instance or model {name!r} is placed; known: {', '.join(known) or 'none'}",
            "model",
        )
    if not runnable(str(exact[0].get("model"))):
        raise ApiError(
            400,
            "model_not_runnable",
            f"model {exact[0].get('model')!r} has no weights a worker can run",
            "model",
        )
    ready = [v for v in exact if v.get("state") == "loaded"]
    if not ready:
        states = ", ".join(f"{v.get('id')}: {v.get('state')}" for v in exact)
        raise ApiError(
            503, "model_not_ready", f"no instance of {name!r} is loaded yet ({states})", "model"
        )
    return min(ready, key=lambda v: busy[str(v["id"])])


def model_card(view: dict[str, Any]) -> dict[str, Any]:
    stages = [
        {k: s.get(k) for k in ("stage", "node", "device", "layer_start", "layer_end", "state")}
        for s in view.get("stages", [])
    ]
    return {
        "id": view["id"],
        "object": "model",
        "created": int(float(view.get("updated") or 0)),
        "owned_by": "shardplane",
        "root": view.get("model"),
        "plan": {
            "generation": view.get("generation"),
            "stage_count": view.get("stage_count"),
            "stages": stages,
        },
    }


# --- the shell -------------------------------------------------------------------------------


class HasCluster(Protocol):
    nc: Client
    cache: ClusterCache
    synced: asyncio.Event


# Requests that may wait for a slot, per slot of the batch (beyond them: 429). Bounded so a
# burst costs waiting clients a bounded delay instead of growing without end.
QUEUE_PER_SLOT = 4


@dataclass
class Serving:
    """What the endpoints share: the API's state, requests in flight per instance, and each
    instance's continuous batch (keyed by instance and generation: a re-placed instance gets
    a batch sized by its new plan, while requests on the old one finish)."""

    api: HasCluster
    busy: Counter[str] = field(default_factory=lambda: Counter[str]())
    queue_limit: int | None = None  # None: QUEUE_PER_SLOT x the plan's batch
    batchers: dict[tuple[str, int], Batcher] = field(default_factory=lambda: {})
    retired: list[Batcher] = field(default_factory=lambda: [])
    _creating: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def batcher(self, view: dict[str, Any]) -> Batcher:
        key = (str(view["id"]), int(view.get("generation") or 0))
        async with self._creating:
            found = self.batchers.get(key)
            if found is not None:
                return found
            plan = await plan_figures(self.api.nc, key[0])
            client = PipelineClient(
                self.api.nc, key[0], int(view["stage_count"]), _hidden(str(view["model"]))
            )
            limit = (
                self.queue_limit if self.queue_limit is not None else QUEUE_PER_SLOT * plan.batch
            )
            for old in [k for k in self.batchers if k[0] == key[0]]:
                self.retired.append(self.batchers.pop(old))  # its requests finish there
            made = self.batchers[key] = Batcher(client, plan, limit)
            return made

    def live(self, instance: str) -> tuple[Batcher | None, PlanFigures | None]:
        """The instance's current batch (its live step time, its plan), if it served yet."""
        mine = [b for (i, _), b in self.batchers.items() if i == instance]
        return (mine[-1], mine[-1].plan) if mine else (None, None)

    async def close(self) -> None:
        for batcher in [*self.batchers.values(), *self.retired]:
            await batcher.close()
        self.batchers.clear()
        self.retired.clear()


SERVING_KEY = web.AppKey("shardplane_openai", Serving)


@functools.lru_cache(maxsize=8)
def _codec(model: str) -> TextCodec:
    return TextCodec(model)


@functools.lru_cache(maxsize=8)
def _hidden(model: str) -> int:
    return model_hidden(model)


@functools.lru_cache(maxsize=8)
def _chat_template(model: str) -> str | None:
    from shardplane.agents.gguf import is_packaged, packaged_chat_template

    return packaged_chat_template(model) if is_packaged(model) else None


@functools.lru_cache(maxsize=8)
def _limits(model: str) -> tuple[int, int] | None:
    """The packaged model's context length and vocabulary size (None: not known here)."""
    from shardplane.agents.gguf import is_packaged, packaged_path, read_config

    if not is_packaged(model):
        return None
    config = read_config(packaged_path(model))
    return config.max_positions, config.vocab


@dataclass
class Job:
    """One validated request, ready to run."""

    view: dict[str, Any]
    prompt: list[int]
    max_tokens: int
    body: _Common
    stop_ids: list[int]
    chat: bool
    codec: TextCodec
    created: int = field(default_factory=lambda: int(time.time()))
    rid: str = field(default_factory=lambda: secrets.token_hex(12))

    @property
    def model(self) -> str:
        return str(self.view["model"])


async def _instance(serving: Serving, name: str) -> dict[str, Any]:
    api = serving.api
    if not api.synced.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(api.synced.wait(), 5.0)
    return pick_instance(api.cache.instance_list(), name, serving.busy)


def _prepare(view: dict[str, Any], body: CompletionRequest | ChatRequest) -> Job:
    model = str(view["model"])
    try:
        codec = _codec(model)
    except GenerateError as exc:
        raise ApiError(503, "model_not_ready", str(exc), "model") from None
    stop_ids = list(codec.eos)
    if isinstance(body, ChatRequest):
        text, kind = render_chat(_chat_template(model), body.messages)
        prompt = _encode(codec, text, "messages")
        if kind == "chatml" and len(end := _encode(codec, "<|im_end|>", "messages")) == 1:
            stop_ids += end
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    else:
        prompt = (
            list(body.prompt)
            if isinstance(body.prompt, list)
            else _encode(codec, body.prompt, "prompt")
        )
        max_tokens = body.max_tokens
    _check_limits(model, prompt, max_tokens)
    return Job(view, prompt, max_tokens, body, stop_ids, isinstance(body, ChatRequest), codec)


def _check_limits(model: str, prompt: list[int], max_tokens: int) -> None:
    limits = _limits(model)
    if limits is None:
        return
    context, vocab = limits
    if len(prompt) + max_tokens > context:
        raise ApiError(
            400,
            "context_length_exceeded",
            f"{len(prompt)} prompt tokens + max_tokens {max_tokens} = {len(prompt) + max_tokens} "
            f"is over {model}'s context of {context} tokens",
            "max_tokens",
        )
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ApiError(
            400,
            "invalid_request",
            f"token ids {bad[:5]} are outside {model}'s vocabulary [0, {vocab})",
            "prompt",
        )


def _encode(codec: TextCodec, text: str, param: str) -> list[int]:
    try:
        ids = codec.encode(text)
    except GenerateError as exc:
        raise ApiError(
            400, "invalid_request", f"{exc} (send `prompt` as a list of token ids)", param
        ) from None
    if not ids:
        raise ApiError(400, "invalid_request", "the prompt encodes to no tokens", param)
    return ids


PIPELINE_STATUS = {"invalid_request": 400, "unavailable": 503, "timeout": 504}


DISCONNECT_POLL_S = 0.25  # how soon a waiting request notices that its client left


async def _admit(serving: Serving, job: Job) -> tuple[Batcher, Ticket]:
    """A place in the instance's batch, or a 429 (with Retry-After) when its queue is full."""
    batcher = await serving.batcher(job.view)
    body = job.body
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    settings = {"temperature": body.temperature, "top_p": body.top_p, "seed": seed}
    seq = Seq(job.rid, tuple(job.prompt), job.max_tokens, frozenset(job.stop_ids))
    try:
        return batcher, batcher.submit(seq, settings)
    except QueueFull as exc:
        raise TooBusy(str(exc), batcher.retry_after_s()) from None


class TooBusy(ApiServerError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def _until_gone(request: web.Request) -> None:
    """Returns once the client's connection is closed (aiohttp does not cancel the handler)."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _tokens(request: web.Request, ticket: Ticket) -> AsyncGenerator[int]:
    """The ticket's tokens up to its last, ending early (ConnectionResetError) when the client
    leaves, also while it waits in the queue or for a step; a failed step raises."""
    gone = asyncio.ensure_future(_until_gone(request))
    try:
        while True:
            getter = asyncio.ensure_future(ticket.events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                raise ConnectionResetError("the client left")
            event = getter.result()
            if isinstance(event, PipelineError):
                raise event
            yield event.token
            if event.done:
                return
    finally:
        gone.cancel()


async def _run(
    request: web.Request, serving: Serving, job: Job, cut: TextCut, admitted: tuple[Batcher, Ticket]
) -> AsyncGenerator[tuple[str, str | None]]:
    """Final text pieces as ``(text, None)``, then ``(rest, finish_reason)`` once; the slot in
    the batch (and the stages' caches) is freed however this ends (done, stop, error,
    disconnect)."""
    instance = str(job.view["id"])
    batcher, ticket = admitted
    finish = "length"
    serving.busy[instance] += 1
    try:
        async with contextlib.aclosing(_tokens(request, ticket)) as tokens:
            async for token in tokens:
                if token in job.stop_ids:
                    finish = "stop"
                    break
                cut.add(token)
                if cut.stopped:
                    finish = "stop"
                    break
                if delta := cut.take():
                    yield delta, None
    except PipelineError as exc:
        status = PIPELINE_STATUS.get(exc.code, 500)
        raise ApiError(status, exc.code, f"instance {instance}: {exc}") from None
    finally:
        batcher.leave(job.rid)
        serving.busy[instance] -= 1
    yield cut.take(final=True), finish


def _stops(body: _Common) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "invalid_request", "a `stop` string must not be empty", "stop")
    return stops


def _usage(job: Job, cut: TextCut) -> dict[str, int]:
    done = len(cut.ids)
    return {
        "prompt_tokens": len(job.prompt),
        "completion_tokens": done,
        "total_tokens": len(job.prompt) + done,
    }


def _choice(job: Job, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if not job.chat:
        choice["text"] = text or ""
    elif job.body.stream:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["message"] = {"role": "assistant", "content": text or ""}
    return choice


def _envelope(job: Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
    if job.chat:
        kind = "chat.completion.chunk" if job.body.stream else "chat.completion"
        rid = f"chatcmpl-{job.rid}"
    else:
        kind, rid = "text_completion", f"cmpl-{job.rid}"
    return {
        "id": rid,
        "object": kind,
        "created": job.created,
        "model": str(job.view["id"]),
        "choices": choices,
    }


async def _serve(
    request: web.Request, kind: type[CompletionRequest] | type[ChatRequest]
) -> web.StreamResponse:
    serving = request.app[SERVING_KEY]
    body = decode_request(await request.read(), kind)
    stops = _stops(body)
    view = await _instance(serving, body.model)
    # The first request for a model reads its tokenizer, chat template and limits (a packaged
    # GGUF: ~2.4 s here), and every request tokenizes its prompt: off the loop, which the API
    # shares with every service in one-process `up` and the demo.
    job = await asyncio.to_thread(_prepare, view, body)
    cut = TextCut(job.codec.decode, stops)
    try:
        admitted = await _admit(serving, job)
    except TooBusy as exc:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return _error_response(429, str(exc), None, "rate_limit_exceeded", headers)
    try:
        if body.stream:
            return await _stream(request, serving, job, cut, admitted)
        pieces: list[str] = []
        finish: str | None = None
        async with contextlib.aclosing(_run(request, serving, job, cut, admitted)) as events:
            async for text, why in events:
                pieces.append(text)
                finish = why
    finally:
        admitted[0].leave(job.rid)  # also when the response failed before generation began
    doc = _envelope(job, [_choice(job, "".join(pieces), finish)])
    doc["usage"] = _usage(job, cut)
    return web.json_response(doc)


def _sse(doc: Any) -> bytes:
    return b"data: " + msgspec.json.encode(doc) + b"\n\n"


async def _stream(
    request: web.Request,
    serving: Serving,
    job: Job,
    cut: TextCut,
    admitted: tuple[Batcher, Ticket],
) -> web.StreamResponse:
    """OpenAI's chunks as server-sent events, ``data: [DONE]`` last. An error after the
    headers went out is one ``data: {"error": ...}`` event (what OpenAI's clients raise on)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        if job.chat:
            await response.write(_sse(_envelope(job, [_choice(job, "", None, first=True)])))
        async with contextlib.aclosing(_run(request, serving, job, cut, admitted)) as events:
            async for text, finish in events:
                if text or finish:
                    await response.write(_sse(_envelope(job, [_choice(job, text or None, finish)])))
        options = job.body.stream_options
        if options is not None and options.include_usage:
            await response.write(_sse({**_envelope(job, []), "usage": _usage(job, cut)}))
    except ApiError as exc:
        err = error_body(exc.status, exc.message, exc.field, exc.code)
        await response.write(b"data: " + err + b"\n\n")
    except ConnectionResetError:
        return response  # the client left; _run released its sequence on the way out
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    """Ready instances of runnable models, each with its plan (stages, devices, layers)."""
    serving = request.app[SERVING_KEY]
    if not serving.api.synced.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(serving.api.synced.wait(), 5.0)
    views = serving.api.cache.instance_list()
    ready = [
        model_card(v) for v in views if v.get("state") == "loaded" and runnable(str(v.get("model")))
    ]
    return web.json_response({"object": "list", "data": ready})


async def serving_status(request: web.Request) -> web.Response:
    """GET /api/serving/{id}: the instance's batch as planned (batch, M, predicted step time
    and tokens/s) and as running (sequences in the batch and in the queue, the median time
    between two tokens of a sequence over the recent steps): what the dashboard compares."""
    serving = request.app[SERVING_KEY]
    name = request.match_info["id"]
    view = await _instance(serving, name)
    batcher = await serving.batcher(view)
    plan = batcher.plan
    return web.json_response(
        {
            "instance": view["id"],
            "plan": {
                "from_plan": plan.from_plan,
                "batch": plan.batch,
                "microbatches": plan.microbatches,
                "step_ms": plan.step_ms,
                "tokens_per_s": plan.tokens_per_s,
            },
            "running": len(batcher.batch.running),
            "queued": len(batcher.batch.queue),
            "queue_limit": batcher.batch.queue_limit,
            "step_ms": batcher.step_ms(),
        }
    )


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CompletionRequest)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, ChatRequest)


def openapi_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    """The /v1 paths and their request schemas, for the API's OpenAPI document."""
    _, schemas = msgspec.json.schema_components(
        [CompletionRequest, ChatRequest], ref_template="#/components/schemas/{name}"
    )
    error = {
        "description": "OpenAI's error shape: `{error: {message, type, param, code}}`",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    answer = {
        "description": "the completion (JSON), or with `stream: true` server-sent chunks "
        "ending with `data: [DONE]`",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }

    def post(summary: str, schema: str) -> dict[str, Any]:
        body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        codes = ("400", "401", "403", "404", "429", "500", "503", "504")
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": body},
                "responses": {"200": answer, **dict.fromkeys(codes, error)},
            }
        }

    paths = {
        "/v1/models": {
            "get": {
                "summary": "OpenAI-compatible: loaded instances of runnable models, each with "
                "its plan (`root` is the model, `plan.stages` its devices and layers)",
                "responses": {"200": answer},
            }
        },
        "/v1/completions": post("OpenAI-compatible completion of a prompt", "CompletionRequest"),
        "/api/serving/{id}": {
            "get": {
                "summary": "An instance's continuous batch: the plan's batch, micro-batches, "
                "step time and tokens/s, and what runs now (sequences running and queued, the "
                "recent median time between two tokens of a sequence)",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": answer, "404": error, "503": error},
            }
        },
        "/v1/chat/completions": post(
            "OpenAI-compatible chat completion (the model's ChatML template, or `role: text`)",
            "ChatRequest",
        ),
    }
    return paths, dict(schemas)


def curl_line(base_url: str, instance: str, token: str | None) -> str:
    """A shell command that asks ``instance`` a chat question (what ``make demo`` prints)."""
    body = {
        "model": instance,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
    }
    auth = f" -H 'Authorization: Bearer {token}'" if token else ""
    data = msgspec.json.encode(body).decode()
    return (
        f"curl -s {base_url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
        f"-d '{data}'"
    )


def register(app: web.Application, api: HasCluster) -> None:
    """Add the /v1 routes to ``app``, serving from ``api``'s cache and NATS connection."""
    serving = app[SERVING_KEY] = Serving(api)

    async def close_batches(_: web.Application) -> None:
        await serving.close()

    app.on_cleanup.append(close_batches)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/api/serving/{id}", serving_status)
