"""Telemetry acknowledged by position (projector.cursor): one ack per round and consumer, a gap in
the deliveries stops the acks, and a leadership starts by rewinding a consumer that has anything
unacknowledged (a crashed leader's deliveries, a consumer made by an older version that acked
each message) to its ack floor, over a real nats-server."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shardplane.bus import codec, subjects
from shardplane.bus.streams import PLACEMENTS, TELEMETRY, provision
from shardplane.projector import cursor
from shardplane.projector.decode import AckInfo
from shardplane.projector.feed import ensure_consumer
from shardplane.projector.rounds import Item
from shardplane.projector.service import ProjectorConfig
from tests.kit import sample

DURABLE = "cursor_test"


def item(stream: str, consumer: str, seq: int) -> Item:
    msg = Msg(None, subject="s", reply=f"r.{stream}.{seq}")  # pyright: ignore[reportArgumentType]
    return Item(msg, AckInfo(stream, consumer, 1, seq, 0.0, seq), None)


def test_one_ack_per_cumulative_consumer_and_one_per_message_elsewhere() -> None:
    items = [
        item(TELEMETRY, "t", 1),
        item(PLACEMENTS, "p", 1),
        item(TELEMETRY, "t", 2),
        item("TELEMETRY_P2", "p0", 7),
        item(PLACEMENTS, "p", 2),
        item(TELEMETRY, "t", 3),
    ]
    acked = [m.reply for m in cursor.to_ack(items)]
    assert acked == [
        f"r.{PLACEMENTS}.1",
        f"r.{PLACEMENTS}.2",
        f"r.{TELEMETRY}.3",
        "r.TELEMETRY_P2.7",
    ]
    assert cursor.ack_policy(TELEMETRY) == AckPolicy.ALL
    assert cursor.ack_policy("TELEMETRY_P4") == AckPolicy.ALL
    assert cursor.ack_policy(PLACEMENTS) == AckPolicy.EXPLICIT


def test_a_gap_in_the_deliveries_is_refused() -> None:
    deliveries = cursor.Deliveries()
    deliveries.start(TELEMETRY, "t", 10)
    deliveries.check([item(TELEMETRY, "t", 11), item(TELEMETRY, "t", 12), item(PLACEMENTS, "p", 5)])
    with pytest.raises(cursor.DeliveryGap, match="delivery 15 came where 13 was next"):
        deliveries.check([item(TELEMETRY, "t", 15)])


async def publish(js: JetStreamContext, count: int) -> list[int]:
    seqs: list[int] = []
    for i in range(count):
        ack = await js.publish(subjects.gpu_sample("cur", i), codec.encode(sample("cur", i, 1)))
        seqs.append(ack.seq)
    return seqs


async def pull(js: JetStreamContext, count: int) -> list[Msg]:
    sub = await js.pull_subscribe_bind(durable=DURABLE, stream=TELEMETRY)
    try:
        got: list[Msg] = []
        while len(got) < count:
            got += await sub.fetch(count - len(got), timeout=5)
        return got
    finally:
        await sub.unsubscribe()


async def test_unacknowledged_deliveries_come_back_at_once(js: JetStreamContext) -> None:
    await provision(js)
    config = ProjectorConfig(ack_wait_s=60.0)  # only a rewind brings them back within the test
    assert await ensure_consumer(js, config, TELEMETRY, DURABLE) == 0
    seqs = await publish(js, 6)
    first = await pull(js, 6)
    # cumulative: the first two are done, the other four were lost (ack_sync: the server
    # answers once the consumer has taken the ack, so the info below already counts it)
    await first[1].ack_sync()
    info = await js.consumer_info(TELEMETRY, DURABLE)
    assert info.num_ack_pending == 4
    assert info.ack_floor is not None and info.ack_floor.stream_seq == seqs[1]

    assert await ensure_consumer(js, config, TELEMETRY, DURABLE) == 0  # rewound
    again = await pull(js, 4)
    assert [m.metadata.sequence.stream for m in again] == seqs[2:]
    await again[-1].ack_sync()
    info = await js.consumer_info(TELEMETRY, DURABLE)
    assert info.num_ack_pending == 0 and info.config.ack_policy == AckPolicy.ALL
    # nothing unacknowledged: kept as it is, and the next delivery must follow the last one
    assert await ensure_consumer(js, config, TELEMETRY, DURABLE) == 4


async def test_a_consumer_that_acked_each_message_is_recreated_at_its_floor(
    js: JetStreamContext,
) -> None:
    await provision(js)
    seqs = await publish(js, 3)
    await js.add_consumer(
        TELEMETRY,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=seqs[0],
        ),
    )
    old = await pull(js, 3)
    await old[0].ack_sync()
    await ensure_consumer(js, ProjectorConfig(), TELEMETRY, DURABLE)
    info = await js.consumer_info(TELEMETRY, DURABLE)
    assert info.config.ack_policy == AckPolicy.ALL
    assert [m.metadata.sequence.stream for m in await pull(js, 2)] == seqs[1:]
    # a later change of an editable field keeps where the rewound consumer starts
    await ensure_consumer(js, ProjectorConfig(ack_wait_s=33.0), TELEMETRY, DURABLE)
    info = await js.consumer_info(TELEMETRY, DURABLE)
    assert info.config.ack_wait == 33.0 and info.config.opt_start_seq == seqs[1]
