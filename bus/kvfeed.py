"""A watch of a whole KV bucket whose changes are taken off nats-py's reader as it parses them.

Why not ``kv.watchall()``: nats-py hands each delivered message to a task of the subscription,
which runs the watcher's coroutine for it (parsing the reply into metadata with a datetime,
building an ``Entry``) and queues the entry for the caller, and that task drains whatever has
piled up without yielding. At 8,000 devices the API and the planner each follow ~4,000
changes a second, in the bursts the projector writes its rounds in. Profiled in the soak
(py-spy on the API, load 3-4): 12 % of the API's busy time went to that task, and an
event-loop probe counted 432 of its steps over 5 ms (up to 34 ms) in three minutes: each one
held up every request the API was answering, the 12 MB device list included. The planner read
its watch through ``updates(timeout=...)``, a ``wait_for`` (a task) per change.

Here the subscription's queue is swapped for a plain function (bus.direct) that reads the
sequence and pending count straight out of the reply subject and appends a small
:class:`Update`; the caller drains them in slices of its own choosing (:meth:`KvFeed.drain`,
the one loop the API and the planner both apply their changes with).
The ordered consumer itself (sequence checks, resets, heartbeats, flow control) is nats-py's,
unchanged: those run in its reader before the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from shardplane.bus import direct
from shardplane.bus.errors import BusError
from shardplane.bus.streams import kv_stream, kv_subject
from shardplane.bus.wait import wait_set

log = logging.getLogger(__name__)

KV_OPERATION = "KV-Operation"  # the header nats-py's KV writes a delete or purge with
MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+ expiry markers carry this instead
_DELETES = frozenset({"DEL", "PURGE"})
_MARKER_DELETES = frozenset({"MaxAge", "Purge", "Remove"})
_V1_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
INACTIVE_THRESHOLD_S = 300.0  # as nats-py's watch: the server drops a consumer left behind
# How long a stop waits for its consumer's deletion: an answer takes milliseconds; with the
# server away the request would wait out the JetStream timeout, holding up a re-watch.
FORGET_WAIT_S = 1.0
_forgetting: set[asyncio.Task[None]] = set()  # deletions still running after their stop


class FeedEnded(BusError):
    """The feed was stopped (by :meth:`KvFeed.stop`, a stall guard, or shutdown)."""


class ReplayTimeout(BusError, TimeoutError):
    """A :func:`snapshot` did not finish in its time (a TimeoutError: worth asking again)."""


@dataclass(frozen=True, slots=True)
class Update:
    key: str
    value: bytes
    revision: int  # the stream sequence of this write
    deleted: bool  # a delete or purge (``value`` is then empty)


Item = Update | None
"""``None`` once: every key's newest value has been delivered (as nats-py's watcher)."""


class GivesWay(Protocol):
    """Something more urgent than applying changes (the API's large bodies: api.priority)."""

    def should_wait(self) -> bool: ...

    async def give_way(self) -> None: ...


def _operation(msg: Msg) -> str | None:
    """ "PUT", "DEL"/"PURGE", or None for a marker this code does not know (skipped, as nats-py
    skips it)."""
    header = msg.headers
    if not header:
        return "PUT"
    if (op := header.get(KV_OPERATION)) is not None:
        return op
    if (reason := header.get(MARKER_REASON)) is not None:
        return "DEL" if reason in _MARKER_DELETES else None
    return "PUT"


class KvFeed:
    """Every change of one bucket, in order, from its newest value per key on."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self._prefix = kv_subject(bucket)
        self._items: deque[Item] = deque()
        self._synced = False
        self._ended = False
        self._arrived = asyncio.Event()  # set by what the reader or a stop adds
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None

    # -- taking ------------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._items)

    def take(self) -> Item:
        """The oldest change not yet taken; only while :meth:`pending`."""
        return self._items.popleft()

    async def ready(self, timeout: float | None = None) -> bool:
        """Wait until a change can be taken: True then, False when ``timeout`` passed first;
        :class:`FeedEnded` once the feed is stopped and all it had was taken. A cancel always
        propagates (bus.wait)."""
        while not self._items:
            if self._ended:
                raise FeedEnded(f"the watch of {self.bucket} ended")
            self._arrived.clear()
            if timeout is None:
                await self._arrived.wait()
            elif not await wait_set(self._arrived, timeout):
                return bool(self._items)
        return True

    async def drain(
        self,
        apply: Callable[[Update], None],
        synced: Callable[[], None],
        *,
        slice_s: float,
        stop: asyncio.Event | None = None,
        poll_s: float = 1.0,
        priority: GivesWay | None = None,
    ) -> None:
        """Hand every change to ``apply`` as it comes, and call ``synced`` at the marker.

        Thousands of changes a second would hold the loop: after ``slice_s`` of applying it
        yields (requests are answered between slices), and before each change it waits while
        ``priority`` says so. Returns once ``stop`` is set (looked at between bursts, at least
        every ``poll_s``); without one it runs until the feed ends (:class:`FeedEnded`)."""
        items, clock = self._items, time.perf_counter
        timeout = None if stop is None else poll_s
        while stop is None or not stop.is_set():
            if not await self.ready(timeout):
                continue
            slice_start = clock()
            while items:
                if priority is not None and priority.should_wait():
                    await priority.give_way()
                    slice_start = clock()
                update = items.popleft()
                if update is None:
                    synced()
                    continue
                apply(update)
                if clock() - slice_start > slice_s:
                    await asyncio.sleep(0)
                    slice_start = clock()

    # -- feeding (nats-py's reader) ----------------------------------------------------------

    def _wake(self) -> None:
        self._arrived.set()

    def on_msg(self, msg: Msg) -> None:
        tokens = msg.reply.split(".")
        if len(tokens) == _V1_TOKENS:
            revision, pending = int(tokens[5]), int(tokens[8])
        else:  # the domain-qualified form (nats-py 2.16's ordered consumer reads only the
            # first form before this is called; kept so a nats-py that reads both works here)
            meta = msg.metadata
            revision, pending = meta.sequence.stream, meta.num_pending
        op = _operation(msg)
        if op is not None:
            deleted = op in _DELETES
            key = msg.subject[len(self._prefix) :]
            self._items.append(Update(key, b"" if deleted else msg.data, revision, deleted))
        if pending == 0:
            self._mark_synced()
        self._wake()

    def _mark_synced(self) -> None:
        if not self._synced:
            self._synced = True
            self._items.append(None)

    # -- life --------------------------------------------------------------------------------

    @classmethod
    async def start(cls, js: JetStreamContext, bucket: str) -> KvFeed:
        feed = cls(bucket)
        sub = await js.subscribe(
            kv_subject(bucket, ">"),
            stream=kv_stream(bucket),
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=INACTIVE_THRESHOLD_S,
        )
        feed._js, feed._sub = js, sub
        # The connection delivers to the plain subscription the JetStream one wraps (and whose
        # queue and counters the wrapper only copied when it was made).
        inner: Subscription = getattr(sub, "_sub", sub)
        if direct.swappable(inner):
            direct.swap_in(inner, feed.on_msg)  # nothing awaited since subscribe: order kept
        else:  # another nats-py: its message iterator, one task step per message
            feed._reader = asyncio.create_task(feed._read(inner))
        try:
            info = await sub.consumer_info()
        except BaseException:  # a failure, or a caller's timeout (snapshot): no feed left running
            await feed.stop()
            raise
        # The server's own count, not the messages this client has seen: its answer and the
        # first deliveries come by different paths, and heartbeats count as delivered here.
        if info.num_pending == 0 and (info.delivered is None or not info.delivered.consumer_seq):
            feed._mark_synced()  # an empty bucket: nothing will say so
        return feed

    async def _read(self, sub: Subscription) -> None:
        async for msg in sub.messages:
            self.on_msg(msg)

    async def stop(self) -> None:
        """Stop delivering (a caller waiting in :meth:`ready` gets :class:`FeedEnded`) and
        delete the feed's consumer, which the server would otherwise keep for its inactive
        threshold: :func:`snapshot`, polled five times a second by ``status``, left hundreds."""
        self._ended = True
        self._wake()
        if self._reader is not None:
            self._reader.cancel()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self._forget(sub)

    async def _forget(self, sub: Subscription) -> None:
        """Delete the consumer, best effort, waiting for it at most ``FORGET_WAIT_S``. Its name
        is read now: a reset of the ordered consumer recreates it under another name, which
        nats-py keeps on the subscription (one still being recreated at the stop is missed,
        as are those a reset left behind: their inactive threshold removes them)."""
        name = getattr(sub, "_consumer", None)
        if self._js is None or not isinstance(name, str):
            return
        task = asyncio.create_task(_delete_consumer(self._js, kv_stream(self.bucket), name))
        _forgetting.add(task)
        task.add_done_callback(_forgetting.discard)
        await asyncio.wait({task}, timeout=FORGET_WAIT_S)


async def _delete_consumer(js: JetStreamContext, stream: str, name: str) -> None:
    try:
        await js.delete_consumer(stream, name)
    except NotFoundError:
        pass  # gone already (its inactive threshold, or the stream with it)
    except Exception as exc:  # the inactive threshold removes it in the end
        log.debug("%s: consumer %s left to its inactive threshold: %r", stream, name, exc)


async def snapshot(js: JetStreamContext, bucket: str, timeout: float = 10.0) -> dict[str, Update]:
    """Every key's newest value in ``bucket`` (deleted keys left out), read in one replay.

    Why not ``kv.keys()`` and a ``get`` per key: nats-py's ``keys()`` ends at its watcher's
    "done" marker, which it may queue from the consumer-info answer before any delivered key
    has been handed over (the answer and the deliveries come by different paths). Under load it
    then lists nothing and raises ``NoKeysError`` for a full bucket: ``shardplane status`` once
    showed 0 devices right after ``demo`` had placed on 6. The feed's marker comes from the
    server's own counts (:meth:`KvFeed.start`), and the values come with the replay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:  # the consumer's creation and first info count too: a stuck server ends the wait
        async with asyncio.timeout_at(deadline):
            feed = await KvFeed.start(js, bucket)
    except TimeoutError as exc:
        raise ReplayTimeout(
            f"the {bucket} bucket's replay did not start within {timeout:.1f} s"
        ) from exc
    values: dict[str, Update] = {}
    try:
        while True:
            if not await feed.ready(max(0.0, deadline - loop.time())):
                raise ReplayTimeout(
                    f"the {bucket} bucket did not finish replaying within {timeout:.1f} s "
                    f"({len(values)} keys read)"
                )
            item = feed.take()
            if item is None:
                return values
            if item.deleted:
                values.pop(item.key, None)
            else:
                values[item.key] = item
    finally:
        await feed.stop()
