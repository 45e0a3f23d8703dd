"""The simulated backend: deterministic per seed, drifting realistic values, every fault kind,
many nodes in one process."""

from __future__ import annotations

import time

import pytest

from shardplane.agents.fleet import Fleet, parse
from shardplane.agents.sim import Fault, SimNode, sim_nodes
from shardplane.bus import codec
from shardplane.bus.messages import DeviceSample

FLEET = """
seed = 11
interval_s = 2.0
[[nodes]]
name = "box"
gpus = [{ model = "A100-80GB", count = 2 }, { model = "RTX-4090" }]
nvlink = [[0, 1]]
load = 0.5
[[faults]]
at_s = 20.0
node = "box"
device = 2
kind = "vanish"
duration_s = 10.0
"""


def _fleet(seed: int = 11) -> Fleet:
    return parse(FLEET.replace("seed = 11", f"seed = {seed}"))


def _run(node: SimNode, ticks: int) -> list[list[DeviceSample]]:
    return [node.read(1000.0 + 2 * i) for i in range(ticks)]


def test_same_seed_same_telemetry_other_seed_other_telemetry() -> None:
    a = _run(SimNode(_fleet().nodes[0], _fleet()), 30)
    b = _run(SimNode(_fleet().nodes[0], _fleet()), 30)
    c = _run(SimNode(_fleet(12).nodes[0], _fleet(12)), 30)
    assert a == b
    assert [s.uuid for s in a[0]] == [s.uuid for s in b[0]] != [s.uuid for s in c[0]]
    assert [s.utilization_gpu_pct for s in a[5]] != [s.utilization_gpu_pct for s in c[5]]


def test_values_drift_within_physical_ranges() -> None:
    fleet = _fleet()
    series = _run(SimNode(fleet.nodes[0], fleet), 60)
    dev0 = [tick[0] for tick in series]
    for s in dev0:
        assert codec.decode(DeviceSample, codec.encode(s)) == s  # the contract holds
        assert s.memory_used_bytes is not None and s.memory_total_bytes is not None
        assert 0 < s.memory_used_bytes <= s.memory_total_bytes
        assert s.memory_free_bytes == s.memory_total_bytes - s.memory_used_bytes
        assert s.power_w is not None and 0 < s.power_w <= 400.0
        assert s.temperature_c is not None and 20.0 < s.temperature_c < 95.0
    assert len({s.utilization_gpu_pct for s in dev0}) > 20  # it moves
    assert len({s.memory_used_bytes for s in dev0}) > 20
    assert dev0[0].bandwidth_gbps == 2039.0 and dev0[0].memory_bus_width_bits == 5120
    assert [(link.peer_uuid, link.gbps) for link in dev0[0].nvlinks] == [(series[0][1].uuid, 300.0)]
    assert series[0][2].nvlinks == ()


def test_temperature_follows_load() -> None:
    fleet = parse('[[nodes]]\nname = "n"\ngpus = [{ model = "H100-SXM", count = 2 }]')
    node = SimNode(fleet.nodes[0], fleet)
    node.devices[0].util_mu, node.devices[1].util_mu = 95.0, 1.0
    for dev in node.devices:
        dev.util = dev.util_mu
    # keep the phases fixed for the check: no random phase change
    last: list[DeviceSample] = []
    for i in range(60):
        for dev, mu in zip(node.devices, (95.0, 1.0), strict=True):
            dev.util_mu = mu
        last = node.read(float(i))
    hot, cold = last
    assert hot.temperature_c is not None and cold.temperature_c is not None
    assert hot.power_w is not None and cold.power_w is not None
    assert hot.temperature_c > cold.temperature_c + 15
    assert hot.power_w > 3 * cold.power_w


def test_scheduled_vanish_and_return() -> None:
    fleet = _fleet()
    node = SimNode(fleet.nodes[0], fleet)
    present = [tick[2].present for tick in _run(node, 20)]
    # t = 2, 4, ... ; vanish at t=20 (tick 10), back at t=30 (tick 15)
    assert present[:9] == [True] * 9
    assert present[9:14] == [False] * 5
    assert present[14:] == [True] * 6
    assert [f.kind for _, f in node.applied] == ["vanish", "return"]


def test_throttle_lowers_clocks_and_power() -> None:
    fleet = _fleet()
    node = SimNode(fleet.nodes[0], fleet)
    before = _run(node, 10)[-1][0]
    node.inject(Fault(kind="throttle", device=0))
    after = _run(node, 15)[-1][0]
    assert "hw_slowdown" in after.throttle_reasons and "hw_slowdown" not in before.throttle_reasons
    assert after.sm_clock_mhz is not None and after.sm_clock_max_mhz is not None
    assert after.sm_clock_mhz <= 0.56 * after.sm_clock_max_mhz
    assert after.power_w is not None and after.power_w <= 0.55 * 400.0
    node.inject(Fault(kind="unthrottle", device=0))
    assert "hw_slowdown" not in node.read(1.0)[0].throttle_reasons


