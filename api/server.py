"""The aiohttp application: thin handlers over :class:`api.state.ClusterCache`.

One background task watches the whole ``cluster_state`` bucket and applies every entry to the
cache; the handlers only read the cache (or forward a placement request over NATS). Server-sent
events fan each change out to every connected browser through a bounded queue per client, so
one slow client can never hold up the watch or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError, NotFoundError

from shardplane.api import metrics, openai_compat, openapi
from shardplane.api.auth import JsonErrorRunner, check_binding, env_token, token_middleware
from shardplane.api.errors import ApiError, request_error
from shardplane.api.state import KINDS, Change, ClusterCache, sse_event
from shardplane.bus import keys, subjects
from shardplane.bus.codec import BOM, DecodeError, check_limits
from shardplane.bus.ids import TOKEN_PATTERN
from shardplane.bus.liveness import ttl_from_env
from shardplane.bus.messages import (
    ErrorCode,
    PlacementReply,
    PlacementRequest,
    ReleaseReply,
    ReleaseRequest,
)
from shardplane.bus.streams import CLUSTER_STATE, provision
from shardplane.bus.watchguard import guard_watch

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The longest the watch or the metrics renderer runs before letting requests in: at thousands
# of KV changes a second their work is most of the loop's, and a request waits behind a slice.
LOOP_SLICE_S = 0.002
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

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


@dataclass(eq=False)  # identity semantics: each connection is its own subscriber
class Subscriber:
    kinds: frozenset[str]
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=20_000))
    lagged: bool = False


class Hub:
    """Fan-out of encoded events to SSE clients. A client whose queue fills (it reads slower
    than the cluster changes) gets its backlog dropped and one ``resync`` event, telling it to
    reload the lists, instead of unbounded memory on the server."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.sent = 0
        self.dropped = 0

    def publish(self, kind: str, event: bytes) -> None:
        for sub in self.subscribers:
            if kind not in sub.kinds and kind != "resync":
                continue
            try:
                sub.queue.put_nowait(event)
                self.sent += 1
            except asyncio.QueueFull:
                self.dropped += sub.queue.qsize()
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(sse_event("resync", b'{"reason":"client too slow"}'))
                sub.lagged = True

    def close_all(self) -> None:
        for sub in self.subscribers:
            while sub.queue.full():  # the end must get through, even past a backlog
                sub.queue.get_nowait()
            sub.queue.put_nowait(b"")  # the empty event ends the stream


@dataclass(frozen=True)
class Rendition:
    plain: bytes
    gzipped: bytes
    own: bytes  # the API's own figures in it
    version: int  # the MetricsBook version it shows
    built: float


@dataclass
class ApiState:
    nc: Client
    cache: ClusterCache
    hub: Hub
    request_timeout_s: float
    started: float = field(default_factory=time.time)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    watch_restarts: int = 0
    watch_error: str | None = None
    placement_requests: Counter[str] = field(default_factory=lambda: Counter[str]())
    watch_task: asyncio.Task[None] | None = None
    metrics: Rendition | None = None
    last_scrape: float = 0.0
    ttl_s: float | None = None  # liveness TTL for judging staleness (None: per node)
    watcher: Any = None  # the current KV watch (bus.watchguard stops it when it stalls)
    watched: int = 0  # the highest stream sequence the watch delivered, any key


STATE_KEY = web.AppKey("shardplane_api", ApiState)


# --- the watch ------------------------------------------------------------------------------


async def _bucket(state: ApiState) -> Any:
    js = state.nc.jetstream()
    try:
        return await js.key_value(CLUSTER_STATE)
    except (NotFoundError, BadRequestError):
        # The API may start before anything provisioned the bus; provisioning is idempotent.
        await provision(js)
        return await js.key_value(CLUSTER_STATE)


def _publish(state: ApiState, change: Change | None) -> None:
    if change is not None and state.hub.subscribers:
        state.hub.publish(change.kind, change.event())


