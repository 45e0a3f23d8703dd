"""The pure reconcile rules: desired (folded assignments) vs held -> actions."""

from __future__ import annotations

import pytest

from shardplane.agents import reconcile as rc
from shardplane.bus.messages import ShardAssignment


def a(
    gen: int,
    stage: int = 0,
    start: int = 0,
    end: int = 4,
    *,
    inst: str = "i1",
    model: str = "hf:/m",
    release: bool = False,
    kv: int = 0,
) -> ShardAssignment:
    return ShardAssignment(
        instance_id=inst,
        generation=gen,
        node="n1",
        model=model,
        stage=stage,
        stage_count=2,
        device="n1/0",
        layer_start=start,
        layer_end=end,
        weight_bytes=100 * (end - start),
        kv_bytes=kv,
        release=release,
    )


def held(assignment: ShardAssignment, state: rc.HeldState = "loaded") -> dict[rc.ShardKey, rc.Held]:
    h = rc.Held(assignment=assignment, state=state, held_bytes=rc.hold_bytes(assignment))
    return {h.key: h}


def test_new_assignment_loads_catalog_reserves() -> None:
    desired = rc.fold_all({}, [a(1), a(1, inst="cat", model="llama-3.1-70b")])
    actions = rc.reconcile(desired, {})
    assert actions == [
        rc.Reserve(assignment=a(1, inst="cat", model="llama-3.1-70b")),
        rc.Load(assignment=a(1)),
    ]


def test_duplicates_and_stale_generations_change_nothing() -> None:
    desired = rc.fold_all({}, [a(2, 0, 0, 3), a(2, 0, 0, 3), a(1, 0, 3, 6), a(2, 0, 0, 3)])
    assert rc.wanted(desired) == [a(2, 0, 0, 3)]
    assert rc.reconcile(desired, held(a(2, 0, 0, 3))) == []


def test_new_generation_moves_layers() -> None:
    old = a(1, 0, 0, 4)
    desired = rc.fold({}, a(2, 1, 4, 8))
    actions = rc.reconcile(desired, held(old))
    assert actions == [
        rc.Unload(held=held(old)[rc.ShardKey("i1", 0)], reason="replaced by generation 2"),
        rc.Load(assignment=a(2, 1, 4, 8)),
    ]


def test_same_weights_under_a_new_generation_are_adopted_not_reloaded() -> None:
    old = a(1, 1, 4, 8)
    new = a(2, 0, 4, 8, kv=10)  # renumbered stage, bigger KV budget, same layers
    actions = rc.reconcile(rc.fold({}, new), held(old))
    assert actions == [rc.Adopt(old=rc.ShardKey("i1", 1), assignment=new)]


def test_release_wins_whatever_the_order() -> None:
    for order in ([a(2), a(2, release=True)], [a(2, release=True), a(2)]):
        desired = rc.fold_all({}, order)
        assert desired["i1"].released
        actions = rc.reconcile(desired, held(a(1)))
        assert [type(x) for x in actions] == [rc.Unload]
        assert isinstance(actions[0], rc.Unload)
        assert actions[0].reason == "released at generation 2"


def test_failed_is_not_retried_until_a_new_generation() -> None:
    desired = rc.fold({}, a(1))
    assert rc.reconcile(desired, held(a(1), "failed")) == []
    desired = rc.fold(desired, a(2))
    actions = rc.reconcile(desired, held(a(1), "failed"))
    assert [type(x) for x in actions] == [rc.Unload, rc.Load]


def test_fold_does_not_mutate_and_keeps_stages_sorted() -> None:
    empty: dict[str, rc.Desired] = {}
    desired = rc.fold_all(empty, [a(1, 1, 4, 8), a(1, 0, 0, 4)])
    assert empty == {}
    assert [s.stage for s in desired["i1"].stages] == [0, 1]


def test_superseded_in_flight_load() -> None:
    desired = rc.fold({}, a(1, 0, 0, 4))
    assert not rc.superseded(desired, a(1, 0, 0, 4))
    assert rc.superseded(rc.fold(desired, a(2, 0, 0, 5)), a(1, 0, 0, 4))
    assert rc.superseded(rc.fold(desired, a(2, release=True)), a(1, 0, 0, 4))


def test_worker_env_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardplane.agents.worker import load_limit_from_env, read_mode_from_env

    monkeypatch.delenv("SHARDPLANE_LOAD_LIMIT_MBPS", raising=False)
    monkeypatch.delenv("SHARDPLANE_LOAD_READ", raising=False)
    # pread by default: a file truncated under a memory map is SIGBUS, the agent's death.
    assert load_limit_from_env() is None and read_mode_from_env() == "pread"
    monkeypatch.setenv("SHARDPLANE_LOAD_LIMIT_MBPS", "250")
    monkeypatch.setenv("SHARDPLANE_LOAD_READ", "MMAP")
    assert load_limit_from_env() == 250e6 and read_mode_from_env() == "mmap"
    monkeypatch.setenv("SHARDPLANE_LOAD_LIMIT_MBPS", "fast")
    monkeypatch.setenv("SHARDPLANE_LOAD_READ", "dma")
    assert load_limit_from_env() is None and read_mode_from_env() == "pread"


def test_an_empty_long_poll_is_idle_and_anything_else_is_trouble() -> None:
    import nats.errors
    import nats.js.errors

    from shardplane.agents.worker import describe_error, idle_poll

    # nats-py's fetch ends an empty poll with any of these; the builtin one has no message.
    for quiet in (
        TimeoutError(),  # asyncio.TimeoutError is this very class
        nats.errors.TimeoutError(),
        nats.js.errors.FetchTimeoutError(),
    ):
        assert idle_poll(quiet), repr(quiet)
    for trouble in (
        nats.js.errors.ServiceUnavailableError(),
        nats.js.errors.NotFoundError(),
        nats.errors.ConnectionClosedError(),
        nats.errors.NoRespondersError(),
    ):
        assert not idle_poll(trouble), repr(trouble)
    assert (
        describe_error(nats.errors.ConnectionClosedError())
        == "ConnectionClosedError: nats: connection closed"
    )
    assert describe_error(nats.js.errors.NotFoundError()).startswith("nats: NotFoundError: ")
    assert describe_error(ValueError("")) == "ValueError"
    assert describe_error(OSError(104, "reset")) == "ConnectionResetError: [Errno 104] reset"
