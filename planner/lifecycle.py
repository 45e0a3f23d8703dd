"""An instance's end, and the repair that keeps the ledger and the assignments in agreement.

Release (``placement.release``) is a generation like any other: the ledger commits generation
g+1 with no devices (its memory is no longer promised, at once) and ``released=True``, then a
``release=True`` assignment goes to every node that held the instance. Workers unload, the
projector shows the instance ``released``. Releasing again finds the committed release and
answers ``already`` (publishing it again if its publish had not finished), so the request is
idempotent; the id stays in the ledger as a tombstone, so a later placement under the same id
numbers its generation above every one published before.

Make-before-break: a heal commits its generation with the releases of the nodes it leaves
deferred (``deferred_releases``); once the KV shows every stage of the new generation loaded
(or after ``DEFER_LIMIT_S``), the repair pass publishes them. A generation that replaces one
with releases still owed carries them over (``service._dropped``).

Repair: a generation whose publish failed, or whose planner died between commit and publish,
stays ``published=False`` in the ledger. Every planner looks for such entries every few seconds
and publishes them again (same Msg-Ids: nothing is stored twice), then marks them, so the
ledger never promises memory to a plan nobody was told about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Protocol

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shardplane.bus import codec, subjects
from shardplane.bus.messages import ErrorInfo, PlacementReply, ReleaseReply, ShardAssignment
from shardplane.bus.wait import wait_set
from shardplane.planner import ledger

log = logging.getLogger(__name__)


class Planner(Protocol):
    """What this module needs of the planner service (``planner.service.Planner``)."""

    @property
    def ledger_kv(self) -> KeyValue: ...

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None: ...

    async def publish_generation(
        self, reply: PlacementReply, release_nodes: tuple[str, ...], plan_key: str
    ) -> None: ...

    def instance_ready(self, instance_id: str, generation: int) -> bool: ...


REPAIR_INTERVAL_S = 1.0
# Make-before-break gives a heal's new stages this long to load before the nodes it left are
# told to unload anyway (their memory must not stay held by a generation that never loads).
DEFER_LIMIT_S = 300.0
REPAIR_AGE_S = 2.0  # leave a fresh commit to its own publisher for this long
MAX_ATTEMPTS = 50


def _fail(instance_id: str, code: str, message: str) -> ReleaseReply:
    return ReleaseReply(
        ok=False,
        instance_id=instance_id,
        error=ErrorInfo(code=code, message=message),  # type: ignore[arg-type]
    )


async def publish_release(
    planner: Planner,
    instance_id: str,
    entry: ledger.LedgerEntry,
    nodes: tuple[str, ...] | None = None,
) -> None:
    """Release assignments at the entry's generation: one per node of ``nodes`` (default: the
    entry's ``release_nodes``, every node that held a released instance)."""
    now = time.time()
    await asyncio.gather(
        *(
            planner.publish(
                subjects.assigned(node),
                codec.encode(
                    ShardAssignment(
                        instance_id=instance_id,
                        generation=entry.generation,
                        node=node,
                        model=entry.model,
                        release=True,
                        ts=now,
                        plan_key=entry.plan_key,
                    )
                ),
                f"{instance_id}-g{entry.generation}-release-{node}",
            )
            for node in (entry.release_nodes if nodes is None else nodes)
        )
    )


async def _finish(planner: Planner, instance_id: str, entry: ledger.LedgerEntry) -> None:
    await publish_release(planner, instance_id, entry)
    await ledger.mark_published(planner.ledger_kv, instance_id, entry.generation)


async def release(planner: Planner, instance_id: str) -> ReleaseReply:
    """Release ``instance_id``; never raises."""
    try:
        return await _release(planner, instance_id)
    except Exception as exc:  # the planner outlives any one request
        log.exception("release of %s failed", instance_id)
        return _fail(
            instance_id,
            "internal",
            f"{type(exc).__name__}: {exc}; if the release was committed the planner keeps "
            "retrying its publish, and re-sending the release retries it at once",
        )


