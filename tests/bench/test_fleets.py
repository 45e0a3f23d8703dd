"""The benches plan offline on the very fleets they simulate live: each fleet is described once,
as a fleet file, and ``bench._fleets.sim_hosts`` makes its synthetic hosts."""

from __future__ import annotations

from shardplane.bench import heal
from shardplane.bench._fleets import demo_hosts
from tests.planner.fleetkit import DEMO


def test_the_demo_file_gives_the_demo_hosts() -> None:
    # GPU groups, NVLink pairs and [[links]] all carry over: the planner tests' demo twin.
    assert demo_hosts() == DEMO


def test_the_64_gpu_fleet_has_its_64_gpus_in_one_kind_a_host() -> None:
    hosts = heal.BIG_HOSTS
    assert sum(len(h.gpus) for h in hosts) == heal.BIG_SIM.device_count() == 64
    assert all(len(set(h.gpus)) == 1 for h in hosts)
    kinds = {h.name.rsplit("-", 1)[0]: (h.gpus[0], h.nvlink) for h in hosts}
    assert kinds == {"a100": ("A100-80GB", True), "l40s": ("L40S", False), "mi": ("MI250X", False)}
