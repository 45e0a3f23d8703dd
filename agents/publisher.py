"""JetStream publishing that never floods and never stores a sample twice.

Telemetry is a "latest value" signal: while NATS is away nothing is gained by queueing a
backlog of old samples, and replaying it after a reconnect would hit the server with a burst.
So the publisher keeps at most one pending message per subject (the newest; a newer sample
supersedes an unsent or failed older one), which bounds memory by the number of devices.

Every message carries a ``Nats-Msg-Id``. A publish that gets no stream answer (timeout, no
responders, connection lost mid-flight) is retried with the *same* id, so if the first attempt
was in fact stored, the stream's duplicate window drops the retry. nats-py does not retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import PubAck

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"


@dataclass(slots=True)
class PublishStats:
    offered: int = 0
    published: int = 0
    duplicates: int = 0  # acks the stream marked duplicate: a retry of a stored message
    superseded: int = 0  # dropped unsent because a newer message for the subject came
    failures: int = 0  # attempts without a stream answer (each is retried)
    retried: int = 0  # publishes that were a retry of an earlier attempt
    last_error: str | None = None
    errors: dict[str, int] = field(default_factory=dict[str, int])


@dataclass(slots=True)
class _Pending:
    subject: str
    payload: bytes
    msg_id: str
    attempts: int = 0


class Publisher:
    def __init__(
        self,
        nc: Client,
        *,
        ack_timeout_s: float = 2.0,
        max_in_flight: int = 1024,
        max_backoff_s: float = 1.0,  # an election ends in seconds: be back within one
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._ack_timeout = ack_timeout_s
        self._max_in_flight = max_in_flight
        self._max_backoff = max_backoff_s
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = PublishStats()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Queue ``payload`` for ``subject``, replacing anything still unsent for it."""
        self.stats.offered += 1
        if subject in self._pending:
            self.stats.superseded += 1
            # Re-insert so subjects go out in the order they were last offered.
            del self._pending[subject]
        self._pending[subject] = _Pending(subject, payload, msg_id)
        self._idle.clear()
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Send whatever is pending, backing off while NATS or the stream does not answer."""
        backoff = 0.0
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    (waker, stopping),
                    timeout=backoff or None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waker.cancel()
                if stop.is_set():
                    break
                self._wake.clear()
                if not self._pending:
                    continue
                if await self.flush_once():
                    backoff = 0.0
                else:
                    backoff = min(self._max_backoff, max(0.25, backoff * 2))
        finally:
            stopping.cancel()

    async def drain(self, timeout_s: float) -> bool:
        """Try to send everything pending within ``timeout_s`` (used for the final heartbeat)."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            if not await self.flush_once():
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self._pending

    async def flush_once(self) -> bool:
        """One pass over what is pending; True when every message got a stream answer."""
        if not self._pending:
            self._idle.set()
            return True
        if not self._nc.is_connected:
            # Publishing now would only fill nats-py's reconnect buffer, which is replayed as a
            # burst on reconnect; the pending map already holds the newest of everything.
            return False
        batch = list(self._pending.values())
        self._pending = {}
        ok = True
        for start in range(0, len(batch), self._max_in_flight):
            chunk = batch[start : start + self._max_in_flight]
            for item, sent in zip(chunk, await self._send_chunk(chunk), strict=True):
                if not sent:
                    ok = False
                    # Retry with the same id unless a newer message for the subject arrived.
                    if item.subject not in self._pending:
                        self._pending[item.subject] = item
                    else:
                        self.stats.superseded += 1
        if not self._pending:
            self._idle.set()
        return ok

    async def _send_chunk(self, chunk: list[_Pending]) -> list[bool]:
        """Publish a chunk and wait for all its acks at once: one wait for the chunk rather than
        a task and a timer per message (that bookkeeping was most of the CPU at scale)."""
        futures: list[asyncio.Future[PubAck] | None] = []
        for item in chunk:
            item.attempts += 1
            if item.attempts > 1:
                self.stats.retried += 1
            try:
                # No stall wait: a chunk is smaller than nats-py's 4000 pending-ack limit and
                # every unanswered future is cancelled below, which frees its slot.
                futures.append(
                    await self._js.publish_async(
                        item.subject, item.payload, headers={MSG_ID: item.msg_id}
                    )
                )
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                self._failed(item, exc)
                futures.append(None)
        waiting = [f for f in futures if f is not None]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self._ack_timeout)
            for f in late:
                f.cancel()
        results: list[bool] = []
        for item, future in zip(chunk, futures, strict=True):
            if future is None:
                results.append(False)
                continue
            if future.cancelled():
                self._failed(item, TimeoutError(f"no ack within {self._ack_timeout:g} s"))
                results.append(False)
                continue
            exc = future.exception()
            if exc is not None:
                self._failed(item, exc)
                results.append(False)
                continue
            self.stats.published += 1
            if future.result().duplicate:
                self.stats.duplicates += 1
            results.append(True)
        return results

    def _failed(self, item: _Pending, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.stats.failures += 1
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        text = str(exc) or kind
        if self.stats.last_error != text:
            # Once per change of cause, not once per message: an outage fails thousands.
            log.warning(
                "publish to %s got no stream answer (%s); will retry with the same id",
                item.subject,
                text,
            )
        self.stats.last_error = text

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()
