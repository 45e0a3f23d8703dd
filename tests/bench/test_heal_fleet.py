"""bench heal's offline parts plan on the very fleets its live part simulates: each fleet is
described once, as a fleet file, and ``bench.heal.sim_hosts`` makes its synthetic hosts."""

from __future__ import annotations

from shardplane.agents import fleet
from shardplane.bench import heal
from tests.planner.fleetkit import DEMO


def test_the_demo_file_gives_the_demo_hosts() -> None:
    # GPU groups, NVLink pairs and [[links]] all carry over: the planner tests' demo twin.
    assert heal.sim_hosts(fleet.load(heal.DEMO_FLEET)) == DEMO


def test_the_64_gpu_fleet_has_its_64_gpus_in_one_kind_a_host() -> None:
    hosts = heal.BIG_HOSTS
    assert sum(len(h.gpus) for h in hosts) == heal.BIG_SIM.device_count() == 64
    assert all(len(set(h.gpus)) == 1 for h in hosts)
    kinds = {h.name.rsplit("-", 1)[0]: (h.gpus[0], h.nvlink) for h in hosts}
    assert kinds == {"a100": ("A100-80GB", True), "l40s": ("L40S", False), "mi": ("MI250X", False)}
