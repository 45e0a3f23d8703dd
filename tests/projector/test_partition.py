"""Partitioned projectors over a real nats-server: the server's partition() transform and our
hash agree, each partition writes exactly its share of the device and node keys, all of them
together write every key, and a partition never judges another's liveness."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from shardplane.bus import codec, keys, kvfeed, subjects
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import CLUSTER_STATE, TELEMETRY, cluster_state, provision
from shardplane.natsserver import NatsServer, free_port
from shardplane.projector import partition as partitions
from shardplane.projector.partition import Partition, partition_of
from tests import kit
from tests.kit import eventually
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
    try:
        values = await kvfeed.snapshot(js, CLUSTER_STATE)
    except Exception:  # no bucket yet
        return set()
    return {k for k in values if k.startswith(("devices.", "nodes."))}


def keys_of(nodes: list[str]) -> set[str]:
    out = {keys.node_key(n) for n in nodes}
    return out | {keys.device_key(n, i) for n in nodes for i in range(2)}


async def wait_keys(js: JetStreamContext, want: set[str], timeout: float = 30.0) -> set[str]:
    async def exactly() -> set[str]:
        have = await present(js)
        missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
        assert have == want, f"missing {missing}, unexpected {extra}"
        return have

    return await eventually(exactly, timeout=timeout, what=f"exactly {len(want)} keys")


async def device_seq(nc: Client, node: str, index: int) -> int | None:
    """The seq of the sample the KV holds for ``node``'s device ``index`` (None: no value)."""
    state = await kit.kv_value(nc, DeviceState, keys.device_key(node, index))
    return None if state is None else state.sample.seq


def test_partition_spec() -> None:
    assert Partition.original_subject("tpart.1.telemetry.gpu.a.0") == "telemetry.gpu.a.0"
    assert Partition.original_subject("shard.status.a.x") == "shard.status.a.x"
    p = Partition(1, 2)
    assert p.owns(keys.device_key("x", 3)) == (partition_of("x", 2) == 1)
    assert p.owns(keys.node_key("x")) == (partition_of("x", 2) == 1)
    assert not p.owns(keys.instance_key("i")) and Partition(0, 2).owns("instances.i")
    assert set(Partition(0, 2).consumers()) == {
        "TELEMETRY_P2",
        "TELEMETRY_P2_NODES",
        "PLACEMENTS",
        "SHARDS",
    }
    assert p.consumers() == {
        "TELEMETRY_P2": ("projector_p1_of_2", "tpart.1.>"),
        "TELEMETRY_P2_NODES": ("projector_p1_of_2_nodes", "tpart.1.>"),
    }
    with pytest.raises(ValueError, match="partition 2 of 2"):
        Partition(2, 2)


async def mirrored(js: JetStreamContext, stream: str, want: int) -> list[Msg]:
    """The first ``want`` messages of a partitions' stream (the mirror copies them over)."""
    sub = await js.pull_subscribe("tpart.>", stream=stream)
    got: list[Msg] = []
    try:
        while len(got) < want:
            got += await sub.fetch(want - len(got), timeout=10.0)
    finally:
        await sub.unsubscribe()
    return got


async def test_our_hash_is_the_servers(nc: Client, js: JetStreamContext) -> None:
    await provision(js)
    await partitions.provision(nc, 3)
    await partitions.provision(nc, 3)  # idempotent
    await publish_fleet(js, 1)
    devices, nodes = partitions.stream_names(3)
    for stream, kind, want in ((devices, "gpu", 2 * len(NODES)), (nodes, "node", len(NODES))):
        seen: dict[str, int] = {}
        for msg in await mirrored(js, stream, want):
            tokens = msg.subject.split(".")
            assert tokens[3] == kind, msg.subject
            seen[tokens[4]] = int(tokens[1])
        assert seen == {n: partition_of(n, 3) for n in NODES}
        assert len(set(seen.values())) == 3  # 24 nodes do fall into all three


async def test_copies_keep_telemetrys_sequence_and_time(nc: Client, js: JetStreamContext) -> None:
    """The reducer judges liveness by stream time: a partition must see TELEMETRY's, as one
    projector does, however late the copy is made (here: the streams are created after the
    fleet published), and deliveries carry no header."""
    await provision(js)
    await publish_fleet(js, 1)
    published_by = datetime.now(UTC)  # every copy is made after this
    await partitions.provision(nc, 2)
    devices, nodes = partitions.stream_names(2)
    copies = [
        *await mirrored(js, devices, 2 * len(NODES)),
        *await mirrored(js, nodes, len(NODES)),
    ]
    for copy in copies:
        original = await js.get_msg(TELEMETRY, copy.metadata.sequence.stream)
        assert Partition.original_subject(copy.subject) == original.subject
        assert original.time is not None and copy.metadata.timestamp <= published_by
        # nats-py reads the two times from different formats (nanoseconds, RFC 3339)
        assert abs(copy.metadata.timestamp - original.time) < timedelta(milliseconds=1)
        assert not copy.headers, copy.headers


