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
import time
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shardplane.bus.wait import wait_set  # re-exported: the projector's callers use it
from shardplane.projector.wire import (
    Publish,
    framing_available,
    hpub,
    pub,
    publish_each,
    send_framed,
    subscribe_direct,
)

log = logging.getLogger(__name__)

_STATUS = "Status"
_HEARTBEAT = "100"
_ACK = b"+ACK"
IDLE_HEARTBEAT_S = 0.2


async def ack_all(nc: Client, msgs: list[Msg]) -> None:
    """Acknowledge ``msgs`` (explicit acks, one per message) in one buffer write."""
    replies = [m.reply for m in msgs if m.reply]
    if not replies:
        return
    if framing_available(nc):
        await send_framed(nc, [pub(reply, "", _ACK) for reply in replies])
    else:
        await publish_each(nc, [(reply, "", _ACK, None) for reply in replies])


class Inbox:
    """Deliveries from every consumer, in arrival order, waiting for the writer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.msgs: list[Msg] = []
        # Per stream: a time T such that every message the stream stored before T is in
        # ``msgs`` or was taken from it (0: not known yet). The projector judges liveness
        # against it, never against a clock that ran on while the stream could not deliver.
        self.caught_up: dict[str, float] = {}
        self.trouble_at = 0.0  # monotonic time a pull last failed (leader change, no stream)
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
        fast: bool = True,
    ) -> None:
        self.nc = nc
        self.fast = fast
        self.inbox = inbox
        self.batch = batch
        self.expires_s = expires_s
        self.stream = stream
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._failures = 0
        self._remaining = 0
        self._done = asyncio.Event()
        self._failed = False
        self._sub: Subscription | None = None

    def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and _STATUS in headers:
            status = headers[_STATUS]
            if status == _HEARTBEAT:
                # The server idles on this request only when it has nothing to deliver.
                self.inbox.caught_up[self.stream] = time.time()
            else:
                # 404 no messages / 408 expired: the request is over, issue the next at once.
                # 409 (consumer deleted, leadership change, max waiting), 503 (no stream):
                # also over, but back off instead of spinning on a consumer that is not there.
                self._failed = status not in ("404", "408")
                if self._failed:
                    self.inbox.trouble_at = time.monotonic()
                    self._failures += 1
                    if self._failures == 1:  # once per outage: an election answers every pull
                        log.warning(
                            "pull on %s: %s %s; retrying",
                            self.subject,
                            status,
                            headers.get("Description", ""),
                        )
                else:
                    # The request ended empty-handed: nothing stored before now is undelivered.
                    self._recovered()
                    self.inbox.caught_up[self.stream] = time.time()
                self._done.set()
            return
        reply = msg.reply
        if reply.endswith(".0"):
            # Nothing pending behind this message: everything stored up to it is delivered.
            self._recovered()
            stored = _stored_at(reply)
            if stored > self.inbox.caught_up.get(self.stream, 0.0):
                self.inbox.caught_up[self.stream] = stored
        self.inbox.put(msg)
        self._remaining -= 1
        if self._remaining <= 0:
            self._done.set()

    def _recovered(self) -> None:
        if self._failures:
            log.info("pull on %s: delivering again", self.subject)
            self._failures = 0

    async def run(self) -> None:
        reply = self.nc.new_inbox()
        # Agents' samples carry a Nats-Msg-Id header each (mirrored copies keep it); the pull
        # loop reads only a status from headers, so they may skip nats-py's header path.
        self._sub = await subscribe_direct(
            self.nc, reply, self._on_msg, fast=self.fast, status_only=True
        )
        request = json.dumps(
            {
                "batch": self.batch,
                "expires": int(self.expires_s * 1e9),
                # Idle heartbeats say "nothing to deliver" often enough for liveness to be
                # judged within a fraction of a second of the truth (see Inbox.caught_up).
                "idle_heartbeat": int(min(IDLE_HEARTBEAT_S, self.expires_s / 2) * 1e9),
            }
        ).encode()
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
                await wait_set(self._done, self.expires_s + 0.5)
        finally:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


def _stored_at(reply: str) -> float:
    """The stream time in an ack subject (``...<ts>.<pending>``), 0.0 when unreadable."""
    head, _, _pending = reply.rpartition(".")
    try:
        return int(head.rpartition(".")[2]) / 1e9
    except ValueError:
        return 0.0


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


EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
MAX_BATCH = 1000  # the server's default limit on messages in one atomic batch
_CAS = b"NATS/1.0\r\n" + EXPECTED_LAST.encode() + b": %d\r\n\r\n"
_CAS_BATCH = (
    b"NATS/1.0\r\n"
    + EXPECTED_LAST.encode()
    + b": %d\r\n"
    + BATCH_ID.encode()
    + b": %s\r\n"
    + BATCH_SEQUENCE.encode()
    + b": %d\r\n%s\r\n"
)
_COMMIT = BATCH_COMMIT.encode() + b": 1\r\n"

# A compare-and-set write: (subject, payload, the subject's expected last sequence; 0: none).
Write = tuple[str, bytes, int]


class Writer:
    """Pipelined JetStream publishes, one round at a time, in one of two shapes:

    - one PubAck per message (:meth:`publish`): each key's outcome is known on its own;
    - atomic batches (:meth:`publish_batches`, nats-server 2.12+ with ``allow_atomic`` on the
      stream): up to :data:`MAX_BATCH` messages stored together or not at all, with one PubAck
      for the batch. Each message keeps its own compare-and-set header; one failed check
      rejects the whole batch, and the caller re-sends that batch's keys one by one to learn
      which key conflicted. A thousand PubAcks fewer per thousand writes is most of the
      client's and the server's work for a write.
    """

    def __init__(self, nc: Client, *, fast: bool = True) -> None:
        self.nc = nc
        self.fast = fast
        self._prefix = ""
        self._prefix_len = 0
        self._sub: Subscription | None = None
        self._round = 0
        self._slots: list[list[str]] = []  # per reply token: the keys its PubAck answers for
        self._stored: dict[str, int] = {}
        self._errors: dict[str, tuple[int, str]] = {}
        self._left = 0
        self._done = asyncio.Event()

    async def _ensure(self) -> None:
        if self._sub is None:
            self._prefix = self.nc.new_inbox() + "."
            self._prefix_len = len(self._prefix)
            self._sub = await subscribe_direct(
                self.nc, self._prefix + "*", self._on_ack, fast=self.fast, raw=self._on_raw_ack
            )

    def _on_ack(self, msg: Msg) -> None:
        """A PubAck that nats-py parsed (it has headers: a status such as 503 no responders)."""
        status = msg.headers.get(_STATUS) if msg.headers else None
        self._settle(msg.subject.encode(), msg.data, status)

    def _on_raw_ack(self, subject: bytes, data: bytes) -> None:
        self._settle(subject, data, None)

    def _settle(self, subject: bytes, data: bytes, status: str | None) -> None:
        round_id, _, index = subject[self._prefix_len :].partition(b"-")
        if int(round_id) != self._round:
            return  # an answer from an earlier round that timed out
        keys = self._slots[int(index)]
        if keys[0] in self._stored or keys[0] in self._errors:
            return
        error: tuple[int, str] | None = None
        seq = 0
        if status == "503":
            error = (503, "no responders: the stream is not available")
        else:
            try:
                ack = _PUBACK.decode(data)
            except msgspec.DecodeError:
                error = (0, f"unreadable PubAck {data[:100]!r}")
            else:
                if ack.error is not None:
                    error = (ack.error.err_code, ack.error.description)
                seq = ack.seq
        if error is not None:
            for key in keys:
                self._errors[key] = error
        else:
            # An atomic batch is stored as one contiguous run ending at the commit's sequence.
            last = len(keys) - 1
            for i, key in enumerate(keys):
                self._stored[key] = seq - (last - i)
        self._left -= 1
        if self._left <= 0:
            self._done.set()

    def _begin(self, slots: list[list[str]]) -> str:
        self._round += 1
        self._slots = slots
        self._stored, self._errors = {}, {}
        self._left = len(slots)
        self._done.clear()
        return f"{self._prefix}{self._round}-"

    async def _finish(self, keys: list[str], timeout_s: float) -> WriteOutcome:
        await wait_set(self._done, timeout_s)
        stored, errors = self._stored, self._errors
        for key in keys:
            if key not in stored and key not in errors:
                errors[key] = (0, "no answer in time")
        self._round += 1  # late answers of this round are ignored from now on
        return WriteOutcome(stored, errors)

    async def publish(self, messages: Mapping[str, Write], timeout_s: float) -> WriteOutcome:
        """``messages``: key -> (subject, payload, expected last subject sequence). Waits for
        every answer (or the timeout: unanswered keys are reported as errors with code 0)."""
        await self._ensure()
        keys = list(messages)
        if not keys:
            return WriteOutcome({}, {})
        prefix = self._begin([[key] for key in keys])
        if framing_available(self.nc):
            commands: list[bytes] = []
            for i, key in enumerate(keys):
                subject, payload, expected = messages[key]
                header = _CAS % expected
                commands.append(hpub(subject, f"{prefix}{i}", header, payload))
            await send_framed(self.nc, commands)
        else:
            await publish_each(
                self.nc,
                [
                    (subject, f"{prefix}{i}", payload, {EXPECTED_LAST: str(expected)})
                    for i, (subject, payload, expected) in enumerate(messages.values())
                ],
            )
        return await self._finish(keys, timeout_s)

    async def publish_batches(
        self, messages: Mapping[str, Write], timeout_s: float, size: int = MAX_BATCH
    ) -> WriteOutcome:
        """Like :meth:`publish`, in atomic batches of up to ``size``: a key's error is its
        batch's error (every key of a rejected batch is unwritten)."""
        await self._ensure()
        keys = list(messages)
        if not keys:
            return WriteOutcome({}, {})
        slots = [keys[i : i + size] for i in range(0, len(keys), size)]
        prefix = self._begin(slots)
        batch_prefix = f"{self._prefix.split('.')[1]}-{self._round}-"  # unique per connection
        framed = framing_available(self.nc)
        commands: list[bytes] = []
        each: list[Publish] = []
        for b, slot in enumerate(slots):
            batch_id = f"{batch_prefix}{b}".encode()
            last = len(slot) - 1
            for i, key in enumerate(slot):
                subject, payload, expected = messages[key]
                commit = i == last
                reply = f"{prefix}{b}" if commit else ""
                if framed:
                    header = _CAS_BATCH % (expected, batch_id, i + 1, _COMMIT if commit else b"")
                    commands.append(hpub(subject, reply, header, payload))
                else:
                    headers = {
                        EXPECTED_LAST: str(expected),
                        BATCH_ID: batch_id.decode(),
                        BATCH_SEQUENCE: str(i + 1),
                    }
                    if commit:
                        headers[BATCH_COMMIT] = "1"
                    each.append((subject, reply, payload, headers))
        if framed:
            await send_framed(self.nc, commands)
        else:
            await publish_each(self.nc, each)
        return await self._finish(keys, timeout_s)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
