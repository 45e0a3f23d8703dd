"""agents.hopwire against the installed nats-py and a real server: the private attributes it
relies on are there and behave as it assumes (this is the test that fails loudly when a nats-py
upgrade changes them), and its request-reply keeps nats-py's semantics (right reply to the right
request, no responders, timeout)."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.agents import hopwire
from tests.kit import eventually


async def test_nats_py_internals_are_as_hopwire_assumes(nc: Client) -> None:
    sub = await nc.subscribe("hopwire.probe")
    assert hopwire.compatible(nc, sub)
    assert isinstance(nc._pending, list)  # pyright: ignore[reportPrivateUsage]
    assert isinstance(sub._pending_queue, asyncio.Queue)  # pyright: ignore[reportPrivateUsage]
    assert callable(getattr(nc._transport, "writelines", None))  # pyright: ignore[reportPrivateUsage]
    await sub.unsubscribe()


async def test_publish_writes_at_once_and_keeps_order(nc: Client, nats_url: str) -> None:
    other = await nats.connect(nats_url)
    try:
        sub = await other.subscribe("hopwire.order")
        await hopwire.settle(other)
        await nc.publish("hopwire.order", b"queued by nats-py")  # waits for the flusher
        await hopwire.publish(nc, "hopwire.order", b"written now")
        # Nothing is left for the flusher: both are on the socket, in order, with no yield.
        assert nc._pending == []  # pyright: ignore[reportPrivateUsage]
        assert nc._pending_data_size == 0  # pyright: ignore[reportPrivateUsage]
        first = await sub.next_msg(timeout=5)
        second = await sub.next_msg(timeout=5)
        assert (first.data, second.data) == (b"queued by nats-py", b"written now")
    finally:
        await other.close()


async def test_publish_refuses_what_nats_py_refuses(nc: Client) -> None:
    with pytest.raises(nats.errors.BadSubjectError):
        await hopwire.publish(nc, "bad subject\r\nPUB x 0", b"")
    with pytest.raises(nats.errors.MaxPayloadError):
        await hopwire.publish(nc, "hopwire.big", b"\0" * (nc.max_payload + 1))


async def test_settle_is_a_barrier_for_a_new_subscription(nats_url: str) -> None:
    """nats-py's flush alone is not (its PING overtakes the queued SUB); a request written at
    once right after it then finds no responder now and then. settle must never let that."""
    for i in range(30):
        asker, other = await nats.connect(nats_url), await nats.connect(nats_url)
        try:
            sub = await other.subscribe(f"hopwire.settle.{i}")
            await hopwire.settle(other)
            await hopwire.publish(asker, f"hopwire.settle.{i}", b"x")
            assert (await sub.next_msg(timeout=5)).data == b"x"
        finally:
            await asker.close()
            await other.close()


async def test_deliver_to_hands_messages_over_in_the_reader(nc: Client, nats_url: str) -> None:
    got: list[bytes] = []
    seen = asyncio.Event()

    def on_msg(msg: Msg) -> None:
        got.append(msg.data)
        if len(got) == 3:
            seen.set()

    sub, direct = await hopwire.deliver_to(nc, "hopwire.direct", on_msg)
    assert direct
    assert sub._wait_for_msgs_task is None  # pyright: ignore[reportPrivateUsage]  # no task of its own
    await nc.flush()
    other = await nats.connect(nats_url)
    try:
        for i in range(3):
            await other.publish("hopwire.direct", str(i).encode())
        await other.flush()
        await asyncio.wait_for(seen.wait(), 5)
    finally:
        await other.close()
    assert got == [b"0", b"1", b"2"]
    assert sub.pending_msgs == 0
    await sub.unsubscribe()


async def test_a_failing_handler_does_not_stop_the_reader(nc: Client, nats_url: str) -> None:
    got: list[bytes] = []

    def on_msg(msg: Msg) -> None:
        if msg.data == b"poison":
            raise ValueError("poison")
        got.append(msg.data)

    await hopwire.deliver_to(nc, "hopwire.poison", on_msg)
    other = await nats.connect(nats_url)
    try:
        for data in (b"poison", b"after"):
            await other.publish("hopwire.poison", data)
        await other.flush()
        await eventually(lambda: got, lambda g: g == [b"after"], timeout=5, what="the next one")
    finally:
        await other.close()
    await nc.flush(timeout=5)  # the connection's reader still reads (its PONG)


async def _echo(nc: Client, subject: str) -> None:
    async def answer(msg: Msg) -> None:
        await asyncio.sleep(0.01 * int(msg.data))  # the later request is answered first
        await nc.publish(msg.reply, b"re:" + msg.data)

    await nc.subscribe(subject, cb=answer)
    await hopwire.settle(nc)


async def test_inbox_pairs_each_reply_with_its_request(nc: Client, nats_url: str) -> None:
    responder = await nats.connect(nats_url)
    try:
        await _echo(responder, "hopwire.echo")
        box = hopwire.inbox(nc)
        assert hopwire.inbox(nc) is box  # one per connection
        replies = await asyncio.gather(
            *(box.request("hopwire.echo", str(n).encode(), timeout=5) for n in (5, 3, 1, 0))
        )
        assert [r.data for r in replies] == [b"re:5", b"re:3", b"re:1", b"re:0"]
        assert box._waiting == {}  # pyright: ignore[reportPrivateUsage]
    finally:
        await responder.close()


async def test_inbox_no_responders_and_timeout_as_nats_py(nc: Client, nats_url: str) -> None:
    box = hopwire.inbox(nc)
    with pytest.raises(nats.errors.NoRespondersError):
        await box.request("hopwire.nobody", b"x", timeout=5)
    silent = await nats.connect(nats_url)
    try:
        await silent.subscribe("hopwire.silent")  # takes the request, never answers
        await hopwire.settle(silent)
        started = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await box.request("hopwire.silent", b"x", timeout=0.3)
        assert 0.25 <= time.monotonic() - started < 5
    finally:
        await silent.close()
    assert box._waiting == {}  # pyright: ignore[reportPrivateUsage]


async def test_warmer_pings_once_just_before_the_expected_time(nc: Client) -> None:
    warmer = hopwire.Warmer(nc, lead_s=0.05)
    loop = asyncio.get_running_loop()
    expected = loop.time() + 0.3
    warmer.expect(expected)
    warmer.expect(expected)  # a new guess replaces the last: still one ping
    await asyncio.sleep(0.1)
    assert warmer.pings == 0  # not before its time
    await eventually(lambda: warmer.pings, lambda n: n > 0, timeout=5, what="the warm-up ping")
    assert warmer.pings == 1
    assert loop.time() >= expected - 0.05
    await asyncio.sleep(0.3)
    assert warmer.pings == 1


async def test_warmer_cancelled_or_late_guess_does_nothing(nc: Client) -> None:
    warmer = hopwire.Warmer(nc, lead_s=0.05)
    loop = asyncio.get_running_loop()
    warmer.expect(loop.time() + 0.1)
    warmer.cancel()
    warmer.expect(loop.time() + 0.01)  # within the lead already: too late to warm
    await asyncio.sleep(0.4)
    assert warmer.pings == 0
