"""The pure heart of the projector: (view of the KV, event) -> changes to the KV.

Every rule here is a *join*: the stored value only ever moves to something that dominates
both what was there and what the event says (newest sample by ``(epoch, seq, ts)``, latest
``last_seen``, highest generation, newest status per stage). Joins are commutative,
associative and idempotent, so any interleaving, duplication or redelivery of the same events
ends in the same state. That is what makes at-least-once delivery plus compare-and-set writes
exact: re-applying an event after a crash, or on top of a value another replica wrote, can
only reproduce or extend the state, never roll it back.

Liveness is the one input that is not an event: ``now``. A value's ``online`` flag is a pure
function of the value, the liveness TTL and ``now``; :func:`sweep` re-evaluates it.

Nothing in this module does I/O; the runner (:mod:`projector.service`) feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

from shardplane.bus.keys import device_key, instance_key, node_key
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceHealth,
    InstanceOverall,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    ShardAssignment,
    ShardState,
    ShardStatus,
    StageState,
)
from shardplane.projector.calibration import calibrate, calibrate_link, carried, carried_links

Value = DeviceState | NodeState | InstanceState
Event = DeviceSample | NodeHeartbeat | ShardAssignment | ShardStatus | InstanceHealth

DEFAULT_INTERVAL_S = 2.0  # NodeHeartbeat.interval_s default: the agent's sample interval
TTL_FACTOR = 3.0  # offline after this many missed intervals

REASON_DEVICE_LOST = "device lost"
REASON_SHUTDOWN = "node shut down"


@dataclass(frozen=True, slots=True)
class Liveness:
    """When something counts as gone. ``ttl_s`` None: ``TTL_FACTOR`` x the node's own
    heartbeat interval (2 s unless the agent says otherwise, so 6 s)."""

    ttl_s: float | None = None

    def ttl(self, node: NodeState | None) -> float:
        if self.ttl_s is not None:
            return self.ttl_s
        interval = node.heartbeat.interval_s if node is not None else DEFAULT_INTERVAL_S
        return TTL_FACTOR * (interval if interval > 0 else DEFAULT_INTERVAL_S)


class StateView(Protocol):
    """What the reducer reads: values by key, the device keys of a node, and everything."""

    def get(self, key: str) -> Value | None: ...

    def device_keys(self, node: str) -> Iterable[str]: ...

    def items(self) -> Iterator[tuple[str, Value]]: ...


class View:
    """The state the reducer reads: key -> value, plus an index of each node's device keys
    (a graceful shutdown touches every device of the node). Plain dict underneath, so tests
    build one from literals; the runner keeps one as its cache of the bucket."""

    __slots__ = ("_devices", "_values")

    def __init__(self, values: Mapping[str, Value] | None = None) -> None:
        self._values: dict[str, Value] = {}
        self._devices: dict[str, set[str]] = {}
        for key, value in (values or {}).items():
            self.set(key, value)

    def get(self, key: str) -> Value | None:
        return self._values.get(key)

    def set(self, key: str, value: Value) -> None:
        self._values[key] = value
        if isinstance(value, DeviceState):
            self._devices.setdefault(value.sample.node, set()).add(key)

    def discard(self, key: str) -> None:
        value = self._values.pop(key, None)
        if isinstance(value, DeviceState):
            self._devices.get(value.sample.node, set()).discard(key)

    def device_keys(self, node: str) -> Iterable[str]:
        return sorted(self._devices.get(node, ()))

    def items(self) -> Iterator[tuple[str, Value]]:
        return iter(self._values.items())

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def copy(self) -> View:
        return View(self._values)


# --- outcomes ---------------------------------------------------------------------------------


class Changes(msgspec.Struct, frozen=True):
    """Apply these values (each a join of the old value and the event). Empty: nothing new."""

    values: dict[str, Value]


class Defer(msgspec.Struct, frozen=True):
    """The event is valid but cannot be applied yet (a status whose assignment has not been
    seen: PLACEMENTS and SHARDS are separate streams, so this order is normal). Retry later."""

    reason: str


class Reject(msgspec.Struct, frozen=True):
    """Well-formed but contradicts the contract: dead-letter it with this reason."""

    reason: str


Outcome = Changes | Defer | Reject
NO_CHANGE = Changes({})


# --- devices and nodes ------------------------------------------------------------------------


def sample_order(sample: DeviceSample) -> tuple[float, int, float]:
    return (sample.epoch, sample.seq, sample.ts)


def heartbeat_order(heartbeat: NodeHeartbeat) -> tuple[float, int, float]:
    return (heartbeat.epoch, heartbeat.seq, heartbeat.ts)


def device_liveness(
    sample: DeviceSample, last_seen: float, shutdown_at: float | None, now: float, ttl: float
) -> tuple[bool, str | None]:
    if not sample.present:
        return False, REASON_DEVICE_LOST
    if shutdown_at is not None and shutdown_at >= last_seen:
        return False, REASON_SHUTDOWN
    if now - last_seen > ttl:
        return False, f"no telemetry for {ttl:g}s"
    return True, None


def node_liveness(
    heartbeat: NodeHeartbeat, last_seen: float, now: float, ttl: float
) -> tuple[bool, str | None]:
    if not heartbeat.online:
        return False, "shut down"
    if now - last_seen > ttl:
        return False, f"no heartbeat for {ttl:g}s"
    return True, None


def node_shutdown_at(node: NodeState | None) -> float | None:
    """Stream time of the node's latest graceful shutdown, if it ever announced one."""
    return None if node is None else node.shutdown_at


