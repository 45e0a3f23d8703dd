"""Who may say what an instance is: the planner's ledger, read by workers and the projector.

The planner numbers generations from its ledger and commits a generation before it publishes
that generation's assignments. So an assignment is trustworthy exactly when the ledger names
its generation and plan for the instance: an older one is stale (a newer plan replaced it), a
newer one, or one for an id the ledger never had, was not published by a planner (a stale
tool, a forged message). Acting on such an assignment would let it take the id over: workers
and the projector keep the highest generation they have seen, and the planner would go on
numbering below it. So they act only on the ledger's generation, and report the rest.

Only the fields read here are decoded (msgspec ignores the others), so the planner may grow
its ledger entries without touching this contract.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shardplane.bus.messages import PlacementReply, ShardAssignment
from shardplane.bus.streams import LEDGER, LEDGER_RESERVATIONS_KEY

Verdict = Literal["current", "stale", "unknown", "ahead", "forged"]


class LedgerInstance(msgspec.Struct, frozen=True, kw_only=True):
    """What the ledger says of one instance (a subset of the planner's LedgerEntry)."""

    generation: int
    plan_key: str = ""
    released: bool = False


class LedgerView(msgspec.Struct, frozen=True, kw_only=True):
    instances: dict[str, LedgerInstance] = {}


_decoder = msgspec.msgpack.Decoder(LedgerView)
EMPTY = LedgerView()


def decode(data: bytes | None) -> LedgerView:
    """The ledger document's authority fields; an unreadable document is empty (nothing is
    authorised by it, and the reason shows in every rejection)."""
    if not data:
        return EMPTY
    try:
        return _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return EMPTY


def judge(view: LedgerView, assignment: ShardAssignment) -> tuple[Verdict, str]:
    """Whether ``assignment`` is the ledger's current word on its instance, and why not."""
    entry = view.instances.get(assignment.instance_id)
    g = assignment.generation
    who = f"{assignment.instance_id} generation {g}"
    if entry is None:
        return "unknown", f"{who}: the planner's ledger has no instance {assignment.instance_id}"
    if g < entry.generation:
        return "stale", f"{who}: the ledger is at generation {entry.generation}"
    if g > entry.generation:
        return "ahead", f"{who}: the ledger is only at generation {entry.generation}"
    if assignment.plan_key != entry.plan_key:
        return "forged", (
            f"{who}: plan {assignment.plan_key or '(none)'!r} is not the ledger's "
            f"{entry.plan_key or '(none)'!r}"
        )
    if entry.released and not assignment.release:
        return "forged", f"{who}: the ledger released the instance at this generation"
    return "current", ""


async def ledger_bucket(js: JetStreamContext) -> KeyValue | None:
    """The ledger bucket, or None when no planner has created it yet (then nothing is
    authorised)."""
    try:
        return await js.key_value(LEDGER)
    except (NotFoundError, BadRequestError):
        return None


async def read(kv: KeyValue | None) -> LedgerView:
    """The ledger as it is now (a direct get: the planner commits before it publishes, so a
    read made after an assignment arrived sees that assignment's commit)."""
    if kv is None:
        return EMPTY
    try:
        entry = await kv.get(LEDGER_RESERVATIONS_KEY)
    except (KeyNotFoundError, KeyDeletedError):
        return EMPTY
    return decode(entry.value)


_reply_dec = msgspec.msgpack.Decoder(PlacementReply)


async def stored_reply(kv: KeyValue, key: str) -> PlacementReply | None:
    """The placement reply a ledger entry's ``plan_key`` names (what the instance runs now),
    or None when it is missing or unreadable. Read by the planner, the controller and the
    API's serving layer alike, so it lives with the other ledger readers."""
    if not key:
        return None
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return None
    if not entry.value:
        return None
    try:
        return _reply_dec.decode(entry.value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
