"""The HTTP handlers: thin reads of the cache, or a placement forwarded over NATS.

Every handler refuses a parameter it does not know, waits for the first full read of the bucket
before answering, and maps every planner answer to its HTTP status once (``ERROR_STATUS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shardplane.api import openapi
from shardplane.api.body import Body, Joined
from shardplane.api.errors import ApiError, request_error
from shardplane.api.hub import JSON, PROMETHEUS, STATE_KEY, ApiState, Subscriber
from shardplane.api.scrape import SCRAPED_RECENTLY_S, render_metrics
from shardplane.api.state import KINDS, sse_event
from shardplane.bus import keys, subjects
from shardplane.bus.codec import BOM, DecodeError, check_limits
from shardplane.bus.ids import TOKEN_PATTERN
from shardplane.bus.messages import (
    ErrorCode,
    PlacementReply,
    PlacementRequest,
    ReleaseReply,
    ReleaseRequest,
)
from shardplane.bus.streams import CLUSTER_STATE

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


# The HTTP status for each PlacementReply error code, whoever set it (the planner, or this API
# when the planner could not be asked). Fleet-state refusals (nothing fits, no devices, a
# concurrent placement won) are 409: the request was well formed, the cluster's current state
# said no, and the same request may succeed later. The planner's own Nats-Service-Error-Code
# header (503 for no_devices, 507 for insufficient_memory) is a NATS-level hint and is not
# used: the status comes from ``error.code`` in the body, so a 503 here always means that no
# planner answered. Every code has a status (a test holds this table to bus ErrorCode).
ERROR_STATUS: dict[ErrorCode, int] = {
    "invalid_request": 400,
    "unknown_model": 404,
    "no_devices": 409,
    "insufficient_memory": 409,
    "conflict": 409,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
    "not_found": 404,
}

_request_decoder = msgspec.json.Decoder(PlacementRequest)
_reply_decoder = msgspec.json.Decoder(PlacementReply)
_release_decoder = msgspec.json.Decoder(ReleaseReply)
_json = msgspec.json.Encoder()
_TOKEN = re.compile(TOKEN_PATTERN)


# --- helpers --------------------------------------------------------------------------------


LARGE_BODY = 256 * 1024  # bodies above this are written in slices of this size


async def _send(
    request: web.Request,
    body: Body,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Answer 200 with ``body``; a large one (the device list is ~12 MB, a scrape ~40 MB at
    8,000 devices) in slices: of a view of it, or joined slice by slice from a list snapshot
    (api.body).

    A plain ``web.Response`` copies such a body three times on the event loop before the
    kernel has it (aiohttp joins headers and body on Python < 3.12.9, asyncio copies what the
    socket did not take, then appends it to its buffer): tens of milliseconds a request under
    load. Slices go to the socket as they are, and the loop serves others while the client
    reads."""
    if len(body) <= LARGE_BODY or request.method == "HEAD":  # (a HEAD answer has no body)
        whole = body if isinstance(body, bytes) else bytes(body)
        return web.Response(body=whole, headers={"Content-Type": content_type, **(headers or {})})
    response = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
    response.content_length = len(body)
    with _state(request).priority.sending():  # the watch waits meanwhile (api.priority)
        await response.prepare(request)
        if isinstance(body, Joined):
            for piece in body.slices(LARGE_BODY):
                await response.write(piece)
        else:
            view = memoryview(body)
            for at in range(0, len(body), LARGE_BODY):
                await response.write(view[at : at + LARGE_BODY])
        await response.write_eof()
    return response


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def _check_query(request: web.Request, allowed: frozenset[str]) -> None:
    for name in request.query:
        if name not in allowed:
            hint = (
                f"; allowed: {', '.join(sorted(allowed))}"
                if allowed
                else "; this endpoint takes none"
            )
            raise ApiError(400, "invalid_request", f"unknown query parameter `{name}`{hint}", name)


def _state(request: web.Request) -> ApiState:
    return request.app[STATE_KEY]


def _instance_id(request: web.Request) -> str:
    """The ``{id}`` of the path, refused unless it is an instance id."""
    ident = request.match_info["id"]
    if not _TOKEN.match(ident):
        raise ApiError(
            400,
            "invalid_request",
            "`id` must be an instance id (lowercase [a-z0-9_-], 1-64 chars)",
            "id",
        )
    return ident


async def _synced(state: ApiState, timeout: float = 5.0) -> None:
    # Right after start the first watch may still be replaying the bucket; wait briefly so a
    # client never sees a half-empty fleet, but never hang a request on a dead bus.
    if not state.synced.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.synced.wait(), timeout)


# --- handlers -------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response({"ok": True, "uptime_s": round(time.time() - state.started, 3)})


