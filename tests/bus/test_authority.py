"""Which assignment counts: the ledger's generation and plan, nothing else (pure)."""

from __future__ import annotations

import msgspec

from shardplane.bus import authority
from shardplane.bus.messages import ShardAssignment
from shardplane.planner import ledger


def _a(generation: int, plan_key: str = "p2", release: bool = False) -> ShardAssignment:
    return ShardAssignment(
        instance_id="i",
        generation=generation,
        node="n",
        model="m",
        plan_key=plan_key,
        release=release,
    )


def _view(**fields: object) -> authority.LedgerView:
    entry = ledger.LedgerEntry(
        generation=2,
        model="m",
        fingerprint="f",
        devices={"n/0": 1},
        nodes=("n",),
        plan_key="p2",
        **fields,  # pyright: ignore[reportArgumentType]
    )
    # The planner's own document, decoded through the bus's narrow view of it.
    return authority.decode(ledger.encode_doc(ledger.LedgerDoc(instances={"i": entry})))


def test_only_the_ledgers_generation_and_plan_count() -> None:
    view = _view()
    assert authority.judge(view, _a(2))[0] == "current"
    assert authority.judge(view, _a(1))[0] == "stale"
    verdict, why = authority.judge(view, _a(99))
    assert verdict == "ahead" and "only at generation 2" in why
    assert authority.judge(view, _a(2, plan_key="guess"))[0] == "forged"
    assert authority.judge(authority.EMPTY, _a(1))[0] == "unknown"
    other = msgspec.structs.replace(_a(2), instance_id="j")
    assert authority.judge(view, other)[0] == "unknown"


def test_a_released_generation_only_takes_releases() -> None:
    view = _view(released=True)
    assert authority.judge(view, _a(2, release=True))[0] == "current"
    assert authority.judge(view, _a(2))[0] == "forged"


def test_an_unreadable_ledger_authorises_nothing() -> None:
    assert authority.decode(b"\xc1 not msgpack") == authority.EMPTY
