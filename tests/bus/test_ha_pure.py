"""The pure parts of high availability: replica settings, transient errors, liveness by time."""

from __future__ import annotations

import logging
import time

import nats.errors
import nats.js.errors
import pytest

from shardplane.api.state import ClusterCache
from shardplane.bus import codec, keys
from shardplane.bus.liveness import judge_device, judge_node, reader_ttl
from shardplane.bus.messages import NodeHeartbeat, NodeState
from shardplane.bus.retry import Outage, retrying, transient
from shardplane.bus.streams import ReplicasError, replicas_from_env, settle_replicas
from shardplane.planner.synthetic import device_state


def test_replicas_from_the_environment_are_checked() -> None:
    assert replicas_from_env("") is None
    assert replicas_from_env("3") == 3
    with pytest.raises(ReplicasError, match="'three' is not a whole number"):
        replicas_from_env("three")
    with pytest.raises(ReplicasError, match="SHARDPLANE_REPLICAS=7 is out of range: 1 to 5"):
        replicas_from_env("7")


def test_replicas_are_never_lowered_and_raised_only_on_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        assert settle_replicas("TELEMETRY", current=3, wanted=1, explicit=True) == 3
        assert settle_replicas("TELEMETRY", current=3, wanted=1, explicit=False) == 3
        assert settle_replicas("TELEMETRY", current=1, wanted=3, explicit=False) == 1
    assert settle_replicas("TELEMETRY", current=1, wanted=3, explicit=True) == 3
    assert settle_replicas("TELEMETRY", current=3, wanted=3, explicit=False) == 3
    mismatches = [r.getMessage() for r in caplog.records]
    assert len(mismatches) == 3
    assert "TELEMETRY has 3 replicas where 1 are configured; keeping 3" in mismatches[0]


def test_what_an_election_looks_like_is_transient_and_an_answer_is_not() -> None:
    assert transient(nats.errors.NoRespondersError())
    assert transient(nats.errors.TimeoutError())
    assert transient(nats.js.errors.ServiceUnavailableError(code=503, err_code=10008))
    assert transient(nats.js.errors.APIError(code=500, err_code=10118))
    assert not transient(nats.js.errors.KeyWrongLastSequenceError())
    assert not transient(nats.js.errors.NotFoundError(code=404, err_code=10059))
    assert not transient(ValueError("bad input"))


async def test_retrying_rides_through_failures_and_logs_the_outage_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 5:
            raise nats.errors.NoRespondersError
        return "stored"

    with caplog.at_level(logging.INFO, logger="shardplane.bus.retry"):
        assert await retrying(flaky, "publish x", deadline_s=10.0) == "stored"
    messages = [r.getMessage() for r in caplog.records]
    assert len(calls) == 5
    assert len(messages) == 2  # one when it began, one when it ended: not one per attempt
    assert "publish x: NoRespondersError" in messages[0]
    assert "working again" in messages[1] and "4 failed attempts" in messages[1]


async def test_retrying_gives_up_at_its_deadline_and_never_retries_an_answer() -> None:
    async def never() -> None:
        raise nats.errors.NoRespondersError

    started = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        await retrying(never, "x", deadline_s=0.3, outage=Outage("x"))
    assert 0.3 <= time.monotonic() - started < 2.0

    tries: list[int] = []

    async def conflict() -> None:
        tries.append(1)
        raise nats.js.errors.KeyWrongLastSequenceError

    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await retrying(conflict, "x")
    assert tries == [1]


def test_readers_judge_staleness_on_their_own_clock() -> None:
    now = time.time()
    fresh = device_state("rig", 0, "A100-80GB", ts=now - 2)
    old = device_state("rig", 1, "A100-80GB", ts=now - 30)
    assert judge_device(fresh, None, now) is fresh
    judged = judge_device(old, None, now)
    assert not judged.online and (judged.offline_reason or "").startswith(
        "stale: no update for 30s"
    )
    # A node that beats every 10 s is not stale after 20 s (3 intervals + slack).
    slow = NodeState(
        heartbeat=NodeHeartbeat(node="slow", seq=1, ts=now - 20, interval_s=10.0),
        online=True,
        last_seen=now - 20,
    )
    assert reader_ttl(slow) == 31.0
    assert judge_node(slow, now) is slow
    assert judge_device(old, slow, now) is old  # 30 s < 31 s for this node's devices
    assert not judge_device(old, None, now, ttl_s=5.0).online
    # Judging never turns an offline value online.
    offline = device_state("rig", 2, "A100-80GB", ts=now, online=False)
    assert judge_device(offline, None, now) is offline


def test_the_api_shows_a_silent_device_stale_and_its_view_age() -> None:
    cache = ClusterCache()
    now = time.time()
    old = device_state("rig", 0, "A100-80GB", ts=now - 30)
    fresh = device_state("rig", 1, "A100-80GB", ts=now)
    cache.apply(keys.device_key("rig", 0), codec.encode(old), 1)
    cache.apply(keys.device_key("rig", 1), codec.encode(fresh), 2)
    assert cache.briefs["devices.rig.0"].status == "online"  # as written
    changes = cache.expire(now)
    assert [c.key for c in changes] == ["devices.rig.0"]
    assert cache.briefs["devices.rig.0"].status == "offline"
    assert b"stale: no update for 30s" in (cache.device_json("rig", 0) or b"")
    assert cache.briefs["devices.rig.1"].status == "online"
    assert cache.expire(now) == []  # judged once
    view_age = cache.view_age(now + 10)
    assert view_age is not None and 9.9 < view_age < 10.1
    assert cache.view_ttl() == reader_ttl(None)
    # The projector writes again: its value replaces the judgement.
    back = device_state("rig", 0, "A100-80GB", ts=now + 1)
    cache.apply(keys.device_key("rig", 0), codec.encode(back), 3)
    assert cache.briefs["devices.rig.0"].status == "online"


def test_an_undecodable_value_is_skipped_with_its_key_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from shardplane.bus.messages import DeviceState
    from shardplane.status import decoded

    with caplog.at_level(logging.WARNING):
        assert decoded(DeviceState, "devices.rig.0", b"\x01garbage") is None
    assert "skipping devices.rig.0: undecodable value" in caplog.text
