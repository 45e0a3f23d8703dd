"""The projector end to end on a real NATS server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar, cast

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import DeviceState, NodeState
from shardplane.bus.streams import DEADLETTER
from shardplane.projector.service import CONSUMERS, REASON_HEADER, SOURCE_SUBJECT_HEADER
from shardplane.projector.store import KV_PREFIX, KV_STREAM
from tests.kit import eventually
from tests.projector.helpers import (
    FAST,
    assignment,
    device,
    heartbeat,
    instance,
    node_state,
    projector,
    sample,
    status,
)

T = TypeVar("T", DeviceState, NodeState)


async def test_samples_heartbeats_assignments_and_statuses_reach_the_kv(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    async with projector(nats_url):
        for seq in range(5):
            await js.publish(subjects.gpu_sample("rig-a", 0), codec.encode(sample("rig-a", 0, seq)))
        await js.publish(subjects.node_heartbeat("rig-a"), codec.encode(heartbeat("rig-a", 1)))
        state = await eventually(
            lambda: device(nc, "rig-a", 0), lambda s: s is not None and s.sample.seq == 4
        )
        assert state is not None and state.online
        node = await eventually(lambda: node_state(nc, "rig-a"), lambda s: s is not None)
        assert node is not None and node.online

        # Status first (SHARDS and PLACEMENTS are separate streams): deferred, then applied.
        await js.publish(
            subjects.shard_status("rig-a", "inst"),
            codec.encode(status("inst", 1, "rig-a", 0, "loaded", 1)),
        )
        for stage, node_id in enumerate(("rig-a", "rig-b")):
            await js.publish(
                subjects.assigned(node_id), codec.encode(assignment("inst", 1, node_id, stage, 2))
            )
        inst = await eventually(
            lambda: instance(nc, "inst"), lambda s: s is not None and s.stages[0].state == "loaded"
        )
        assert inst is not None and inst.state == "loading"
        await js.publish(
            subjects.shard_status("rig-b", "inst"),
            codec.encode(status("inst", 1, "rig-b", 1, "loaded", 1)),
        )
        inst = await eventually(
            lambda: instance(nc, "inst"), lambda s: s is not None and s.state == "loaded"
        )


async def _dead_letters(js: JetStreamContext) -> list[tuple[str, dict[str, str], bytes]]:
    out: list[tuple[str, dict[str, str], bytes]] = []
    info = await js.stream_info(DEADLETTER)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(DEADLETTER, seq)
        headers = cast("dict[str, str]", msg.headers or {})
        out.append((msg.subject or "", dict(headers), msg.data or b""))
    return out


async def test_garbage_on_every_subject_is_dead_lettered_and_valid_traffic_flows(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    bad_sample = msgspec.msgpack.encode(
        {"node": "rig-a", "index": 0, "uuid": "", "seq": -1, "ts": 1}
    )
    poison: list[tuple[str, bytes, str]] = [
        (subjects.gpu_sample("rig-a", 0), b"\xc1\xff not msgpack", "invalid payload"),
        (subjects.gpu_sample("rig-a", 0), bad_sample, "invalid payload"),
        (subjects.gpu_sample("rig-a", 0), b"", "empty payload"),
        (subjects.gpu_sample("rig-a", 0), codec.encode(sample("rig-b", 0, 1)), "subject names"),
        (subjects.node_heartbeat("rig-a"), b"{}", "invalid payload"),
        (
            subjects.node_heartbeat("rig-a"),
            msgspec.msgpack.encode({"node": "rig-a"}),
            "invalid payload",
        ),
        ("telemetry.gpu.rig-a", codec.encode(sample("rig-a", 0, 1)), "unexpected subject"),
        (subjects.assigned("rig-a"), b"\x00", "invalid payload"),
        (
            subjects.assigned("rig-a"),
            codec.encode(assignment("inst", 1, "rig-a", 3, 2)),
            "out of range",
        ),
        (
            subjects.shard_status("rig-a", "inst"),
            msgspec.msgpack.encode([1, 2, 3]),
            "invalid payload",
        ),
        (
            subjects.shard_status("rig-a", "inst"),
            msgspec.msgpack.encode({"instance_id": "inst", "generation": 0}),
            "invalid payload",
        ),
    ]
    # Statuses that cannot be applied are retried a few times, then dead-lettered.
    config = dataclasses.replace(FAST, max_defers=3, defer_delay_s=0.1)
    async with projector(nats_url, config) as runner:
        for seq, (subject, data, _) in enumerate(poison):
            await js.publish(subjects.gpu_sample("rig-a", 1), codec.encode(sample("rig-a", 1, seq)))
            await js.publish(subject, data)
        await js.publish(
            subjects.assigned("rig-a"), codec.encode(assignment("inst", 1, "rig-a", 0, 1))
        )
        # A status from a node the stage is not assigned to (and no release for it comes).
        await js.publish(
            subjects.shard_status("rig-z", "inst"),
            codec.encode(status("inst", 1, "rig-z", 0, "loaded", 1)),
        )
        await js.publish(
            subjects.shard_status("rig-a", "inst"),
            codec.encode(status("inst", 1, "rig-a", 0, "loaded", 1)),
        )
        await js.publish(subjects.gpu_sample("rig-a", 1), codec.encode(sample("rig-a", 1, 99)))

        await eventually(
            lambda: device(nc, "rig-a", 1), lambda s: s is not None and s.sample.seq == 99
        )
        inst = await eventually(
            lambda: instance(nc, "inst"), lambda s: s is not None and s.state == "loaded"
        )
        assert inst is not None
        letters = await eventually(lambda: _dead_letters(js), lambda d: len(d) == len(poison) + 1)
        assert runner.stats.deadlettered == len(poison) + 1

    expected = [(f"deadletter.{s}", data, why) for s, data, why in poison]
    expected.append(
        (f"deadletter.{subjects.shard_status('rig-z', 'inst')}", b"", "assigned to rig-a")
    )
    # Streams are consumed independently, so match letters to poison regardless of order.
    remaining = list(letters)
    for want_subject, want_data, why in expected:
        match = next(
            (
                letter
                for letter in remaining
                if letter[0] == want_subject
                and why in letter[1][REASON_HEADER]
                and (not want_data or letter[2] == want_data)
            ),
            None,
        )
        assert match is not None, (want_subject, why, remaining)
        assert match[1][SOURCE_SUBJECT_HEADER] == want_subject.removeprefix("deadletter.")
        remaining.remove(match)
    # Terminated, not waiting for redelivery: nothing is left pending on any consumer.
    for stream, durable in CONSUMERS.items():
        info = await js.consumer_info(stream, durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0, (stream, info)


@dataclasses.dataclass(frozen=True, slots=True)
class _Beat:
    seq: int
    heartbeat: PubAck  # where the stream stored each of the beat's two messages
    sample: PubAck


@contextlib.asynccontextmanager
async def _beating(
    js: JetStreamContext, node: str, first_seq: int, interval_s: float, period_s: float = 0.3
) -> AsyncGenerator[list[_Beat], None]:
    """A node's agent: a heartbeat (announcing ``interval_s``) and a sample of device 0 every
    ``period_s`` until the block ends. A beat under way when it ends is finished first, so
    the last beat in the list is the last one published (the silence starts there)."""
    beats: list[_Beat] = []
    done = asyncio.Event()

    async def loop() -> None:
        seq = first_seq
        while not done.is_set():
            hb = await js.publish(
                subjects.node_heartbeat(node),
                codec.encode(heartbeat(node, seq, interval_s=interval_s)),
            )
            sa = await js.publish(subjects.gpu_sample(node, 0), codec.encode(sample(node, 0, seq)))
            beats.append(_Beat(seq, hb, sa))
            seq += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), period_s)

    task = asyncio.create_task(loop())
    try:
        yield beats
    finally:
        done.set()
        await task


async def _stored_at(js: JetStreamContext, ack: PubAck) -> datetime.datetime:
    """When the server stored a published message (its clock, like the KV's timestamps)."""
    stored = (await js.get_msg(ack.stream, ack.seq)).time
    assert stored is not None
    return stored


async def test_a_silent_node_goes_offline_within_ttl_plus_an_interval_and_comes_back(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    interval = 0.4  # TTL defaults to 3 intervals: 1.2 s
    device_key, node_key = keys.device_key("quiet", 0), keys.node_key("quiet")

    # Every value the projector stores, with the server's time of storing it: how long the
    # silence took to show is measured on the server's clock, from the last beat stored to
    # the offline value stored, so the test's own polling is not charged to the projector.
    stored: list[tuple[str, datetime.datetime, bytes]] = []

    async def on_entry(msg: Msg) -> None:
        stored.append((msg.subject.removeprefix(KV_PREFIX), msg.metadata.timestamp, msg.data))

    watch = await js.subscribe(
        f"{KV_PREFIX}>", stream=KV_STREAM, cb=on_entry, ordered_consumer=True
    )

    def first_offline(
        key: str, kind: type[T], seq_of: Callable[[T], int], seq: int
    ) -> tuple[datetime.datetime, T] | None:
        """The first value of ``key`` stored offline after the beat ``seq``, and when."""
        for got, when, data in stored:
            if got == key:
                value = msgspec.msgpack.decode(data, type=kind)
                if seq_of(value) == seq and not value.online:
                    return when, value
        return None

    async with projector(nats_url):
        # Beat until the node and its device are seen online, then fall silent.
        async with _beating(js, "quiet", 0, interval) as beats:
            state = await eventually(
                lambda: device(nc, "quiet", 0), lambda s: s is not None and s.online, timeout=10
            )
            await eventually(
                lambda: node_state(nc, "quiet"), lambda s: s is not None and s.online, timeout=10
            )
        last = beats[-1]
        node_off = await eventually(
            lambda: asyncio.sleep(
                0, first_offline(node_key, NodeState, lambda n: n.heartbeat.seq, last.seq)
            ),
            lambda found: found is not None,
            timeout=10,
        )
        device_off = await eventually(
            lambda: asyncio.sleep(
                0, first_offline(device_key, DeviceState, lambda d: d.sample.seq, last.seq)
            ),
            lambda found: found is not None,
            timeout=10,
        )
        assert node_off is not None and device_off is not None
        (node_at, node), (gone_at, gone) = node_off, device_off
        node_took = (node_at - await _stored_at(js, last.heartbeat)).total_seconds()
        gone_took = (gone_at - await _stored_at(js, last.sample)).total_seconds()
        # The requirement: offline within the TTL plus one interval of the last beat.
        bound = 3 * interval + interval + 0.3
        assert node_took <= bound and gone_took <= bound, (
            f"offline {node_took:.2f} s (node) and {gone_took:.2f} s (device) after the last "
            f"beat; the bound is {bound:.2f} s"
        )
        assert node.offline_reason == "no heartbeat for 1.2s"
        assert gone.offline_reason == "no telemetry for 1.2s"
        assert state is not None and gone.last_seen >= state.last_seen

        # It comes back. From here on the agent announces a 5 s interval (TTL 15 s), so
        # nothing below can go offline for silence: only the graceful shutdown can do it.
        async with _beating(js, "quiet", last.seq + 10, 5.0) as beats:
            back = await eventually(
                lambda: device(nc, "quiet", 0), lambda s: s is not None and s.online, timeout=10
            )
            await eventually(
                lambda: node_state(nc, "quiet"), lambda s: s is not None and s.online, timeout=10
            )
        assert back is not None and back.sample.seq >= last.seq + 10

        # A graceful shutdown: node and devices offline at once, no TTL wait.
        await js.publish(
            subjects.node_heartbeat("quiet"),
            codec.encode(heartbeat("quiet", beats[-1].seq + 1, interval_s=5.0, online=False)),
        )
        gone = await eventually(
            lambda: device(nc, "quiet", 0), lambda s: s is not None and not s.online, timeout=10
        )
        assert gone is not None and gone.offline_reason == "node shut down"
    await watch.unsubscribe()
