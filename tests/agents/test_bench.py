"""The shard-load benchmark runs end to end on a tiny checkpoint and ends with its JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardplane.bench.shard_load import main


def test_shard_load_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size-gib", "0.04", "--repeat", "1", "--idle-s", "0", "--dir", str(tmp_path)]
    assert main(quick=True, argv=argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert {"load_gbps", "raw_read_gbps", "ratio", "unprimed_load_gbps", "unprimed_ratio"} <= (
        figures.keys()
    )
    assert figures["load_gbps"] > 0 and figures["raw_read_gbps"] > 0
    assert figures["unprimed_load_gbps"] > 0 and figures["unprimed_ratio"] > 0
    assert figures["read_mode"] == "pread"  # the worker's default
    assert list(tmp_path.iterdir()) == []  # the checkpoint is cleaned up
