"""The pure reducer, without a server: order, duplication and redelivery never change the end
state (property tests), plus the instance and liveness rules one by one."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shardplane.bus import keys
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    InstanceState,
    NodeHeartbeat,
    NodeState,
    ShardAssignment,
    ShardStatus,
)
from shardplane.projector.reducer import (
    Changes,
    Defer,
    Event,
    Liveness,
    Reject,
    View,
    apply,
    overall_state,
    sample_order,
    sweep,
)
from tests import kit

NOW = 1_000.0
LIVE = Liveness(ttl_s=6.0)

Timed = tuple[Event, float]  # an event and the stream time it was stored at


def fold(events: Sequence[Timed], now: float = NOW, view: View | None = None) -> View:
    """Apply events like the runner does: deferred ones come back later (redelivery) until
    nothing more can be applied; then a liveness sweep at ``now``."""
    view = view or View()
    queue = deque(events)
    stalled = 0
    while queue and stalled <= len(queue):
        event, seen = queue.popleft()
        outcome = apply(view, event, seen, now, LIVE)
        if isinstance(outcome, Defer):
            queue.append((event, seen))
            stalled += 1
            continue
        stalled = 0
        if isinstance(outcome, Changes):
            for key, value in outcome.values.items():
                view.set(key, value)
    for key, value in sweep(view, now, LIVE).items():
        view.set(key, value)
    return view


def snapshot(view: View) -> dict[str, object]:
    return dict(view.items())


# --- strategies -------------------------------------------------------------------------------


@st.composite
def device_history(draw: st.DrawFn) -> list[Timed]:
    """One device's samples: distinct (epoch, seq), clocks that may step, a device that may
    vanish and come back, stored at increasing stream times near NOW."""
    count = draw(st.integers(1, 25))
    epochs = draw(st.lists(st.sampled_from([0.0, 100.0, 200.0]), min_size=count, max_size=count))
    seqs = draw(st.lists(st.integers(0, 10_000), min_size=count, max_size=count, unique=True))
    out: list[Timed] = []
    for i, (epoch, seq) in enumerate(zip(epochs, seqs, strict=True)):
        sample = DeviceSample(
            node="n1",
            index=0,
            uuid="GPU-1",
            seq=seq,
            ts=draw(st.floats(900.0, 1_000.0)),
            epoch=epoch,
            present=draw(st.booleans()),
            memory_free_bytes=draw(st.integers(0, 2**40)),
        )
        out.append((sample, 995.0 + i * 0.1))
    return out


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn, events: list[Timed]) -> list[Timed]:
    extra = draw(st.lists(st.sampled_from(events), max_size=len(events)))
    return draw(st.permutations([*events, *extra]))


# --- devices ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data(), history=device_history())
def test_any_order_of_a_devices_samples_ends_at_its_highest_sequence_sample(
    data: st.DataObject, history: list[Timed]
) -> None:
    events = data.draw(shuffled_with_duplicates(history))
    view = fold(events)
    state = view.get(keys.device_key("n1", 0))
    assert isinstance(state, DeviceState)
    newest = max((e for e, _ in history if isinstance(e, DeviceSample)), key=sample_order)
    assert state.sample == newest
    assert state.last_seen == max(seen for _, seen in history)
    assert state.online == newest.present
    assert state.offline_reason == (None if newest.present else "device lost")
    # ...and it is exactly the state the events produce in the order they were published.
    assert snapshot(view) == snapshot(fold(history))


@st.composite
def node_history(draw: st.DrawFn) -> list[Timed]:
    """Two devices and the node's heartbeats, including graceful shutdowns and restarts."""
    out: list[Timed] = []
    seen = 980.0
    for seq in range(draw(st.integers(1, 30))):
        seen += draw(st.floats(0.01, 1.0))
        kind = draw(st.sampled_from(["gpu0", "gpu1", "hb", "bye"]))
        if kind in ("gpu0", "gpu1"):
            index = int(kind[-1])
            event: Event = DeviceSample(
                node="n1", index=index, uuid=f"GPU-{index}", seq=seq, ts=seen, epoch=1.0
            )
        else:
            event = NodeHeartbeat(
                node="n1", seq=seq, ts=seen, online=kind == "hb", interval_s=2.0, epoch=1.0
            )
        out.append((event, seen))
    return out


