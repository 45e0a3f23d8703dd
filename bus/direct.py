"""A subscription's messages handed to a plain function the moment nats-py's reader parses them.

nats-py queues every message and awaits it in a task per subscription: a queue put, a get and
a task switch per message, paid by the projector at full speed and by every pipeline stage
crossing (with cold caches). Both swap the subscription's queue for :class:`DirectQueue`, so
the stand-in is written once, here. It reaches into nats-py (a subscription's
``_pending_queue``, ``_pending_size``); pyproject pins nats-py to the minor release it was
written against, and :func:`subscribe` checks :func:`swappable` and falls back to nats-py's
callback task where it is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)


def swappable(sub: Subscription) -> bool:
    """Whether this nats-py keeps ``sub``'s messages in a queue :func:`swap_in` can replace."""
    return isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)


class DirectQueue:
    """Stands in for a subscription's ``asyncio.Queue``: what nats-py's reader puts goes to
    ``handler`` at once. Nothing is ever pending, so draining finds nothing to wait for. An
    exception is logged and goes no further: in nats-py's reader it would end the reading of
    the whole connection."""

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)  # pyright: ignore[reportPrivateUsage]
        try:
            self._handler(msg)
        except Exception:
            log.exception("message on %s: its handler failed", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        return None

    async def join(self) -> None:
        return None

    async def get(self) -> Msg:
        return await asyncio.get_running_loop().create_future()  # never: nothing is queued


def swap_in(sub: Subscription, handler: Callable[[Msg], None]) -> None:
    """Hand ``sub``'s messages to ``handler`` from now on, first those already queued (only
    where :func:`swappable`)."""
    queue: asyncio.Queue[Msg] = sub._pending_queue  # pyright: ignore[reportPrivateUsage]
    direct = DirectQueue(sub, handler)
    sub._pending_queue = direct  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
    while not queue.empty():
        direct.put_nowait(queue.get_nowait())


def is_direct(sub: Subscription) -> bool:
    return isinstance(getattr(sub, "_pending_queue", None), DirectQueue)


async def subscribe(
    nc: Client, subject: str, handler: Callable[[Msg], None], *, inline: bool = True
) -> tuple[Subscription, bool]:
    """Subscribe ``subject`` with each message handed to ``handler`` (a plain function that
    must not block) as nats-py's reader parses it. Returns the subscription and whether that
    direct path is in place; without it (``inline`` False, or a nats-py whose queue cannot be
    swapped) the messages reach the same ``handler`` through nats-py's callback task.

    No pending limits: the direct path holds nothing, and the fallback must not drop as a slow
    consumer what the direct path would have handled."""
    if inline:
        sub = await nc.subscribe(subject, pending_msgs_limit=-1, pending_bytes_limit=-1)
        if swappable(sub):
            swap_in(sub, handler)
            return sub, True
        await sub.unsubscribe()

    async def via_task(msg: Msg) -> None:
        handler(msg)

    sub = await nc.subscribe(subject, cb=via_task, pending_msgs_limit=-1, pending_bytes_limit=-1)
    return sub, False
