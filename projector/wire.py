"""The projector's wire-level shortcuts into nats-py, each with a plain fallback.

At 15,000 messages a second the client's per-message machinery costs more than the work the
messages carry: ``nc.publish`` validates and schedules a flush per call; every delivery goes
through a regex match, a coroutine, a ``Msg`` built with decoded strings, an asyncio queue and
a task switch before a callback sees it. For the projector's own subscriptions (pull
deliveries and PubAcks, whose subjects we chose) this module frames publishes in one buffer
write and hands plain ``MSG`` deliveries to a synchronous handler straight from the read
loop. Everything else (headers, status messages, PING/PONG, INFO, errors, other
subscriptions) still goes through nats-py unchanged.

These reach into nats-py internals (``_send_command``, ``_flush_pending``, ``_ps``, a
subscription's ``_pending_queue``); pyproject pins nats-py to the one minor release they were
written against. Each shortcut checks the internals it needs and falls back to the public API
when they are missing, so the projector keeps working on another nats-py; the fallback is
silent at run time, and tests/projector/test_fast_path.py (through :func:`fast_path_state`)
fails when a shortcut is off or nats-py is outside the pin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple, cast

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from shardplane.bus import direct

log = logging.getLogger(__name__)

Handler = Callable[[Msg], None]
# (subject, payload) of a plain MSG: for answers whose subject and body are all that matter
# (PubAcks), so not even a Msg is built for them.
RawHandler = Callable[[bytes, bytes], None]


def target(subject: str, reply: str) -> bytes:
    return f"{subject} {reply}".encode() if reply else subject.encode()


def pub(subject: str, reply: str, payload: bytes) -> bytes:
    return b"PUB %s %d\r\n%s\r\n" % (target(subject, reply), len(payload), payload)


def hpub(subject: str, reply: str, headers: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        target(subject, reply),
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


# Publishes as (subject, reply, payload, headers or None).
Publish = tuple[str, str, bytes, "dict[str, str] | None"]


def framing_available(nc: Client) -> bool:
    """Whether this nats-py has the internals :func:`send_framed` queues into."""
    return hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending")


async def send_framed(nc: Client, commands: list[bytes]) -> None:
    """Hand many already framed publishes (PUB/HPUB) to the client as one buffer write.

    ``nc.publish`` validates, encodes and schedules a flush per call, which for acks and KV
    writes costs more than the work they carry; our subjects and replies come from the server
    or from validated tokens, so they are framed here and queued in one piece. Only call it
    where :func:`framing_available`; otherwise publish one by one with ``nc.publish``."""
    await nc._send_command(b"".join(commands))  # pyright: ignore[reportPrivateUsage]
    await nc._flush_pending()  # pyright: ignore[reportPrivateUsage]


async def publish_each(nc: Client, messages: list[Publish]) -> None:
    for subject, reply, payload, headers in messages:
        await nc.publish(subject, payload, reply=reply, headers=headers)


async def subscribe_direct(
    nc: Client,
    subject: str,
    handler: Handler,
    *,
    fast: bool = True,
    raw: RawHandler | None = None,
    status_only: bool = False,
) -> Subscription:
    """Subscribe ``handler`` (a plain function that must not block or raise) to ``subject``
    (``fast`` False: through nats-py's queue and callback task, to measure what this buys).
    With ``raw``, plain MSG frames go to ``raw(subject, payload)`` on the fast path, and only
    what nats-py parses (frames with headers) reaches ``handler``. With ``status_only``, the
    handler reads no header but a status: messages with headers and no status may come
    without their headers (those the fast path takes)."""
    sub, inline = await direct.subscribe(nc, subject, handler, inline=fast)
    parser = fast_parser(nc) if inline else None
    if parser is not None:
        parser.direct[sub._id] = handler  # pyright: ignore[reportPrivateUsage]
        if raw is not None:
            parser.raw[sub._id] = raw  # pyright: ignore[reportPrivateUsage]
        if status_only:
            parser.bare.add(sub._id)  # pyright: ignore[reportPrivateUsage]
    return sub


# The header block of a message with headers and no status line.
_NO_STATUS = b"NATS/1.0\r\n"


class FastParser(Parser):
    """nats-py's parser with a fast path for deliveries to direct subscriptions.

    Complete ``MSG`` frames at the front of the buffer whose subscription is registered in
    :attr:`direct` are cut out with ``split`` and handed to the handler at once; so are
    ``HMSG`` frames without a status line for subscriptions in :attr:`bare`, as plain
    messages, their headers dropped (the pull loop reads nothing from headers but a status,
    and every sample an agent stores carries its ``Nats-Msg-Id``, which sent each one through
    nats-py's slow path). The first frame that is anything else
    (a status, another subscription's, incomplete) ends the fast path, and nats-py's own
    parser takes the rest of the buffer exactly as it would have."""

    # Set by fast_parser(), which turns the client's own parser into one of these.
    client: Client
    direct: dict[int, Handler]
    raw: dict[int, RawHandler]
    bare: set[int]  # direct subscriptions that want a status from headers, nothing else
    fast_frames: int  # frames this fast path delivered (what fast_path_state reports)

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        direct = self.direct
        if not direct:
            await super().parse()
            return
        if self.state == AWAITING_MSG_PAYLOAD:
            # nats-py's parser stopped inside a frame: finish it here when it is ours.
            arg = self.msg_arg
            handler = direct.get(arg["sid"])
            if handler is None or self.header_needed or len(buf) < self.needed + 2:
                await super().parse()
                return
            payload = bytes(buf[: self.needed])
            del buf[: self.needed + 2]
            self.state = AWAITING_CONTROL_LINE
            self._deliver(arg["sid"], handler, arg["subject"], arg["reply"], payload)
        size = len(buf)
        pos = 0
        waiting = False  # an incomplete frame of ours at the end: wait for the rest
        while True:
            if buf.startswith(b"MSG ", pos):
                skip, fields = 4, 3
            elif buf.startswith(b"HMSG ", pos):
                skip, fields = 5, 4  # ... <header bytes> <total bytes>
            else:
                break
            eol = buf.find(b"\r\n", pos, pos + 4096)
            if eol < 0:
                waiting = size - pos < 4096
                break
            parts = bytes(buf[pos + skip : eol]).split()
            if len(parts) not in (fields, fields + 1):
                break  # malformed: nats-py's parser reports it
            sid = int(parts[1])
            handler = direct.get(sid)
            if handler is None:
                break
            start = eol + 2
            end = start + int(parts[-1])
            if end + 2 > size:
                waiting = True
                break
            head = int(parts[-2]) if fields == 4 else 0
            if head and (
                sid not in self.bare
                or not buf.startswith(_NO_STATUS, start)
                or buf.find(b"Status:", start, start + head) >= 0
            ):
                break  # headers wanted, or a status (heartbeat, 404...): nats-py reads them
            payload = bytes(buf[start + head : end])
            pos = end + 2
            reply = parts[2] if len(parts) == fields + 1 else b""
            self._deliver(sid, handler, parts[0], reply, payload)
        if pos:
            del buf[:pos]
        if not waiting:
            await super().parse()

    def _deliver(
        self, sid: int, handler: Handler, subject: bytes, reply: bytes, payload: bytes
    ) -> None:
        """One plain frame of a direct subscription: to its raw handler if it has one (no Msg
        built), else to its Msg handler."""
        nc = self.client
        self.fast_frames += 1
        stats = nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(payload)
        try:
            raw = self.raw.get(sid)
            if raw is not None:
                raw(subject, payload)
                return
            handler(
                nc.msg_class(
                    subject=subject.decode(),
                    reply=reply.decode(),
                    data=payload,
                    headers=None,
                    _client=nc,
                    _sid=sid,
                )
            )
        except Exception:
            log.exception("handler for subscription %d failed", sid)


def fast_parser(nc: Client) -> FastParser | None:
    """The client's :class:`FastParser`, installed on first use (None where nats-py's parser
    is not the one this was written against)."""
    current = getattr(nc, "_ps", None)
    if isinstance(current, FastParser):
        return current
    if type(current) is not Parser or not hasattr(current, "buf"):
        return None
    # The parser object itself becomes a FastParser (rather than a copy of its state taking
    # its place): the read loop may be suspended inside the old parse() right now (it awaits
    # while handling some frames), and a copy would then diverge from the state that call
    # goes on to change. One object, one state; the next parse() call is the fast one.
    current.__class__ = FastParser
    fast = cast(FastParser, current)
    fast.client = nc
    fast.direct = {}
    fast.raw = {}
    fast.bare = set()
    fast.fast_frames = 0
    return fast


class FastPathState(NamedTuple):
    """Which shortcuts a connection runs on, for the test that keeps a nats-py upgrade from
    turning them off unnoticed (each one falls back silently, by design, at run time)."""

    framing: bool  # publishes framed into nats-py's pending buffer
    parser: bool  # the client's parser is a FastParser
    fast_frames: int  # MSG frames the FastParser delivered itself


def fast_path_state(nc: Client) -> FastPathState:
    """What :func:`fast_parser` and :func:`framing_available` chose for ``nc`` (installs
    nothing)."""
    parser = getattr(nc, "_ps", None)
    if isinstance(parser, FastParser):
        return FastPathState(framing_available(nc), True, parser.fast_frames)
    return FastPathState(framing_available(nc), False, 0)
