"""``projector-throughput --partitions 2``, small: both partitions drain their shares of the
backlog, nothing is lost, and the scale-out figures are on the last line."""

from __future__ import annotations

import json

import pytest

from shardplane.bench import projector_throughput


def test_partitioned_drain_reports_scaleout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--nodes", "40", "--gpus", "2", "--rounds", "3", "--lag-seconds", "1"]
    assert projector_throughput.main(quick=True, argv=[*argv, "--partitions", "2"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["partitions"] == 2 and last["lost"] == 0
    assert last["partitioned_msgs_per_s"] > 0 and last["scaleout_ratio"] > 0
    parts = {"nats-server", "partition 0", "partition 1", "bench"}
    assert set(last["partitioned_cpu_pct"]) == parts
    # where the CPU went, per message, and the ceiling that puts on the ratio
    assert set(last["cpu_us_per_msg_partitioned"]) == parts
    # (a drain this small may take under one CPU tick: the figures can be 0, never missing)
    assert last["cpu_us_per_msg_single"]["projector"] >= 0
    assert 0 < last["scaleout_ceiling"] <= 2
    # what copying the backlog into the partitions' stream cost the server, outside the timing
    assert last["sourcing_server_us_per_msg"] >= 0
    measured = last["scaleout_ceiling_measured"]
    assert measured is None or 0 < measured <= 2
