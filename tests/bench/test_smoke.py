"""Every benchmark runs end to end on a tiny input and ends with its JSON line.

A benchmark is only run by hand, for its figures, so without these a renamed key, a broken
argument or a verdict that no longer follows its figures would surface on the day the figures
are wanted. Each run here is seconds long: the figures are not judged, only their presence and
the met/missed rules that turn them into a verdict. (shard-load and pipeline have their own
smoke tests in tests/agents/.)"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardplane.bench import (
    agent_overhead,
    api_latency,
    failover,
    fuzz,
    kv_feed,
    placement_quality,
    projector_throughput,
)


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A benchmark may quiet the ``shardplane`` loggers for its own run (fuzz does): in this
    process the next test would find them quiet, so their level is put back."""
    root = logging.getLogger("shardplane")
    level = root.level
    yield
    root.setLevel(level)


def _figures(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    figures: dict[str, Any] = json.loads(lines[-1])  # the very last line is the JSON object
    assert isinstance(figures, dict)
    return figures


def _has(figures: dict[str, Any], names: str) -> None:
    missing = set(names.split()) - figures.keys()
    assert not missing, f"the JSON line lacks {sorted(missing)}: {figures}"


def _run(
    main: Callable[..., int], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    code = main(quick=True, argv=argv)
    return code, _figures(capsys)


def _passed(
    main: Callable[..., int], argv: list[str], capsys: pytest.CaptureFixture[str], names: str
) -> dict[str, Any]:
    """The figures of a run that must exit 0 and whose JSON line must hold ``names``."""
    code, figures = _run(main, argv, capsys)
    assert code == 0, figures
    _has(figures, names)
    return figures


def test_agent_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    names = (
        "cpu_pct_one_core_8dev_2s init_s_no_gpu cpu_ms_per_cycle_8dev "
        "floor_cpu_ms_per_cycle_publish init_floor_s"
    )
    figures = _passed(agent_overhead.main, ["--cycles", "3"], capsys, names)
    assert figures["cycles"] == 3 and figures["messages_per_cycle"] == 9
    assert figures["cpu_ms_per_cycle_8dev"] > 0 and figures["floor_cpu_ms_per_cycle_publish"] > 0


def test_kv_feed(capsys: pytest.CaptureFixture[str]) -> None:
    names = "watchall_iter_cpu_us watchall_updates_cpu_us kv_feed_cpu_us feed_cpu_over_floor"
    figures = _passed(kv_feed.main, ["--changes", "300"], capsys, names)
    assert figures["changes"] == 300 and figures["kv_feed_cpu_us"] > 0


def test_fuzz_verdict_follows_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, figures = _run(fuzz.main, ["--inputs", "40"], capsys)
    assert figures["inputs"] == 40 and set(figures["per_target"]) == set(fuzz.TARGETS)
    clean = (
        figures["answered"] == figures["inputs"]
        and figures["crashes"] == figures["internal_errors"] == figures["forbidden_allowed"] == 0
    )
    assert code == (0 if clean else 1), figures
    assert clean, figures  # the services answered every input and let nothing forbidden by


def test_placement_quality(capsys: pytest.CaptureFixture[str]) -> None:
    names = (
        "cases overclaim_max worse_than_exo worse_than_best_single_device "
        "max_gap_vs_exact_pct solve_p50_ms"
    )
    figures = _passed(placement_quality.main, ["--cases", "2"], capsys, names)
    assert figures["cases"] >= 2
    assert figures["worse_than_exo"] == figures["worse_than_best_single_device"] == 0


def test_api_latency(capsys: pytest.CaptureFixture[str]) -> None:
    code, figures = _run(api_latency.main, ["--nodes", "4"], capsys)
    assert code == 0
    assert figures["devices"] == 32 and figures["nodes"] == 4
    for key in ("devices_p99_ms", "metrics_p99_ms", "devices_p99_ms_churn", "floor_healthz_p99_ms"):
        assert figures[key] > 0, key
    assert figures["target_p99_ms"] == api_latency.TARGET_P99_MS


def test_api_latency_met_and_missed() -> None:
    target = api_latency.TARGET_P99_MS
    keys = ("devices_p99_ms", "metrics_p99_ms")
    assert api_latency._within_target({"devices_p99_ms": target, "metrics_p99_ms": 1.0}, keys)  # pyright: ignore[reportPrivateUsage]
    assert not api_latency._within_target(  # pyright: ignore[reportPrivateUsage]
        {"devices_p99_ms": 1.0, "metrics_p99_ms": target + 0.1}, keys
    )


def test_projector_throughput_verdict_follows_its_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--nodes", "4", "--gpus", "2", "--rounds", "2", "--lag-seconds", "1"]
    names = "msgs_per_s raw_drain_msgs_per_s ratio lag_p99_ms_at_4000 lost"
    figures = _passed(projector_throughput.main, argv, capsys, names)
    assert figures["msgs_per_s"] > 0 and figures["raw_drain_msgs_per_s"] > 0
    missed = (
        figures["ratio"] < projector_throughput.TARGET_RATIO
        or figures["msgs_per_s"] < projector_throughput.TARGET_RATE
        or figures["lag_p99_ms_at_4000"] > projector_throughput.TARGET_P99_MS
        or figures["lost"] != 0
    )
    assert isinstance(figures["targets_met"], bool)
    if missed:  # on four nodes the rate target is out of reach: the verdict must say so
        assert figures["targets_met"] is False, figures


def test_failover_verdict_follows_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, figures = _run(failover.main, ["--kills", "1", "--nodes", "2", "--gpus", "1"], capsys)
    assert figures["kills"] == 1
    _has(figures, "unavailable_s_max floor_s_max vs_floor_max lost false_offline")
    met = (
        figures["unavailable_s_max"] is not None
        and figures["unavailable_s_max"] <= failover.TARGET_UNAVAILABLE_S
        and figures["lost"] == 0
        and figures["false_offline"] == 0
    )
    assert code == (0 if met else 1), figures