def _max_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def make_device(
    sample: DeviceSample,
    last_seen: float,
    shutdown_at: float | None,
    now: float,
    ttl: float,
    previous: DeviceState | None = None,
) -> DeviceState:
    # A shutdown older than the newest sample is history; dropping it keeps values canonical
    # (the same facts always encode to the same bytes, whatever order they came in).
    if shutdown_at is not None and shutdown_at < last_seen:
        shutdown_at = None
    online, reason = device_liveness(sample, last_seen, shutdown_at, now, ttl)
    state = DeviceState(
        sample=sample,
        online=online,
        last_seen=last_seen,
        offline_reason=reason,
        shutdown_at=shutdown_at,
    )
    return carried(state, previous)


def apply_sample(
    view: StateView, sample: DeviceSample, seen: float, now: float, liveness: Liveness
) -> Outcome:
    """``seen``: when the bus stored the sample (stream time, one clock for every agent)."""
    key = device_key(sample.node, sample.index)
    current = view.get(key)
    node = view.get(node_key(sample.node))
    node = node if isinstance(node, NodeState) else None
    ttl = liveness.ttl(node)
    shutdown = node_shutdown_at(node)
    previous: DeviceState | None = None
    if isinstance(current, DeviceState):
        newest = sample if sample_order(sample) > sample_order(current.sample) else current.sample
        last_seen = max(current.last_seen, seen)
        shutdown = _max_opt(current.shutdown_at, shutdown)
        previous = current
    else:
        newest, last_seen = sample, seen
    value = make_device(newest, last_seen, shutdown, now, ttl, previous)
    return NO_CHANGE if value == current else Changes({key: value})


def apply_heartbeat(
    view: StateView, heartbeat: NodeHeartbeat, seen: float, now: float, liveness: Liveness
) -> Outcome:
    key = node_key(heartbeat.node)
    current = view.get(key)
    shutdown = None if heartbeat.online else seen
    if isinstance(current, NodeState):
        newest = (
            heartbeat
            if heartbeat_order(heartbeat) > heartbeat_order(current.heartbeat)
            else current.heartbeat
        )
        last_seen = max(current.last_seen, seen)
        shutdown = _max_opt(current.shutdown_at, shutdown)
    else:
        newest, last_seen = heartbeat, seen
    previous = current if isinstance(current, NodeState) else None
    value = make_node(newest, last_seen, shutdown, now, liveness, previous)
    changes: dict[str, Value] = {} if value == current else {key: value}
    # A graceful shutdown takes the node's devices with it at once, not a TTL later. Devices
    # that report after it are back (make_device compares the times).
    if not heartbeat.online:
        ttl = liveness.ttl(value)
        for device_key in view.device_keys(heartbeat.node):
            device = view.get(device_key)
            if not isinstance(device, DeviceState):
                continue
            updated = make_device(
                device.sample,
                device.last_seen,
                _max_opt(device.shutdown_at, seen),
                now,
                ttl,
                device,
            )
            if updated != device:
                changes[device_key] = updated
    return Changes(changes)


