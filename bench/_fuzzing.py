"""Fuzzing the whole running system, shared by ``bench/fuzz.py`` and the tests.

The services (projector, planner, API, agents and workers of a two-node simulated fleet) run
as their roles on a secured nats-server. Inputs come from hypothesis strategies: arbitrary bytes
and near-valid documents (a valid message with one thing wrong: a missing or unknown field, a
wrong type, a number out of range, nesting a thousand levels deep, a BOM, a JSON scalar, an
inconsistent model card), in JSON and MessagePack. They go to ``placement.request``, to the
HTTP API, and into the streams every bus decoder reads (telemetry, shard status, assignments),
each published by the one role allowed to publish there.

What counts: a request is *answered* when a reply arrives that decodes as a PlacementReply (or,
over HTTP, a JSON body with ``ok``); an error reply with code ``internal`` (HTTP 5xx) is an
internal error. A stream input is answered when the projector has acknowledged it and it was
either dead-lettered with a reason or valid (then it must not have been dead-lettered: nothing
valid is lost). A crash is a service task that ended, or a service that no longer answers a
valid request or applies a valid sample afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from shardplane.bench._probes import SecureBus
from shardplane.bus import authority, codec, subjects
from shardplane.bus.authority import LedgerView
from shardplane.bus.messages import PlacementReply, ShardAssignment, ShardStatus
from shardplane.bus.streams import DEADLETTER, PLACEMENTS, SHARDS, TELEMETRY
from shardplane.natsserver import free_port
from shardplane.placing import request_with_retry
from shardplane.projector.decode import Poison, decode_event
from shardplane.projector.service import (
    CONSUMERS,
    REASON_HEADER,
    SOURCE_SEQ_HEADER,
    SOURCE_STREAM_HEADER,
)

NODE = "rig-a"
FLEET = """
interval_s = 1.0
[network]
default_gbps = 10.0
[[nodes]]
name = "rig-a"
gpus = [{ model = "A100-80GB", count = 1 }]
[[nodes]]
name = "rig-b"
gpus = [{ model = "RTX-4090", count = 2 }]
"""
TOKEN = "fuzz-token"
TARGETS: tuple[str, ...] = ("request", "http", "telemetry", "status", "assignment")

# --- inputs --------------------------------------------------------------------------------

_CARD = {
    "name": "fuzz-card",
    "layers": 8,
    "hidden": 1024,
    "intermediate": 4096,
    "heads": 16,
    "kv_heads": 4,
    "vocab": 32000,
}
REQUEST: dict[str, Any] = {"model": "llama-3.1-8b", "context_tokens": 2048, "dry_run": True}
SAMPLE: dict[str, Any] = {
    "node": NODE,
    "index": 0,
    "uuid": "GPU-fuzz",
    "seq": 1,
    "ts": 1.0,
    "memory_total_bytes": 80 * 2**30,
    "memory_free_bytes": 70 * 2**30,
}
HEARTBEAT: dict[str, Any] = {"node": NODE, "seq": 1, "ts": 1.0}
STATUS: dict[str, Any] = {
    "instance_id": "fuzz",
    "generation": 1,
    "node": NODE,
    "stage": 0,
    "state": "loaded",
    "seq": 1,
    "ts": 1.0,
}
ASSIGNMENT: dict[str, Any] = {
    "instance_id": "fuzz",
    "generation": 1,
    "node": NODE,
    "model": "llama-3.1-8b",
    "release": True,
}

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_odd_numbers = st.sampled_from([0, -1, 2**63, -(2**63), 10**30, 1.5, float("nan"), float("inf")])


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def near_valid(draw: st.DrawFn, base: dict[str, Any], card: bool = False) -> bytes:
    """``base`` with one thing wrong, encoded as JSON (sometimes with a BOM, leading space or
    truncated) or MessagePack."""
    doc: dict[str, Any] = dict(base)
    if card and draw(st.booleans()):
        doc["model"] = dict(_CARD)
    target: dict[str, Any] = doc["model"] if isinstance(doc.get("model"), dict) else doc
    keys = sorted(target)
    how = draw(st.sampled_from(["drop", "unknown", "retype", "number", "deep", "none", "typo"]))
    if how == "drop" and keys:
        target.pop(draw(st.sampled_from(keys)))
    elif how == "unknown":
        target[draw(st.text(min_size=1, max_size=12))] = draw(_json_values)
    elif how == "retype" and keys:
        target[draw(st.sampled_from(keys))] = draw(_json_values)
    elif how == "number" and keys:
        target[draw(st.sampled_from(keys))] = draw(_odd_numbers | st.integers())
    elif how == "deep" and keys:
        target[draw(st.sampled_from(keys))] = _deep(draw(st.integers(10, 3000)))
    elif how == "typo" and keys:
        key = draw(st.sampled_from(keys))
        target[key[:-1] + "x"] = target.pop(key)
    form = draw(st.sampled_from(["json", "json", "msgpack", "bom", "space", "cut", "scalar"]))
    try:
        body = json.dumps(doc, allow_nan=True).encode()
        packed = msgspec.msgpack.encode(doc)
    except (RecursionError, ValueError, OverflowError, msgspec.EncodeError):
        return b"[" * 5000
    if form == "msgpack":
        return packed
    if form == "bom":
        return codec.BOM + body
    if form == "space":
        return b" \n\t" + body
    if form == "cut":
        return body[: draw(st.integers(0, max(0, len(body) - 1)))]
    if form == "scalar":
        return draw(st.sampled_from([b"null", b"123", b'"x"', b"true", b"[]", b"{}"]))
    return body


def strategy(target: str) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=600)
    base = {
        "request": (REQUEST, True),
        "http": (REQUEST, True),
        "telemetry": (SAMPLE, False),
        "status": (STATUS, False),
        "assignment": (ASSIGNMENT, False),
    }[target]
    near = near_valid(base[0], base[1])
    if target == "telemetry":
        near = st.one_of(near, near_valid(HEARTBEAT))
    return st.one_of(raw, near, near, near)  # three near-valid documents to one byte string


def draw_inputs(target: str, count: int, seed: int = 0) -> list[bytes]:
    """``count`` inputs for ``target``, reproducibly (hypothesis drives the choices)."""
    out: list[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=(
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ),
        deadline=None,
    )
    @given(strategy(target), st.just(seed))
    def collect(data: bytes, _seed: int) -> None:
        out.append(data)

    collect()
    return out


# --- the system under fuzz -------------------------------------------------------------------


@dataclass
class FuzzResult:
    inputs: dict[str, int] = field(default_factory=dict[str, int])
    answered: dict[str, int] = field(default_factory=dict[str, int])
    internal_errors: dict[str, int] = field(default_factory=dict[str, int])
    deadlettered: int = 0
    valid_lost: int = 0
    crashes: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list[str])  # first few, for the reader
    codes: dict[str, int] = field(default_factory=dict[str, int])  # request replies by outcome

    def note(self, message: str) -> None:
        if len(self.failures) < 10:
            self.failures.append(message)


@dataclass
class System:
    bus: SecureBus
    api_url: str
    tasks: list[asyncio.Task[None]]
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def running_system(bus: SecureBus):
    from shardplane import secure
    from shardplane.commands import run_services, wait_for_devices

    with tempfile.TemporaryDirectory(prefix="shardplane-fuzz-") as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(FLEET)
        stop = asyncio.Event()
        port = free_port()
        tasks = await run_services(
            bus.url,
            stop,
            fleet=fleet,
            api_port=port,
            creds=secure.role_creds(bus.folder),
            api_token=TOKEN,
        )
        try:
            api = await bus.connect("api")
            try:
                await wait_for_devices(api, 3, timeout=60)
            finally:
                await api.close()
            yield System(bus, f"http://127.0.0.1:{port}", tasks, stop)
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=15)
            for task in tasks:
                task.cancel()


def _reply_of(data: bytes) -> PlacementReply | None:
    try:
        return codec.decode(PlacementReply, data, codec.sniff_encoding(data))
    except codec.DecodeError:
        return None


async def fuzz_requests(nc: Client, inputs: list[bytes], result: FuzzResult) -> None:
    for data in inputs:
        try:
            msg = await nc.request(subjects.PLACEMENT_REQUEST, data, timeout=30.0)
        except NatsTimeoutError:
            result.note(f"placement.request unanswered: {data[:80]!r}")
            continue
        reply = _reply_of(msg.data)
        if reply is None:
            result.note(f"placement.request reply not a PlacementReply: {msg.data[:120]!r}")
            continue
        result.answered["request"] += 1
        code = "ok" if reply.error is None else reply.error.code
        result.codes[code] = result.codes.get(code, 0) + 1
        if reply.error is not None and reply.error.code == "internal":
            result.internal_errors["request"] += 1
            result.note(f"internal error for {data[:80]!r}: {reply.error.message[:200]}")


async def fuzz_http(base: str, inputs: list[bytes], result: FuzzResult) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for i, data in enumerate(inputs):
            # Every third input goes into a query string or path instead of a body.
            if i % 3 == 2:
                text = data.decode("latin-1").replace("#", "%23")
                url, method, body = f"{base}/api/gpu/devices?{text[:200]}", "GET", None
            elif i % 3 == 1:
                url, method, body = f"{base}/api/placements", "POST", b"{" + data
            else:
                url, method, body = f"{base}/api/placements", "POST", data
            try:
                async with session.request(method, url, data=body, headers=headers) as response:
                    payload = await response.read()
                    status = response.status
            except aiohttp.ClientError as exc:
                result.note(f"HTTP {method} failed: {exc!r}")
                continue
            try:
                doc = json.loads(payload)
            except ValueError:
                result.note(f"HTTP {status} body not JSON: {payload[:120]!r}")
                continue
            if not isinstance(doc, dict) or ("ok" not in doc and "count" not in doc):
                result.note(f"HTTP {status} body has no ok: {payload[:120]!r}")
                continue
            result.answered["http"] += 1
            result.codes[f"http {status}"] = result.codes.get(f"http {status}", 0) + 1
            if status >= 500 and status != 503:
                result.internal_errors["http"] += 1
                result.note(f"HTTP {status} for {data[:80]!r}: {payload[:200]!r}")


STREAM_OF = {"telemetry": TELEMETRY, "status": SHARDS, "assignment": PLACEMENTS}


def _subject(target: str, data: bytes, i: int) -> str:
    if target == "telemetry":
        return subjects.node_heartbeat(NODE) if i % 2 else subjects.gpu_sample(NODE, 0)
    if target == "status":
        return subjects.shard_status(NODE, "fuzz")
    return subjects.assigned(NODE)


# A stored stream input is one of: "poison" (no decoder takes it: it must be dead-lettered with
# a reason), "valid" (well-formed and authorised by the planner's ledger: it must not be
# dead-lettered) or "unauthorised" (well-formed, but for an instance, generation or plan the
# ledger never published: the generation authority may drop it or dead-letter it, either is
# right; bus.authority).
Kind = Literal["poison", "valid", "unauthorised"]


@dataclass(frozen=True)
class Authorised:
    """What the planner really placed before the fuzz: the ledger's view, and each placed
    stage as (instance, generation, node, stage)."""

    ledger: LedgerView
    stages: frozenset[tuple[str, int, str, int]]


def classify(subject: str, data: bytes, known: Authorised) -> Kind:
    event = decode_event(subject, data)
    match event:
        case Poison():
            return "poison"
        case ShardAssignment():
            ok = authority.judge(known.ledger, event)[0] in ("current", "stale")
            return "valid" if ok else "unauthorised"
        case ShardStatus():
            key = (event.instance_id, event.generation, event.node, event.stage)
            return "valid" if key in known.stages else "unauthorised"
        case _:
            return "valid"


async def publish_stream_inputs(
    nc: Client, target: str, inputs: list[bytes], result: FuzzResult, known: Authorised
) -> list[tuple[int, Kind]]:
    """Publish through JetStream; (stream sequence, kind) for each stored input."""
    js = nc.jetstream()
    stored: list[tuple[int, Kind]] = []
    for i, data in enumerate(inputs):
        subject = _subject(target, data, i)
        ack = await js.publish(subject, data, timeout=10.0)
        stored.append((ack.seq, classify(subject, data, known)))
    return stored


async def place_for_real(api: Client, instance_id: str) -> PlacementReply:
    """A small real placement on NODE through the planner (the model card is tiny, so it fits
    however much the fuzz placed).

    The first one runs as soon as the devices are in the KV, which says nothing of the planner:
    it may still be subscribing, and the server answers "no responders" at once until it has,
    so that answer (and only that) is retried until the planner serves."""
    body: dict[str, Any] = {
        "model": dict(_CARD),
        "instance_id": instance_id,
        "context_tokens": 2048,
        "exclude_nodes": [n for n in ("rig-a", "rig-b") if n != NODE],
    }
    reply = await request_with_retry(api, body, timeout=30.0)
    if not reply.ok:
        raise RuntimeError(f"the fuzz's own placement of {instance_id} failed: {reply.error}")
    return reply


async def authorised(admin: Client, placed: list[PlacementReply]) -> Authorised:
    view = await authority.read(await authority.ledger_bucket(admin.jetstream()))
    stages = frozenset(
        (r.instance_id or "", r.generation, s.node, i)
        for r in placed
        for i, s in enumerate(r.stages)
    )
    return Authorised(view, stages)


async def settle(admin: Client, timeout: float = 120.0) -> bool:
    """True once the projector has acknowledged everything in its streams."""
    js = admin.jetstream()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = True
        for stream, durable in CONSUMERS.items():
            info = await js.consumer_info(stream, durable)
            if (info.num_pending or 0) or (info.num_ack_pending or 0):
                done = False
        if done:
            return True
        await asyncio.sleep(0.2)
    return False


async def dead_letters(admin: Client) -> dict[tuple[str, int], str]:
    """(source stream, sequence) -> reason, for everything the projector dead-lettered."""
    js = admin.jetstream()
    found: dict[tuple[str, int], str] = {}
    last = (await js.stream_info(DEADLETTER)).state.last_seq
    for seq in range(1, last + 1):
        try:
            msg = await js.get_msg(DEADLETTER, seq)
        except Exception:
            continue
        headers: dict[str, str] = dict(msg.headers or {})  # pyright: ignore[reportUnknownArgumentType]
        if SOURCE_STREAM_HEADER in headers:
            reason = headers.get(REASON_HEADER, "")
            found[(headers[SOURCE_STREAM_HEADER], int(headers[SOURCE_SEQ_HEADER]))] = reason
    return found


def check_stream_inputs(
    target: str,
    stored: list[tuple[int, Kind]],
    dead: dict[tuple[str, int], str],
    result: FuzzResult,
) -> None:
    stream = STREAM_OF[target]
    for seq, kind in stored:
        reason = dead.get((stream, seq))
        if kind == "valid" and reason is not None:
            result.valid_lost += 1
            result.note(f"{target} #{seq} was valid but dead-lettered: {reason}")
        elif kind == "poison" and not reason:
            result.note(f"{target} #{seq} invalid and not dead-lettered with a reason")
            continue
        result.answered[target] += 1
        result.deadlettered += reason is not None


async def still_alive(system: System, result: FuzzResult) -> None:
    """Every service still runs and still does its job after the fuzz."""
    for task in system.tasks:
        if task.done():
            result.crashes += 1
            result.note(f"service task ended: {task!r}")
    api = await system.bus.connect("api")
    try:
        body = json.dumps({"model": "llama-3.1-8b", "dry_run": True}).encode()
        msg = await api.request(subjects.PLACEMENT_REQUEST, body, timeout=30.0)
        # The fuzz may have filled the fleet (valid requests place for real): any well-formed
        # answer but an internal error shows the planner alive and planning.
        reply = _reply_of(msg.data)
        if reply is None or (reply.error is not None and reply.error.code == "internal"):
            result.crashes += 1
            result.note(f"planner no longer plans: {msg.data[:200]!r}")
    finally:
        await api.close()
    await _worker_alive(system, result)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{system.api_url}/readyz") as response,
    ):
        if response.status != 200:
            result.crashes += 1
            result.note(f"API not ready after the fuzz: {response.status}")


async def _worker_alive(system: System, result: FuzzResult) -> None:
    """The worker that read every fuzzed assignment still takes a real one and reports it."""
    admin = await system.bus.connect("admin")
    api = await system.bus.connect("api")
    try:
        sub = await admin.subscribe(subjects.shard_status(NODE, "alive-check"))
        await admin.flush()
        try:
            await place_for_real(api, "alive-check")
            await sub.next_msg(timeout=30.0)
        except (NatsTimeoutError, RuntimeError) as exc:
            result.crashes += 1
            result.note(f"the worker of {NODE} no longer answers a valid assignment: {exc!r}")
    finally:
        await api.close()
        await admin.close()


async def fuzz_system(
    counts: dict[str, int], seed: int = 0, progress: Callable[[str], None] | None = None
) -> FuzzResult:
    """Run everything and throw ``counts[target]`` inputs at each target."""
    from shardplane.bench._probes import secure_bus

    result = FuzzResult()
    for target in TARGETS:
        result.inputs[target] = result.answered[target] = result.internal_errors[target] = 0
    inputs = {t: draw_inputs(t, counts.get(t, 0), seed) for t in TARGETS if counts.get(t)}
    started = time.perf_counter()
    async with secure_bus() as bus, running_system(bus) as system:
        stored: dict[str, list[tuple[int, Kind]]] = {}
        api = await bus.connect("api")
        publishers = {
            "telemetry": await bus.connect("agent"),
            "status": await bus.connect("worker"),
            "assignment": await bus.connect("planner"),
        }
        try:
            # Statuses and assignments are only valid for what the planner placed: place the
            # instance the near-valid ones name ("fuzz", generation 1, stage 0 on NODE).
            admin = await bus.connect("admin")
            try:
                known = await authorised(admin, [await place_for_real(api, "fuzz")])
            finally:
                await admin.close()
            for target, data in inputs.items():
                result.inputs[target] = len(data)
                if progress:
                    progress(f"{target}: {len(data)} inputs")
                if target == "request":
                    await fuzz_requests(api, data, result)
                elif target == "http":
                    await fuzz_http(system.api_url, data, result)
                else:
                    stored[target] = await publish_stream_inputs(
                        publishers[target], target, data, result, known
                    )
        finally:
            for nc in [api, *publishers.values()]:
                await nc.close()
        admin = await bus.connect("admin")
        try:
            if not await settle(admin):
                result.note("the projector did not acknowledge every input within 120 s")
            dead = await dead_letters(admin)
        finally:
            await admin.close()
        for target, seqs in stored.items():
            check_stream_inputs(target, seqs, dead, result)
        await still_alive(system, result)
    result.seconds = time.perf_counter() - started
    return result
