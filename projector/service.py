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
import heapq
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shardplane.bus import authority, subjects
from shardplane.bus.errors import ProjectorError
from shardplane.bus.messages import InstanceState, NodeState, ShardAssignment
from shardplane.bus.retry import Outage, describe, retrying, transient
from shardplane.bus.streams import (
    LEDGER,
    LEDGER_RESERVATIONS_KEY,
    PLACEMENTS,
    SHARDS,
    TELEMETRY,
    provision,
)
from shardplane.bus.wait import wait_set
from shardplane.projector import partition as partitions
from shardplane.projector.decode import AckInfo, Poison, decode_event, parse_ack_subject
from shardplane.projector.lease import DEFAULT_LEASE_TTL_S, Lease
from shardplane.projector.partition import Partition
from shardplane.projector.reducer import (
    NO_CHANGE,
    Changes,
    Defer,
    Event,
    Liveness,
    Outcome,
    Reject,
    Value,
    View,
    apply,
    expires_at,
    sweep,
)
from shardplane.projector.store import Overlay, Store, WriteError
from shardplane.projector.transport import Inbox, Puller, ack_all

log = logging.getLogger(__name__)

# How long a stop waits for its cancelled feeders and lease holder to end.
FEEDER_STOP_S = 2.0

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
    lean_pull: bool = True  # our pull loop (transport.Puller) instead of nats-py's fetch()
    pull_depth: int = 2  # pull requests outstanding per consumer (lean pull loop)
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 10.0  # redelivery after a crash waits this long
    max_ack_pending: int = 40_000  # >= the round being written + the next + the inbox
    sweep_interval_s: float = 0.5
    full_sweep_interval_s: float = 30.0  # safety net under the deadline heap (TTL changes)
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    defer_delay_s: float = 0.25
    max_defers: int = 240  # a status whose assignment never comes is dead-lettered (~1 min)
    write_timeout_s: float = 10.0
    # A graceful stop finishes the round being written for at most this long (holding the
    # lease); past it the round is abandoned and its messages handed back for redelivery, so
    # a write the server is slow to answer cannot hold the standby off for write_timeout_s.
    stop_grace_s: float = 2.0
    stats_interval_s: float = 60.0  # log the counters this often
    probe_interval_s: float = 0.5  # how often TELEMETRY's leader is asked whether it is there
    slow_round_s: float = 0.25  # log rounds slower than this (latency diagnosis)
    pipeline_writes: bool = True  # False: one write at a time (only to measure what it buys)
    # Atomic batch writes where the server has them (2.12+): one PubAck per 1,000 writes, but
    # measured slower on the server than one PubAck each (README "Throughput"), so opt-in.
    atomic_batches: bool = False
    direct_delivery: bool = True  # deliveries and PubAcks straight from the read loop (wire.py)
    overlap_rounds: bool = True  # apply the next round while the last one is being written
    # Apply an assignment only at the generation the planner's ledger names (bus.authority);
    # off only where tests publish assignments by hand, without a planner.
    verify_generations: bool = True


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
    # Where the writer's time goes (seconds): applying, waiting for the KV's answers, acking.
    apply_s: float = 0.0
    write_wait_s: float = 0.0
    ack_s: float = 0.0
    idle_s: float = 0.0
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
            "apply_s": round(self.apply_s, 3),
            "write_wait_s": round(self.write_wait_s, 3),
            "ack_s": round(self.ack_s, 3),
            "idle_s": round(self.idle_s, 3),
        }


class LeaseLost(ProjectorError):
    pass


@dataclass(slots=True)
class _Item:
    msg: Msg
    info: AckInfo | None
    event: Event | None  # None: poison
    reason: str = ""


@dataclass(slots=True)
class _Round:
    """Messages taken together: decoded, applied over a base view, written, settled."""

    items: list[_Item]
    sweep_due: bool
    due_keys: list[str] | None
    size: int
    now: float  # the time liveness is judged at: never past what TELEMETRY has delivered
    overlay: Overlay = field(init=False)
    deferred: list[tuple[_Item, str]] = field(default_factory=list[tuple[_Item, str]])
    rejected: list[tuple[_Item, str]] = field(default_factory=list[tuple[_Item, str]])
    applied: list[_Item] = field(default_factory=list[_Item])


