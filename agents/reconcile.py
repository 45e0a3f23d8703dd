"""Pure reconcile logic for the shard worker: desired state (folded from ShardAssignments) against
what the worker holds, giving the actions that close the gap. No I/O here; the async shell in
``agents/worker.py`` executes the actions and publishes ShardStatus.

Why the rules are what they are:
- Assignments are generation-numbered desired state. The newest generation of an instance
  replaces everything this node had of it; an older one is stale and ignored, so redelivery and
  duplicates (JetStream is at-least-once) can never move the worker backwards.
- ``release=True`` at generation g means "nothing of this instance here at g". It wins over any
  stage assignment of the same generation whatever the delivery order, so folding is
  order-independent within a generation.
- A held shard whose weights are identical to a newly desired one (same model, device, layer
  range, embeddings/head, bytes) is *adopted* under the new generation instead of reloaded: a
  re-plan that leaves this node's layers alone must not cost a reload.
- A failed load is remembered so an unchanged desired state does not retry it in a loop; a new
  generation is the retry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from shardplane.bus.messages import ShardAssignment

HeldState = Literal["loaded", "reserved", "failed"]


class ShardKey(msgspec.Struct, frozen=True, order=True):
    instance_id: str
    stage: int


class Desired(msgspec.Struct, frozen=True):
    """What this node should hold of one instance: the newest generation seen and its stages."""

    generation: int
    released: bool = False
    stages: tuple[ShardAssignment, ...] = ()  # sorted by stage, at most one per stage


class Held(msgspec.Struct, frozen=True):
    """A shard the worker holds (or tried to): the assignment it acted on and the outcome."""

    assignment: ShardAssignment
    state: HeldState
    held_bytes: int = 0  # memory reported held on the device through hold_memory

    @property
    def key(self) -> ShardKey:
        return ShardKey(self.assignment.instance_id, self.assignment.stage)


class Load(msgspec.Struct, frozen=True, tag=True):
    assignment: ShardAssignment


class Reserve(msgspec.Struct, frozen=True, tag=True):
    """A catalog model (no local weights): hold its memory, read nothing."""

    assignment: ShardAssignment


class Adopt(msgspec.Struct, frozen=True, tag=True):
    """Keep what is held, re-labelled with the new generation's assignment."""

    old: ShardKey
    assignment: ShardAssignment


class Unload(msgspec.Struct, frozen=True, tag=True):
    held: Held
    reason: str


Action = Load | Reserve | Adopt | Unload


def is_local_checkpoint(model: str) -> bool:
    """Weights this worker can really load: ``hf:<dir>`` or a model shipped in a package."""
    from shardplane.agents.gguf import is_packaged

    return model.startswith("hf:") or is_packaged(model)


def same_weights(a: ShardAssignment, b: ShardAssignment) -> bool:
    """True when holding ``a`` is exactly holding ``b`` (only generation/stage/kv may differ)."""
    return (
        a.model == b.model
        and a.device == b.device
        and a.layer_start == b.layer_start
        and a.layer_end == b.layer_end
        and a.embeddings == b.embeddings
        and a.head == b.head
        and a.weight_bytes == b.weight_bytes
    )


def hold_bytes(a: ShardAssignment) -> int:
    """Memory the device holds for an assignment: the plan's total, else weights + KV."""
    return a.memory_bytes or (a.weight_bytes + a.kv_bytes)


def fold(desired: Mapping[str, Desired], assignment: ShardAssignment) -> dict[str, Desired]:
    """Fold one assignment into the desired state; returns a new mapping (input untouched)."""
    out = dict(desired)
    current = out.get(assignment.instance_id)
    if current is not None and assignment.generation < current.generation:
        return out  # stale: an older plan delivered late or redelivered
    if current is None or assignment.generation > current.generation:
        current = Desired(generation=assignment.generation)
    if assignment.release:
        out[assignment.instance_id] = Desired(generation=assignment.generation, released=True)
        return out
    if current.released:
        return out  # release of this generation already seen: it wins
    stages = {a.stage: a for a in current.stages}
    stages[assignment.stage] = assignment
    out[assignment.instance_id] = Desired(
        generation=assignment.generation,
        stages=tuple(stages[s] for s in sorted(stages)),
    )
    return out


def fold_all(
    desired: Mapping[str, Desired], assignments: Iterable[ShardAssignment]
) -> dict[str, Desired]:
    out = dict(desired)
    for assignment in assignments:
        out = fold(out, assignment)
    return out


def wanted(desired: Mapping[str, Desired]) -> list[ShardAssignment]:
    """Every stage assignment this node should hold, in (instance, stage) order."""
    return [
        a
        for instance in sorted(desired)
        if not desired[instance].released
        for a in desired[instance].stages
    ]


def reconcile(desired: Mapping[str, Desired], held: Mapping[ShardKey, Held]) -> list[Action]:
    """Actions that turn ``held`` into ``desired``: unloads first (they free memory for the
    loads), then adoptions, then loads/reservations in (instance, stage) order. Empty when
    everything is already right, which is what makes duplicates harmless."""
    unloads: list[Action] = []
    adopts: list[Action] = []
    loads: list[Action] = []
    unmatched: dict[ShardKey, Held] = dict(held)
    for assignment in wanted(desired):
        key = ShardKey(assignment.instance_id, assignment.stage)
        exact = unmatched.get(key)
        if exact is not None and exact.assignment == assignment:
            del unmatched[key]  # already acted on exactly this (loaded, reserved or failed)
            continue
        # Same weights held anywhere in this instance (a re-plan renumbered the stage or changed
        # only its KV budget): adopt instead of reloading.
        match = next(
            (
                h
                for h in sorted(unmatched.values(), key=lambda h: h.key)
                if h.assignment.instance_id == assignment.instance_id
                and h.state in ("loaded", "reserved")
                and same_weights(h.assignment, assignment)
            ),
            None,
        )
        if match is not None:
            del unmatched[match.key]
            adopts.append(Adopt(old=match.key, assignment=assignment))
            continue
        loads.append(
            Load(assignment=assignment)
            if is_local_checkpoint(assignment.model)
            else Reserve(assignment=assignment)
        )
    for key in sorted(unmatched):
        h = unmatched[key]
        d = desired.get(key.instance_id)
        if d is None:
            reason = "no longer assigned"
        elif d.released:
            reason = f"released at generation {d.generation}"
        else:
            reason = f"replaced by generation {d.generation}"
        unloads.append(Unload(held=h, reason=reason))
    return unloads + adopts + loads


def superseded(desired: Mapping[str, Desired], loading: ShardAssignment) -> bool:
    """True when an in-flight load is no longer wanted (a newer plan moved or released it)."""
    return not any(same_weights(a, loading) for a in wanted(desired))
