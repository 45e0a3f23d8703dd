"""The ordering rule, pinned by hand: the newest sample, heartbeat or status is the greatest
``(epoch, seq, ts)``.

The property tests fold random histories and compare with themselves, so a different rule that
is still a total order passes them. These cases are the ones where the candidate orders
disagree: a restarted agent (new epoch, seq back at 0), a clock stepped back (same epoch,
higher seq, earlier ts) and a repeat of a seq (ts decides)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from shardplane.bus.keys import device_key, node_key
from shardplane.bus.messages import DeviceSample, DeviceState, NodeHeartbeat, NodeState
from shardplane.projector.reducer import (
    Changes,
    Liveness,
    View,
    apply_heartbeat,
    apply_sample,
    heartbeat_order,
    sample_order,
    status_order,
)
from tests import kit

T = TypeVar("T")
NOW = 1000.0
LIVE = Liveness(ttl_s=60.0)


def _sample(epoch: float, seq: int, ts: float, free_gib: int) -> DeviceSample:
    return kit.sample("n", 0, seq, epoch=epoch, ts=ts, free=free_gib * kit.GIB)


def _folded(
    arrivals: tuple[T, ...], apply: Callable[[View, T, float, float, Liveness], object]
) -> View:
    """The view after ``arrivals`` in that order; each must change it or leave it as is."""
    view = View()
    for event in arrivals:
        outcome = apply(view, event, NOW, NOW, LIVE)
        assert isinstance(outcome, Changes)
        for key, value in outcome.values.items():
            view.set(key, value)
    return view


def _kept_sample(*arrivals: DeviceSample) -> DeviceSample:
    """The sample the KV holds after ``arrivals``, in that order."""
    state = _folded(arrivals, apply_sample).get(device_key("n", 0))
    assert isinstance(state, DeviceState)
    return state.sample


# (older, newer): each pair is ordered by (epoch, seq, ts) and by no other arrangement of them.
CASES = {
    # The agent restarted: its seq starts over, its epoch moves on.
    "restart": (_sample(500.0, 90, 900.0, 10), _sample(600.0, 1, 899.0, 20)),
    # Same run, the wall clock stepped back between two samples: seq, not ts, says which.
    "clock stepped back": (_sample(500.0, 7, 950.0, 10), _sample(500.0, 8, 940.0, 20)),
    # A republished seq (same epoch): the later reading wins.
    "same seq": (_sample(500.0, 8, 940.0, 10), _sample(500.0, 8, 941.0, 20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_newest_sample_is_the_greatest_epoch_seq_ts(case: str) -> None:
    older, newer = CASES[case]
    assert sample_order(older) < sample_order(newer)
    assert _kept_sample(older, newer) == newer
    assert _kept_sample(newer, older) == newer  # arrival order does not matter


def test_a_restart_beats_a_higher_seq_from_the_run_before() -> None:
    before = _sample(epoch=500.0, seq=1_000, ts=990.0, free_gib=10)
    after = _sample(epoch=600.0, seq=0, ts=991.0, free_gib=20)
    assert _kept_sample(after, before).memory_free_bytes == 20 * kit.GIB


def test_heartbeats_follow_the_same_rule() -> None:
    old = kit.heartbeat("n", 50, epoch=500.0, ts=950.0, hostname="before")
    new = kit.heartbeat("n", 2, epoch=600.0, ts=949.0, hostname="after")
    assert heartbeat_order(old) < heartbeat_order(new)
    for arrivals in ((old, new), (new, old)):
        state = _folded(arrivals, apply_heartbeat).get(node_key("n"))
        assert isinstance(state, NodeState)
        assert state.heartbeat == new, arrivals


def test_statuses_follow_the_same_rule() -> None:
    base = kit.status("i", 1, "n", 0, "loaded", 0)
    restart_old = kit.status("i", 1, "n", 0, "loading", 40, epoch=500.0, ts=950.0)
    restart_new = kit.status("i", 1, "n", 0, "loaded", 1, epoch=600.0, ts=949.0)
    stepped_old = kit.status("i", 1, "n", 0, "loading", 7, epoch=500.0, ts=950.0)
    stepped_new = kit.status("i", 1, "n", 0, "loaded", 8, epoch=500.0, ts=940.0)
    assert status_order(restart_old) < status_order(restart_new)
    assert status_order(stepped_old) < status_order(stepped_new)
    assert status_order(base) < status_order(restart_old)


def test_hand_written_orders_are_what_the_rule_says() -> None:
    heartbeat = NodeHeartbeat(node="n", seq=3, ts=7.0, epoch=5.0)
    assert heartbeat_order(heartbeat) == (5.0, 3, 7.0)
    assert sample_order(_sample(5.0, 3, 7.0, 1)) == (5.0, 3, 7.0)
