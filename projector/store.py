"""The projector's cache of the ``cluster_state`` bucket and its compare-and-set writer.

Every write is conditional on the revision the cache holds for the key
(``Nats-Expected-Last-Subject-Sequence``): if anything else wrote the key since (a replica that
still believed it was leader, an operator), the write fails instead of overwriting, the key is
re-read, and the caller re-applies its events on the fresh value. Writes of one round are
pipelined (all published, then all acknowledgements awaited), which is what makes a batch of
a thousand keys cost one round trip instead of a thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError, NotFoundError

from shardplane.bus import keys
from shardplane.bus.errors import ProjectorError
from shardplane.bus.messages import DeviceState, InstanceState, NodeState
from shardplane.bus.streams import CLUSTER_STATE, allow_atomic_batches, kv_stream, kv_subject
from shardplane.projector.reducer import Value, View
from shardplane.projector.transport import Write, WriteOutcome, Writer

log = logging.getLogger(__name__)

KV_STREAM = kv_stream(CLUSTER_STATE)
KV_PREFIX = kv_subject(CLUSTER_STATE)
WRONG_LAST_SEQUENCE = (10071, 10164)
ROUND_TIMEOUT_BASE_S = 2.0
ROUND_TIMEOUT_PER_WRITE_S = 0.001  # JSStreamWrongLastSequence(Constant)Err

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[
    str,
    msgspec.msgpack.Decoder[DeviceState]
    | msgspec.msgpack.Decoder[NodeState]
    | msgspec.msgpack.Decoder[InstanceState],
] = {
    keys.DEVICES: msgspec.msgpack.Decoder(DeviceState),
    keys.NODES: msgspec.msgpack.Decoder(NodeState),
    keys.INSTANCES: msgspec.msgpack.Decoder(InstanceState),
}


class WriteError(ProjectorError, RuntimeError):
    """A write round failed for a reason other than a revision conflict (no stream answer,
    timeout): nothing may be acknowledged; the caller refreshes ``keys`` and retries."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


def decode_value(key: str, data: bytes) -> Value | None:
    """The stored value, or None when it is missing or unreadable (then the next write for the
    key replaces it, still conditional on its revision)."""
    decoder = _DECODERS.get(keys.prefix(key))
    if decoder is None or not data:
        return None
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        log.warning("unreadable value under %s; it will be replaced", key)
        return None


def _deleted(headers: dict[str, str] | None) -> bool:
    # KV-Operation is DEL or PURGE on a tombstone; a value carries no such header.
    return bool(headers and headers.get("KV-Operation"))


def encode_value(value: Value) -> bytes:
    return _ENCODER.encode(value)


class Cache(View):
    """A :class:`View` of the bucket plus the revision of every key (0: never written)."""

    __slots__ = ("revisions",)

    def __init__(self) -> None:
        super().__init__()
        self.revisions: dict[str, int] = {}

    def revision(self, key: str) -> int:
        return self.revisions.get(key, 0)

    def store(self, key: str, value: Value | None, revision: int) -> None:
        self.revisions[key] = revision
        if value is not None:
            self.set(key, value)
        else:
            self.discard(key)


class Overlay:
    """A view of ``base`` with a batch's pending changes on top; the reducer reads it while a
    batch is applied, so the batch's updates to one key coalesce into one write."""

    __slots__ = ("_base", "_devices", "changes")

    def __init__(self, base: View | Overlay) -> None:
        self._base = base
        self.changes: dict[str, Value] = {}
        self._devices: dict[str, set[str]] = {}

    def rebase(self, base: View | Overlay) -> None:
        """Read through ``base`` from now on (the values underneath were stored: the cache
        holds them now)."""
        self._base = base

    def get(self, key: str) -> Value | None:
        value = self.changes.get(key)
        return value if value is not None else self._base.get(key)

    def set(self, key: str, value: Value) -> None:
        self.changes[key] = value
        if isinstance(value, DeviceState) and key not in self._base:
            self._devices.setdefault(value.sample.node, set()).add(key)

    def update(self, values: Mapping[str, Value]) -> None:
        for key, value in values.items():
            self.set(key, value)

    def device_keys(self, node: str) -> list[str]:
        return sorted({*self._base.device_keys(node), *self._devices.get(node, ())})

    def items(self) -> Iterator[tuple[str, Value]]:
        for key, value in self._base.items():
            yield key, self.changes.get(key, value)
        for key, value in self.changes.items():
            if key not in self._base:
                yield key, value

    def __contains__(self, key: object) -> bool:
        return key in self.changes or key in self._base

    def __len__(self) -> int:
        return len(self._base) + sum(1 for k in self.changes if k not in self._base)

    def pending(self) -> dict[str, Value]:
        """The changes that differ from the base (a key can change and change back)."""
        return {k: v for k, v in self.changes.items() if self._base.get(k) != v}


@dataclass(slots=True)
class WriteResult:
    written: int
    conflicts: list[str]


