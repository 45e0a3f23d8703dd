"""bus.kvfeed against a real server: the replay, live changes in order, deletes, stopping (and
its consumer going with it)."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from shardplane.bus import direct
from shardplane.bus.kvfeed import FeedEnded, Item, KvFeed, ReplayTimeout, Update, snapshot
from shardplane.bus.streams import kv_stream
from tests.kit import eventually

BUCKET = "feed_test"


async def _bucket(js: JetStreamContext) -> KeyValue:
    return await js.create_key_value(bucket=BUCKET, history=1)


async def _take(feed: KvFeed, count: int, timeout: float = 10.0) -> list[Item]:
    out: list[Item] = []
    while len(out) < count:
        assert await feed.ready(timeout), f"{len(out)} of {count} changes came within {timeout} s"
        while feed.pending() and len(out) < count:
            out.append(feed.take())
    return out


async def test_replay_is_the_newest_value_per_key_then_the_marker(js: JetStreamContext) -> None:
    kv = await _bucket(js)
    await kv.put("devices.a.0", b"old")
    await kv.put("devices.a.0", b"new")
    await kv.put("nodes.a", b"n")
    await kv.delete("nodes.a")
    await kv.put("devices.b.1", b"x")
    feed = await KvFeed.start(js, BUCKET)
    try:
        got = await _take(feed, 4)
        assert got[-1] is None, "every key's newest value, then the marker"
        by_key = {u.key: u for u in got if u is not None}
        assert by_key["devices.a.0"].value == b"new"
        assert by_key["nodes.a"].deleted and by_key["nodes.a"].value == b""
        assert by_key["devices.b.1"] == Update("devices.b.1", b"x", 5, False)
    finally:
        await feed.stop()


async def test_an_empty_bucket_is_synced_at_once(js: JetStreamContext) -> None:
    await _bucket(js)
    feed = await KvFeed.start(js, BUCKET)
    try:
        assert await _take(feed, 1) == [None]
        assert not await feed.ready(timeout=0.2), "nothing else came"
    finally:
        await feed.stop()


async def test_live_changes_arrive_in_order_from_the_reader(js: JetStreamContext) -> None:
    kv = await _bucket(js)
    feed = await KvFeed.start(js, BUCKET)
    try:
        assert await _take(feed, 1) == [None]
        sub = feed._sub  # pyright: ignore[reportPrivateUsage]
        assert sub is not None and direct.is_direct(getattr(sub, "_sub", sub))
        for i in range(2000):
            await kv.put(f"devices.n{i % 50}.0", str(i).encode())
        await kv.purge("devices.n0.0")
        got = await _take(feed, 2001)
        updates = [u for u in got if u is not None]
        assert [u.value for u in updates[:2000]] == [str(i).encode() for i in range(2000)]
        revisions = [u.revision for u in updates]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        assert updates[-1].key == "devices.n0.0" and updates[-1].deleted
    finally:
        await feed.stop()


async def test_a_stopped_feed_ends_its_reader_after_what_it_holds(js: JetStreamContext) -> None:
    kv = await _bucket(js)
    await kv.put("k", b"v")
    feed = await KvFeed.start(js, BUCKET)
    assert await feed.ready(10.0)
    await feed.stop()
    assert await feed.ready(0.1), "what came before the stop can still be taken"
    while feed.pending():
        feed.take()
    with pytest.raises(FeedEnded, match="feed_test"):
        await feed.ready(1.0)


async def test_a_snapshot_is_every_live_key_newest_value(js: JetStreamContext) -> None:
    kv = await _bucket(js)
    assert await snapshot(js, BUCKET) == {}, "an empty bucket is an empty snapshot, not an error"
    for i in range(600):
        await kv.put(f"devices.n{i % 200}.0", str(i).encode())
    for i in range(0, 200, 4):
        await kv.delete(f"devices.n{i}.0")
    for _ in range(5):  # the race nats-py's keys() loses comes and goes with the loop's timing
        got = await snapshot(js, BUCKET)
        expected = {f"devices.n{i}.0": str(400 + i).encode() for i in range(200) if i % 4}
        assert {k: u.value for k, u in got.items()} == expected


async def test_a_snapshot_gives_up_within_its_timeout_on_a_server_that_does_not_answer(
    nc: Client,
) -> None:
    """``status`` retries a snapshot that timed out; one that waited on each of the consumer's
    requests for the client's own JetStream timeout kept it ~30 s on a stuck server."""
    silent = await nc.subscribe("silent.api.>")  # takes the API requests, answers none
    js = nc.jetstream(prefix="silent.api", timeout=30.0)
    started = time.monotonic()
    with pytest.raises(ReplayTimeout, match=r"did not start within 0\.5 s"):
        await snapshot(js, BUCKET, timeout=0.5)
    assert time.monotonic() - started < 5.0
    await silent.unsubscribe()


async def test_a_finished_feed_leaves_no_consumer_behind(js: JetStreamContext) -> None:
    kv = await _bucket(js)
    for i in range(50):
        await kv.put(f"devices.n{i}.0", b"v")

    async def consumers() -> int:
        return (await js.stream_info(kv_stream(BUCKET))).state.consumer_count

    before = await consumers()
    for _ in range(5):  # as ``status`` polls
        assert len(await snapshot(js, BUCKET)) == 50
    feed = await KvFeed.start(js, BUCKET)
    assert await consumers() == before + 1, "the feed's own consumer, while it runs"
    await feed.stop()
    await feed.stop()  # a second stop (the guard's, then the watch's own) is harmless
    # The server would keep each one for INACTIVE_THRESHOLD_S (minutes), far past this wait.
    await eventually(consumers, lambda n: n == before, timeout=10.0, what="consumers deleted")