def make_node(
    heartbeat: NodeHeartbeat,
    last_seen: float,
    shutdown_at: float | None,
    now: float,
    liveness: Liveness,
    previous: NodeState | None = None,
) -> NodeState:
    """The node's value, judged live on ``now``, keeping what ``previous`` measured of its
    links (projector.calibration: heartbeats do not reset it)."""
    probe = NodeState(heartbeat=heartbeat, online=True, last_seen=last_seen)
    online, reason = node_liveness(heartbeat, last_seen, now, liveness.ttl(probe))
    node = NodeState(
        heartbeat=heartbeat,
        online=online,
        last_seen=last_seen,
        offline_reason=reason,
        shutdown_at=shutdown_at,
    )
    return carried_links(node, previous)


# --- instances ---------------------------------------------------------------------------------

_READY: frozenset[ShardState] = frozenset({"loaded", "reserved"})
_STARTED: frozenset[ShardState] = frozenset({"loading", "loaded", "reserved"})


def overall_state(
    stages: tuple[StageState, ...], stage_count: int, released: bool
) -> InstanceOverall:
    if not stages:
        return "released" if released else "pending"
    states: list[ShardState] = [s.state for s in stages]
    missing: list[ShardState] = ["pending"] * max(0, stage_count - len(stages))
    states += missing
    if "failed" in states:
        # Some stages hold memory while another failed: the instance cannot serve but is not
        # gone either; "failed" only when nothing of it is up.
        return "degraded" if any(s in _READY for s in states) else "failed"
    if all(s == "loaded" for s in states):
        return "loaded"
    if all(s in _READY for s in states):
        return "reserved"
    if any(s in _STARTED for s in states):
        return "loading"
    return "pending"


def _stage_from(assignment: ShardAssignment, previous: StageState | None) -> StageState:
    base = StageState(
        stage=assignment.stage,
        node=assignment.node,
        device=assignment.device,
        layer_start=assignment.layer_start,
        layer_end=assignment.layer_end,
        weight_bytes=assignment.weight_bytes,
        memory_bytes=assignment.memory_bytes,
    )
    if previous is None or previous.status_ts is None:
        return base
    # Keep the status already reported for this stage (a redelivered assignment must not
    # reset a stage that is loaded back to pending).
    return _with_status_fields(base, previous)


def _with_status_fields(stage: StageState, status: StageState) -> StageState:
    return StageState(
        stage=stage.stage,
        node=stage.node,
        device=stage.device,
        layer_start=stage.layer_start,
        layer_end=stage.layer_end,
        weight_bytes=stage.weight_bytes,
        memory_bytes=stage.memory_bytes,
        state=status.state,
        reason=status.reason,
        bytes_loaded=status.bytes_loaded,
        load_ms=status.load_ms,
        where=status.where,
        status_seq=status.status_seq,
        status_epoch=status.status_epoch,
        status_ts=status.status_ts,
    )


def _instance(
    *,
    instance_id: str,
    model: str,
    generation: int,
    stage_count: int,
    stages: tuple[StageState, ...],
    released_nodes: tuple[str, ...],
    updated: float,
    health: InstanceState | None = None,
) -> InstanceState:
    value = InstanceState(
        instance_id=instance_id,
        model=model,
        generation=generation,
        stage_count=stage_count,
        stages=stages,
        state=overall_state(stages, stage_count, bool(released_nodes)),
        updated=updated,
        released_nodes=released_nodes,
    )
    return _with_health(value, health) if health is not None else value


def _with_health(value: InstanceState, source: InstanceState) -> InstanceState:
    """``value`` with the controller's verdict of ``source`` (verdicts span generations)."""
    return msgspec.structs.replace(
        value,
        health=source.health,
        health_reason=source.health_reason,
        health_generation=source.health_generation,
        health_ts=source.health_ts,
        health_seq=source.health_seq,
    )


