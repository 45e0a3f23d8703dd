"""The controller's two memory lines, pure: out of memory moves at once, getting full only once
it has held on every check for ``full_hold_s``."""

from __future__ import annotations

from shardplane.bus.messages import DeviceState, Stage
from shardplane.planner import health
from tests import kit

GIB = 2**30
TOTAL = 80 * GIB
CFG = health.HealConfig(full_hold_s=30.0, full_hold_checks=3)
# The line for getting full with a 10 % headroom: 25 % of 8 GiB left, 2 GiB.
LINE = int((1.0 - CFG.full_share) * 0.1 * TOTAL)


def _stage(device: str = "a/0") -> Stage:
    held = {"weight_bytes": 40 * GIB, "kv_bytes": 8 * GIB, "memory_bytes": 50 * GIB}
    return kit.stage("a", 0, 40, device=device, bandwidth_gbps=1500.0, stage_ms=30.0, **held)


def _devices(free: int, ref: str = "a/0") -> dict[str, DeviceState]:
    return {ref: kit.device_with_free(free, TOTAL)}


def _watch(frees: list[int], interval_s: float = 1.0) -> list[str | None]:
    """Feed one reading per check to a FullWatch as the controller does: what each check says."""
    watch = health.FullWatch()
    stages = (_stage(),)
    out: list[str | None] = []
    for i, free in enumerate(frees):
        reason = health.getting_full(stages, _devices(free), CFG, headroom=0.1)
        out.append(watch.hold(reason, i * interval_s, CFG))
    return out


def test_out_of_memory_is_immediate_and_getting_full_is_not() -> None:
    """Free memory under the runtime's working memory is out of memory: a reason at the first
    check. 1.5 GiB free (others ate most of the headroom, the stage still fits) is only getting
    full: no reason from out_of_memory."""
    stages = (_stage(),)
    oom = health.out_of_memory(stages, _devices(100 * 2**20), CFG)
    assert oom is not None and "a/0 is out of memory" in oom and "100 MiB free" in oom
    assert health.out_of_memory(stages, _devices(0), CFG) is not None
    tight = _devices(int(1.5 * GIB))
    assert health.out_of_memory(stages, tight, CFG) is None
    full = health.getting_full(stages, tight, CFG, headroom=0.1)
    assert full is not None and "a/0 is full" in full
    assert health.getting_full(stages, _devices(LINE + GIB), CFG, headroom=0.1) is None


def test_getting_full_moves_only_once_it_held_for_the_window() -> None:
    """A fill that stays (1.5 GiB free on every check) gives a reason at the check 30 s after
    the first, not before, and it says how long it held."""
    said = _watch([int(1.5 * GIB)] * 40)
    first = next(i for i, r in enumerate(said) if r is not None)
    assert first == 30, said
    reason = said[first]
    assert reason is not None and "for 30 s" in reason
    assert all(r is None for r in said[first + 1 : first + 30])  # counting starts again


def test_a_transient_dip_or_one_reading_back_above_the_line_moves_nothing() -> None:
    """A dip under the line for 20 s (a workload phase that ends) moves nothing, and neither
    does a 50 s dip broken by one reading with the headroom back: each restarts the count."""
    dip = [20 * GIB] * 5 + [int(1.5 * GIB)] * 20 + [20 * GIB] * 20
    assert all(r is None for r in _watch(dip))
    broken = [int(1.5 * GIB)] * 25 + [LINE + 1] + [int(1.5 * GIB)] * 25
    assert all(r is None for r in _watch(broken))


def test_the_window_needs_its_checks_too() -> None:
    """Checks far apart (a stalled controller) still need ``full_hold_checks`` readings under
    the line: two readings 40 s apart are not a held fill."""
    said = _watch([int(1.5 * GIB)] * 3, interval_s=40.0)
    assert said[:2] == [None, None]
    assert said[2] is not None
