"""The soak benchmark, small and short, end to end: every service in its own process, faults,
placements, and a last line whose correctness figures must hold (nothing lost, ledger equal to
what was answered ok). Timing targets are not asserted here: a shared machine's timings are
the benchmark's to report."""

from __future__ import annotations

import json

import pytest

from shardplane.bench import soak


def test_fleet_file_and_node_names_agree() -> None:
    from shardplane.agents.fleet import parse

    for nodes in (1, 5, 40, 1000):
        fleet = parse(soak.fleet_toml(nodes, 2, 1.0))
        assert [n.name for n in fleet.nodes] == soak.node_names(nodes)


def test_bad_arguments_say_which(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        soak.parse(True, ["--nodes", "0"])
    assert "--nodes (0)" in capsys.readouterr().err


def test_short_soak(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--nodes", "6", "--gpus", "2", "--minutes", "0.25", "--warmup", "8"]
    argv += ["--interval", "1", "--place-every", "2"]
    assert soak.main(quick=True, argv=argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("lag_p99_ms", "api_p99_ms", "placement_p99_ms", "rss_growth_pct", "lost"):
        assert key in last
    assert last["lost"] == 0
    assert last["ledger_mismatch"] == 0
    assert last["placed"] >= 1 and last["faults"] >= 1
    assert last["lag_p99_ms"] > 0 and last["api_p99_ms"] > 0
    assert 0 < last["api_headers_p99_ms"] <= last["api_p99_ms"]  # headers come before the body
