"""The projector applies an assignment only at the generation and plan the planner's ledger
names: a forged plan is dead-lettered at once, a generation ahead of the ledger once it has
waited long enough for the ledger to catch up, and neither touches the instance."""

from __future__ import annotations

import dataclasses

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.bus import codec, subjects
from shardplane.bus.streams import LEDGER, provision
from shardplane.planner import ledger
from shardplane.projector.service import REASON_HEADER
from tests.kit import eventually
from tests.projector.helpers import FAST, assignment, instance, projector

CHECKING = dataclasses.replace(FAST, verify_generations=True, max_defers=4, defer_delay_s=0.1)


async def test_only_the_ledgers_generation_reaches_the_kv(nats_url: str, nc: Client) -> None:
    js = nc.jetstream()
    await provision(js)
    kv = await js.key_value(LEDGER)
    doc, revision = await ledger.read(kv)
    entry = ledger.LedgerEntry(
        generation=2, model="llama-3.1-8b", fingerprint="f", devices={}, nodes=("rig-a",),
        plan_key="p2",
    )  # fmt: skip
    await ledger.commit(kv, ledger.LedgerDoc(instances={**doc.instances, "auth": entry}), revision)
    letters: list[Msg] = []

    async def on_letter(msg: Msg) -> None:
        letters.append(msg)

    await nc.subscribe(f"{subjects.DEADLETTER}.>", cb=on_letter)
    async with projector(nats_url, CHECKING):
        good = assignment("auth", 2, "rig-a", 0, 1, plan_key="p2")
        await js.publish(subjects.assigned("rig-a"), codec.encode(good))
        await eventually(
            lambda: instance(nc, "auth"), lambda s: s is not None and s.generation == 2
        )
        forged = msgspec.structs.replace(good, plan_key="guess", layer_end=99)
        ahead = assignment("auth", 9, "rig-a", 0, 1, plan_key="p2")
        await js.publish(subjects.assigned("rig-a"), codec.encode(forged))
        await js.publish(subjects.assigned("rig-a"), codec.encode(ahead))
        await eventually(lambda: len(letters), lambda n: n >= 2, timeout=20, what="2 dead letters")
        reasons = sorted((m.headers or {}).get(REASON_HEADER, "") for m in letters)
        assert "not the ledger's" in reasons[0] or "not the ledger's" in reasons[1], reasons
        assert any("only at generation 2" in r for r in reasons), reasons
        state = await instance(nc, "auth")
        assert state is not None and state.generation == 2
        assert state.stages[0].layer_end == good.layer_end