async def test_a_stream_of_the_sourced_layout_is_replaced(nc: Client, js: JetStreamContext) -> None:
    await provision(js)
    await publish_fleet(js, 1)
    old = {
        "name": partitions.stream_name(2),
        "storage": "file",
        "sources": [{"name": TELEMETRY, "subject_transforms": partitions.transforms(2)}],
    }
    reply = await nc.request(f"$JS.API.STREAM.CREATE.{old['name']}", json.dumps(old).encode())
    assert "error" not in json.loads(reply.data)
    await partitions.provision(nc, 2)
    info = await js.stream_info(partitions.stream_name(2))
    assert info.config.mirror is not None and not info.config.sources
    assert len(await mirrored(js, partitions.stream_name(2), 2 * len(NODES))) == 2 * len(NODES)


async def test_no_mirror_is_made_before_telemetry_is_there(nc: Client) -> None:
    """Its size (replicas) follows TELEMETRY's, and a mirror once made keeps its own."""
    with pytest.raises(partitions.PartitionError, match=TELEMETRY):
        await partitions.provision(nc, 2, telemetry_wait_s=0.6)
    reply = await nc.request(f"$JS.API.STREAM.INFO.{partitions.stream_name(2)}", b"")
    assert "error" in json.loads(reply.data)


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
        # The marker: a sample published after the whole fleet, written once partition 0 has
        # taken in everything before it; anything of partition 1 it took would show by then.
        marker = sample(mine[0], 0, 2)
        await js.publish(subjects.gpu_sample(mine[0], 0), codec.encode(marker))
        await eventually(lambda: device_seq(nc, mine[0], 0), lambda seq: seq == 2, what="marker")
        assert await present(js) == keys_of(mine)
        async with partition_running(nats_url, Partition(1, 2)):
            await wait_keys(js, keys_of(NODES))
            await publish_fleet(js, 2)

            async def seqs() -> list[int | None]:
                return [await device_seq(nc, node, 1) for node in NODES]

            await eventually(
                seqs, lambda got: got == [2] * len(NODES), timeout=30, what="every device at seq 2"
            )


async def test_a_partition_leaves_other_partitions_liveness_alone(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    """The whole fleet went silent while only partition 0 runs, with a short TTL and full
    sweeps: partition 0 marks its own devices offline (the marker that it swept) and none of
    partition 1's (that is partition 1's judgement)."""
    await provision(js)
    await partitions.provision(nc, 2)
    await publish_fleet(js, 1)
    async with partition_running(nats_url, Partition(1, 2)):
        await wait_keys(js, keys_of([n for n in NODES if partition_of(n, 2) == 1]))
    kv = await cluster_state(js)
    theirs = sorted(keys_of([n for n in NODES if partition_of(n, 2) == 1]))
    before = {k: (await kv.get(k)).revision for k in theirs}
    mine = [n for n in NODES if partition_of(n, 2) == 0]

    async def my_offline() -> list[bool]:
        states = [await kit.kv_value(nc, DeviceState, keys.device_key(n, 0)) for n in mine]
        return [s is not None and not s.online for s in states]

    async with partition_running(
        nats_url, Partition(0, 2), ttl_s=0.5, full_sweep_interval_s=0.3, sweep_interval_s=0.1
    ):
        await eventually(my_offline, all, timeout=30, what="partition 0's own devices offline")
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


async def test_partitions_ride_out_a_server_restart(tmp_path: Path) -> None:
    """The mirrors live on file like TELEMETRY: after a restart they go on copying from where
    they were (TELEMETRY's own sequences), each partition's consumer from its ack floor, and
    the fleet's next samples reach the KV through both partitions."""
    server = NatsServer(port=free_port(), store_dir=tmp_path / "store")
    await asyncio.to_thread(server.start)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()
    try:
        await provision(js)
        await partitions.provision(nc, 2)
        await publish_fleet(js, 1)
        async with (
            partition_running(server.url, Partition(0, 2)),
            partition_running(server.url, Partition(1, 2)),
        ):
            await wait_keys(js, keys_of(NODES))
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            await eventually(
                lambda: publish_fleet(js, 2), timeout=30, what="publishing after the restart"
            )

            async def seqs() -> list[int | None]:
                return [await device_seq(nc, node, i) for node in NODES for i in range(2)]

            await eventually(
                seqs, lambda got: got == [2] * 2 * len(NODES), timeout=60, what="seq 2 in KV"
            )
        devices, nodes = partitions.stream_names(2)
        last = (await js.stream_info(TELEMETRY)).state.last_seq
        # TELEMETRY's last message is the last node's last sample: the device mirror ends on it.
        assert (await js.stream_info(devices)).state.last_seq == last
        assert (await js.stream_info(nodes)).state.messages == 2 * len(NODES)
    finally:
        await nc.close()
        await asyncio.to_thread(server.cleanup)
