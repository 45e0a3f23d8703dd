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
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shardplane.bus import authority
from shardplane.bus.messages import InstanceState, NodeState, ShardAssignment
from shardplane.bus.retry import Outage, describe, retrying, transient
from shardplane.bus.streams import (
    LEDGER,
    LEDGER_RESERVATIONS_KEY,
    TELEMETRY,
    provision,
)
from shardplane.bus.wait import wait_set
from shardplane.projector import cursor
from shardplane.projector import partition as partitions
from shardplane.projector.config import CONSUMERS as CONSUMERS
from shardplane.projector.config import LeaseLost, ProjectorStats
from shardplane.projector.config import ProjectorConfig as ProjectorConfig
from shardplane.projector.deadletter import REASON_HEADER as REASON_HEADER
from shardplane.projector.deadletter import SOURCE_SEQ_HEADER as SOURCE_SEQ_HEADER
from shardplane.projector.deadletter import SOURCE_STREAM_HEADER as SOURCE_STREAM_HEADER
from shardplane.projector.deadletter import SOURCE_SUBJECT_HEADER as SOURCE_SUBJECT_HEADER
from shardplane.projector.deadletter import dead_letter
from shardplane.projector.decode import Poison, decode_event, parse_ack_subject
from shardplane.projector.feed import ensure_consumer, feed, nak_quietly
from shardplane.projector.lease import Lease
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
from shardplane.projector.rounds import Item, Round
from shardplane.projector.store import Overlay, Store, WriteError
from shardplane.projector.transport import Inbox, ack_all

log = logging.getLogger(__name__)

# How long a stop waits for its cancelled feeders and lease holder to end.
FEEDER_STOP_S = 2.0


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
        self._deliveries = cursor.Deliveries()  # gaps in what cumulative consumers delivered

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
            self._deliveries = cursor.Deliveries()
            for stream, (durable, only) in consumers.items():
                delivered = await retrying(
                    lambda s=stream, d=durable, o=only: ensure_consumer(
                        self.js, self.config, s, d, o
                    ),
                    f"consumer {durable}",
                )
                self._deliveries.start(stream, durable, delivered)
                feeders.append(
                    asyncio.create_task(feed(self.nc, self.js, self.config, stream, durable, inbox))
                )
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
            await nak_quietly([*handback, *inbox.drop_all()])

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
        inflight_round: Round | None = None
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
        # A partition reads its telemetry from its own mirrors of TELEMETRY (samples and
        # heartbeats apart): the clock follows the one further behind.
        streams = (TELEMETRY,) if self.partition is None else self.partition.telemetry_streams
        caught_up = min(inbox.caught_up.get(stream, 0.0) for stream in streams)
        if caught_up <= 0.0:
            return
        if not self._caught_up:
            self._caught_up = True
            log.info("projector caught up with %s; liveness sweeps on", ", ".join(streams))
        self._clock = max(self._clock, min(time.time(), caught_up))

    def _decode(self, msgs: list[Msg]) -> list[Item]:
        items: list[Item] = []
        for msg in msgs:
            decoded = decode_event(Partition.original_subject(msg.subject), msg.data)
            info = parse_ack_subject(msg.reply) if msg.reply else None
            if isinstance(decoded, Poison):
                items.append(Item(msg, info, None, decoded.reason))
            else:
                items.append(Item(msg, info, decoded))
        self.stats.received += len(msgs)
        self._deliveries.check(items)
        return items

    def _prepare(self, msgs: list[Msg], sweep_due: bool, base: View | Overlay) -> Round:
        """Decode ``msgs`` and apply them over ``base`` (the cache, or the values of the round
        still being written, which the cache will hold once that round is stored)."""
        started = time.perf_counter()
        items = self._decode(msgs)
        # A new leader applies the backlog first; nobody sweeps right after an outage.
        sweep_due = sweep_due and self._caught_up and time.monotonic() >= self._hold_until
        now = self._clock
        due_keys = self._due(now) if sweep_due else None
        round_ = Round(items, sweep_due, due_keys, len(msgs), now)
        self._apply(round_, base)
        self.stats.apply_s += time.perf_counter() - started
        return round_

    def _extend(self, round_: Round, msgs: list[Msg], *, apply_now: bool) -> None:
        """Add what arrived while the round before was being written (updates of one key
        coalesce into one write across both batches of messages)."""
        started = time.perf_counter()
        items = self._decode(msgs)
        round_.items.extend(items)
        round_.size += len(msgs)
        if apply_now:
            self._apply_items(round_, items, round_.now)
        self.stats.apply_s += time.perf_counter() - started

    def _apply(self, round_: Round, base: View | Overlay) -> None:
        now = round_.now
        round_.overlay = Overlay(base)
        round_.deferred, round_.rejected, round_.applied = [], [], []
        self._apply_items(round_, round_.items, now)
        if round_.sweep_due:
            overlay = round_.overlay
            overlay.update(sweep(overlay, now, self.liveness, round_.due_keys))

    def _apply_items(self, round_: Round, items: list[Item], now: float) -> None:
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

    async def _commit(self, round_: Round) -> bool:
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

        dead: list[tuple[Item, str]] = [(i, i.reason) for i in round_.items if i.event is None]
        dead += round_.rejected
        retry: list[Item] = []
        for item, reason in round_.deferred:
            delivered = item.info.delivered if item.info is not None else 1
            if delivered >= self.config.max_defers:
                dead.append((item, f"{reason} (gave up after {delivered} deliveries)"))
            else:
                retry.append(item)
        if dead:
            failed = await dead_letter(self.js, dead, self.config.write_timeout_s, self.stats)
            if cursor.covers(failed):
                raise WriteError("a dead-letter copy was not stored; starting over", [])
        for item in retry:
            self.stats.deferred += 1
            await item.msg.nak(delay=self.config.defer_delay_s)
        acking = time.perf_counter()
        if not self.lease.valid():
            raise LeaseLost  # an ex-leader's cumulative ack could cover a new leader's work
        await ack_all(self.nc, cursor.to_ack(round_.applied))
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