async def _release(planner: Planner, instance_id: str) -> ReleaseReply:
    kv = planner.ledger_kv
    for _attempt in range(MAX_ATTEMPTS):
        doc, revision = await ledger.read(kv)
        entry = doc.instances.get(instance_id)
        if entry is None:
            return _fail(instance_id, "not_found", f"no instance {instance_id!r} in the ledger")
        if entry.released:
            if not entry.published:
                await _finish(planner, instance_id, entry)
            return ReleaseReply(
                ok=True,
                instance_id=instance_id,
                generation=entry.generation,
                nodes=entry.release_nodes,
                already=True,
            )
        generation = entry.generation + 1
        gone = ledger.LedgerEntry(
            generation=generation,
            model=entry.model,
            fingerprint=entry.fingerprint,
            devices={},
            nodes=(),
            ts=time.time(),
            plan_key=ledger.plan_key(instance_id, generation, secrets.token_hex(4)),
            published=False,
            released=True,
            release_nodes=tuple(dict.fromkeys((*entry.nodes, *entry.deferred_releases))),
            request=entry.request,
        )
        instances = dict(doc.instances)
        instances[instance_id] = gone
        try:
            await ledger.commit(kv, ledger.LedgerDoc(instances=instances), revision)
        except KeyWrongLastSequenceError:
            await asyncio.sleep(secrets.randbelow(5) / 1000.0)
            continue
        if entry.plan_key:
            with contextlib.suppress(Exception):
                await kv.purge(entry.plan_key)
        await _finish(planner, instance_id, gone)
        return ReleaseReply(
            ok=True,
            instance_id=instance_id,
            generation=generation,
            released_bytes=sum(entry.devices.values()),
            nodes=gone.release_nodes,
        )
    return _fail(instance_id, "conflict", f"the ledger changed under {MAX_ATTEMPTS} attempts")


async def repair_once(planner: Planner, age_s: float = REPAIR_AGE_S) -> int:
    """Publish every committed, unpublished generation older than ``age_s``; how many were."""
    doc, _ = await ledger.read(planner.ledger_kv)
    done = 0
    for instance_id, entry in ledger.unpublished(doc, older_than=time.time() - age_s):
        try:
            if entry.released:
                await publish_release(planner, instance_id, entry)
            else:
                stored = await ledger.stored_reply(planner.ledger_kv, entry.plan_key)
                if stored is None:
                    # The reply is stored before the commit; without it there is no plan to
                    # publish, so say so rather than promise memory silently.
                    log.error(
                        "ledger: %s generation %d is unpublished and its plan %s is missing",
                        instance_id,
                        entry.generation,
                        entry.plan_key,
                    )
                    continue
                await planner.publish_generation(stored, entry.release_nodes, entry.plan_key)
            await ledger.mark_published(planner.ledger_kv, instance_id, entry.generation)
        except Exception as exc:
            log.warning("repairing %s generation %d: %r", instance_id, entry.generation, exc)
            continue
        log.info("repaired %s generation %d: assignments published", instance_id, entry.generation)
        done += 1
    return done


async def release_deferred(planner: Planner, now: float | None = None) -> int:
    """Publish the releases heals deferred, once their generation is loaded (make-before-break),
    or once ``DEFER_LIMIT_S`` has passed; how many entries were done."""
    now = time.time() if now is None else now
    doc, _ = await ledger.read(planner.ledger_kv)
    done = 0
    for instance_id, entry in sorted(doc.instances.items()):
        if not entry.deferred_releases or not entry.published or entry.released:
            continue
        if not planner.instance_ready(instance_id, entry.generation) and (
            now - entry.ts < DEFER_LIMIT_S
        ):
            continue
        try:
            await publish_release(planner, instance_id, entry, entry.deferred_releases)
            await ledger.clear_deferred(planner.ledger_kv, instance_id, entry.generation)
        except Exception as exc:
            log.warning("deferred releases of %s: %r", instance_id, exc)
            continue
        done += 1
    return done


async def repair_loop(planner: Planner, stop: asyncio.Event) -> None:
    """``repair_once`` at start and every ``REPAIR_INTERVAL_S`` until ``stop``."""
    while not stop.is_set():
        try:
            await repair_once(planner)
            await release_deferred(planner)
        except Exception as exc:  # the bus is away: next round
            log.debug("ledger repair pass failed: %r", exc)
        await wait_set(stop, REPAIR_INTERVAL_S)
