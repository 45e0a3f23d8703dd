"""The memory ledger: what every placed instance was promised, in the KV bucket
``placement_ledger``, so memory promised to one instance is never promised to another — also
with many concurrent requests and several planner processes.

One key, ``reservations``, holds every instance's promise, so a plan that touches several
devices commits atomically with one compare-and-set (``kv.update(last=revision)``). A planner
that loses the race re-reads, re-checks its plan against the winner's promises and retries or
replans. Each plan's reply is stored under its own key (``plans.<instance>.<generation>.<nonce>``)
before the compare-and-set, and the winning ledger entry names it, so a repeated request with
the same ``instance_id`` answers exactly the committed plan, even across planners.

The ledger owns generations: a generation is committed *before* its assignments are published
(workers and the projector act only on the ledger's generation, ``bus.authority``), and the
entry says whether its assignments are all stored yet (``published``). A publish that fails,
or a planner that dies between the commit and the publish, leaves ``published=False``: the
next request for the instance, and every planner's repair pass, publish it again (the same
Nats-Msg-Ids, so what did land is not stored twice) and then mark it. The ledger and the
assignments therefore agree after any crash: rolling forward, never back, because some stages
of the generation may already be loading.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shardplane.bus import keys
from shardplane.bus.authority import stored_reply as stored_reply  # the planner's name for it
from shardplane.bus.messages import DeviceState, InstanceState, PlacementRequest
from shardplane.bus.retry import retrying
from shardplane.bus.streams import LEDGER_RESERVATIONS_KEY

RESERVATIONS_KEY = LEDGER_RESERVATIONS_KEY
MATERIALISED = frozenset({"loaded", "reserved"})  # a worker holds the memory: telemetry shows it
DROPPED = frozenset({"released", "failed"})  # an instance that holds nothing any more


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    model: str
    fingerprint: str
    devices: dict[str, int]  # device ref -> bytes promised
    nodes: tuple[str, ...]
    ts: float = 0.0
    plan_key: str = ""  # where this generation's reply is stored (written before the commit)
    # Added for healing (defaults read old entries as they were: published, live).
    published: bool = True  # every assignment of this generation is stored in PLACEMENTS
    released: bool = False  # this generation is a release: the instance holds nothing
    release_nodes: tuple[str, ...] = ()  # nodes this generation tells to unload
    # Make-before-break (heals): nodes whose release waits until every stage of this
    # generation is loaded; the repair pass publishes it then (or after a bound).
    deferred_releases: tuple[str, ...] = ()
    request: PlacementRequest | None = None  # what was asked (the controller re-sends it)


class LedgerDoc(msgspec.Struct, frozen=True, kw_only=True):
    instances: dict[str, LedgerEntry] = {}
    v: int = 1


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(LedgerDoc)


def fingerprint(req: PlacementRequest) -> str:
    """What makes two requests for one instance the same plan (everything but the id, dry_run
    and the time limit)."""
    model = req.model if isinstance(req.model, str) else msgspec.json.encode(req.model).decode()
    key = msgspec.json.encode(
        [
            model,
            req.context_tokens,
            req.batch,
            req.objective,
            req.memory_headroom,
            sorted(req.exclude_nodes),
            req.max_stages,
            req.solver,
            # Added with the schedule model, only when set, so older instances keep their key.
            *(
                [req.microbatches, req.min_stages]
                if req.microbatches != "auto" or req.min_stages is not None
                else []
            ),
        ]
    )
    return hashlib.sha256(key).hexdigest()[:24]


def promised_bytes(
    doc: LedgerDoc,
    *,
    exclude_instance: str | None,
    instances: Mapping[str, InstanceState],
    devices: Mapping[str, DeviceState],
) -> dict[str, int]:
    """Bytes promised per device that the devices' telemetry does not show yet.

    A stage whose worker reports it loaded (or reserved) at the promised generation, in a status
    older than the device's newest sample, is already inside the reported free memory, so it is
    not subtracted twice. Instances released or failed hold nothing. ``exclude_instance`` is the
    instance being re-placed: its old promise is what the new plan replaces, and what it has
    already loaded is credited back (a negative entry), since the new generation releases it.
    """
    out: dict[str, int] = {}
    for inst_id, entry in doc.instances.items():
        state = instances.get(inst_id)
        if state is not None and state.generation >= entry.generation and state.state in DROPPED:
            continue
        loaded: set[str] = set()
        if state is not None and state.generation == entry.generation:
            for st in state.stages:
                if st.device and st.state in MATERIALISED:
                    dev = devices.get(st.device)
                    if dev is not None and dev.sample.ts > state.updated:
                        loaded.add(st.device)
        for ref, nbytes in entry.devices.items():
            if inst_id == exclude_instance:
                # Re-placing this instance: what its current generation holds comes back when
                # the new generation replaces it, so the telemetry's "used" is credited back.
                if ref in loaded:
                    out[ref] = out.get(ref, 0) - nbytes
            elif ref not in loaded:
                out[ref] = out.get(ref, 0) + nbytes
    return out


def encode_doc(doc: LedgerDoc) -> bytes:
    return _enc.encode(doc)


def decode_doc(data: bytes | None) -> LedgerDoc:
    if not data:
        return LedgerDoc()
    return _dec.decode(data)


async def _get(kv: KeyValue) -> tuple[bytes | None, int]:
    try:
        entry = await kv.get(RESERVATIONS_KEY)
    except (KeyNotFoundError, KeyDeletedError):
        return None, 0
    return entry.value, entry.revision or 0


async def read(kv: KeyValue) -> tuple[LedgerDoc, int]:
    """The ledger and its revision (0: the key does not exist yet); rides through a leader
    election of the bucket (bus.retry)."""
    data, revision = await retrying(lambda: _get(kv), "ledger read")
    return decode_doc(data), revision


async def commit(kv: KeyValue, doc: LedgerDoc, revision: int) -> int:
    """Compare-and-set; raises KeyWrongLastSequenceError when someone committed first.

    Through a leader election the write is retried; an attempt whose answer was lost may have
    landed all the same, and its retry then fails the compare-and-set against our own write.
    So a conflict is checked by re-reading: if the ledger holds exactly our document (a plan
    key and a timestamp make it unique), the write landed and its revision is returned."""
    data = encode_doc(doc)

    async def attempt() -> int:
        try:
            if revision == 0:
                return await kv.create(RESERVATIONS_KEY, data)
            return await kv.update(RESERVATIONS_KEY, data, last=revision)
        except KeyWrongLastSequenceError:
            current, current_revision = await _get(kv)
            if current == data and current_revision:
                return current_revision
            raise

    return await retrying(attempt, "ledger commit")


def plan_key(instance_id: str, generation: int, nonce: str) -> str:
    """A key per attempt: two planners racing for one instance never overwrite each other's
    reply; the ledger entry that wins the compare-and-set names the one that counts."""
    return keys.plan_key(instance_id, generation, nonce)


async def mark_published(kv: KeyValue, instance_id: str, generation: int) -> bool:
    """Set ``published`` on the instance's entry if it is still at ``generation``; False when
    it moved on (then that newer generation's own publisher marks it)."""
    for _attempt in range(50):
        doc, revision = await read(kv)
        entry = doc.instances.get(instance_id)
        if entry is None or entry.generation != generation:
            return False
        if entry.published or await _replaced(kv, doc, revision, instance_id, published=True):
            return True
    return False


async def clear_deferred(kv: KeyValue, instance_id: str, generation: int) -> bool:
    """Drop the deferred releases of the instance's entry (they were published)."""
    for _attempt in range(50):
        doc, revision = await read(kv)
        entry = doc.instances.get(instance_id)
        if entry is None or entry.generation != generation or not entry.deferred_releases:
            return False
        if await _replaced(kv, doc, revision, instance_id, deferred_releases=()):
            return True
    return False


async def _replaced(
    kv: KeyValue, doc: LedgerDoc, revision: int, instance_id: str, **changes: Any
) -> bool:
    """Commit ``doc`` with the instance's entry changed; False when another planner wrote the
    ledger since ``revision`` (then the caller reads it again and retries)."""
    instances = dict(doc.instances)
    instances[instance_id] = msgspec.structs.replace(instances[instance_id], **changes)
    try:
        await commit(kv, LedgerDoc(instances=instances), revision)
    except KeyWrongLastSequenceError:
        return False
    return True


def unpublished(doc: LedgerDoc, older_than: float) -> list[tuple[str, LedgerEntry]]:
    """Entries committed before ``older_than`` whose assignments are not all stored yet."""
    return [
        (inst, entry)
        for inst, entry in sorted(doc.instances.items())
        if not entry.published and entry.ts < older_than
    ]
