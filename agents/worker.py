"""The shard worker: consumes ``placement.assigned.<node>``, holds what the newest plan says, and
reports the truth on ``shard.status.<node>.<instance>``.

Shape: a thin async shell around pure logic. ``agents.reconcile`` folds assignments into desired
state and diffs it against what is held; ``agents.loader`` reads exactly a stage's tensors. This
module only moves messages and runs the actions.

Delivery and restarts:
- In an agent process (``agents.service``) every worker reads an inbox of the process's one
  shared consumer (``agents.assignments``: a consumer per node hits the server's consumer limit
  at 1,000 nodes). On its own (``Worker(..., inbox=None)``, tests, embedding) a worker runs:
- A durable pull consumer (``worker-<node>``) is the cursor through the node's assignments, so
  anything published while the worker was down is delivered when it returns.
- A restarted process holds nothing, yet the durable consumer will not redeliver what the
  previous incarnation acked. So on start, if the durable delivered anything before, the worker
  first replays the node's whole assignment history (a short-lived ephemeral consumer) to
  rebuild desired state. Folding is idempotent, which is why messages are acked as soon as they are
  folded, and why redelivered duplicates are harmless.
- Only the planner's ledger says which generation of an instance counts (``bus.authority``): an
  assignment of another generation is stale (dropped) or unauthorised (dead-lettered with the
  reason), so a forged higher generation cannot take an instance over.
- Loads run in a thread (``asyncio.to_thread``), so the event loop, and with it the agent's
  telemetry on the same loop, keeps running while gigabytes are copied. An in-flight load that a
  newer plan no longer wants is cancelled between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from shardplane.agents import reconcile as rc
from shardplane.agents.assignments import Inbox, fetch_backoff, fetch_unless_stopped
from shardplane.agents.fit import device_index as device_index
from shardplane.agents.fit import misfit as misfit
from shardplane.agents.fit import spec_of
from shardplane.agents.intake import (
    deadletter,
    decode_assignment,
    describe_error,
    durable_name,
    ensure_streams,
    idle_poll,
    subscribe,
)
from shardplane.agents.loader import (
    DEFAULT_READ_MODE,
    LoadCancelled,
    LoadedShard,
    LoadError,
    ReadMode,
)
from shardplane.agents.pipeline import PipelineHost, load_assigned
from shardplane.agents.statuses import publish_status
from shardplane.agents.steptiming import StepTiming
from shardplane.agents.workerenv import load_limit_from_env as load_limit_from_env
from shardplane.agents.workerenv import read_mode_from_env as read_mode_from_env
from shardplane.bus import authority, streams, subjects
from shardplane.bus.messages import ShardAssignment, ShardState, ShardStatus

log = logging.getLogger(__name__)

HoldMemory = Callable[[int, int], None]
Capacity = Callable[[int], "int | None"]  # device index -> its total memory, None if unknown


FETCH_BATCH = 64
FETCH_TIMEOUT_S = 2.0  # long poll; stopping does not wait for it (raced with stop)


class Worker:
    """One node's worker. ``run_worker`` is the entry point; tests use the class to look at
    what a worker holds (``shards``: key -> tensors actually in memory)."""

    def __init__(
        self,
        nc: Client,
        *,
        node: str,
        hold_memory: HoldMemory | None = None,
        use_cuda: bool = True,
        read_limit_bps: float | None = None,
        memory_limit: int | None = None,
        read_mode: ReadMode = DEFAULT_READ_MODE,
        capacity: Capacity | None = None,
        verify_generations: bool = True,
        inbox: Inbox | None = None,
    ) -> None:
        self.nc = nc
        self.capacity = capacity
        # Act only on the ledger's generation of each instance (bus.authority); off only where
        # tests publish assignments by hand, without a planner.
        self.verify_generations = verify_generations
        self._ledger_kv: KeyValue | None = None
        self.inbox = inbox  # the shared feed's inbox; None: this worker's own durable
        self.node = node
        self.hold_memory = hold_memory
        self.use_cuda = use_cuda
        self.read_limit_bps = read_limit_bps
        self.memory_limit = memory_limit
        self.read_mode: ReadMode = read_mode
        self.desired: dict[str, rc.Desired] = {}
        self.held: dict[rc.ShardKey, rc.Held] = {}
        self.shards: dict[rc.ShardKey, LoadedShard] = {}
        # Readers order statuses by (epoch, seq, ts): seq restarts at 0 with each incarnation,
        # the epoch (start time) tells incarnations apart.
        self.epoch = time.time()
        self._seq = 0
        self._changed = asyncio.Event()
        self._inflight: tuple[ShardAssignment, threading.Event] | None = None
        self._sub: Any = None  # the durable pull subscription (JetStreamContext.PullSubscription)
        # Serves loaded stages of runnable models; their step times go out in ShardStatus.
        self.pipeline = PipelineHost(nc, on_steps=self._step_measured)

    # --- public view ------------------------------------------------------------------------

    def tensor_names(self) -> dict[rc.ShardKey, list[str]]:
        return {key: shard.names() for key, shard in self.shards.items()}

    # --- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        js = self.nc.jetstream()
        subject = subjects.assigned(self.node)
        if self.inbox is None:
            await ensure_streams(js)
            await self._rebuild(js, subject)
            self._sub = await subscribe(js, self.node, subject)
            self._changed.set()  # reconcile the rebuilt state once, even with nothing new
        reconciler = asyncio.create_task(self._reconcile_loop(stop))
        try:
            if self.inbox is None:
                await self._fetch_loop(js, subject, stop)
            else:
                await self._inbox_loop(js, self.inbox, stop)
        finally:
            if self._inflight is not None:
                self._inflight[1].set()  # abandon an in-flight load between two chunks
            self._changed.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reconciler, timeout=30)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            await self.pipeline.stop_all()
            await self._release_all("worker stopped")

    async def _rebuild(self, js: JetStreamContext, subject: str) -> None:
        """Replay the node's assignment history when an earlier incarnation already acked some."""
        try:
            info = await js.consumer_info(streams.PLACEMENTS, durable_name(self.node))
        except NotFoundError:
            return  # first start: the new durable delivers everything from the beginning
        # Anything delivered before (acked, or sent to a fetch that died with the old process)
        # may never come again through the durable: replay the history.
        if info.delivered is None or not info.delivered.stream_seq:
            return
        sub = await js.pull_subscribe(
            subject,
            stream=streams.PLACEMENTS,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
        try:
            pending = (await sub.consumer_info()).num_pending or 0
            count = 0
            while pending > 0:
                try:
                    msgs = await sub.fetch(min(pending, 256), timeout=2.0)
                except nats.errors.TimeoutError:
                    break
                view = await self._ledger(js)
                for msg in msgs:
                    assignment = decode_assignment(msg, self.node)
                    if assignment is not None and self._verdict(view, assignment)[0] == "current":
                        self.desired = rc.fold(self.desired, assignment)
                    count += 1
                pending = msgs[-1].metadata.num_pending if msgs else 0
            log.info("worker %s: rebuilt desired state from %d assignments", self.node, count)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(streams.PLACEMENTS, sub._consumer)  # pyright: ignore[reportPrivateUsage]

    async def _fetch_loop(self, js: JetStreamContext, subject: str, stop: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stop.wait())
        failures = 0
        try:
            while not stop.is_set():
                pull = self._sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                fetch = await fetch_unless_stopped(pull, stopped)
                if fetch is None:
                    break
                try:
                    msgs = fetch.result()
                except Exception as exc:
                    if idle_poll(exc):
                        log.debug(
                            "worker %s: no assignment within %.1f s", self.node, FETCH_TIMEOUT_S
                        )
                        continue
                    # Connection trouble (the client reconnects by itself) or the durable was
                    # deleted (stream re-provisioned): after a few failures, subscribe again.
                    failures += 1
                    what = f"worker {self.node}: fetching assignments"
                    described = describe_error(exc)
                    if await fetch_backoff(log, what, described, exc, failures, stop):
                        # Drop the old subscription first: left behind, it would still collect
                        # status replies for the dead consumer that nothing reads, and closing
                        # the connection would wait the whole drain timeout for them.
                        with contextlib.suppress(Exception):
                            await self._sub.unsubscribe()
                        with contextlib.suppress(Exception):
                            await ensure_streams(js)
                            self._sub = await subscribe(js, self.node, subject)
                            failures = 0
                    continue
                failures = 0
                await self._fold(js, msgs, acked=True, live=True)
                self._cancel_superseded()
                self._changed.set()
        finally:
            stopped.cancel()

    async def _inbox_loop(self, js: JetStreamContext, inbox: Inbox, stop: asyncio.Event) -> None:
        """Assignments from the agent process's shared feed (``agents.assignments``): history is
        folded quietly, and the worker acts once the feed says it has caught up."""
        while (batch := await inbox.next(stop)) is not None:
            await self._fold(js, batch.msgs, acked=False, live=batch.live)
            if batch.live:
                self._cancel_superseded()
                self._changed.set()

    async def _fold(
        self, js: JetStreamContext, msgs: list[Msg], *, acked: bool, live: bool
    ) -> None:
        """Fold what the ledger authorises into the desired state (bus.authority): a stale
        generation is passed over, an unknown, ahead or forged one dead-lettered with the
        reason (live messages only: history is folded quietly)."""
        view = await self._ledger(js)
        for msg in msgs:
            assignment = decode_assignment(msg, self.node)
            if assignment is None:
                if live:
                    await deadletter(js, msg, self.node)
                continue
            verdict, why = self._verdict(view, assignment)
            if verdict in ("unknown", "ahead", "forged"):
                if live:
                    log.warning("worker %s: rejected assignment: %s", self.node, why)
                    await deadletter(js, msg, self.node, why)
                continue
            if verdict == "current":
                self.desired = rc.fold(self.desired, assignment)
            if acked:
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _ledger(self, js: JetStreamContext) -> authority.LedgerView | None:
        """The planner's ledger now (None: not checking). Read after the assignments arrived,
        so it includes their commits (the planner commits before it publishes)."""
        if not self.verify_generations:
            return None
        if self._ledger_kv is None:
            self._ledger_kv = await authority.ledger_bucket(js)
        return await authority.read(self._ledger_kv)

    def _verdict(
        self, view: authority.LedgerView | None, assignment: ShardAssignment
    ) -> tuple[authority.Verdict, str]:
        return ("current", "") if view is None else authority.judge(view, assignment)

    def _cancel_superseded(self) -> None:
        if self._inflight is None:
            return
        assignment, cancel = self._inflight
        if rc.superseded(self.desired, assignment):
            cancel.set()

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            if stop.is_set():
                return
            for action in rc.reconcile(self.desired, self.held):
                if stop.is_set():
                    return
                try:
                    await self._apply(action)
                except Exception:
                    log.exception("worker %s: %s failed", self.node, type(action).__name__)
                if self._changed.is_set():
                    break  # the plan changed meanwhile: recompute before doing stale work

    # --- actions ----------------------------------------------------------------------------

    async def _apply(self, action: rc.Action) -> None:
        match action:
            case rc.Unload(held=held, reason=reason):
                await self._unload(held, reason)
            case rc.Adopt(old=old, assignment=assignment):
                await self._adopt(old, assignment)
            case rc.Reserve(assignment=assignment):
                await self._reserve(assignment)
            case rc.Load(assignment=assignment):
                await self._load(assignment)

    def _hold(self, assignment: ShardAssignment, delta: int) -> None:
        if self.hold_memory is not None and delta:
            try:
                self.hold_memory(device_index(assignment), delta)
            except Exception:
                log.exception("worker %s: hold_memory(%+d) failed", self.node, delta)

    async def _unload(self, held: rc.Held, reason: str) -> None:
        key = held.key
        self.held.pop(key, None)
        shard = self.shards.pop(key, None)
        await self.pipeline.stop(key)
        if shard is not None:
            shard.release()
        self._hold(held.assignment, -held.held_bytes)
        if held.state != "failed":
            await self._status(held.assignment, "unloaded", reason=reason)

    async def _adopt(self, old: rc.ShardKey, assignment: ShardAssignment) -> None:
        previous = self.held.pop(old)
        shard = self.shards.pop(old, None)
        key = rc.ShardKey(assignment.instance_id, assignment.stage)
        new_bytes = rc.hold_bytes(assignment)
        self._hold(assignment, new_bytes - previous.held_bytes)
        self.held[key] = rc.Held(assignment=assignment, state=previous.state, held_bytes=new_bytes)
        await self.pipeline.stop(old)
        if shard is not None:
            self.shards[key] = shard
            await self.pipeline.serve(key, assignment, shard.tensors)
            await self._loaded(assignment, shard)
        else:
            await self._status(assignment, previous.state)

    async def _refuse_misfit(self, assignment: ShardAssignment) -> bool:
        """Mark ``assignment`` failed (True) when its bytes cannot fit on its device."""
        if self.capacity is None:
            return False
        key = rc.ShardKey(assignment.instance_id, assignment.stage)
        index = device_index(assignment)
        elsewhere = sum(
            h.held_bytes
            for k, h in self.held.items()
            if k != key and device_index(h.assignment) == index
        )
        try:
            total = self.capacity(index)
        except Exception:  # a device that cannot be read now: the planner's check stands
            log.exception("worker %s: reading device %d's memory failed", self.node, index)
            return False
        why = misfit(assignment, total, elsewhere)
        if why is None:
            return False
        self.held[key] = rc.Held(assignment=assignment, state="failed")
        log.warning("worker %s: %s stage %d: %s", self.node, key.instance_id, key.stage, why)
        await self._status(assignment, "failed", reason=why)
        return True

    async def _reserve(self, assignment: ShardAssignment) -> None:
        if await self._refuse_misfit(assignment):
            return
        # A catalog model has no weights here: hold its memory, read nothing, and say so.
        amount = rc.hold_bytes(assignment)
        self._hold(assignment, amount)
        key = rc.ShardKey(assignment.instance_id, assignment.stage)
        self.held[key] = rc.Held(assignment=assignment, state="reserved", held_bytes=amount)
        await self._status(assignment, "reserved")

    async def _load(self, assignment: ShardAssignment) -> None:
        if await self._refuse_misfit(assignment):
            return
        key = rc.ShardKey(assignment.instance_id, assignment.stage)
        await self._status(assignment, "loading")
        amount = rc.hold_bytes(assignment)
        self._hold(assignment, amount)
        cancel = threading.Event()
        self._inflight = (assignment, cancel)
        try:
            shard = await asyncio.to_thread(
                load_assigned,
                assignment.model,
                spec_of(assignment),
                # 0 means the plan carried no figure (older planner): nothing to check against.
                expected_bytes=assignment.weight_bytes or None,
                device_index=device_index(assignment),
                use_cuda=self.use_cuda,
                memory_limit=self.memory_limit,
                read_limit_bps=self.read_limit_bps,
                cancel=cancel,
                read_mode=self.read_mode,
            )
        except LoadCancelled:
            self._hold(assignment, -amount)
            await self._status(assignment, "unloaded", reason="load cancelled: no longer assigned")
            return
        except LoadError as exc:
            self._hold(assignment, -amount)
            self.held[key] = rc.Held(assignment=assignment, state="failed")
            log.warning(
                "worker %s: %s stage %d failed: %s",
                self.node,
                assignment.instance_id,
                assignment.stage,
                exc,
            )
            await self._status(assignment, "failed", reason=str(exc))
            return
        except Exception as exc:  # a bug or an environment surprise: still report it
            self._hold(assignment, -amount)
            self.held[key] = rc.Held(assignment=assignment, state="failed")
            log.exception("worker %s: load crashed", self.node)
            await self._status(assignment, "failed", reason=f"internal error: {exc!r}")
            return
        finally:
            self._inflight = None
        self.shards[key] = shard
        self.held[key] = rc.Held(assignment=assignment, state="loaded", held_bytes=amount)
        await self.pipeline.serve(key, assignment, shard.tensors)
        log.info(
            "worker %s: %s stage %d loaded %d bytes in %.0f ms on %s",
            self.node,
            assignment.instance_id,
            assignment.stage,
            shard.nbytes,
            shard.load_ms,
            shard.where,
        )
        await self._loaded(assignment, shard)

    async def _step_measured(self, key: rc.ShardKey, timing: StepTiming) -> None:
        held, shard = self.held.get(key), self.shards.get(key)
        if held is None or shard is None or held.state != "loaded":
            return
        await self._status(
            held.assignment,
            "loaded",
            bytes_loaded=shard.nbytes,
            load_ms=shard.load_ms,
            where=shard.where,
            tensors=len(shard.tensors),
            step_ms=timing.ms,
            step_bytes=timing.read_bytes,
            step_rows=timing.rows,
            step_flops=timing.flops,
            executor=timing.executor,
            hop_ms=timing.hop_ms,
        )

    async def _release_all(self, reason: str) -> None:
        """On a graceful stop the memory goes with the process: say so, best effort."""
        for held in list(self.held.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._unload(held, reason), timeout=2.0)

    # --- status -----------------------------------------------------------------------------

    async def _loaded(self, assignment: ShardAssignment, shard: LoadedShard) -> None:
        await self._status(
            assignment,
            "loaded",
            bytes_loaded=shard.nbytes,
            load_ms=shard.load_ms,
            where=shard.where,
            tensors=len(shard.tensors),
        )

    async def _status(self, assignment: ShardAssignment, state: ShardState, **fields: Any) -> None:
        self._seq += 1
        status = ShardStatus(
            instance_id=assignment.instance_id,
            generation=assignment.generation,
            node=self.node,
            stage=assignment.stage,
            state=state,
            seq=self._seq,
            ts=time.time(),
            epoch=self.epoch,
            device=assignment.device,
            **fields,
        )
        await publish_status(self.nc.jetstream(), status)


async def run_worker(
    nc: Client,
    *,
    node: str,
    stop: asyncio.Event,
    hold_memory: HoldMemory | None = None,
    capacity: Capacity | None = None,
    inbox: Inbox | None = None,
) -> None:
    """Run the shard worker of ``node`` on ``nc`` until ``stop`` is set. ``capacity`` (device
    index -> total bytes) lets it refuse an assignment that cannot fit. With ``inbox`` it
    takes its assignments from the agent process's shared feed instead of its own durable
    consumer (a fleet's nodes share one consumer: see ``agents.assignments``).

    ``SHARDPLANE_LOAD_LIMIT_MBPS`` (MB/s), when set, throttles shard loads, so that loading a
    new plan does not starve a serving process on the same host of disk bandwidth.
    ``SHARDPLANE_LOAD_READ=mmap`` reads tensors through a memory map instead of positional reads
    (the default, ``pread``: a file truncated under a map kills the process with SIGBUS; see
    ``agents.loader.load_stage``)."""
    await Worker(
        nc,
        node=node,
        hold_memory=hold_memory,
        read_limit_bps=load_limit_from_env(),
        read_mode=read_mode_from_env(),
        capacity=capacity,
        inbox=inbox,
    ).run(stop)
