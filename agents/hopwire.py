"""The pipeline's hot path over nats-py with fewer event-loop turns: bytes written at once,
requests and replies handed straight from nats-py's reader to whoever waits for them.

Why: a stage crossing is paid with cold caches (the stage's forward has just streamed its
weights through the L3), so every event-loop turn on it costs a trip through the loop, the
selector and a task's wake-up fetched from memory again. nats-py, used plainly, spends turns a
crossing does not need:

- ``publish`` only queues the bytes and wakes its flusher task: they leave one turn later;
- a subscription's messages go through an ``asyncio.Queue`` to a task of the subscription's
  own, which then runs the callback: one turn;
- ``request`` resolves its future in that task, then ``asyncio.wait_for`` releases its waiter
  in another callback, and only then does the caller resume: two more turns.

Here ``flush_now`` writes the queued bytes to the socket at once, and ``deliver_to`` replaces a
subscription's queue with an object whose ``put_nowait`` (called by nats-py's reader as each
message is parsed) hands the message on directly: ``Inbox`` resolves the waiting request's
future (the caller resumes in the next turn) or, asked with ``Inbox.ask``, calls back in the
reader itself (a stage relaying the next stage's answer upstream: no turn at all); a stage
server runs a decode step right there too, or starts a task for anything else.

Fewer turns still leave the crossing cold: the process, the socket, the loop, nats-py's reader
and the server's side of the connection were all last used before the other side's compute
evicted them. ``Warmer`` sends one PING shortly before the next message is expected (a stage's
next request, a request's reply: steps of a generation come at a steady pace), so that path
has just been used when the message comes. No polling: one round trip per expected message,
on a timer, on a core that would sit idle. Measured by ``bench hop_profile`` (one crossing,
8 ms of compute upstream, load 2.4-3.0): 0.84-0.98 ms before this module, 0.66-0.86 ms with
fewer turns alone, 0.41-0.55 ms with the warm-up. ``SHARDPLANE_WARM=0`` turns the warm-up off
(to measure it, or should a deployment mind the PINGs).

Writing at once exposes a race nats-py's own slowness hid: ``nc.flush()`` writes its PING
straight to the socket, ahead of commands still queued for the flusher, so after
``subscribe`` + ``flush`` the server may not have the SUB yet, and a request written at once
from another connection finds no responder. ``deliver_to`` writes its SUB at once; ``settle``
is the barrier for subscriptions made with nats-py alone.

This is the only module that touches nats-py's private attributes (pinned ``nats-py>=2.16,
<2.17``); ``tests/agents/test_hopwire.py`` checks each of them against the installed nats-py
and a real server, so an upgrade that changes them fails there loudly. Should they be missing
at run time anyway, ``compatible`` says so and callers take nats-py's public path instead.

Writing at once must not outrun the socket: nats-py's own path makes a publisher wait once its
buffer passes the connection's ``pending_size`` (its flusher awaits the socket's ``drain``),
so a stalled server stops publishers instead of growing memory. ``publish_now`` and
``flush_now`` therefore write only while the bytes this process holds for the socket stay
under that same size, and otherwise leave them to nats-py's path and its back-pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shardplane.bus import direct

log = logging.getLogger(__name__)

NO_RESPONDERS = "503"  # the status header of the server's answer when nobody subscribes
_STATUS = "Status"  # nats-py's header key for a message's status line

# The attributes relied upon: the client's pending buffer, its size and its transport; a
# subscription's queue (nats-py's reader calls its ``put_nowait``). ``backlog`` also reads the
# transport's stream writer and the client's ``pending_size``, and where they are missing
# writes nothing directly.
CLIENT_ATTRS = ("_pending", "_pending_data_size", "_transport")
SUBSCRIPTION_ATTRS = ("_pending_queue",)


def compatible(nc: Client, sub: Subscription | None = None) -> bool:
    """Whether the installed nats-py has the private attributes this module uses."""
    ok = all(hasattr(nc, a) for a in CLIENT_ATTRS)
    return ok and (sub is None or all(hasattr(sub, a) for a in SUBSCRIPTION_ATTRS))


def flush_now(nc: Client) -> None:
    """Write what ``publish`` queued to the socket now, not one loop turn later (the flusher,
    woken by ``publish``, then finds nothing left to write). Order is kept: the flusher takes
    the same buffer, and neither side yields between taking and writing it."""
    if not nc.is_connected or not compatible(nc):
        return  # reconnecting: nats-py's flusher sends the buffer once it can
    pending: list[bytes] = nc._pending  # pyright: ignore[reportPrivateUsage]
    if not pending or _congested(nc, 0):
        return  # a full socket: the flusher (woken by whoever queued these) waits it out
    nc._pending = []  # pyright: ignore[reportPrivateUsage]
    nc._pending_data_size = 0  # pyright: ignore[reportPrivateUsage]
    nc._transport.writelines(pending)  # pyright: ignore[reportPrivateUsage, reportOptionalMemberAccess]


async def publish(nc: Client, subject: str, payload: bytes, reply: str = "") -> None:
    """``nc.publish`` written to the socket at once (``publish_now``, else nats-py's own path,
    which raises its own errors)."""
    if not publish_now(nc, subject, payload, reply):
        await nc.publish(subject, payload, reply=reply)
        flush_now(nc)


def publish_now(nc: Client, subject: str, payload: bytes, reply: str = "") -> bool:
    """Write a PUB straight to the transport (after anything still queued, so order is kept)
    and say so; False, having done nothing, for anything unusual (reconnecting, draining, too
    large, a subject nats-py would refuse, a socket that is not keeping up): then
    ``nc.publish`` must take it. nats-py's publish
    would also allocate a future and queue it for its flusher task, whose wake-up then writes
    nothing. Subjects are checked as nats-py checks them (no whitespace: a CR LF would inject
    a protocol line)."""
    size = len(payload)
    if (
        not nc.is_connected
        or nc.is_draining_pubs
        or size > nc.max_payload
        or not compatible(nc)
        or _congested(nc, size)
        or not subject
        or _BAD_SUBJECT.search(subject)
        or _BAD_SUBJECT.search(reply)
    ):
        return False
    flush_now(nc)
    head = f"PUB {subject} {reply} {size}\r\n" if reply else f"PUB {subject} {size}\r\n"
    nc._transport.writelines([head.encode(), payload, b"\r\n"])  # pyright: ignore[reportPrivateUsage, reportOptionalMemberAccess]
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    return True


_BAD_SUBJECT = re.compile(r"\s")


def backlog(nc: Client) -> int | None:
    """Bytes this process holds for ``nc``'s socket (the asyncio transport's write buffer plus
    what nats-py queued); None for a transport that does not say (then nothing is written
    directly: nats-py's own path knows how to wait for it)."""
    writer = getattr(nc._transport, "_io_writer", None)  # pyright: ignore[reportPrivateUsage]
    size = getattr(getattr(writer, "transport", None), "get_write_buffer_size", None)
    if not callable(size):
        return None
    buffered = size()
    if not isinstance(buffered, int):
        return None
    return buffered + nc._pending_data_size  # pyright: ignore[reportPrivateUsage]


def backlog_limit(nc: Client) -> int:
    """The connection's own ``pending_size`` (nats-py makes publishers wait beyond it)."""
    limit = getattr(nc, "_max_pending_size", 0)
    return limit if isinstance(limit, int) and limit > 0 else DEFAULT_BACKLOG_LIMIT


DEFAULT_BACKLOG_LIMIT = 2 * 1024 * 1024  # nats-py's default pending_size


def _congested(nc: Client, size: int) -> bool:
    held = backlog(nc)
    return held is None or held + size > backlog_limit(nc)


# A timer of the event loop fires up to 1 ms late (epoll's timeout is in whole ms, rounded up).
WARM_LEAD_S = 0.002  # measured 1.2-5 ms: 1.2 is too close (a late timer misses the message)
WARM = os.environ.get("SHARDPLANE_WARM", "1") != "0"


async def settle(nc: Client, timeout: int = 5) -> None:
    """Everything ``nc`` queued (a SUB just made) has reached the server and been processed:
    written now, then a PING/PONG round trip behind it."""
    flush_now(nc)
    await nc.flush(timeout=timeout)


async def deliver_to(
    nc: Client, subject: str, on_msg: Callable[[Msg], None]
) -> tuple[Subscription, bool]:
    """Subscribe ``subject`` with each message handed to ``on_msg`` (a plain function, called
    in nats-py's reader: it must not block) as it is parsed. Returns the subscription and
    whether the direct path is in place; if not (an incompatible nats-py) the messages come
    through nats-py's own callback task instead, to the same ``on_msg``."""
    sub, inline = await direct.subscribe(nc, subject, on_msg, inline=compatible(nc))
    if inline:
        flush_now(nc)  # the SUB, so that a later nc.flush() really follows it
    return sub, inline


class Inbox:
    """Request-reply over one long-lived reply subscription per connection, whose replies
    resolve the waiting request's future straight from nats-py's reader. Errors are nats-py's
    own (``NoRespondersError``, ``TimeoutError``), so callers handle them as for ``request``.

    It holds its connection weakly: ``inbox`` keeps one per connection in a
    ``WeakKeyDictionary``, whose entry (and so this inbox, its subscription's handler and its
    warmer) must go with the connection, which a strong reference from here would prevent."""

    def __init__(self, nc: Client) -> None:
        self._nc = weakref.ref(nc)
        self.prefix = nc.new_inbox() + "."
        # A request's waiter: the future ``request`` awaits, or the callback ``ask`` was given.
        self._waiting: dict[str, asyncio.Future[Msg] | Callable[[Msg], None]] = {}
        self._tokens = itertools.count()
        self._started: asyncio.Future[bool] | None = None
        # The last request's round trip, by subject, for the warm-up; a process asks the
        # stages of many instances over its life, so only the most recent subjects are kept.
        self._round_trip: OrderedDict[str, float] = OrderedDict()
        self.warmer = Warmer(nc, WARM_LEAD_S)

    def start(self) -> asyncio.Future[bool]:
        """Subscribe the replies' subject: once, and again after a try that failed (a failure
        is for the requests that waited on that try, not for every later one). The future
        says whether the direct path is in place."""
        started = self._started
        if started is None or (
            started.done() and (started.cancelled() or started.exception() is not None)
        ):
            loop = asyncio.get_running_loop()
            started = self._started = loop.create_future()
            started.add_done_callback(_retrieved)
            task = loop.create_task(self._subscribe(started))
            _keep.add(task)
            task.add_done_callback(_keep.discard)
        return started

    async def _subscribe(self, started: asyncio.Future[bool]) -> None:
        nc = self._nc()
        try:
            if nc is None:
                raise nats.errors.ConnectionClosedError
            _, direct = await deliver_to(nc, self.prefix + "*", self._arrived)
        except Exception as exc:
            log.warning(
                "reply inbox %s* not subscribed (retried on the next request): %r", self.prefix, exc
            )
            started.set_exception(exc)
        except BaseException:
            started.cancel()
            raise
        else:
            started.set_result(direct)

    def _arrived(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject[len(self.prefix) :])
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(msg)
        elif waiter is not None:
            waiter(msg)

    def ask(
        self,
        subject: str,
        payload: bytes,
        timeout: float,
        on_reply: Callable[[Msg | nats.errors.Error], None],
    ) -> bool:
        """``request`` with no task and no loop turn: the request is written now, and the reply
        is handed to ``on_reply`` by nats-py's reader as it is parsed (or nats-py's error, a
        ``NoRespondersError`` then, a ``TimeoutError`` from a timer). ``on_reply`` is called
        exactly once and must not block. False, having sent nothing, where it cannot be done
        now (the inbox not subscribed yet, a write ``publish_now`` declines): ``request``
        then takes it."""
        nc = self._nc()
        started = self._started
        if nc is None or started is None or not started.done() or started.cancelled():
            return False
        if started.exception() is not None:
            return False
        token = str(next(self._tokens))
        sent = time.monotonic()
        loop = asyncio.get_running_loop()

        def arrived(msg: Msg) -> None:
            del self._waiting[token]
            timer.cancel()
            if msg.headers and msg.headers.get(_STATUS) == NO_RESPONDERS:
                on_reply(nats.errors.NoRespondersError())
                return
            self._remember(subject, time.monotonic() - sent)
            on_reply(msg)

        def expired() -> None:
            if self._waiting.pop(token, None) is not None:
                on_reply(nats.errors.TimeoutError())

        self._waiting[token] = arrived
        if not publish_now(nc, subject, payload, reply=self.prefix + token):
            del self._waiting[token]
            return False
        timer = loop.call_later(timeout, expired)
        if WARM and (last := self._round_trip.get(subject)) is not None:
            self.warmer.expect(sent + last)
        return True

    async def request(self, subject: str, payload: bytes, timeout: float) -> Msg:
        nc = self._nc()
        if nc is None:
            raise nats.errors.ConnectionClosedError
        await asyncio.shield(self.start())
        token = str(next(self._tokens))
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = fut
        sent = time.monotonic()
        if WARM and (last := self._round_trip.get(subject)) is not None:
            self.warmer.expect(sent + last)  # the answer should take as long as the last one
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                # The publish spends the same budget: on a socket that is not keeping up it
                # waits (nats-py's back-pressure). It has a block of its own because nats-py
                # swallows the cancellation of that wait, and the one cancellation a timeout
                # makes would be gone; the reply's block then times out at once.
                async with asyncio.timeout_at(deadline):
                    await publish(nc, subject, payload, reply=self.prefix + token)
                async with asyncio.timeout_at(deadline):
                    msg = await fut
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        finally:
            del self._waiting[token]
        if msg.headers and msg.headers.get(_STATUS) == NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        self._remember(subject, time.monotonic() - sent)
        return msg

    def _remember(self, subject: str, round_trip: float) -> None:
        kept = self._round_trip
        kept[subject] = round_trip
        kept.move_to_end(subject)
        while len(kept) > ROUND_TRIPS_KEPT:
            kept.popitem(last=False)


ROUND_TRIPS_KEPT = 256  # subjects whose last round trip an inbox remembers (most recent)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    # A start that failed with nobody waiting is logged by ``Inbox._subscribe`` already;
    # asyncio would log it again when the future is collected.
    if not fut.cancelled():
        fut.exception()


class Warmer:
    """One PING shortly before a message is expected (``expect``), so that the path it will
    take (this process's wake-up, the socket, the loop, nats-py's reader; the server's side of
    this connection) was just used when it comes, instead of cold after the other side's
    compute streamed its weights through the caches. One PING per expected message, on a
    timer: nothing polls. A wrong guess costs one PING round trip on an idle core."""

    def __init__(self, nc: Client, lead_s: float) -> None:
        self._nc = weakref.ref(nc)  # an inbox's warmer must not keep its connection alive
        self.lead_s = lead_s  # before the expected time; the loop's timers are ms-coarse
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.pings = 0  # round trips done

    def expect(self, at: float) -> None:
        """The next message is expected at ``at`` (``time.monotonic()``, the loop's clock)."""
        self.cancel()
        loop = asyncio.get_running_loop()
        if at - self.lead_s > loop.time():
            self._timer = loop.call_at(at - self.lead_s, self._ping)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ping(self) -> None:
        self._timer = None
        nc = self._nc()
        if nc is not None and nc.is_connected:
            task = asyncio.get_running_loop().create_task(self._round_trip(nc))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _round_trip(self, nc: Client) -> None:
        with contextlib.suppress(Exception):
            await nc.flush(timeout=1)
            self.pings += 1


_inboxes: weakref.WeakKeyDictionary[Client, Inbox] = weakref.WeakKeyDictionary()


def inbox(nc: Client) -> Inbox:
    """The connection's inbox, subscribed on first use (later callers wait for it)."""
    box = _inboxes.get(nc)
    if box is None:
        box = _inboxes[nc] = Inbox(nc)
    box.start()
    return box


_keep: set[asyncio.Task[Any]] = set()  # the start tasks, held until done