async def readyz(request: web.Request) -> web.Response:
    state = _state(request)
    problems: list[str] = []
    if not state.nc.is_connected:
        problems.append("NATS is not connected")
    else:
        try:
            kv = await state.nc.jetstream().key_value(CLUSTER_STATE)
            await asyncio.wait_for(kv.status(), 2.0)
        except Exception as exc:
            problems.append(
                f"KV bucket {CLUSTER_STATE} is not readable: {type(exc).__name__}: {exc}"
            )
    if not state.cache.ready:
        problems.append("the cluster_state watch has not delivered the bucket yet")
    if state.watch_error:
        problems.append(f"the cluster_state watch failed: {state.watch_error}")
    age, ttl = state.cache.view_age(time.time()), state.cache.view_ttl(state.ttl_s)
    if age is not None and age > ttl:
        problems.append(
            f"the view is {age:.1f} s old (newest sample), over the {ttl:g} s TTL: "
            "the projector or NATS is behind"
        )
    body = {
        "ready": not problems,
        "problems": problems,
        "nats_connected": state.nc.is_connected,
        "revision": state.cache.revision,
        "devices": len(state.cache.briefs),
    }
    return web.json_response(body, status=200 if not problems else 503)


async def devices(request: web.Request) -> web.StreamResponse:
    _check_query(request, frozenset({"node", "status"}))
    state = _state(request)
    await _synced(state)
    node, status = request.query.get("node"), request.query.get("status")
    if status is not None and status not in ("online", "offline"):
        raise ApiError(400, "invalid_request", "`status` must be online or offline", "status")
    if node is None and status is None:
        return await _send(request, state.cache.devices_body())
    cache = state.cache
    keys = [
        k
        for k in cache.sorted_keys("device")
        if (node is None or cache.briefs[k].node == node)
        and (status is None or cache.briefs[k].status == status)
    ]
    head = f'{{"count":{len(keys)},"revision":{cache.revision},"devices":['.encode()
    parts = cache.json["device"]
    return await _send(request, Joined(head, [parts[k] for k in keys], b"]}"))


async def device(request: web.Request) -> web.Response:
    _check_query(request, frozenset())
    state = _state(request)
    await _synced(state)
    node, index = request.match_info["node"], request.match_info["index"]
    if not index.isdigit():
        raise ApiError(
            400, "invalid_request", "`index` must be a device index (0, 1, ...)", "index"
        )
    body = state.cache.device_json(node, int(index))
    if body is None:
        raise ApiError(404, "not_found", f"no device {node}/{index}", "id")
    return _json_response(body)


HISTORY_ALL_LIMIT = 512  # devices one unfiltered history answer may hold (150 points each)


async def history(request: web.Request) -> web.Response:
    _check_query(request, frozenset({"device", "node"}))
    state = _state(request)
    await _synced(state)
    wanted, node_filter = request.query.get("device"), request.query.get("node")
    cache = state.cache
    out: dict[str, Any] = {}
    if wanted is None and node_filter is None and len(cache.briefs) > HISTORY_ALL_LIMIT:
        raise ApiError(
            400,
            "invalid_request",
            f"{len(cache.briefs)} devices are too many for one history answer: pass `node` or `device`",
            "device",
        )
    if wanted is not None:
        index = wanted.rpartition("/")[2]
        key = keys.key_of_ref(wanted)
        series = cache.history.series(key) if index.isdigit() else None
        if series is None:
            raise ApiError(404, "not_found", f"no history for device {wanted!r}", "device")
        out[wanted] = series
    else:
        for key in cache.sorted_keys("device"):
            if node_filter is not None and cache.briefs[key].node != node_filter:
                continue
            series = cache.history.series(key)
            if series is not None:
                out[cache.briefs[key].id] = series
    return _json_response(_json.encode({"points": cache.history.points, "devices": out}))


