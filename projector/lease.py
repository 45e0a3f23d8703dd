"""Leader lease: of several projector replicas, only the holder of ``projector_lease/leader``
reads the consumers and writes ``cluster_state``.

The lease is a key in a KV bucket whose ``max_age`` is the lease TTL. A replica takes it with
``create`` (succeeds only when the key does not exist) and the holder renews it every TTL/3
with ``update(last=revision)`` (compare-and-set, so a holder that lost the key cannot renew
it back). If the holder dies, its key ages out after the TTL and a standby's ``create``
succeeds. A holder that stops gracefully keeps renewing while it finishes its last round,
then deletes its key; standbys ask every quarter second, so one takes over at once rather
than after the TTL. A holder counts its lease valid until ``(time it sent the last renewal) + TTL -
margin``, so it stops writing before the server could have let anyone else take over.

The lease is for efficiency, not for correctness: a paused leader that wakes up after losing
its lease can still issue a write or two before it notices, but every write is a
compare-and-set on the revision it read and every reduction is a join, so such a write either
fails (and is re-applied on the new value) or adds nothing the new leader would not have
written. Takeover loses nothing: the consumers are durable and shared, and anything the old
leader did not acknowledge is redelivered to the new one after the consumer's ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

LEASE_BUCKET = "projector_lease"
LEASE_KEY = "leader"
DEFAULT_LEASE_TTL_S = 3.0
# A standby asks this often (or every TTL/3 if that is sooner): a graceful stop deletes the
# key, and the standby should notice in a fraction of a second whatever the TTL.
STANDBY_POLL_S = 0.25
_MARGIN = 0.2  # of the TTL: stop writing this much before the server may expire the lease


def holder_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(
        self,
        js: JetStreamContext,
        holder: str | None = None,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        key: str = LEASE_KEY,
    ) -> None:
        self.js = js
        self.key = key  # one key per projector partition (projector.partition)
        self.holder = holder or holder_id()
        self.ttl_s = ttl_s
        self._kv: KeyValue | None = None
        self._revision = 0
        self._valid_until = 0.0

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(LEASE_BUCKET)
                # Every replica must time the lease the way the bucket expires it.
                ttl = (await self._kv.status()).ttl
                if ttl:
                    self.ttl_s = ttl
            except (NotFoundError, BadRequestError):
                self._kv = await self.js.create_key_value(
                    KeyValueConfig(
                        bucket=LEASE_BUCKET,
                        description="which projector replica writes cluster_state",
                        history=1,
                        ttl=self.ttl_s,
                        storage=StorageType.FILE,
                    )
                )
        return self._kv

    def valid(self) -> bool:
        return self._revision != 0 and time.monotonic() < self._valid_until

    def _granted(self, revision: int, sent: float) -> None:
        self._revision = revision
        self._valid_until = sent + self.ttl_s * (1.0 - _MARGIN)

    async def try_acquire(self) -> bool:
        kv = await self.bucket()
        sent = time.monotonic()
        try:
            revision = await kv.create(self.key, self.holder.encode())
        except KeyWrongLastSequenceError:
            return False
        self._granted(revision, sent)
        log.info("projector %s holds the lease", self.holder)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the lease (True) or ``stop`` is set (False)."""
        waited = False
        while not stop.is_set():
            with contextlib.suppress(Exception):
                if await self.try_acquire():
                    return True
            if not waited:
                log.info(
                    "projector %s is standing by: another replica holds the lease", self.holder
                )
                waited = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(self.ttl_s / 3, STANDBY_POLL_S))
        return False

    async def renew(self) -> bool:
        if self._revision == 0:
            return False
        kv = await self.bucket()
        sent = time.monotonic()
        try:
            revision = await kv.update(self.key, self.holder.encode(), last=self._revision)
        except KeyWrongLastSequenceError:
            log.warning("projector %s lost the lease", self.holder)
            self._revision = 0
            return False
        self._granted(revision, sent)
        return True

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew every TTL/3 until cancelled; set ``lost`` (and return) when the lease cannot
        be kept. The leader cancels it only once it has stopped writing: a graceful stop keeps
        the lease while it finishes its last round, then releases it."""
        while not lost.is_set():
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.renew():
                    lost.set()
            except Exception as exc:  # a blip: keep trying while the lease is still valid
                log.warning("lease renewal failed: %r", exc)
                if not self.valid():
                    lost.set()

    async def release(self) -> None:
        """Give the lease up at once (graceful stop), so a standby need not wait for the TTL."""
        if self._revision == 0:
            return
        revision, self._revision = self._revision, 0
        with contextlib.suppress(Exception):
            kv = await self.bucket()
            try:
                await kv.delete(self.key, last=revision)
            except APIError:
                # A renewal cancelled after it was sent may have moved the revision on: the
                # key is still ours if it still names this holder.
                entry = await kv.get(self.key)
                if entry.value == self.holder.encode():
                    await kv.delete(self.key, last=entry.revision)