async def _nak_quietly(msgs: Iterable[Msg]) -> None:
    for msg in msgs:
        with contextlib.suppress(Exception):
            await msg.nak()


def _header_safe(text: str, limit: int = 1024) -> str:
    return text.replace("\r", " ").replace("\n", " ")[:limit]


class Projector:
    def __init__(
        self, nc: Client, config: ProjectorConfig | None = None, partition: Partition | None = None
    ) -> None:
        self.nc = nc
        self.partition = partition  # None: one projector writes every key
        self.js: JetStreamContext = nc.jetstream()
        self.config = config or ProjectorConfig()
        self.liveness = Liveness(self.config.ttl_s)
        self.store = Store(
            nc,
            self.js,
            timeout_s=self.config.write_timeout_s,
            pipeline=self.config.pipeline_writes,
            batches=self.config.atomic_batches,
            direct=self.config.direct_delivery,
        )
        self.lease = Lease(
            self.js,
            ttl_s=self.config.lease_ttl_s,
            **({"key": partition.lease_key} if partition else {}),
        )
        self.stats = ProjectorStats()
        self.leading = asyncio.Event()
        # (when it goes offline if nothing newer arrives, key): a sweep pops what is due
        # instead of scanning every key (8,000 devices every half second adds up).
        self._deadlines: list[tuple[float, str]] = []
        self._next_full_sweep = 0.0
        # Liveness is judged at the time up to which TELEMETRY is known to be delivered (see
        # Inbox.caught_up), not at the wall clock: while the stream cannot deliver (a leader
        # election, an outage, a backlog a new leader has not applied yet) no device is
        # written offline for samples that exist but have not arrived. Readers judge staleness
        # on their own clock meanwhile (bus.liveness).
        self._clock = 0.0
        self._caught_up = False  # this leadership has applied TELEMETRY's backlog
        # No sweep before this (monotonic): after TELEMETRY could not take writes (an election,
        # a lost server), agents need an interval (and a retry) to get a sample stored again.
        self._hold_until = 0.0
        self._write_outage = Outage("cluster_state writes", log)
        self._ledger = authority.EMPTY  # the planner's ledger as last seen (a KV watch)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await provision(self.js)
        if self.partition is not None:
            await partitions.ensure(self.nc, self.partition.count)
        follower = (
            asyncio.create_task(self._follow_ledger(stop))
            if self.config.verify_generations
            else None
        )
        try:
            while not stop.is_set():
                if not self.lease.valid() and not await self.lease.acquire(stop):
                    break
                try:
                    await self._lead(stop)
                except LeaseLost:
                    log.warning("projector stepped down: lease lost")
                except Exception as exc:
                    # The bus went away mid-round, a read timed out...: nothing was
                    # acknowledged that is not stored, so start the round over (keeping the
                    # lease while it is still valid). An election is expected: no traceback.
                    if transient(exc):
                        log.warning("projector round failed (%s); resuming in 1 s", describe(exc))
                    else:
                        log.exception("projector round failed; resuming in 1 s")
                    await wait_set(stop, 1.0)
                finally:
                    self.leading.clear()
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(BaseException):
                    await follower
            await self.lease.release()

    async def _follow_ledger(self, stop: asyncio.Event) -> None:
        """Keep ``_ledger`` current. An assignment that arrives before its commit reached this
        watch is deferred, not lost (see ``_authorise``)."""
        while not stop.is_set():
            try:
                kv = await self.js.key_value(LEDGER)
                watcher = await kv.watch(LEDGER_RESERVATIONS_KEY)
                try:
                    while not stop.is_set():
                        try:
                            entry = await watcher.updates(timeout=1.0)
                        except nats.errors.TimeoutError:
                            continue
                        if isinstance(entry, KeyValue.Entry):
                            deleted = entry.operation in ("DEL", "PURGE")
                            self._ledger = authority.decode(None if deleted else entry.value)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except Exception as exc:  # the bus is away: watch again
                log.warning("watching the planner's ledger failed: %r", exc)
                await wait_set(stop, 1.0)

    def _authorise(self, event: Event) -> Outcome | None:
        """An outcome for an assignment the ledger does not name (None: apply it)."""
        if not self.config.verify_generations or not isinstance(event, ShardAssignment):
            return None
        verdict, why = authority.judge(self._ledger, event)
        if verdict == "current":
            return None
        if verdict == "stale":
            return NO_CHANGE
        if verdict == "forged":
            return Reject(why)
        # Ahead of (or absent from) the ledger as this projector saw it: the commit may not
        # have reached the watch yet. Retried; dead-lettered with the reason if it never does.
        return Defer(why)

    async def _lead(self, stop: asyncio.Event) -> None:
        self.stats.leaderships += 1
        lost = asyncio.Event()
        # Renewed until this leadership is over, the last round included (cancelled below).
        holder = asyncio.create_task(self.lease.hold(lost))
        # Room for the round after next: the pull loops keep fetching while one round is written
        # and the next one applied, so the writer never waits on a fetch round trip.
        inbox = Inbox(2 * self.config.max_round)
        feeders: list[asyncio.Task[None]] = []
        handback: list[Msg] = []  # taken but not stored: nak'd once the pulls have stopped
        try:
            loaded = await retrying(self.store.load, "loading cluster_state")
            self._caught_up = False
            self._clock = max(
                (
                    v.last_seen
                    for _, v in self.store.cache.items()
                    if not isinstance(v, InstanceState)
                ),
                default=0.0,
            )
            self._deadlines = []
            self._track(self.store.cache.items())
            self._next_full_sweep = 0.0
            log.info("projector leading; %d keys in cluster_state", loaded)
            consumers = {s: (d, None) for s, d in CONSUMERS.items()}
            if self.partition is not None:
                consumers = self.partition.consumers()
            for stream, (durable, only) in consumers.items():
                await retrying(
                    lambda s=stream, d=durable, o=only: self._ensure_consumer(s, d, o),
                    f"consumer {durable}",
                )
                feeders.append(asyncio.create_task(self._feed(stream, durable, inbox)))
            feeders.append(asyncio.create_task(self._probe(inbox)))
            self.leading.set()
            await self._write_loop(inbox, stop, lost, handback)
        finally:
            tasks = [*feeders, holder]
            for task in tasks:
                task.cancel()
            # Bounded: a task that ignored its cancel must not hold the stop (and the lease).
            ended, stuck = await asyncio.wait(tasks, timeout=FEEDER_STOP_S)
            for task in ended:
                if not task.cancelled():
                    task.exception()  # retrieved: a failure is the feeder's own to log
            if stuck:
                log.warning(
                    "%d projector task(s) still running %.0f s after being cancelled: %s",
                    len(stuck),
                    FEEDER_STOP_S,
                    ", ".join(t.get_name() for t in stuck),
                )
            # Hand what was fetched but not stored straight back instead of letting it wait
            # out the ack wait (a standby takes over at once after a graceful stop). Only now
            # that the pull subscriptions are gone: a nak while a pull request of ours is still
            # open can be redelivered into it, and dropped with it.
            await _nak_quietly([*handback, *inbox.drop_all()])

    async def _ensure_consumer(self, stream: str, durable: str, only: str | None = None) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=only,
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

    async def _feed(self, stream: str, durable: str, inbox: Inbox) -> None:
        if self.config.lean_pull:
            # Several requests outstanding, so the server always holds one to fill while the
            # answer to the other is on its way (one at a time left the stream idle each RTT).
            pullers = [
                Puller(
                    self.nc,
                    stream,
                    durable,
                    inbox,
                    batch=self.config.fetch_batch,
                    fast=self.config.direct_delivery,
                )
                for _ in range(self.config.pull_depth)
            ]
            await asyncio.gather(*(puller.run() for puller in pullers))
            return
        # nats-py's own fetch: kept to measure what the lean puller buys (bench --ablation).
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        try:
            while True:
                await inbox.room.wait()
                try:
                    msgs = await sub.fetch(
                        self.config.fetch_batch, timeout=self.config.fetch_timeout_s
                    )
                except (TimeoutError, nats.errors.TimeoutError):
                    inbox.caught_up[stream] = time.time()  # nothing left to deliver
                    continue
                except Exception as exc:
                    log.warning("fetch failed: %r", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    inbox.put(msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _write_loop(
        self, inbox: Inbox, stop: asyncio.Event, lost: asyncio.Event, handback: list[Msg]
    ) -> None:
        """Rounds, two at a time: while one round's writes are with the server, the next is
        decoded and applied on top of its values (the server stores and the projector computes
        at the same time). The next round is written only once the one before it is stored
        and acknowledged, so the order of writes and acks is what it would be one by one; if
        the earlier round hit a conflict, the next is applied again on the fresh cache.

        Messages taken and not stored when it returns or raises go to ``handback``."""
        next_sweep = time.monotonic()
        next_report = time.monotonic() + self.config.stats_interval_s
        stopping = asyncio.create_task(stop.wait())
        losing = asyncio.create_task(lost.wait())
        inflight: asyncio.Task[bool] | None = None
        inflight_round: _Round | None = None
        try:
            while not stop.is_set():
                if lost.is_set():
                    raise LeaseLost
                if inflight is not None and inflight.done():
                    inflight.result()  # a failed commit ends the leadership (redelivery)
                    inflight = inflight_round = None
                if not inbox.msgs:
                    wait = max(0.0, next_sweep - time.monotonic())
                    ready = asyncio.create_task(inbox.ready.wait())
                    waits: set[asyncio.Future[Any]] = {ready, stopping, losing}
                    if inflight is not None:
                        waits.add(inflight)
                    idle_from = time.perf_counter()
                    await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                    self.stats.idle_s += time.perf_counter() - idle_from
                    ready.cancel()
                    if stop.is_set():
                        break
                msgs = inbox.take(self.config.max_round)
                self._advance(inbox)
                due = time.monotonic() >= next_sweep
                if msgs or due:
                    base = inflight_round.overlay if inflight_round is not None else None
                    round_ = self._prepare(msgs, due, base or self.store.cache)
                    if inflight is not None:
                        # A stop must not wait out a write the server is slow to answer: the
                        # grace below bounds it.
                        await asyncio.wait({inflight, stopping}, return_when=FIRST_COMPLETED)
                        if not inflight.done():
                            handback.extend(msgs)  # this round is never written
                            break
                        try:
                            clean = inflight.result()
                        except BaseException:
                            handback.extend(msgs)  # back at once, not after the ack wait
                            raise
                        inflight = inflight_round = None
                        extra = inbox.take(max(0, self.config.max_round - round_.size))
                        self._advance(inbox)
                        if clean:
                            round_.overlay.rebase(self.store.cache)
                            if extra:
                                self._extend(round_, extra, apply_now=True)
                        else:
                            if extra:
                                self._extend(round_, extra, apply_now=False)
                            self._apply(round_, self.store.cache)
                    inflight = asyncio.create_task(self._commit(round_))
                    inflight_round = round_
                    if not self.config.overlap_rounds:
                        await asyncio.wait({inflight, stopping}, return_when=FIRST_COMPLETED)
                if due:
                    next_sweep = time.monotonic() + self.config.sweep_interval_s
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + self.config.stats_interval_s
                    log.info("projector stats: %s", self.stats.as_dict())
            if inflight is not None:
                # A graceful stop finishes the round it started, within its grace.
                await asyncio.wait({inflight}, timeout=self.config.stop_grace_s)
                if inflight.done():
                    inflight.result()
                else:
                    log.warning(
                        "the last round (%d messages) was not stored within %.1f s of the stop; "
                        "handing its messages back for redelivery",
                        inflight_round.size if inflight_round is not None else 0,
                        self.config.stop_grace_s,
                    )
        finally:
            if inflight is not None and not inflight.done():
                inflight.cancel()
                with contextlib.suppress(BaseException):
                    await inflight
                if inflight_round is not None:
                    # Whatever of it was stored is stored; redelivered, it reduces to nothing.
                    handback.extend(item.msg for item in inflight_round.items)
            stopping.cancel()
            losing.cancel()
            log.info("projector stats: %s", self.stats.as_dict())

    # --- one round ----------------------------------------------------------------------------

    def _hold(self, since: float) -> None:
        """Hold sweeps for the longest TTL from ``since`` (monotonic): a live agent gets a
        sample stored within its interval (and a retry) once TELEMETRY takes writes again."""
        ttl = max(
            (self.liveness.ttl(v) for _, v in self.store.cache.items() if isinstance(v, NodeState)),
            default=self.liveness.ttl(None),
        )
        self._hold_until = max(self._hold_until, since + ttl)

    async def _probe(self, inbox: Inbox) -> None:
        """Ask TELEMETRY's leader, every ``probe_interval_s``, whether it is there; while it is
        not (and for a TTL after), agents cannot get samples stored, so nothing is swept."""
        outage = Outage(f"stream {TELEMETRY}", log)
        while True:
            started = time.monotonic()
            try:
                await self.js.stream_info(TELEMETRY)
                outage.recovered()
            except Exception as exc:
                outage.failed(exc)
                self._hold(time.monotonic())
            if inbox.trouble_at >= started - self.config.probe_interval_s:
                self._hold(inbox.trouble_at)
            await asyncio.sleep(
                max(0.0, self.config.probe_interval_s - (time.monotonic() - started))
            )

    def _advance(self, inbox: Inbox) -> None:
        """Move the liveness clock on once everything received has been taken into rounds
        (a sweep must come after the messages that arrived before it, never before)."""
        if inbox.msgs:
            return
        caught_up = inbox.caught_up.get(TELEMETRY, 0.0)
        if caught_up <= 0.0:
            return
        if not self._caught_up:
            self._caught_up = True
            log.info("projector caught up with %s; liveness sweeps on", TELEMETRY)
        self._clock = max(self._clock, min(time.time(), caught_up))

    def _decode(self, msgs: list[Msg]) -> list[_Item]:
        items: list[_Item] = []
        for msg in msgs:
            decoded = decode_event(Partition.original_subject(msg.subject), msg.data)
            info = parse_ack_subject(msg.reply) if msg.reply else None
            if isinstance(decoded, Poison):
                items.append(_Item(msg, info, None, decoded.reason))
            else:
                items.append(_Item(msg, info, decoded))
        self.stats.received += len(msgs)
        return items

    def _prepare(self, msgs: list[Msg], sweep_due: bool, base: View | Overlay) -> _Round:
        """Decode ``msgs`` and apply them over ``base`` (the cache, or the values of the round
        still being written, which the cache will hold once that round is stored)."""
        started = time.perf_counter()
        items = self._decode(msgs)
        # A new leader applies the backlog first; nobody sweeps right after an outage.
        sweep_due = sweep_due and self._caught_up and time.monotonic() >= self._hold_until
        now = self._clock
        due_keys = self._due(now) if sweep_due else None
        round_ = _Round(items, sweep_due, due_keys, len(msgs), now)
        self._apply(round_, base)
        self.stats.apply_s += time.perf_counter() - started
        return round_

    def _extend(self, round_: _Round, msgs: list[Msg], *, apply_now: bool) -> None:
        """Add what arrived while the round before was being written (updates of one key
        coalesce into one write across both batches of messages)."""
        started = time.perf_counter()
        items = self._decode(msgs)
        round_.items.extend(items)
        round_.size += len(msgs)
        if apply_now:
            self._apply_items(round_, items, round_.now)
        self.stats.apply_s += time.perf_counter() - started

    def _apply(self, round_: _Round, base: View | Overlay) -> None:
        now = round_.now
        round_.overlay = Overlay(base)
        round_.deferred, round_.rejected, round_.applied = [], [], []
        self._apply_items(round_, round_.items, now)
        if round_.sweep_due:
            overlay = round_.overlay
            overlay.update(sweep(overlay, now, self.liveness, round_.due_keys))

    def _apply_items(self, round_: _Round, items: list[_Item], now: float) -> None:
        overlay = round_.overlay
        for item in items:
            if item.event is None:
                continue
            seen = item.info.timestamp if item.info is not None else time.time()
            outcome = self._authorise(item.event) or apply(
                overlay, item.event, seen, now, self.liveness
            )
            if isinstance(outcome, Changes):
                overlay.update(outcome.values)
                round_.applied.append(item)
            elif isinstance(outcome, Defer):
                round_.deferred.append((item, outcome.reason))
            elif isinstance(outcome, Reject):  # pyright: ignore[reportUnnecessaryIsInstance]
                round_.rejected.append((item, outcome.reason))

    async def _commit(self, round_: _Round) -> bool:
        """Write the round's changes until stored, then settle its messages. True when it went
        through as prepared (no conflict, no failed write): a round prepared on top of this
        one is still valid."""
        started = time.perf_counter()
        write_s = 0.0
        clean = True
        while True:
            if not self.lease.valid():
                raise LeaseLost
            pending = round_.overlay.pending()
            write_started = time.perf_counter()
            try:
                result = await self.store.write(pending)
            except WriteError as exc:
                clean = False
                self.stats.write_errors += 1
                self._write_outage.failed(exc)
                await asyncio.sleep(0.2)
                try:
                    await self.store.refresh(exc.keys)
                except Exception as err:
                    if not transient(err):
                        raise
                    continue  # stale revisions only cost a conflict and a re-read later
                self._apply(round_, self.store.cache)
                continue
            finally:
                write_s += time.perf_counter() - write_started
            self._write_outage.recovered()
            self.stats.writes += result.written
            self._track((k, v) for k, v in pending.items() if k not in result.conflicts)
            if not result.conflicts:
                break
            # Someone else wrote these keys: take their values and re-apply the round on top.
            clean = False
            self.stats.conflicts += len(result.conflicts)
            await self.store.refresh(result.conflicts)
            self._apply(round_, self.store.cache)

        self.stats.rounds += 1
        if round_.sweep_due:
            self.stats.sweeps += 1
        self.stats.applied += len(round_.applied)

        dead: list[tuple[_Item, str]] = [(i, i.reason) for i in round_.items if i.event is None]
        dead += round_.rejected
        retry: list[_Item] = []
        for item, reason in round_.deferred:
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
        acking = time.perf_counter()
        await ack_all(self.nc, [item.msg for item in round_.applied])
        self.stats.ack_s += time.perf_counter() - acking
        self.stats.write_wait_s += write_s
        took = time.perf_counter() - started
        if took > self.config.slow_round_s:
            log.info(
                "slow commit: %.0f ms for %d messages, %d writes (%.0f ms waiting for the KV)",
                took * 1000,
                round_.size,
                len(pending),
                write_s * 1000,
            )
        return clean

    def _track(self, values: Iterable[tuple[str, Value]]) -> None:
        cache = self.store.cache
        for key, value in values:
            if self.partition is not None and not self.partition.owns(key):
                continue  # another partition's key: its own projector judges its liveness
            deadline = expires_at(cache, value, self.liveness)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, key))

    def _due(self, now: float) -> list[str] | None:
        """Keys whose deadline passed (None: all keys, for the periodic full sweep)."""
        if time.monotonic() >= self._next_full_sweep:
            self._next_full_sweep = time.monotonic() + self.config.full_sweep_interval_s
            self._deadlines = []
            self._track(self.store.cache.items())
            if self.partition is not None:
                return [k for k, _ in self.store.cache.items() if self.partition.owns(k)]
            return None
        due: set[str] = set()
        while self._deadlines and self._deadlines[0][0] < now:
            due.add(heapq.heappop(self._deadlines)[1])
        return sorted(due)

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
            futures.append(future)
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
    partition: Partition | None = None,
) -> None:
    """Materialise TELEMETRY, PLACEMENTS and SHARDS into ``cluster_state`` until ``stop``; with
    ``partition``, only that partition's share (``projector.partition``)."""
    base = config or ProjectorConfig()
    if ttl_s is not None:
        base = dataclasses.replace(base, ttl_s=ttl_s)
    await Projector(nc, base, partition).run(stop)