@settings(max_examples=150, deadline=None)
@given(data=st.data(), history=node_history())
def test_any_order_of_a_nodes_heartbeats_and_samples_ends_in_the_same_state(
    data: st.DataObject, history: list[Timed]
) -> None:
    events = data.draw(shuffled_with_duplicates(history))
    expected = fold(history)
    assert snapshot(fold(events)) == snapshot(expected)
    # A device is "node shut down" exactly when a shutdown came after its last sample.
    byes = [seen for e, seen in history if isinstance(e, NodeHeartbeat) and not e.online]
    for index in (0, 1):
        state = expected.get(keys.device_key("n1", index))
        if not isinstance(state, DeviceState):
            continue
        shut = any(b >= state.last_seen for b in byes)
        assert (state.offline_reason == "node shut down") == shut, (state, byes)


def test_a_graceful_shutdown_takes_the_devices_offline_and_a_new_sample_brings_one_back() -> None:
    gpu = DeviceSample(node="n1", index=0, uuid="G", seq=1, ts=NOW)
    view = fold([(gpu, NOW - 1), (NodeHeartbeat(node="n1", seq=1, ts=NOW), NOW - 1)])
    assert view.get("devices.n1.0") == DeviceState(sample=gpu, online=True, last_seen=NOW - 1)
    bye = NodeHeartbeat(node="n1", seq=2, ts=NOW, online=False)
    view = fold([(bye, NOW - 0.5)], view=view)
    node = view.get("nodes.n1")
    assert isinstance(node, NodeState) and not node.online and node.offline_reason == "shut down"
    device = view.get("devices.n1.0")
    assert isinstance(device, DeviceState) and device.offline_reason == "node shut down"
    back = DeviceSample(node="n1", index=0, uuid="G", seq=2, ts=NOW, epoch=5.0)
    view = fold([(back, NOW - 0.2)], view=view)
    device = view.get("devices.n1.0")
    assert isinstance(device, DeviceState) and device.online and device.shutdown_at is None


def test_a_silent_device_goes_offline_after_the_ttl_and_back_on_its_next_sample() -> None:
    gpu = DeviceSample(node="n1", index=0, uuid="G", seq=1, ts=NOW)
    view = fold([(gpu, NOW)])
    assert sweep(view, NOW + 6.0, LIVE) == {}
    changes = sweep(view, NOW + 6.1, LIVE)
    state = changes["devices.n1.0"]
    assert isinstance(state, DeviceState) and not state.online
    assert state.last_seen == NOW and state.offline_reason == "no telemetry for 6s"
    view.set("devices.n1.0", state)
    later = DeviceSample(node="n1", index=0, uuid="G", seq=2, ts=NOW + 10)
    outcome = apply(view, later, NOW + 10, NOW + 10, LIVE)
    assert isinstance(outcome, Changes)
    back = outcome.values["devices.n1.0"]
    assert isinstance(back, DeviceState) and back.online and back.offline_reason is None


def test_the_default_ttl_is_three_agent_intervals() -> None:
    default = Liveness()
    assert default.ttl(None) == 6.0
    hb = NodeHeartbeat(node="n1", seq=1, ts=NOW, interval_s=5.0)
    assert default.ttl(NodeState(heartbeat=hb, online=True, last_seen=NOW)) == 15.0
    assert Liveness(ttl_s=1.5).ttl(None) == 1.5


# --- instances --------------------------------------------------------------------------------


def assign(gen: int, node: str, stage: int, count: int = 2, **kw: Any) -> ShardAssignment:
    return kit.assignment("i1", gen, node, stage, count, model="m", ts=float(gen), **kw)


def report(gen: int, node: str, stage: int, state: str, seq: int) -> ShardStatus:
    return kit.status("i1", gen, node, stage, state, seq, ts=float(gen) + seq / 100)