def apply_assignment(view: StateView, assignment: ShardAssignment) -> Outcome:
    key = instance_key(assignment.instance_id)
    current = view.get(key)
    current = current if isinstance(current, InstanceState) else None
    if not assignment.release and assignment.stage >= assignment.stage_count:
        return Reject(
            f"stage {assignment.stage} out of range for stage_count {assignment.stage_count}"
        )
    if current is not None and assignment.generation < current.generation:
        return NO_CHANGE  # superseded: a newer generation replaced this one
    if current is None or assignment.generation > current.generation:
        # A newer generation replaces the old one wholesale: nothing of it carries over.
        stages: tuple[StageState, ...] = ()
        released: tuple[str, ...] = ()
        model, stage_count, updated = assignment.model, assignment.stage_count, assignment.ts
    else:
        stages, released = current.stages, current.released_nodes
        model, stage_count = current.model, current.stage_count
        updated = max(current.updated, assignment.ts)

    if assignment.release:
        released = tuple(sorted({*released, assignment.node}))
    else:
        by_stage = {s.stage: s for s in stages}
        if stages and (stage_count != assignment.stage_count or model != assignment.model):
            return Reject(
                f"generation {assignment.generation} already has model {model!r} in "
                f"{stage_count} stages; this assignment says {assignment.model!r} in "
                f"{assignment.stage_count}"
            )
        model, stage_count = assignment.model, assignment.stage_count
        by_stage[assignment.stage] = _stage_from(assignment, by_stage.get(assignment.stage))
        stages = tuple(by_stage[i] for i in sorted(by_stage))

    value = _instance(
        instance_id=assignment.instance_id,
        model=model,
        generation=assignment.generation,
        stage_count=stage_count,
        stages=stages,
        released_nodes=released,
        updated=updated,
        health=current,
    )
    return NO_CHANGE if value == current else Changes({key: value})


def status_order(status: ShardStatus) -> tuple[float, int, float]:
    return (status.epoch, status.seq, status.ts)


def apply_status(view: StateView, status: ShardStatus) -> Outcome:
    key = instance_key(status.instance_id)
    current = view.get(key)
    if not isinstance(current, InstanceState):
        return Defer(f"no assignment seen yet for instance {status.instance_id}")
    if status.generation < current.generation:
        return NO_CHANGE  # a status of a replaced generation says nothing about this one
    if status.generation > current.generation:
        return Defer(
            f"status for generation {status.generation} of {status.instance_id}; "
            f"assignments seen only up to {current.generation}"
        )
    if status.node in current.released_nodes:
        return NO_CHANGE  # e.g. "unloaded" from a node this generation released
    stage = next((s for s in current.stages if s.stage == status.stage), None)
    if stage is None:
        return Defer(
            f"no assignment seen yet for stage {status.stage} of {status.instance_id} "
            f"generation {status.generation}"
        )
    if stage.node != status.node:
        # Either nonsense or a node whose release for this generation has not arrived yet
        # (another stream): wait for it; the runner dead-letters it if it never comes.
        return Defer(
            f"status from node {status.node} for stage {status.stage} of "
            f"{status.instance_id}, which generation {status.generation} assigned to {stage.node}"
        )
    if stage.status_ts is not None and status_order(status) <= (
        stage.status_epoch,
        stage.status_seq,
        stage.status_ts,
    ):
        return NO_CHANGE  # older or the same status again
    # Only the reported stage's status moves; where and what it runs stays as assigned.
    reported = msgspec.structs.replace(
        stage,
        state=status.state,
        reason=status.reason,
        bytes_loaded=status.bytes_loaded,
        load_ms=status.load_ms,
        where=status.where,
        status_seq=status.seq,
        status_epoch=status.epoch,
        status_ts=status.ts,
    )
    stages = tuple(reported if s.stage == status.stage else s for s in current.stages)
    value = _instance(
        instance_id=current.instance_id,
        model=current.model,
        generation=current.generation,
        stage_count=current.stage_count,
        stages=stages,
        released_nodes=current.released_nodes,
        updated=max(current.updated, status.ts),
        health=current,
    )
    changes: dict[str, Value] = {} if value == current else {key: value}
    changes.update(_calibrate(view, status))
    changes.update(_calibrate_link(view, current, status))
    return Changes(changes) if changes else NO_CHANGE