def test_fill_and_drain_memory() -> None:
    fleet = _fleet()
    node = SimNode(fleet.nodes[0], fleet)
    node.inject(Fault(kind="fill", device=1, fraction=0.99, duration_s=4.0))
    s = node.read(1.0)[1]
    assert s.memory_free_bytes is not None and s.memory_total_bytes is not None
    assert s.memory_free_bytes <= 0.01 * s.memory_total_bytes + 1
    node.read(2.0)
    s = node.read(3.0)[1]  # 4 simulated seconds later it drained
    assert s.memory_free_bytes is not None and s.memory_total_bytes is not None
    assert s.memory_free_bytes > 0.3 * s.memory_total_bytes


def test_silent_node_and_resume() -> None:
    fleet = _fleet()
    node = SimNode(fleet.nodes[0], fleet)
    assert not node.silenced()
    node.inject(Fault(kind="silent", duration_s=6.0))
    assert node.silenced()
    _run(node, 3)
    assert not node.silenced()


def test_worker_held_memory_shows_as_used() -> None:
    fleet = _fleet()
    a = SimNode(fleet.nodes[0], fleet)
    b = SimNode(fleet.nodes[0], fleet)
    b.hold(0, 20 * 1024**3)
    sa, sb = a.read(1.0)[0], b.read(1.0)[0]
    assert sb.memory_used_bytes == sa.memory_used_bytes + 20 * 1024**3  # type: ignore[operator]
    b.hold(0, -20 * 1024**3)
    assert a.read(2.0)[0].memory_used_bytes == b.read(2.0)[0].memory_used_bytes


def test_bad_fault_command_is_refused() -> None:
    fleet = _fleet()
    node = SimNode(fleet.nodes[0], fleet)
    with pytest.raises(ValueError, match="needs a device"):
        node.inject(Fault(kind="vanish", device=7))


def test_many_nodes_in_one_process_are_cheap() -> None:
    fleet = parse(
        'seed = 3\n[[nodes]]\nname = "n"\ncount = 500\ngpus = [{ model = "A10", count = 4 }]'
    )
    nodes = sim_nodes(fleet)
    assert len({d.uuid for n in nodes for d in n.devices}) == 2000  # unique identities
    t0 = time.thread_time()  # this thread's: earlier tests' leftover threads are not charged
    samples = [s for n in nodes for s in n.read(1.0)]
    cpu = time.thread_time() - t0
    assert len(samples) == 2000
    assert cpu < 0.5, f"one cycle of 2000 simulated devices took {cpu:.3f} s of CPU"


@pytest.mark.slow
def test_five_thousand_nodes() -> None:
    fleet = parse('[[nodes]]\nname = "n"\ncount = 5000\ngpus = [{ model = "A10", count = 4 }]')
    nodes = sim_nodes(fleet)
    t0 = time.process_time()
    for tick in range(3):
        for n in nodes:
            n.read(float(tick))
    assert (time.process_time() - t0) / 3 < 2.0


def test_dcgm_default_counters_are_simulated_per_part() -> None:
    """HBM parts have a memory temperature, Ampere datacenter parts remap rows, a consumer
    part has neither; energy only grows; AMD parts report an amdgpu driver and no XID."""
    fleet = parse(
        """
seed = 3
[[nodes]]
name = "mix"
gpus = [{ model = "A100-80GB" }, { model = "RTX-4090" }, { model = "MI250X" }]
load = 0.6
"""
    )
    node = SimNode(fleet.nodes[0], fleet)
    runs = _run(node, 5)
    a100, rtx, mi = runs[-1]
    assert a100.driver_version == "550.54.15" and mi.driver_version == "6.8.5"
    assert a100.memory_temperature_c is not None and a100.temperature_c is not None
    assert a100.memory_temperature_c > a100.temperature_c  # HBM runs hotter than the die
    assert rtx.memory_temperature_c is None
    assert (a100.remapped_rows_uncorrectable, a100.row_remap_failed) == (0, False)
    assert rtx.remapped_rows_uncorrectable is None and rtx.row_remap_failed is None
    assert (a100.xid_last, mi.xid_last) == (0, None)
    energies = [run[0].energy_mj or 0 for run in runs]
    assert energies == sorted(energies) and energies[-1] > energies[0] > 0
    # 5 ticks of 2 s at >= 10 % of a 400 W TDP: at least 4 kJ, in millijoules.
    assert energies[-1] >= 5 * 2.0 * 40.0 * 1000.0
    for s in (a100, rtx, mi):
        assert s.pcie_tx_bytes_per_s is not None and s.pcie_tx_bytes_per_s >= 0.0
        assert codec.decode(DeviceSample, codec.encode(s)) == s
