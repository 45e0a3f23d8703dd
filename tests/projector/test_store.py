"""The projector's KV writer on a real server, in both shapes: atomic batches (nats-server
2.12+) and one PubAck per write. Each must record the revision the server gave every key, and
a key someone else wrote in between must come back as a conflict, never be overwritten."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, keys
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import cluster_state
from shardplane.projector.reducer import Value
from shardplane.projector.store import Store
from tests.projector.helpers import sample


def _supports_atomic_batches(nc: Client) -> bool:
    version = nc.connected_server_version
    return (version.major, version.minor) >= (2, 12)


def _states(nodes: int, seq: int) -> dict[str, Value]:
    return {
        keys.device_key(f"n{i}", 0): DeviceState(
            sample=sample(f"n{i}", 0, seq), online=True, last_seen=time.time()
        )
        for i in range(nodes)
    }


@pytest.mark.parametrize("batches", [True, False], ids=["atomic-batches", "one-ack-each"])
async def test_writes_record_the_servers_revisions_and_detect_conflicts(
    nc: Client, js: JetStreamContext, batches: bool
) -> None:
    store = Store(nc, js, timeout_s=5.0, batches=batches)
    await store.load()
    assert store.batches == (batches and _supports_atomic_batches(nc))

    # 2,500 keys: three batches, the last one partial.
    first = _states(2500, seq=1)
    result = await store.write(first)
    assert (result.written, result.conflicts) == (2500, [])
    kv = await cluster_state(js)
    for key in [*list(first)[::97], next(reversed(first))]:
        entry = await kv.get(key)
        assert store.cache.revision(key) == entry.revision, key
        assert codec.decode(DeviceState, entry.value or b"") == first[key]

    # Someone else writes one key of the middle batch: that key conflicts, every other key
    # of every batch is stored, and the other writer's value survives.
    intruder_key = keys.device_key("n1500", 0)
    intruder = DeviceState(sample=sample("n1500", 0, 99), online=True, last_seen=time.time())
    await kv.update(intruder_key, codec.encode(intruder), last=store.cache.revision(intruder_key))
    second = _states(2500, seq=2)
    result = await store.write(second)
    assert result.conflicts == [intruder_key]
    assert result.written == 2499
    entry = await kv.get(intruder_key)
    assert codec.decode(DeviceState, entry.value or b"") == intruder
    if store.batches:
        assert store.batch_fallbacks == 1  # only the batch holding the conflict was re-sent
    for key in (keys.device_key("n0", 0), keys.device_key("n1499", 0)):
        entry = await kv.get(key)
        assert store.cache.revision(key) == entry.revision
        assert codec.decode(DeviceState, entry.value or b"") == second[key]

    # After a refresh the conflicting key writes cleanly on top of the intruder's revision.
    await store.refresh(result.conflicts)
    result = await store.write({intruder_key: second[intruder_key]})
    assert (result.written, result.conflicts) == (1, [])
