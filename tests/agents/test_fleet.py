"""Fleet files: the demo loads, mistakes are named, big fleets expand."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardplane.agents.fleet import FleetError, load, parse, peer_links

ROOT = Path(__file__).resolve().parents[2]


def test_demo_fleet_loads() -> None:
    fleet = load(ROOT / "fleets" / "demo.toml")
    assert [n.name for n in fleet.nodes] == ["rig-a", "rig-b", "rig-c", "rig-d"]
    assert fleet.device_count() == 7
    rig_c = fleet.node("rig-c")
    assert rig_c is not None
    assert [g.spec.key for g in rig_c.gpus] == ["RTX-3060-12GB", "P40"]
    assert [g.index for g in rig_c.gpus] == [0, 1]
    rig_d = fleet.node("rig-d")
    assert rig_d is not None and rig_d.nvlink == ((0, 1),) and rig_d.interconnect == "xgmi"
    links = dict((p, (g, lat)) for p, g, lat in peer_links(fleet, "rig-a"))
    assert links == {"rig-b": (25.0, 0.05), "rig-c": (10.0, 0.2), "rig-d": (100.0, 0.01)}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[[nodes]]\nname = "a"\ngpus = [{ model = "H9000" }]', "unknown GPU model 'H9000'"),
        ('[[nodes]]\nname = "a"\ngpus = [{ model = "T4" }]\nnvlink = [[0, 1]]', "nvlink"),
        ('[[nodes]]\nname = "Bad Name"', "nodes[0].name"),
        ('[[nodes]]\nname = "a"\ngpu = []', "gpu"),
        ('[[nodes]]\nname = "a"\n[[links]]\na = "a"\nb = "z"\ngbps = 1.0', "unknown node 'z'"),
        (
            '[[nodes]]\nname = "a"\ngpus = [{ model = "T4" }]\n'
            '[[faults]]\nat_s = 1.0\nnode = "a"\ndevice = 3\nkind = "vanish"',
            "device 3 does not exist",
        ),
        ('[[nodes]]\nname = "a"\n[[faults]]\nat_s = 1.0\nnode = "a"\nkind = "explode"', "kind"),
        ("interval_s = -2", "interval_s"),
        ("seed = ", "not valid TOML"),
    ],
)
def test_mistakes_are_named(text: str, says: str) -> None:
    with pytest.raises(FleetError, match=None) as err:
        parse(text, "f.toml")
    assert says in str(err.value) and "f.toml" in str(err.value)


def test_count_expands_a_node_into_many() -> None:
    fleet = parse('[[nodes]]\nname = "sim"\ncount = 1000\ngpus = [{ model = "A10", count = 4 }]')
    assert len(fleet.nodes) == 1000 and fleet.nodes[7].name == "sim-007"
    assert fleet.device_count() == 4000
    # Too many nodes to list every pair: only listed links travel, the default rides alongside.
    assert peer_links(fleet, "sim-000") == ()