async def watch_cluster_state(state: ApiState) -> None:
    """Apply every change of the bucket to the cache, forever; re-watch after any failure.

    A fresh watch replays the newest value of every key, so after a restart the cache is
    reconciled: keys that vanished meanwhile are dropped, and clients are told to resync."""
    first = True
    while True:
        watcher: Any = None
        try:
            kv = await _bucket(state)
            watcher = await kv.watchall()
            state.watcher = watcher
            seen: set[str] = set()
            initial = True
            slice_start = time.perf_counter()
            async for entry in watcher:
                if entry is None:
                    if initial:
                        initial = False
                        for change in state.cache.forget_missing(seen):
                            _publish(state, change)
                        state.cache.ready = True
                        state.synced.set()
                        state.watch_error = None
                        if not first:
                            state.hub.publish(
                                "resync", sse_event("resync", b'{"reason":"rewatch"}')
                            )
                        first = False
                    continue
                key = str(entry.key)
                if initial:
                    seen.add(key)
                deleted = entry.operation in ("DEL", "PURGE")
                revision = int(entry.revision or 0)
                state.watched = max(state.watched, revision)
                change = state.cache.apply(key, entry.value, revision, deleted, replay=initial)
                _publish(state, change)
                if time.perf_counter() - slice_start > LOOP_SLICE_S:
                    # A queued entry is taken without suspending: yield now and then, or a burst
                    # of changes would hold every request (and every body half sent) meanwhile.
                    await asyncio.sleep(0)
                    slice_start = time.perf_counter()
            raise ConnectionError("the watch ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.watch_restarts += 1
            state.watch_error = f"{type(exc).__name__}: {exc}"
            log.warning("cluster_state watch failed (%s); watching again", state.watch_error)
            await asyncio.sleep(min(5.0, 0.2 * state.watch_restarts))
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()


async def _guard(state: ApiState) -> None:
    async def restart() -> None:
        if state.watcher is not None:
            await state.watcher.stop()

    await guard_watch(
        state.nc.jetstream(), f"KV_{CLUSTER_STATE}", lambda: state.watched, restart, what="api"
    )


async def expire_stale(state: ApiState, interval_s: float = 0.5) -> None:
    """Judge liveness on the API's clock every ``interval_s`` (bus.liveness): during an outage
    nobody rewrites ``online``, and the API must not keep serving it as fresh."""
    while True:
        await asyncio.sleep(interval_s)
        for change in state.cache.expire(time.time(), state.ttl_s):
            _publish(state, change)


# --- helpers --------------------------------------------------------------------------------


LARGE_BODY = 256 * 1024  # bodies above this are written in slices of this size


async def _send(
    request: web.Request,
    body: bytes,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Answer 200 with ``body``; a large one (the device list is ~8 MB, a scrape ~40 MB at
    8,000 devices) in slices of a view of it.

    A plain ``web.Response`` copies such a body three times on the event loop before the
    kernel has it (aiohttp joins headers and body on Python < 3.12.9, asyncio copies what the
    socket did not take, then appends it to its buffer): tens of milliseconds a request under
    load. Slices of a memoryview go to the socket as they are, and the loop serves others while
    the client reads."""
    if len(body) <= LARGE_BODY or request.method == "HEAD":  # (a HEAD answer has no body)
        return web.Response(body=body, headers={"Content-Type": content_type, **(headers or {})})
    response = web.StreamResponse(headers={"Content-Type": content_type, **(headers or {})})
    response.content_length = len(body)
    await response.prepare(request)
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
    return await _send(request, b"".join((head, b",".join(parts[k] for k in keys), b"]}")))


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
    body: Callable[[ApiState], bytes],
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


def own_metrics(state: ApiState) -> bytes:
    """The API process's own figures (small; rendered with each scrape rendition)."""
    cache = state.cache
    own = [
        "# HELP shardplane_api_sse_clients Server-sent event clients connected.",
        "# TYPE shardplane_api_sse_clients gauge",
        f"shardplane_api_sse_clients {len(state.hub.subscribers)}",
        "# HELP shardplane_api_sse_dropped_total Events dropped for SSE clients too slow to read them.",
        "# TYPE shardplane_api_sse_dropped_total counter",
        f"shardplane_api_sse_dropped_total {state.hub.dropped}",
        "# HELP shardplane_api_kv_updates_total cluster_state changes applied to the cache.",
        "# TYPE shardplane_api_kv_updates_total counter",
        f"shardplane_api_kv_updates_total {cache.updates}",
        "# HELP shardplane_api_kv_invalid_total cluster_state values that failed to decode.",
        "# TYPE shardplane_api_kv_invalid_total counter",
        f"shardplane_api_kv_invalid_total {cache.invalid}",
        "# HELP shardplane_api_kv_revision Newest cluster_state revision the cache holds.",
        "# TYPE shardplane_api_kv_revision gauge",
        f"shardplane_api_kv_revision {cache.revision}",
        "# HELP shardplane_api_watch_restarts_total Times the cluster_state watch was restarted.",
        "# TYPE shardplane_api_watch_restarts_total counter",
        f"shardplane_api_watch_restarts_total {state.watch_restarts}",
        "# HELP shardplane_api_metrics_renders_total Times the scrape text was rendered.",
        "# TYPE shardplane_api_metrics_renders_total counter",
        f"shardplane_api_metrics_renders_total {cache.metrics.renders}",
        "# HELP shardplane_api_placement_requests_total POST /api/placements by outcome.",
        "# TYPE shardplane_api_placement_requests_total counter",
        *(
            f'shardplane_api_placement_requests_total{{outcome="{k}"}} {v}'
            for k, v in sorted(state.placement_requests.items())
        ),
    ]
    return ("\n".join(own) + "\n").encode()


async def render_metrics(state: ApiState) -> Rendition:
    """Render the scrape text and its gzip form once, for every scrape until the next render.

    At 8,000 devices the text is ~40 MB: formatting the changed devices, joining the changed
    families and compressing take tens of milliseconds, so they happen here, at most once per
    ``metrics_interval_s``, in slices that yield to the event loop, the big join and the
    compression in a thread (both release the GIL), never on a scrape's path. A scrape sees
    figures at most ``metrics_interval_s`` plus one render old, well inside any scrape interval
    (the DCGM exporter itself collects every 30 s). Changes that land mid-render are in the next
    one: under constant churn no text is ever "current", and redoing it would only cost more."""
    cache = state.cache
    slice_start = time.perf_counter()
    while cache.format_stale(64):
        if time.perf_counter() - slice_start > LOOP_SLICE_S:
            await asyncio.sleep(0)  # the watch and requests run between slices
            slice_start = time.perf_counter()
    version = cache.metrics.version
    parts: list[bytes] = []
    for part in cache.metrics.parts(cache.summary_metrics):
        parts.append(part)
        await asyncio.sleep(0)
    cache.metrics.renders += 1
    own = own_metrics(state)
    parts.append(own)
    plain, gzipped = await asyncio.to_thread(_join_and_compress, parts)
    rendition = Rendition(
        plain=plain, gzipped=gzipped, own=own, version=version, built=time.monotonic()
    )
    current = state.metrics
    # Two renders can overlap (two first scrapes, a scrape and the refresher): the one that
    # finishes last must not replace newer figures with older ones.
    if current is not None and current.version > version:
        return current
    state.metrics = rendition
    return rendition


def _join_and_compress(parts: list[bytes]) -> tuple[bytes, bytes]:
    plain = b"".join(parts)
    return plain, gzip.compress(plain, 1)


SCRAPED_RECENTLY_S = 300.0  # keep the rendition fresh only while something scrapes


async def refresh_metrics(state: ApiState, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        held = state.metrics
        if held is None or time.monotonic() - state.last_scrape > SCRAPED_RECENTLY_S:
            continue  # nobody scrapes: render on the next scrape, not for nobody
        if state.cache.metrics_dirty(held.version) or own_metrics(state) != held.own:
            try:
                await render_metrics(state)
            except Exception:
                log.exception("rendering /metrics failed")


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


# --- the application ------------------------------------------------------------------------


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a client can cause answers JSON naming what was wrong; anything else is a
    500 with the error logged, never a dropped connection or a dead server."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.Response(body=exc.body(), status=exc.status, content_type=JSON)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # A body over the limit is an invalid request (413, code invalid_request), so that every
        # answer to POST /api/placements carries a bus ErrorCode; aiohttp's text names the sizes.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "invalid_request")
        message = exc.text if exc.status == 413 and exc.text else exc.reason
        body = ApiError(exc.status, code, message).body()
        return web.Response(body=body, status=exc.status, content_type=JSON, headers=_allow(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        body = ApiError(500, "internal", f"{type(exc).__name__}: {exc}").body()
        return web.Response(body=body, status=500, content_type=JSON)


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def make_app(
    nc: Client,
    *,
    request_timeout_s: float = 30.0,
    history_points: int = 150,
    metrics_interval_s: float = metrics.RENDER_INTERVAL_S,
    token: str | None = None,
    ttl_s: float | None = None,
) -> web.Application:
    """The whole API on one NATS connection; the watch runs while the app runs. With ``token``,
    mutating endpoints need it as a bearer token (``api.auth``)."""
    app = web.Application(
        middlewares=[errors_middleware, openai_compat.errors_middleware, token_middleware(token)],
        client_max_size=1024 * 1024,
    )
    # A misspelt host label setting stops the API here, before it serves one scrape.
    cache = ClusterCache(history_points, host_label=metrics.host_label_from_env())
    state = ApiState(
        nc=nc,
        cache=cache,
        hub=Hub(),
        request_timeout_s=request_timeout_s,
        ttl_s=ttl_s if ttl_s is not None else ttl_from_env(),
    )
    app[STATE_KEY] = state

    async def watch_ctx(app: web.Application) -> AsyncIterator[None]:
        state.watch_task = asyncio.create_task(watch_cluster_state(state), name="api-watch")
        refresher = asyncio.create_task(
            refresh_metrics(state, metrics_interval_s), name="api-metrics"
        )
        expirer = asyncio.create_task(expire_stale(state), name="api-liveness")
        guard = asyncio.create_task(_guard(state), name="api-watch-guard")
        # Serve only once the bucket is loaded (or 10 s passed): a first request should see
        # the whole fleet, and /readyz tells the truth either way.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.synced.wait(), 10.0)
        yield
        for task in (state.watch_task, refresher, expirer, guard):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def on_shutdown(app: web.Application) -> None:
        state.hub.close_all()

    app.cleanup_ctx.append(watch_ctx)
    app.on_shutdown.append(on_shutdown)
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/api/openapi.json", openapi_handler)
    r.add_get("/api/gpu/devices", devices)
    r.add_get("/api/gpu/devices/{node}/{index}", device)
    r.add_get("/api/gpu/history", history)
    r.add_get("/api/gpu/topology", topology)
    r.add_get("/api/nodes", nodes)
    r.add_get("/api/placements", placements)
    r.add_post("/api/placements", place)
    r.add_get("/api/placements/{id}", placement)
    r.add_delete("/api/placements/{id}", release)
    r.add_get("/api/events", events)
    r.add_static("/static/", STATIC_DIR, show_index=False)
    openai_compat.register(app, state)  # /v1/models, /v1/completions, /v1/chat/completions
    return app


async def start_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start ``app`` on ``host:port`` (0 picks a free port); returns the runner and base URL."""
    runner = JsonErrorRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound: Any = runner.addresses[0]
    return runner, f"http://{host}:{int(bound[1])}"


async def run_api(
    nc: Client,
    *,
    stop: asyncio.Event,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
) -> None:
    """Serve until ``stop`` is set, then close clients (SSE streams included) and return.
    ``token`` (default ``SHARDPLANE_API_TOKEN``) guards mutating endpoints; without one, a
    non-loopback ``host`` raises InsecureBinding before anything is served."""
    token = token or env_token()
    check_binding(host, token)
    runner, url = await start_app(make_app(nc, token=token), host, port)
    log.info("status API and dashboard on %s/", url)
    # Whatever is alive now (modules, connections, the loaded cache) lives for the process:
    # moving it out of the cycle collector's generations keeps its full collections, which
    # pause the event loop, down to what changed since. Acyclic garbage (all of the cache's
    # values) is still freed by reference counting as it is replaced.
    gc.freeze()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        gc.unfreeze()  # hand the collector everything back (matters when embedded, as in tests)