class Store:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        timeout_s: float = 10.0,
        pipeline: bool = True,
        batches: bool = False,
        direct: bool = True,
    ) -> None:
        self.nc = nc
        self.js = js
        self.writer = Writer(nc, fast=direct)
        self.timeout_s = timeout_s
        self.pipeline = pipeline
        self.want_batches = batches and pipeline
        self.batches = False  # decided in load(): the server must support them
        self.batch_fallbacks = 0  # batches rejected and re-sent one message at a time
        self._failed_batch_rounds = 0
        self.cache = Cache()

    async def load(self) -> int:
        """Read every key's newest value and revision into a fresh cache (on taking the lead:
        the previous leader, or an operator, may have written since this process last looked)."""
        cache = Cache()
        try:
            info = await self.js.stream_info(KV_STREAM)
        except NotFoundError:
            self.cache = cache
            return 0
        if self.want_batches and not self.batches:
            self.batches = await allow_atomic_batches(self.nc, KV_STREAM)
            log.info("KV writes: %s", "atomic batches" if self.batches else "one PubAck each")
        if info.state.messages:
            sub = await self.js.subscribe(
                f"{KV_PREFIX}>",
                stream=KV_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
            try:
                pending = 1
                while pending:
                    msg = await sub.next_msg(timeout=self.timeout_s)
                    meta = msg.metadata
                    key = msg.subject[len(KV_PREFIX) :]
                    deleted = _deleted(msg.headers)
                    value = None if deleted else decode_value(key, msg.data)
                    cache.store(key, value, meta.sequence.stream)
                    pending = meta.num_pending
            finally:
                await sub.unsubscribe()
        self.cache = cache
        return len(cache.revisions)

    async def refresh(self, keys: list[str]) -> None:
        """Re-read ``keys`` after a conflict: the newest value and revision from the server."""
        for key in keys:
            try:
                msg = await self.js.get_msg(KV_STREAM, subject=KV_PREFIX + key, direct=True)
            except (NotFoundError, KeyNotFoundError):
                self.cache.store(key, None, 0)
                continue
            deleted = _deleted(msg.headers)  # pyright: ignore[reportUnknownArgumentType]
            value = None if deleted else decode_value(key, msg.data or b"")
            self.cache.store(key, value, msg.seq or 0)

    async def write(self, values: Mapping[str, Value]) -> WriteResult:
        """Pipelined compare-and-set writes; stored ones update the cache, conflicting keys
        are returned for :meth:`refresh`. Raises WriteError when a write got no answer."""
        if not values:
            return WriteResult(0, [])
        cache = self.cache
        messages = {
            key: (KV_PREFIX + key, encode_value(value), cache.revision(key))
            for key, value in values.items()
        }
        timeout = self.round_timeout(len(messages))
        if self.batches:
            outcome = await self._write_batches(messages, timeout)
        elif self.pipeline:
            outcome = await self.writer.publish(messages, timeout)
        else:
            outcome = WriteOutcome({}, {})
            for key, message in messages.items():
                one = await self.writer.publish({key: message}, self.round_timeout(1))
                outcome.stored.update(one.stored)
                outcome.errors.update(one.errors)
        for key, seq in outcome.stored.items():
            cache.store(key, values[key], seq)
        conflicts = [k for k, (code, _) in outcome.errors.items() if code in WRONG_LAST_SEQUENCE]
        failed = {k: e for k, e in outcome.errors.items() if e[0] not in WRONG_LAST_SEQUENCE}
        if failed:
            # The failed keys may or may not be stored; their cached revisions are stale
            # either way, so the caller re-reads them (and the conflicts) before retrying.
            key, (code, text) = next(iter(failed.items()))
            raise WriteError(
                f"{len(failed)} of {len(messages)} writes failed (e.g. {key}: {code} {text})",
                [*failed, *conflicts],
            )
        return WriteResult(len(outcome.stored), conflicts)

    def round_timeout(self, writes: int) -> float:
        """How long a round of ``writes`` may wait for its answers: enough for the biggest
        rounds on a loaded machine, but a handful of writes whose answers were lost with a
        killed stream leader is retried after seconds, not after the whole ``timeout_s``."""
        return min(self.timeout_s, ROUND_TIMEOUT_BASE_S + writes * ROUND_TIMEOUT_PER_WRITE_S)

    async def _write_batches(self, messages: Mapping[str, Write], timeout: float) -> WriteOutcome:
        """Atomic batches; the keys of a rejected batch are re-sent one by one, which says
        which of them conflicted (a rejected batch stored nothing, so the same expected
        revisions still apply; a batch that timed out and was stored after all shows up
        as conflicts, which the caller resolves by re-reading)."""
        outcome = await self.writer.publish_batches(messages, timeout)
        if not outcome.errors:
            self._failed_batch_rounds = 0
            return outcome
        self.batch_fallbacks += 1
        codes = {code for code, _ in outcome.errors.values()}
        if codes.isdisjoint((0, *WRONG_LAST_SEQUENCE)):
            # Rejected for something other than a conflict or a timeout (a limit, the setting
            # removed by an operator): after a few rounds in a row, stop sending batches.
            self._failed_batch_rounds += 1
            if self._failed_batch_rounds >= 3:
                self.batches = False
                code, text = next(iter(outcome.errors.values()))
                log.warning("atomic batches rejected (%s %s); writing one by one", code, text)
        retry = {key: messages[key] for key in outcome.errors}
        again = await self.writer.publish(retry, timeout)
        return WriteOutcome({**outcome.stored, **again.stored}, again.errors)