def _listing(
    body: Callable[[ApiState], Body],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A GET of a whole list the cache keeps ready-built: no parameters, the body as is."""

    async def handler(request: web.Request) -> web.StreamResponse:
        _check_query(request, frozenset())
        state = _state(request)
        await _synced(state)
        return await _send(request, body(state))

    return handler


topology = _listing(lambda state: state.cache.topology_body())
nodes = _listing(lambda state: state.cache.nodes_body())
placements = _listing(lambda state: state.cache.placements_body())


async def placement(request: web.Request) -> web.Response:
    _check_query(request, frozenset())
    state = _state(request)
    await _synced(state)
    ident = _instance_id(request)
    body = state.cache.instance_json(ident)
    if body is None:
        raise ApiError(404, "not_found", f"no placement {ident!r}", "id")
    return _json_response(body)


async def place(request: web.Request) -> web.Response:
    """Validate the PlacementRequest here (so a typo gets a 400 naming the field without a
    round trip), then forward the client's JSON as is and return the planner's reply as is."""
    _check_query(request, frozenset())
    state = _state(request)
    raw = await request.read()
    try:
        check_limits(raw, "json", "PlacementRequest")
        parsed = _request_decoder.decode(raw.removeprefix(BOM))
    except (msgspec.ValidationError, msgspec.DecodeError, DecodeError) as exc:
        state.placement_requests["invalid_request"] += 1
        raise request_error(exc, raw) from None
    timeout = state.request_timeout_s
    if parsed.time_limit_s is not None:
        timeout = max(timeout, parsed.time_limit_s + 10.0)
    try:
        if not state.nc.is_connected:
            # Reconnecting: a request would wait out its whole timeout in nats-py's buffer.
            raise ConnectionClosedError
        msg = await state.nc.request(subjects.PLACEMENT_REQUEST, raw, timeout=timeout)
    except (NoRespondersError, ConnectionClosedError) as exc:
        state.placement_requests["unavailable"] += 1
        why = (
            "no planner answers placement.request; is `shardplane planner` running?"
            if isinstance(exc, NoRespondersError)
            else "the API is not connected to NATS; retry in a moment"
        )
        raise ApiError(503, "unavailable", why) from None
    except NatsTimeoutError:
        state.placement_requests["timeout"] += 1
        raise ApiError(
            504, "timeout", f"the planner did not answer within {timeout:.0f} s"
        ) from None
    try:
        reply = _reply_decoder.decode(msg.data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        state.placement_requests["bad_reply"] += 1
        raise ApiError(
            502, "internal", f"the planner's reply is not a PlacementReply: {exc}"
        ) from None
    if reply.ok:
        state.placement_requests["ok"] += 1
        return _json_response(msg.data, 200)
    code: ErrorCode = reply.error.code if reply.error is not None else "internal"
    state.placement_requests[code] += 1
    return _json_response(msg.data, ERROR_STATUS[code])


async def release(request: web.Request) -> web.Response:
    """DELETE /api/placements/{id}: forward a ReleaseRequest over ``placement.release`` and
    return the planner's ReleaseReply as is (200 also when it was released before: idempotent)."""
    _check_query(request, frozenset())
    state = _state(request)
    ident = _instance_id(request)
    body = _json.encode(ReleaseRequest(instance_id=ident))
    try:
        if not state.nc.is_connected:
            raise ConnectionClosedError
        msg = await state.nc.request(
            subjects.PLACEMENT_RELEASE, body, timeout=state.request_timeout_s
        )
    except (NoRespondersError, ConnectionClosedError):
        raise ApiError(
            503, "unavailable", "no planner answers placement.release; retry in a moment"
        ) from None
    except NatsTimeoutError:
        raise ApiError(504, "timeout", "the planner did not answer the release in time") from None
    try:
        reply = _release_decoder.decode(msg.data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ApiError(
            502, "internal", f"the planner's reply is not a ReleaseReply: {exc}"
        ) from None
    code: ErrorCode | None = reply.error.code if reply.error is not None else None
    return _json_response(msg.data, 200 if reply.ok or code is None else ERROR_STATUS[code])


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one event per KV change (``device``, ``node``, ``instance``, each
    with ``op`` put/delete and the same view the lists return), ``resync`` when a client must
    reload, and a comment every 15 s so proxies keep the connection open."""
    _check_query(request, frozenset({"kinds"}))
    state = _state(request)
    kinds: frozenset[str] = frozenset(KINDS)
    if "kinds" in request.query:
        asked = {k.strip() for k in request.query["kinds"].split(",") if k.strip()}
        unknown = sorted(asked - set(KINDS))
        if unknown or not asked:
            raise ApiError(
                400,
                "invalid_request",
                f"`kinds` takes {', '.join(KINDS)}; got {unknown or 'nothing'}",
                "kinds",
            )
        kinds = frozenset(asked)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    await response.prepare(request)
    sub = Subscriber(kinds)
    state.hub.subscribers.add(sub)
    try:
        hello = _json.encode({"revision": state.cache.revision, "kinds": sorted(kinds)})
        await response.write(b"retry: 2000\n" + sse_event("hello", hello))
        while True:
            try:
                first = await asyncio.wait_for(sub.queue.get(), 15.0)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if not first:
                break
            # Batch what has queued up into one write: at thousands of changes per second a
            # write per event would cost more than the events themselves.
            batch = [first]
            while not sub.queue.empty() and len(batch) < 512:
                item = sub.queue.get_nowait()
                if not item:
                    await response.write(b"".join(batch))
                    return response
                batch.append(item)
            await response.write(b"".join(batch))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        state.hub.subscribers.discard(sub)
    return response


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    _check_query(request, frozenset())
    state = _state(request)
    await _synced(state)
    state.last_scrape = time.monotonic()
    rendition = state.metrics
    if rendition is None or time.monotonic() - rendition.built > SCRAPED_RECENTLY_S:
        rendition = await render_metrics(state)  # the first scrape in a while pays once
    if "gzip" in request.headers.get("Accept-Encoding", "").lower():
        headers = {"Vary": "Accept-Encoding", "Content-Encoding": "gzip"}
        return await _send(request, rendition.gzipped, PROMETHEUS, headers)
    return await _send(request, rendition.plain, PROMETHEUS, {"Vary": "Accept-Encoding"})


async def openapi_handler(request: web.Request) -> web.Response:
    return _json_response(openapi.document_bytes())


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