def apply_health(view: StateView, health: InstanceHealth) -> Outcome:
    """The controller's verdict: the newest by ``(ts, seq)`` wins, whatever the generation (a
    heal is judged across the old generation and the new one)."""
    key = instance_key(health.instance_id)
    current = view.get(key)
    if not isinstance(current, InstanceState):
        return Defer(f"no assignment seen yet for instance {health.instance_id}")
    if current.health_ts is not None and (health.ts, health.seq) <= (
        current.health_ts,
        current.health_seq,
    ):
        return NO_CHANGE
    value = msgspec.structs.replace(
        current,
        health=health.state,
        health_reason=health.reason,
        health_generation=health.generation,
        health_ts=health.ts,
        health_seq=health.seq,
    )
    return NO_CHANGE if value == current else Changes({key: value})


def _calibrate(view: StateView, status: ShardStatus) -> dict[str, Value]:
    """The device's measured bandwidth and compute, folded with a stage's step timing
    (projector.calibration)."""
    if not status.step_ms or status.device is None:
        return {}
    node, _, index = status.device.rpartition("/")
    key = device_key(node, int(index))
    device = view.get(key)
    if not isinstance(device, DeviceState):
        return {}
    updated = calibrate(device, status)
    return {} if updated == device else {key: updated}


def _calibrate_link(
    view: StateView, instance: InstanceState, status: ShardStatus
) -> dict[str, Value]:
    """The reporting node's measured crossing to the node of the instance's next stage
    (projector.calibration)."""
    if status.hop_ms is None:
        return {}
    nxt = next((s for s in instance.stages if s.stage == status.stage + 1), None)
    key = node_key(status.node)
    node = view.get(key)
    if nxt is None or not isinstance(node, NodeState):
        return {}
    updated = calibrate_link(node, nxt.node, status)
    return {} if updated == node else {key: updated}


# --- dispatch and sweep -------------------------------------------------------------------------


def apply(view: StateView, event: Event, seen: float, now: float, liveness: Liveness) -> Outcome:
    """The reducer: what ``event`` (stored by the bus at ``seen``) changes in ``view`` at ``now``."""
    if isinstance(event, DeviceSample):
        return apply_sample(view, event, seen, now, liveness)
    if isinstance(event, NodeHeartbeat):
        return apply_heartbeat(view, event, seen, now, liveness)
    if isinstance(event, ShardAssignment):
        return apply_assignment(view, event)
    if isinstance(event, InstanceHealth):
        return apply_health(view, event)
    return apply_status(view, event)


def expires_at(view: StateView, value: Value, liveness: Liveness) -> float | None:
    """When ``value`` goes offline for silence if nothing newer arrives (None: it is offline
    already, or not something that expires). The runner keeps these in a heap so a sweep
    looks only at what is due instead of at every key."""
    if isinstance(value, DeviceState):
        if not value.online:
            return None
        node = view.get(node_key(value.sample.node))
        return value.last_seen + liveness.ttl(node if isinstance(node, NodeState) else None)
    if isinstance(value, NodeState):
        return value.last_seen + liveness.ttl(value) if value.online else None
    return None


def sweep(
    view: StateView, now: float, liveness: Liveness, keys: Iterable[str] | None = None
) -> dict[str, Value]:
    """Re-evaluate ``online`` at ``now`` for ``keys`` (default: every device and node): the
    TTL's only effect."""
    changes: dict[str, Value] = {}
    if keys is None:
        candidates: Iterable[tuple[str, Value | None]] = view.items()
    else:
        candidates = ((key, view.get(key)) for key in keys)
    for key, value in candidates:
        if isinstance(value, DeviceState):
            node = view.get(node_key(value.sample.node))
            ttl = liveness.ttl(node if isinstance(node, NodeState) else None)
            online, reason = device_liveness(
                value.sample, value.last_seen, value.shutdown_at, now, ttl
            )
            if online != value.online or reason != value.offline_reason:
                changes[key] = make_device(
                    value.sample,
                    value.last_seen,
                    value.shutdown_at,
                    now,
                    ttl,
                    value,
                )
        elif isinstance(value, NodeState):
            online, reason = node_liveness(
                value.heartbeat, value.last_seen, now, liveness.ttl(value)
            )
            if online != value.online or reason != value.offline_reason:
                changes[key] = make_node(
                    value.heartbeat, value.last_seen, value.shutdown_at, now, liveness, value
                )
    return changes
