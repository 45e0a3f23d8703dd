"""Link calibration: the crossings stages report (``ShardStatus.hop_ms``) become their link's
measured latency on the sending node, robust to bad figures, kept across heartbeats, and the
planner plans that link at it; on a real server, through the projector's KV."""

from __future__ import annotations

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import (
    DeviceSample,
    DeviceState,
    NetLink,
    NodeHeartbeat,
    NodeState,
    ShardStatus,
)
from shardplane.planner.fleet import DEFAULT_NET_LATENCY_MS, build_fleet
from shardplane.projector.calibration import MIN_SAMPLES, WINDOW
from tests import kit
from tests.kit import eventually
from tests.projector import helpers
from tests.projector.test_reducer import NOW, View, assign, fold


def hop(seq: int, ms: float | None, node: str = "a", stage: int = 0, rows: int = 1) -> ShardStatus:
    return kit.status(
        "i1", 1, node, stage, "loaded", seq, ts=1.0 + seq / 100, hop_ms=ms, step_rows=rows
    )


def nodes_after(statuses: list[ShardStatus], stage1: str = "b") -> View:
    events = [
        (NodeHeartbeat(node="a", seq=1, ts=NOW), NOW - 1),
        (NodeHeartbeat(node="b", seq=1, ts=NOW), NOW - 1),
        (assign(1, "a", 0), 1.0),
        (assign(1, stage1, 1), 1.0),
    ]
    return fold(events + [(s, 1.5) for s in statuses])


def node(view: View, name: str = "a") -> NodeState:
    state = view.get(keys.node_key(name))
    assert isinstance(state, NodeState)
    return state


def test_crossings_become_the_links_measured_latency() -> None:
    few = nodes_after([hop(i, 1.2) for i in range(1, MIN_SAMPLES)])
    assert node(few).measured_hop_ms == {}  # nothing claimed before MIN_SAMPLES figures
    assert len(node(few).measured_hop_samples["b"]) == MIN_SAMPLES - 1
    view = nodes_after([hop(i, 1.2) for i in range(1, MIN_SAMPLES + 1)])
    assert node(view).measured_hop_ms == {"b": 1.2}
    assert node(view, "b").measured_hop_ms == {}  # the last stage asks nobody


def test_zeros_outliers_and_batches_cannot_poison_it() -> None:
    bad = [hop(1, 0.0), hop(2, None), hop(3, 50.0, rows=4), hop(4, float("nan"))]
    good = [hop(5, 1.0), hop(6, 0.001), hop(7, 1.0), hop(8, 900.0), hop(9, 1.0)]
    state = node(nodes_after(bad + good))
    assert state.measured_hop_ms == {"b": 1.0}  # median of 1, 0.001, 1, 900, 1
    assert len(state.measured_hop_samples["b"]) == 5
    many = node(nodes_after([hop(i, 1.0 if i % 2 else 2.0) for i in range(1, 30)]))
    assert len(many.measured_hop_samples["b"]) == WINDOW  # a window, not all history


def test_a_crossing_within_one_node_is_not_a_link() -> None:
    assert node(nodes_after([hop(i, 1.0) for i in range(1, 5)], stage1="a")).measured_hop_ms == {}


def test_heartbeats_and_liveness_keep_the_measured_links() -> None:
    view = nodes_after([hop(i, 1.2) for i in range(1, 4)])
    view = fold([(NodeHeartbeat(node="a", seq=2, ts=NOW), NOW - 0.5)], view=view)
    assert node(view).measured_hop_ms == {"b": 1.2}
    # Long silent: the sweep marks it offline, rebuilding its state; the measurement stays.
    view = fold([], now=NOW + 3600, view=view)
    assert not node(view).online and node(view).measured_hop_ms == {"b": 1.2}


def _fleet_ab(a: NodeState, b: NodeState) -> tuple[float, float]:
    """Latency the planner gives the crossing a -> b and b -> a, one device on each."""
    devices = [
        DeviceState(
            sample=DeviceSample(
                node=n, index=0, uuid=f"G{n}", seq=1, ts=NOW, name="NVIDIA A100-SXM4-80GB",
                memory_total_bytes=80 * 2**30, memory_free_bytes=80 * 2**30,
            ),
            online=True,
            last_seen=NOW,
        )
        for n in ("a", "b")
    ]  # fmt: skip
    fleet = build_fleet(devices, {"a": a, "b": b})
    da, db = fleet.devices
    return fleet.link(da, db).latency_ms, fleet.link(db, da).latency_ms


def test_the_planner_plans_the_link_at_its_measured_latency() -> None:
    view = nodes_after([hop(i, 1.2) for i in range(1, 4)])
    # Measured one way: both ways take it (the planner's return hop goes b -> a).
    assert _fleet_ab(node(view), node(view, "b")) == (1.2, 1.2)
    plain = nodes_after([])
    assert _fleet_ab(node(plain), node(plain, "b")) == (DEFAULT_NET_LATENCY_MS,) * 2
    # A configured link keeps its bandwidth; its latency is what was measured.
    link = msgspec.structs.replace(node(view).heartbeat, links=(NetLink(peer="b", gbps=100.0),))
    configured = build_fleet([], {"a": msgspec.structs.replace(node(view), heartbeat=link)})
    assert configured.node_links[("a", "b")].gbytes_per_s == pytest.approx(12.5)
    assert configured.node_links[("a", "b")].latency_ms == 1.2


async def test_a_reported_crossing_reaches_the_planners_fleet(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    """Real server and projector: assignments and step reports as workers publish them; the
    KV's node states, as the planner reads them, plan the link at the measured crossing."""
    async with helpers.projector(nats_url):
        for name in ("rig-a", "rig-b"):
            await js.publish(subjects.node_heartbeat(name), codec.encode(kit.heartbeat(name, 1)))
        for stage, name in enumerate(("rig-a", "rig-b")):
            await js.publish(
                subjects.assigned(name), codec.encode(kit.assignment("inst", 1, name, stage, 2))
            )
        for seq, ms in enumerate((1.1, 0.9, 1.3, 1.0), start=1):
            status = kit.status("inst", 1, "rig-a", 0, "loaded", seq, hop_ms=ms, step_ms=20.0)
            await js.publish(subjects.shard_status("rig-a", "inst"), codec.encode(status))
        a = await eventually(
            lambda: helpers.node_state(nc, "rig-a"),
            lambda s: s is not None and len(s.measured_hop_samples.get("rig-b", ())) == 4,
            what="four crossings on rig-a's node state",
        )
        b = await helpers.node_state(nc, "rig-b")
    assert a is not None and b is not None
    assert a.measured_hop_ms == {"rig-b": pytest.approx(1.05)}  # the median of four
    fleet = build_fleet([], {"rig-a": a, "rig-b": b})
    assert fleet.node_links[("rig-a", "rig-b")].latency_ms == pytest.approx(1.05)
