"""Lean JetStream plumbing for the projector's hot path.

nats-py's ``PullSubscription.fetch`` awaits every message through ``asyncio.wait_for``
(a task and a timer per message) and ``publish_async`` takes a semaphore, a NUID and a future
per message, then parses each PubAck into a dataclass. Per message that costs more than
decoding, reducing and encoding together. Here, with the same wire protocol:

- :class:`Puller` keeps one pull request (``$JS.API.CONSUMER.MSG.NEXT``) outstanding per
  consumer and collects deliveries in a subscription callback into a shared :class:`Inbox`;
- :class:`Writer` publishes a round of writes with reply subjects under one wildcard inbox
  and counts the PubAcks down in a callback.

Both keep JetStream's semantics: the consumer is the same durable (explicit acks, ack wait,
redelivery), and every write still gets its own PubAck or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_STATUS = "Status"
_HEARTBEAT = "100"
_ACK = b"+ACK"


def _pub(subject: str, reply: str, payload: bytes) -> bytes:
    return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)


def _hpub(subject: str, reply: str, headers: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


def header_block(headers: Mapping[str, str]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


async def send_batch(
    nc: Client, commands: list[bytes], fallback: list[tuple[str, str, bytes, dict[str, str] | None]]
) -> None:
    """Hand many publishes to the client as one buffer write.

    ``nc.publish`` validates, encodes and schedules a flush per call, which for acks and KV
    writes costs more than the work they carry; our subjects and replies come from the server
    or from validated tokens, so they are framed here and queued in one piece. Falls back to
    ``nc.publish`` if this nats-py lacks the internals (``fallback`` carries the same
    messages as (subject, reply, payload, headers))."""
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None:
        for subject, reply, payload, headers in fallback:
            await nc.publish(subject, payload, reply=reply, headers=headers)
        return
    await send(b"".join(commands))
    await flush()


async def ack_all(nc: Client, msgs: list[Msg]) -> None:
    """Acknowledge ``msgs`` (explicit acks, one per message) in one buffer write."""
    if not msgs:
        return
    replies = [m.reply for m in msgs if m.reply]
    await send_batch(
        nc,
        [_pub(reply, "", _ACK) for reply in replies],
        [(reply, "", _ACK, None) for reply in replies],
    )


class Inbox:
    """Deliveries from every consumer, in arrival order, waiting for the writer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.msgs: list[Msg] = []
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    def put(self, msg: Msg) -> None:
        self.msgs.append(msg)
        self.ready.set()
        if len(self.msgs) >= self.limit:
            self.room.clear()

    def take(self, most: int) -> list[Msg]:
        taken, self.msgs = self.msgs[:most], self.msgs[most:]
        if not self.msgs:
            self.ready.clear()
        if len(self.msgs) < self.limit:
            self.room.set()
        return taken

    def drop_all(self) -> list[Msg]:
        return self.take(len(self.msgs))


class Puller:
    """One durable pull consumer feeding an :class:`Inbox`."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        inbox: Inbox,
        *,
        batch: int,
        expires_s: float = 1.0,
        api_prefix: str = "$JS.API",
    ) -> None:
        self.nc = nc
        self.inbox = inbox
        self.batch = batch
        self.expires_s = expires_s
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._remaining = 0
        self._done = asyncio.Event()
        self._failed = False
        self._sub: Subscription | None = None

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and _STATUS in headers:
            status = headers[_STATUS]
            if status != _HEARTBEAT:
                # 404 no messages / 408 expired: the request is over, issue the next at once.
                # 409 (consumer deleted, leadership change, max waiting), 503 (no stream):
                # also over, but back off instead of spinning on a consumer that is not there.
                self._failed = status not in ("404", "408")
                if self._failed:
                    log.warning(
                        "pull on %s: %s %s", self.subject, status, headers.get("Description", "")
                    )
                self._done.set()
            return
        self.inbox.put(msg)
        self._remaining -= 1
        if self._remaining <= 0:
            self._done.set()

    async def run(self) -> None:
        reply = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            reply, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        request = json.dumps({"batch": self.batch, "expires": int(self.expires_s * 1e9)}).encode()
        try:
            while True:
                await self.inbox.room.wait()  # back-pressure: the writer is behind
                if self._failed:
                    self._failed = False
                    await asyncio.sleep(0.5)
                self._done.clear()
                self._remaining = self.batch
                try:
                    await self.nc.publish(self.subject, request, reply=reply)
                except Exception as exc:  # reconnecting: try again shortly
                    log.debug("pull request failed: %r", exc)
                    await asyncio.sleep(0.2)
                    continue
                # A request can vanish without a status (a reconnect in between): give up on
                # it a little after it would have expired.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), self.expires_s + 2.0)
        finally:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_PUBACK = msgspec.json.Decoder(_PubAck)


class WriteOutcome(msgspec.Struct):
    """Per key: the stored sequence, or the JetStream error code (0 with no answer)."""

    stored: dict[str, int]
    errors: dict[str, tuple[int, str]]


class Writer:
    """Pipelined JetStream publishes, each with its own PubAck, one round at a time."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._round = 0
        self._keys: list[str] = []
        self._stored: dict[str, int] = {}
        self._errors: dict[str, tuple[int, str]] = {}
        self._left = 0
        self._done = asyncio.Event()

    async def _ensure(self) -> None:
        if self._sub is None:
            self._prefix = self.nc.new_inbox() + "."
            self._sub = await self.nc.subscribe(
                self._prefix + "*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1
            )

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        round_id, _, index = token.partition("-")
        if round_id != str(self._round):
            return  # an answer from an earlier round that timed out
        key = self._keys[int(index)]
        if key in self._stored or key in self._errors:
            return
        if msg.headers and msg.headers.get(_STATUS) == "503":
            self._errors[key] = (503, "no responders: the stream is not available")
        else:
            try:
                ack = _PUBACK.decode(msg.data)
            except msgspec.DecodeError:
                self._errors[key] = (0, f"unreadable PubAck {msg.data[:100]!r}")
            else:
                if ack.error is not None:
                    self._errors[key] = (ack.error.err_code, ack.error.description)
                else:
                    self._stored[key] = ack.seq
        self._left -= 1
        if self._left <= 0:
            self._done.set()

    async def publish(
        self,
        messages: Mapping[str, tuple[str, bytes, dict[str, str]]],
        timeout_s: float,
    ) -> WriteOutcome:
        """``messages``: key -> (subject, payload, headers). Waits for every answer (or the
        timeout: unanswered keys are reported as errors with code 0)."""
        await self._ensure()
        self._round += 1
        self._keys = list(messages)
        self._stored, self._errors = {}, {}
        self._left = len(self._keys)
        self._done.clear()
        if not self._keys:
            return WriteOutcome({}, {})
        prefix = f"{self._prefix}{self._round}-"
        commands: list[bytes] = []
        fallback: list[tuple[str, str, bytes, dict[str, str] | None]] = []
        for i, key in enumerate(self._keys):
            subject, payload, headers = messages[key]
            reply = f"{prefix}{i}"
            commands.append(_hpub(subject, reply, header_block(headers), payload))
            fallback.append((subject, reply, payload, headers))
        await send_batch(self.nc, commands, fallback)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout_s)
        stored, errors = self._stored, self._errors
        for key in self._keys:
            if key not in stored and key not in errors:
                errors[key] = (0, "no answer in time")
        self._round += 1  # late answers of this round are ignored from now on
        return WriteOutcome(stored, errors)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