INSTANCE_HISTORY: list[Timed] = [
    (assign(1, "a", 0), 1.0),
    (assign(1, "b", 1), 1.0),
    (report(1, "a", 0, "loading", 1), 1.1),
    (report(1, "b", 1, "loading", 1), 1.1),
    (report(1, "a", 0, "loaded", 2), 1.2),
    (report(1, "b", 1, "failed", 2), 1.2),
    # generation 2 moves stage 1 from b to c; b is released
    (assign(2, "a", 0), 2.0),
    (assign(2, "c", 1), 2.0),
    (assign(2, "b", 0, release=True), 2.0),
    (report(2, "b", 0, "unloaded", 3), 2.1),
    (report(2, "a", 0, "reserved", 1), 2.1),
    (report(2, "c", 1, "loading", 1), 2.1),
    (report(2, "c", 1, "reserved", 2), 2.2),
    (report(2, "a", 0, "loaded", 2), 2.3),
]


@settings(max_examples=150, deadline=None)
@given(events=shuffled_with_duplicates(INSTANCE_HISTORY))
def test_any_order_of_assignments_and_statuses_ends_at_the_newest_generation(
    events: list[Timed],
) -> None:
    state = fold(events).get("instances.i1")
    assert state == fold(INSTANCE_HISTORY).get("instances.i1")
    assert isinstance(state, InstanceState)
    assert state.generation == 2 and state.released_nodes == ("b",)
    assert [(s.node, s.state) for s in state.stages] == [("a", "loaded"), ("c", "reserved")]
    assert state.state == "reserved"


def test_a_newer_generation_replaces_the_old_one_and_old_statuses_are_ignored() -> None:
    view = fold(INSTANCE_HISTORY[:6])
    state = view.get("instances.i1")
    assert isinstance(state, InstanceState) and state.state == "degraded"
    view = fold([(assign(2, "a", 0, count=1), 2.0)], view=view)
    state = view.get("instances.i1")
    assert isinstance(state, InstanceState)
    assert (state.generation, state.stage_count, state.state) == (2, 1, "pending")
    assert [s.state for s in state.stages] == ["pending"]
    stale = apply(view, report(1, "a", 0, "loaded", 9), 3.0, NOW, LIVE)
    assert stale == Changes({})


def test_a_status_before_its_assignment_or_from_another_node_is_deferred() -> None:
    view = View()
    assert isinstance(apply(view, report(1, "a", 0, "loaded", 1), 1.0, NOW, LIVE), Defer)
    view = fold([(assign(1, "a", 0), 1.0)], view=view)
    assert isinstance(apply(view, report(1, "a", 1, "loaded", 1), 1.0, NOW, LIVE), Defer)
    assert isinstance(apply(view, report(2, "a", 0, "loaded", 1), 1.0, NOW, LIVE), Defer)
    # A node the stage is not assigned to: maybe its release is still on the way.
    wrong = apply(view, report(1, "z", 0, "loaded", 1), 1.0, NOW, LIVE)
    assert isinstance(wrong, Defer) and "assigned to a" in wrong.reason
    view = fold([(assign(1, "z", 0, release=True), 1.0)], view=view)
    assert apply(view, report(1, "z", 0, "unloaded", 2), 1.0, NOW, LIVE) == Changes({})
    assert isinstance(apply(view, assign(1, "a", 5, count=2), 1.0, NOW, LIVE), Reject)


def test_releasing_every_node_marks_the_instance_released() -> None:
    view = fold([(assign(1, "a", 0, count=1), 1.0), (assign(2, "a", 0, release=True), 2.0)])
    state = view.get("instances.i1")
    assert isinstance(state, InstanceState)
    assert (state.state, state.stages, state.released_nodes) == ("released", (), ("a",))


def test_overall_state() -> None:
    def stages(*states: str) -> tuple[object, ...]:
        view = fold(
            [(assign(1, f"n{i}", i, count=len(states)), 1.0) for i in range(len(states))]
            + [(report(1, f"n{i}", i, s, 1), 1.0) for i, s in enumerate(states) if s != "pending"]
        )
        state = view.get("instances.i1")
        assert isinstance(state, InstanceState)
        return state.stages

    assert overall_state(stages("loaded", "loaded"), 2, False) == "loaded"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("loaded", "reserved"), 2, False) == "reserved"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("loaded", "loading"), 2, False) == "loading"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("loaded", "failed"), 2, False) == "degraded"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("loading", "failed"), 2, False) == "failed"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("pending", "pending"), 2, False) == "pending"  # pyright: ignore[reportArgumentType]
    assert overall_state(stages("loaded"), 2, False) == "loading"  # pyright: ignore[reportArgumentType]
