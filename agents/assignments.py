"""One assignment consumer per agent process, shared by all the workers it runs.

Why: a durable consumer per node (``worker-<node>``) stops at the server's consumer limit
(nats-server refuses the 1,001st consumer of a stream with JetStream error 10026, "maximum
consumers limit reached"), so a 1,000-node fleet never got its workers going. An agent process
that simulates 250 nodes needs one cursor through PLACEMENTS, not 250.

How: ``AssignmentFeed`` owns one ephemeral pull consumer (no acks, memory storage, dropped by
the server ``INACTIVE_S`` after its process dies, so nodes that come and go leave nothing
behind) filtered on the process's nodes, and hands each message to the inbox of the node in its
subject. It starts from the beginning of the stream: a process that starts holds nothing, so it
needs each node's whole assignment history anyway (the durable worker replays it the same way
after a restart), and folding is idempotent. Messages already in the stream when the feed started
are *history*: a worker folds them without acting on each, and acts once the feed says it caught
up (``Batch(live=True)``), so a restart does not load generation 1 on its way to generation 5.
A poison message is parked on ``deadletter.>`` only when it is live, not each time history is
replayed. When the consumer is lost (server restart, deleted, expired during a long partition)
the feed creates a new one from the stream sequence after the last one it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from shardplane.bus import streams, subjects
from shardplane.bus.wait import wait_set

log = logging.getLogger(__name__)

FETCH_BATCH = 256
FETCH_TIMEOUT_S = 2.0
INACTIVE_S = 120.0
# Past this many nodes one wildcard filter is cheaper than a filter subject per node; the
# process then drops the few assignments of nodes another process runs.
MAX_FILTER_SUBJECTS = 256


async def fetch_unless_stopped(
    pull: Coroutine[Any, Any, list[Msg]], stopped: asyncio.Future[Any]
) -> asyncio.Future[list[Msg]] | None:
    """Run a fetch until it completes or ``stopped`` does: the finished fetch (its result or
    its error), or None when the stop came first. A fetch cut short is cancelled, and the
    messages it would have taken are redelivered later."""
    fetch = asyncio.ensure_future(pull)
    await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if fetch.done():
        return fetch
    fetch.cancel()
    with contextlib.suppress(BaseException):
        await fetch
    return None


async def fetch_backoff(
    logger: logging.Logger,
    what: str,
    described: str,
    exc: BaseException,
    failures: int,
    stop: asyncio.Event,
) -> bool:
    """After the ``failures``-th failed fetch of assignments: log it, wait min(5, 0.2 x
    failures) s (less if stopped), and say whether to make the consumer anew. A 503/404 on a
    fetch means the consumer is most likely gone; any other error (connection trouble, which
    the client mends by itself) gets a few tries first. Never after a stop."""
    delay = min(5.0, 0.2 * failures)
    logger.warning(
        "%s from %s failed (%s), attempt %d; retrying in %.1f s",
        what,
        streams.PLACEMENTS,
        described,
        failures,
        delay,
    )
    await wait_set(stop, delay)
    gone = isinstance(exc, ServiceUnavailableError | NotFoundError)
    return (gone or failures >= 3) and not stop.is_set()


@dataclass(frozen=True)
class Batch:
    """Messages for one node, in stream order. ``live`` is False while replaying history."""

    msgs: list[Msg]
    live: bool


@dataclass
class Inbox:
    """One node's queue of batches; the worker reads it, the feed fills it."""

    queue: asyncio.Queue[Batch] = field(default_factory=lambda: asyncio.Queue[Batch]())

    async def next(self, stop: asyncio.Event) -> Batch | None:
        """The next batch, or None once ``stop`` is set."""
        if stop.is_set():
            return None
        if not self.queue.empty():
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({get, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if get.done():
            return get.result()
        get.cancel()
        return None


def node_of(subject: str) -> str:
    """``placement.assigned.<node>`` -> ``<node>``."""
    return subject.rsplit(".", 1)[-1]


def filter_for(nodes: Sequence[str]) -> list[str]:
    """The consumer's filter subjects: one per node, or the wildcard for many nodes."""
    if len(nodes) == 1:
        return [subjects.assigned(nodes[0])]
    if len(nodes) > MAX_FILTER_SUBJECTS:
        return [subjects.assigned("*")]
    return [subjects.assigned(n) for n in sorted(set(nodes))]


def split_batches(
    msgs: Sequence[tuple[str, int, Any]], history_end: int
) -> dict[str, list[tuple[list[Any], bool]]]:
    """Group ``(node, stream_seq, msg)`` by node, keeping order, cut where history ends."""
    out: dict[str, list[tuple[list[Any], bool]]] = {}
    for node, seq, msg in msgs:
        live = seq > history_end
        runs = out.setdefault(node, [])
        if runs and runs[-1][1] == live:
            runs[-1][0].append(msg)
        else:
            runs.append(([msg], live))
    return out


class AssignmentFeed:
    """The shared assignment consumer of one agent process; see the module docstring."""

    def __init__(self, nc: Client, nodes: Sequence[str]) -> None:
        if not nodes:
            raise ValueError("an assignment feed needs at least one node")
        self.nc = nc
        self.inboxes = {n: Inbox() for n in nodes}
        self.filters = filter_for(list(nodes))
        self.next_seq = 1  # the stream sequence to resume from when the consumer is recreated
        self.history_end = 0
        self.caught_up = asyncio.Event()
        self._sub: Any = None

    def inbox(self, node: str) -> Inbox:
        return self.inboxes[node]

    def _pull(self) -> Any:
        """The current subscription (a nats-py PullSubscription), once ``_start`` made one."""
        return self._sub

    async def _subscribe(self, js: JetStreamContext) -> Any:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            description=f"shard workers of {len(self.inboxes)} nodes",
        )
        if len(self.filters) == 1:
            return await js.pull_subscribe(
                self.filters[0], stream=streams.PLACEMENTS, config=config
            )
        config.filter_subjects = self.filters
        return await js.pull_subscribe("", stream=streams.PLACEMENTS, config=config)

    async def _start(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(streams.PLACEMENTS)
        except NotFoundError:
            await streams.provision(js)
            info = await js.stream_info(streams.PLACEMENTS)
        self.history_end = info.state.last_seq
        if self.history_end == 0:
            self._announce_caught_up()
        self._sub = await self._subscribe(js)

    def _announce_caught_up(self) -> None:
        if self.caught_up.is_set():
            return
        self.caught_up.set()
        for inbox in self.inboxes.values():
            inbox.queue.put_nowait(Batch([], live=True))

    def _dispatch(self, msgs: list[Msg]) -> None:
        tagged: list[tuple[str, int, Any]] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            self.next_seq = max(self.next_seq, seq + 1)
            tagged.append((node_of(msg.subject), seq, msg))
        for node, runs in split_batches(tagged, self.history_end).items():
            inbox = self.inboxes.get(node)
            if inbox is None:
                continue  # another agent process runs that node (wildcard filter)
            for run, live in runs:
                inbox.queue.put_nowait(Batch(run, live))
        if msgs and (msgs[-1].metadata.num_pending == 0 or self.next_seq > self.history_end):
            self._announce_caught_up()

    async def run(self, stop: asyncio.Event) -> None:
        """Feed the inboxes until ``stop`` is set."""
        js = self.nc.jetstream()
        failures = 0
        while self._sub is None and not stop.is_set():
            try:
                await self._start(js)
            except Exception as exc:  # JetStream not answering yet: the agent keeps retrying
                failures += 1
                log.warning("assignment feed: cannot start yet (%r), attempt %d", exc, failures)
                await wait_set(stop, min(5.0, 0.2 * failures))
        failures = 0
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                pull = self._pull().fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                fetch = await fetch_unless_stopped(pull, stopped)
                if fetch is None:
                    break
                try:
                    msgs: list[Msg] = fetch.result()
                except TimeoutError:
                    self._announce_caught_up()  # nothing pending: whatever history there was is in
                    continue
                except Exception as exc:
                    failures += 1
                    if await self._recover(js, exc, failures, stop):
                        failures = 0
                    continue
                failures = 0
                self._dispatch(msgs)
        finally:
            stopped.cancel()
            with contextlib.suppress(Exception):
                await self._pull().unsubscribe()

    async def _recover(
        self, js: JetStreamContext, exc: BaseException, failures: int, stop: asyncio.Event
    ) -> bool:
        """Wait a little; when the consumer looks gone (or keeps failing), make a new one from
        the next unseen sequence. True when it did."""
        described = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        if await fetch_backoff(log, "assignment feed: fetching", described, exc, failures, stop):
            with contextlib.suppress(Exception):
                await self._pull().unsubscribe()
            try:
                self._sub = await self._subscribe(js)
                return True
            except Exception as again:
                log.warning("assignment feed: resubscribing failed: %r", again)
        return False
