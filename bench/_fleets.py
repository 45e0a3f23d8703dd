"""The benchmarks' fleets, each described once: as the fleet file the simulator runs.

Why: a benchmark that plans offline on synthetic hosts (``planner.synthetic.HostSpec``, noise
free) for a fleet it also runs live (simulated agents reading a fleet file) kept a TOML text and
a hand-written host list side by side, free to drift apart unseen. The file is the description;
the hosts are read off it here.
"""

from __future__ import annotations

from shardplane.agents import fleet as simfleet
from shardplane.planner.synthetic import HostSpec
from shardplane.wiring import DEMO_FLEET


def sim_hosts(fleet: simfleet.Fleet) -> tuple[HostSpec, ...]:
    """The simulated fleet's nodes as synthetic hosts. A node with NVLink pairs counts as
    NVLinked (a ``HostSpec`` joins all its GPUs); each ``[[links]]`` entry stays on its ``a``
    node; the file's ``[network]`` defaults do not carry (the planner's own apply)."""
    return tuple(
        HostSpec(
            node.name,
            tuple(gpu.spec.key for gpu in node.gpus),
            nvlink=bool(node.nvlink),
            links=tuple(
                (link.b, link.gbps, link.latency_ms) for link in fleet.links if link.a == node.name
            ),
        )
        for node in fleet.nodes
    )


def demo_hosts() -> tuple[HostSpec, ...]:
    """The demo fleet (``fleets/demo.toml``) as synthetic hosts."""
    return sim_hosts(simfleet.load(DEMO_FLEET))
