"""Bus plumbing for the worker tests: publish assignments, watch statuses, run workers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from shardplane.agents.loader import StageSpec, stage_bytes
from shardplane.agents.worker import Worker
from shardplane.bus import codec, subjects
from shardplane.bus.messages import DeviceSample, ShardAssignment, ShardStatus
from shardplane.bus.streams import LEDGER, provision
from shardplane.planner import ledger
from tests.kit import eventually

_ids = itertools.count()


async def authorize(js: JetStreamContext, assignment: ShardAssignment) -> None:
    """Commit ``assignment``'s generation and plan in the planner's ledger, as a planner does
    before it publishes (for workers that check generations: run_agents' workers)."""
    await provision(js)
    kv = await js.key_value(LEDGER)
    doc, revision = await ledger.read(kv)
    instances = dict(doc.instances)
    instances[assignment.instance_id] = ledger.LedgerEntry(
        generation=assignment.generation,
        model=assignment.model,
        fingerprint="by-hand",
        devices={},
        nodes=(assignment.node,),
        plan_key=assignment.plan_key,
    )
    await ledger.commit(kv, ledger.LedgerDoc(instances=instances), revision)


async def assign(js: JetStreamContext, assignment: ShardAssignment) -> None:
    await js.publish(
        subjects.assigned(assignment.node),
        codec.encode(assignment),
        headers={"Nats-Msg-Id": f"test-{next(_ids)}"},
    )


def stage(
    root: Path,
    instance: str,
    generation: int,
    node: str,
    index: int,
    count: int,
    start: int,
    end: int,
    layers: int,
    *,
    device: int = 0,
) -> ShardAssignment:
    """A ShardAssignment for an hf: checkpoint with weight_bytes computed from its headers, the
    way the planner does."""
    spec = StageSpec(start, end, embeddings=start == 0, head=end == layers)
    return ShardAssignment(
        instance_id=instance,
        generation=generation,
        node=node,
        model=f"hf:{root}",
        stage=index,
        stage_count=count,
        device=f"{node}/{device}",
        layer_start=start,
        layer_end=end,
        layers_total=layers,
        weight_bytes=stage_bytes(root, spec),
        embeddings=spec.embeddings,
        head=spec.head,
    )


class StatusLog:
    """Every ShardStatus on the bus from subscription on, in arrival order."""

    def __init__(self) -> None:
        self.items: list[ShardStatus] = []
        self._sub: Subscription | None = None

    async def start(self, nc: Client) -> StatusLog:
        async def on(msg: Msg) -> None:
            self.items.append(codec.decode(ShardStatus, msg.data))

        self._sub = await nc.subscribe(f"{subjects.SHARD_STATUS}.>", cb=on)
        return self

    def of(self, instance: str, generation: int | None = None) -> list[ShardStatus]:
        return [
            s
            for s in self.items
            if s.instance_id == instance and (generation is None or s.generation == generation)
        ]

    def latest(self, instance: str, generation: int) -> dict[int, ShardStatus]:
        out: dict[int, ShardStatus] = {}
        for s in self.of(instance, generation):
            out[s.stage] = s
        return out

    async def wait(
        self, what: str, predicate: Callable[[StatusLog], bool], timeout: float = 20.0
    ) -> None:
        def holds() -> None:
            if not predicate(self):
                tail = "\n".join(repr(s) for s in self.items[-12:])
                raise AssertionError(f"last statuses:\n{tail}")

        await eventually(holds, timeout=timeout, what=what)

    async def settled(
        self,
        instance: str,
        generation: int,
        stages: int,
        states: tuple[str, ...] = ("loaded",),
        timeout: float = 20.0,
    ) -> dict[int, ShardStatus]:
        def done(log: StatusLog) -> bool:
            latest = log.latest(instance, generation)
            return len(latest) == stages and all(
                s.state in (*states, "failed") for s in latest.values()
            )

        await self.wait(f"{instance} generation {generation} to settle", done, timeout)
        return self.latest(instance, generation)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


@contextlib.asynccontextmanager
async def workers(
    nc: Client, nodes: list[str], **options: object
) -> AsyncGenerator[dict[str, Worker], None]:
    """Run one Worker per node on ``nc``; stop them all on exit."""
    stop = asyncio.Event()
    # Assignments by hand, without a planner's ledger: no generation check unless asked for.
    options.setdefault("verify_generations", False)
    running = {n: Worker(nc, node=n, use_cuda=False, **options) for n in nodes}  # type: ignore[arg-type]
    tasks = [asyncio.create_task(w.run(stop)) for w in running.values()]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)


async def until_sample_after(
    samples: list[DeviceSample], ts: float, timeout: float = 10.0
) -> DeviceSample:
    """The first sample (in arrival order) taken after ``ts``, once it has arrived."""

    def late() -> DeviceSample:
        found = next((s for s in samples if s.ts > ts), None)
        assert found is not None, f"latest taken at {samples[-1].ts if samples else None}"
        return found

    return await eventually(late, timeout=timeout, what=f"a sample taken after {ts}")


def assert_interval_kept(
    samples: list[DeviceSample], started: float, ended: float, interval: float
) -> None:
    """Judged at the source, from the samples' own ``ts`` and ``seq`` (seq counts the sampling
    loop's turns, ts is when each turn read): a blocked loop shows as a ts jump between
    consecutive seqs and as too little seq advance over the window. Arrival times would also
    count server and ack stalls, and a sample dropped on the way leaves only a seq gap."""
    by_seq = {s.seq: s for s in samples if started <= s.ts <= ended}  # a retried publish: once
    during = [by_seq[q] for q in sorted(by_seq)]
    taken = during[-1].seq - during[0].seq + 1 if during else 0
    assert taken >= (ended - started) / interval * 0.5, (taken, len(during), ended - started)
    steps = [(b.ts - a.ts) / (b.seq - a.seq) for a, b in itertools.pairwise(during)]
    assert max(steps) < 0.5, max(steps)
