"""Partitioned projectors over a real nats-server: the server's partition() transform and our
hash agree, each partition writes exactly its share of the device and node keys, all of them
together write every key, and a partition never judges another's liveness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import cluster_state, provision
from shardplane.projector import partition as partitions
from shardplane.projector.partition import Partition, partition_of
from tests.projector.helpers import FAST, heartbeat, running, sample

NODES = [f"node-{i:03d}" for i in range(24)]


@contextlib.asynccontextmanager
async def partition_running(
    url: str, part: Partition, **config: float
) -> AsyncGenerator[None, None]:
    async with running(url, dataclasses.replace(FAST, **config), part):
        yield


async def publish_fleet(js: JetStreamContext, seq: int) -> None:
    for node in NODES:
        await js.publish(subjects.node_heartbeat(node), codec.encode(heartbeat(node, seq)))
        for index in range(2):
            data = codec.encode(sample(node, index, seq))
            await js.publish(subjects.gpu_sample(node, index), data)


async def present(js: JetStreamContext) -> set[str]:
    kv = await cluster_state(js)
    try:
        return {k for k in await kv.keys() if k.startswith(("devices.", "nodes."))}
    except Exception:  # no keys yet
        return set()


def keys_of(nodes: list[str]) -> set[str]:
    out = {keys.node_key(n) for n in nodes}
    return out | {keys.device_key(n, i) for n in nodes for i in range(2)}


async def wait_keys(js: JetStreamContext, want: set[str], timeout: float = 30.0) -> set[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while (have := await present(js)) != want:
        if asyncio.get_running_loop().time() > deadline:
            missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
            raise AssertionError(f"missing {missing}, unexpected {extra}")
        await asyncio.sleep(0.2)
    return have


def test_partition_spec() -> None:
    assert Partition.original_subject("tpart.1.telemetry.gpu.a.0") == "telemetry.gpu.a.0"
    assert Partition.original_subject("shard.status.a.x") == "shard.status.a.x"
    p = Partition(1, 2)
    assert p.owns(keys.device_key("x", 3)) == (partition_of("x", 2) == 1)
    assert p.owns(keys.node_key("x")) == (partition_of("x", 2) == 1)
    assert not p.owns(keys.instance_key("i")) and Partition(0, 2).owns("instances.i")
    assert set(Partition(0, 2).consumers()) == {"TELEMETRY_P2", "PLACEMENTS", "SHARDS"}
    assert set(p.consumers()) == {"TELEMETRY_P2"}
    with pytest.raises(ValueError, match="partition 2 of 2"):
        Partition(2, 2)


async def test_our_hash_is_the_servers(nc: Client, js: JetStreamContext) -> None:
    await provision(js)
    await partitions.provision(nc, 3)
    await partitions.provision(nc, 3)  # idempotent
    await publish_fleet(js, 1)
    sub = await js.pull_subscribe("tpart.>", stream=partitions.stream_name(3))
    seen: dict[str, int] = {}
    while len(seen) < len(NODES):
        for msg in await sub.fetch(200, timeout=10.0):
            tokens = msg.subject.split(".")
            seen[tokens[4]] = int(tokens[1])
    assert seen == {n: partition_of(n, 3) for n in NODES}
    assert len(set(seen.values())) == 3  # 24 nodes do fall into all three


async def test_each_partition_writes_its_share_and_together_all(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    await provision(js)
    await partitions.provision(nc, 2)
    await publish_fleet(js, 1)
    mine = [n for n in NODES if partition_of(n, 2) == 0]
    assert 0 < len(mine) < len(NODES)
    async with partition_running(nats_url, Partition(0, 2)):
        await wait_keys(js, keys_of(mine))
        await asyncio.sleep(1.0)  # anything of partition 1 would show by now
        assert await present(js) == keys_of(mine)
        async with partition_running(nats_url, Partition(1, 2)):
            await wait_keys(js, keys_of(NODES))
            await publish_fleet(js, 2)
            kv = await cluster_state(js)

            async def all_at_seq_2() -> bool:
                for node in NODES:
                    entry = await kv.get(keys.device_key(node, 1))
                    if codec.decode(DeviceState, entry.value or b"").sample.seq != 2:
                        return False
                return True

            for _ in range(150):
                if await all_at_seq_2():
                    break
                await asyncio.sleep(0.2)
            assert await all_at_seq_2()


async def test_a_partition_leaves_other_partitions_liveness_alone(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    """Partition 1's devices went silent while only partition 0 runs, with a short TTL and full
    sweeps: partition 0 marks none of them offline (that is partition 1's judgement)."""
    await provision(js)
    await partitions.provision(nc, 2)
    await publish_fleet(js, 1)
    async with partition_running(nats_url, Partition(1, 2)):
        await wait_keys(js, keys_of([n for n in NODES if partition_of(n, 2) == 1]))
    kv = await cluster_state(js)
    theirs = sorted(keys_of([n for n in NODES if partition_of(n, 2) == 1]))
    before = {k: (await kv.get(k)).revision for k in theirs}
    async with partition_running(
        nats_url, Partition(0, 2), ttl_s=0.5, full_sweep_interval_s=0.3, sweep_interval_s=0.1
    ):
        await asyncio.sleep(3.0)
    after: dict[str, int] = {}
    for k in theirs:
        try:
            entry = await kv.get(k)
            assert entry.revision is not None
            after[k] = entry.revision
        except KeyNotFoundError:
            after[k] = -1
    assert after == before


def test_the_command_takes_a_partition() -> None:
    from shardplane.cli import parse_args

    assert parse_args(["projector", "--partition", "1/2"]).partition == (1, 2)
    assert parse_args(["projector"]).partition is None
    with pytest.raises(SystemExit):
        parse_args(["projector", "--partition", "2/2"])
