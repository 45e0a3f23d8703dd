"""Leader lease: of several replicas of a service, only the holder of ``<bucket>/leader`` acts
(the projector's replicas: ``projector_lease``, the one that writes ``cluster_state``; the
controller's: ``controller_lease``, the one that re-places instances). One mechanism, shared in
the bus package so every service elects its active replica the same way.

The lease is a key in a KV bucket whose ``max_age`` is the lease TTL. A replica takes it with
``create`` (succeeds only when the key does not exist) and the holder renews it every TTL/3
with ``update(last=revision)`` (compare-and-set, so a holder that lost the key cannot renew
it back). If the holder dies, its key ages out after the TTL and a standby's ``create``
succeeds. A holder that stops gracefully keeps renewing while it finishes its last round,
then deletes its key; standbys ask every quarter second, so one takes over at once rather
than after the TTL. A holder counts its lease valid until ``(time it sent the last renewal) + TTL -
margin``, so it stops writing before the server could have let anyone else take over.

Through an outage of NATS itself (the lease bucket electing a leader, the holder's server
lost and its connection moving to another) the holder keeps leading for up to
``ELECTION_DEADLINE_S`` while its renewals fail for reasons that mean "not now" (bus.retry):
stepping down and taking over again would only add a reload to the outage, and the worst a
standby that took the key meanwhile can cause is conflicting writes, which the following
explains are harmless. A renewal that finds the key moved to someone else ends it at once.

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
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from shardplane.bus import keys
from shardplane.bus.retry import ELECTION_DEADLINE_S, Outage, transient
from shardplane.bus.streams import ensure_bucket, wanted_replicas
from shardplane.bus.wait import wait_set

log = logging.getLogger(__name__)

LEASE_BUCKET = "projector_lease"  # the projector's (the default, for compatibility)
CONTROLLER_LEASE_BUCKET = "controller_lease"
LEASE_KEY = keys.LEASE
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
        *,
        bucket: str = LEASE_BUCKET,
        role: str = "projector",
        key: str = LEASE_KEY,
    ) -> None:
        self.js = js
        self.key = key  # one key per projector partition (projector.partition)
        self.bucket_name = bucket
        self.role = role
        self.holder = holder or holder_id()
        self.ttl_s = ttl_s
        self._kv: KeyValue | None = None
        self._revision = 0
        self._valid_until = 0.0
        self._riding_until = 0.0  # renewals fail transiently: still leading until then

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(self.bucket_name)
                # Every replica must time the lease the way the bucket expires it.
                ttl = (await self._kv.status()).ttl
                if ttl:
                    self.ttl_s = ttl
            except (NotFoundError, BadRequestError):
                # Replicated like the rest: a lease on the one server that died would stall
                # every replica until that server came back.
                replicas, explicit = wanted_replicas(self.js)
                self._kv = await ensure_bucket(
                    self.js,
                    KeyValueConfig(
                        bucket=self.bucket_name,
                        description=f"which {self.role} replica is the active one",
                        history=1,
                        ttl=self.ttl_s,
                        storage=StorageType.FILE,
                        replicas=replicas,
                    ),
                    explicit,
                )
        return self._kv

    def valid(self) -> bool:
        now = time.monotonic()
        return self._revision != 0 and (now < self._valid_until or now < self._riding_until)

    def riding_out(self, exc: BaseException) -> None:
        """A renewal failed with ``exc``: if that means an outage (bus.retry.transient), keep
        leading through it, up to ELECTION_DEADLINE_S from its first failure."""
        if transient(exc) and self._revision != 0 and not self._riding_until:
            self._riding_until = time.monotonic() + ELECTION_DEADLINE_S

    def _granted(self, revision: int, sent: float) -> None:
        self._riding_until = 0.0
        self._revision = revision
        self._valid_until = sent + self.ttl_s * (1.0 - _MARGIN)

    async def try_acquire(self) -> bool:
        kv = await self.bucket()
        sent = time.monotonic()
        try:
            revision = await kv.create(self.key, self.holder.encode())
        except KeyWrongLastSequenceError:
            revision = await self._reclaim(kv)
            if not revision:
                return False
        self._granted(revision, sent)
        log.info("%s %s holds the lease", self.role, self.holder)
        return True

    async def _reclaim(self, kv: KeyValue) -> int:
        """The key exists: if it still names this holder (a renewal whose answer was lost in a
        reconnect, a create that landed before its answer did), renew it and keep leading,
        instead of standing by for a TTL behind our own lease. 0 when it is someone else's."""
        try:
            entry = await kv.get(self.key)
        except (KeyNotFoundError, KeyDeletedError):
            return 0
        if entry.value != self.holder.encode() or not entry.revision:
            return 0
        try:
            revision = await kv.update(self.key, self.holder.encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            return 0
        log.info(
            "%s %s still holds the lease (reclaimed after a reconnect)", self.role, self.holder
        )
        return revision

    async def _retake(self, kv: KeyValue) -> int:
        """Create the key again if it is gone (0 if someone else has it by now): a holder whose
        lease expired while the bucket could not be renewed keeps leading without a reload."""
        try:
            revision = await kv.create(self.key, self.holder.encode())
        except KeyWrongLastSequenceError:
            return 0
        log.info("%s %s took the lease again (it expired during an outage)", self.role, self.holder)
        return revision

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the lease (True) or ``stop`` is set (False)."""
        waited = False
        outage = Outage("taking the lease", log)
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    outage.recovered()
                    return True
            except Exception as exc:  # the bucket cannot answer now: try again shortly
                outage.failed(exc)
            else:
                if not waited:
                    log.info(
                        "%s %s is standing by: another replica holds the lease",
                        self.role,
                        self.holder,
                    )
                    waited = True
            await wait_set(stop, min(self.ttl_s / 3, STANDBY_POLL_S))
        return False

    async def renew(self) -> bool:
        if self._revision == 0:
            return False
        kv = await self.bucket()
        sent = time.monotonic()
        try:
            revision = await kv.update(self.key, self.holder.encode(), last=self._revision)
        except KeyWrongLastSequenceError:
            # An earlier renewal may have landed with its answer lost (a reconnect, a leader
            # change): then the key moved on but is still ours. Or an outage of the bucket
            # outlasted the TTL and the key aged out with nobody taking it: take it again.
            revision = await self._reclaim(kv) or await self._retake(kv)
            if not revision:
                log.warning("%s %s lost the lease", self.role, self.holder)
                self._revision = 0
                return False
        self._granted(revision, sent)
        return True

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew every TTL/3 until cancelled; set ``lost`` (and return) when the lease cannot
        be kept. The leader cancels it only once it has stopped writing: a graceful stop keeps
        the lease while it finishes its last round, then releases it."""
        outage = Outage("lease renewal", log)
        while not lost.is_set():
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await self.renew():
                    lost.set()
                outage.recovered()
            except Exception as exc:  # a blip: keep trying while the lease is still valid
                outage.failed(exc)
                self.riding_out(exc)
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
