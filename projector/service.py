"""The projector's runner: durable pull consumers in, compare-and-set KV writes out.

Shape of one round (see README "Exactly-once"):

1. fetchers (one per stream) pull batches into a bounded queue; the writer takes whatever is
   queued (up to ``max_round``), so a backlog is handled in big rounds and a trickle in small,
   prompt ones;
2. every message is decoded and validated (poison goes to the dead-letter list) and applied to
   an overlay over the cache with the pure reducer, so several updates of one key within the
   round coalesce into one value;
3. the round's changed keys are written in one pipelined burst, each write conditional on the
   revision the cache holds; conflicting keys are re-read and the whole round re-applied on top
   (idempotent, because the reducer is a join) until every write is stored;
4. only then are the messages acknowledged; poison is copied to ``deadletter.<subject>`` and,
   once that copy is stored, terminated; statuses whose assignment has not arrived yet are
   nak'ed with a delay.

A crash anywhere before step 4 only means redelivery, and re-applying a delivered event
reproduces the state it already produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus import subjects
from bus.streams import PLACEMENTS, SHARDS, TELEMETRY, provision
from projector.decode import AckInfo, Poison, decode_event, parse_ack_subject
from projector.lease import DEFAULT_LEASE_TTL_S, Lease
from projector.reducer import Changes, Defer, Event, Liveness, Reject, apply, sweep
from projector.store import Overlay, Store, WriteError

log = logging.getLogger(__name__)

CONSUMERS = {
    TELEMETRY: "projector_telemetry",
    PLACEMENTS: "projector_placements",
    SHARDS: "projector_shards",
}
REASON_HEADER = "Shardplane-Deadletter-Reason"
SOURCE_SUBJECT_HEADER = "Shardplane-Source-Subject"
SOURCE_STREAM_HEADER = "Shardplane-Source-Stream"
SOURCE_SEQ_HEADER = "Shardplane-Source-Seq"


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    ttl_s: float | None = None  # liveness TTL; None: 3 x each node's heartbeat interval
    fetch_batch: int = 1000
    max_round: int = 8000  # messages applied (and coalesced) per write round
    queue_batches: int = 4  # fetched batches buffered ahead of the writer
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 10.0  # redelivery after a crash waits this long
    max_ack_pending: int = 20_000
    sweep_interval_s: float = 0.5
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    defer_delay_s: float = 0.25
    max_defers: int = 240  # a status whose assignment never comes is dead-lettered (~1 min)
    write_timeout_s: float = 10.0
    pipeline_writes: bool = True  # False: one write at a time (only to measure what it buys)


@dataclass(slots=True)
class ProjectorStats:
    received: int = 0
    applied: int = 0
    rounds: int = 0
    writes: int = 0
    conflicts: int = 0
    write_errors: int = 0
    deferred: int = 0
    deadlettered: int = 0
    sweeps: int = 0
    leaderships: int = 0
    deadletter_reasons: dict[str, int] = field(default_factory=dict[str, int])

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "applied": self.applied,
            "rounds": self.rounds,
            "writes": self.writes,
            "conflicts": self.conflicts,
            "write_errors": self.write_errors,
            "deferred": self.deferred,
            "deadlettered": self.deadlettered,
            "sweeps": self.sweeps,
            "leaderships": self.leaderships,
        }


class LeaseLost(Exception):
    pass


@dataclass(slots=True)
class _Item:
    msg: Msg
    info: AckInfo | None
    event: Event | None  # None: poison
    reason: str = ""


def _header_safe(text: str, limit: int = 1024) -> str:
    return text.replace("\r", " ").replace("\n", " ")[:limit]


class Projector:
    def __init__(self, nc: Client, config: ProjectorConfig | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config or ProjectorConfig()
        self.liveness = Liveness(self.config.ttl_s)
        self.store = Store(
            self.js, timeout_s=self.config.write_timeout_s, pipeline=self.config.pipeline_writes
        )
        self.lease = Lease(self.js, ttl_s=self.config.lease_ttl_s)
        self.stats = ProjectorStats()
        self.leading = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await provision(self.js)
        try:
            while not stop.is_set():
                if not await self.lease.acquire(stop):
                    break
                try:
                    await self._lead(stop)
                except LeaseLost:
                    log.warning("projector stepped down: lease lost")
                finally:
                    self.leading.clear()
        finally:
            await self.lease.release()

    async def _lead(self, stop: asyncio.Event) -> None:
        self.stats.leaderships += 1
        lost = asyncio.Event()
        holder = asyncio.create_task(self.lease.hold(lost, stop))
        loaded = await self.store.load()
        log.info("projector leading; %d keys in cluster_state", loaded)
        queue: asyncio.Queue[list[Msg]] = asyncio.Queue(self.config.queue_batches)
        subs = [await self._subscribe(stream, durable) for stream, durable in CONSUMERS.items()]
        fetchers = [asyncio.create_task(self._fetch(sub, queue)) for sub in subs]
        self.leading.set()
        try:
            await self._write_loop(queue, stop, lost)
        finally:
            for task in [*fetchers, holder]:
                task.cancel()
            for task in [*fetchers, holder]:
                with contextlib.suppress(BaseException):
                    await task
            # Hand what was fetched but not applied straight back instead of letting it wait
            # out the ack wait (a standby takes over at once after a graceful stop).
            while not queue.empty():
                for msg in queue.get_nowait():
                    with contextlib.suppress(Exception):
                        await msg.nak()
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _subscribe(self, stream: str, durable: str) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=durable,
            description="shardplane projector: stream -> cluster_state",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait_s,
            max_ack_pending=self.config.max_ack_pending,
            max_deliver=-1,
        )
        try:
            info = await self.js.consumer_info(stream, durable)
            current = info.config
            if (current.ack_wait, current.max_ack_pending) != (
                config.ack_wait,
                config.max_ack_pending,
            ):
                await self.js.add_consumer(stream, config)  # an update of editable fields
        except NotFoundError:
            await self.js.add_consumer(stream, config)
        return await self.js.pull_subscribe_bind(durable=durable, stream=stream)

    async def _fetch(
        self, sub: JetStreamContext.PullSubscription, queue: asyncio.Queue[list[Msg]]
    ) -> None:
        while True:
            try:
                msgs = await sub.fetch(self.config.fetch_batch, timeout=self.config.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            await queue.put(msgs)

    async def _write_loop(
        self, queue: asyncio.Queue[list[Msg]], stop: asyncio.Event, lost: asyncio.Event
    ) -> None:
        next_sweep = time.monotonic()
        stopping = asyncio.create_task(stop.wait())
        losing = asyncio.create_task(lost.wait())
        try:
            while not stop.is_set():
                if lost.is_set():
                    raise LeaseLost
                wait = max(0.0, next_sweep - time.monotonic())
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopping, losing}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                msgs: list[Msg] = []
                if getter in done:
                    msgs = getter.result()
                else:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        msgs = await getter  # it may have completed while being cancelled
                while len(msgs) < self.config.max_round and not queue.empty():
                    msgs.extend(queue.get_nowait())
                due = time.monotonic() >= next_sweep
                if msgs or due:
                    await self.process(msgs, sweep_due=due)
                if due:
                    next_sweep = time.monotonic() + self.config.sweep_interval_s
        finally:
            stopping.cancel()
            losing.cancel()

    # --- one round ----------------------------------------------------------------------------

    async def process(self, msgs: list[Msg], *, sweep_due: bool = False) -> None:
        """Apply, write (until stored), then acknowledge ``msgs``."""
        items: list[_Item] = []
        for msg in msgs:
            decoded = decode_event(msg.subject, msg.data)
            info = parse_ack_subject(msg.reply) if msg.reply else None
            if isinstance(decoded, Poison):
                items.append(_Item(msg, info, None, decoded.reason))
            else:
                items.append(_Item(msg, info, decoded))
        self.stats.received += len(msgs)

        while True:
            if not self.lease.valid():
                raise LeaseLost
            now = time.time()
            overlay = Overlay(self.store.cache)
            deferred: list[tuple[_Item, str]] = []
            rejected: list[tuple[_Item, str]] = []
            applied: list[_Item] = []
            for item in items:
                if item.event is None:
                    continue
                seen = item.info.timestamp if item.info is not None else now
                outcome = apply(overlay, item.event, seen, now, self.liveness)
                if isinstance(outcome, Changes):
                    overlay.update(outcome.values)
                    applied.append(item)
                elif isinstance(outcome, Defer):
                    deferred.append((item, outcome.reason))
                elif isinstance(outcome, Reject):  # pyright: ignore[reportUnnecessaryIsInstance]
                    rejected.append((item, outcome.reason))
            if sweep_due:
                overlay.update(sweep(overlay, now, self.liveness))
            pending = overlay.pending()
            try:
                result = await self.store.write(pending)
            except WriteError as exc:
                self.stats.write_errors += 1
                log.warning("KV write round failed, retrying: %s", exc)
                await asyncio.sleep(0.2)
                await self.store.refresh(exc.keys)
                continue
            self.stats.writes += result.written
            if not result.conflicts:
                break
            # Someone else wrote these keys: take their values and re-apply the round on top.
            self.stats.conflicts += len(result.conflicts)
            await self.store.refresh(result.conflicts)

        self.stats.rounds += 1
        if sweep_due:
            self.stats.sweeps += 1
        self.stats.applied += len(applied)

        dead: list[tuple[_Item, str]] = [(i, i.reason) for i in items if i.event is None]
        dead += rejected
        retry: list[_Item] = []
        for item, reason in deferred:
            delivered = item.info.delivered if item.info is not None else 1
            if delivered >= self.config.max_defers:
                dead.append((item, f"{reason} (gave up after {delivered} deliveries)"))
            else:
                retry.append(item)
        if dead:
            await self._dead_letter(dead)
        for item in retry:
            self.stats.deferred += 1
            await item.msg.nak(delay=self.config.defer_delay_s)
        for item in applied:
            await item.msg.ack()

    async def _dead_letter(self, dead: list[tuple[_Item, str]]) -> None:
        futures: list[asyncio.Future[Any]] = []
        for item, reason in dead:
            info = item.info
            headers = {
                REASON_HEADER: _header_safe(reason),
                SOURCE_SUBJECT_HEADER: item.msg.subject,
            }
            if info is not None:
                headers[SOURCE_STREAM_HEADER] = info.stream
                headers[SOURCE_SEQ_HEADER] = str(info.stream_seq)
                # A redelivery after a crash between the copy and the term() dedups here.
                headers["Nats-Msg-Id"] = f"deadletter-{info.stream}-{info.stream_seq}"
            future = await self.js.publish_async(
                subjects.deadletter(item.msg.subject), item.msg.data or b"", headers=headers
            )
            futures.append(future)  # pyright: ignore[reportArgumentType]
        done, _ = await asyncio.wait(futures, timeout=self.config.write_timeout_s)
        for (item, reason), future in zip(dead, futures, strict=True):
            if future in done and future.exception() is None:
                self.stats.deadlettered += 1
                key = reason.split(":", 1)[0][:80]
                self.stats.deadletter_reasons[key] = self.stats.deadletter_reasons.get(key, 0) + 1
                log.warning("dead-lettered %s: %s", item.msg.subject, reason)
                await item.msg.term()
            else:
                future.cancel()
                # Not copied: leave it to come back (never drop a message unrecorded).
                await item.msg.nak(delay=1.0)


async def run_projector(
    nc: Client,
    *,
    stop: asyncio.Event,
    ttl_s: float | None = None,
    config: ProjectorConfig | None = None,
) -> None:
    """Materialise TELEMETRY, PLACEMENTS and SHARDS into ``cluster_state`` until ``stop``."""
    base = config or ProjectorConfig()
    if ttl_s is not None:
        base = dataclasses.replace(base, ttl_s=ttl_s)
    await Projector(nc, base).run(stop)
