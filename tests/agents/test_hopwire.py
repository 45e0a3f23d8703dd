"""agents.hopwire against the installed nats-py and a real server: the private attributes it
relies on are there and behave as it assumes (this is the test that fails loudly when a nats-py
upgrade changes them), and its request-reply keeps nats-py's semantics (right reply to the right
request, no responders, timeout), frees what it keeps per connection, and lets a stalled
server hold its publishers back instead of growing memory."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import weakref
from collections.abc import Callable

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shardplane.agents import hopwire
from shardplane.natsserver import NatsServer
from tests.kit import eventually


async def test_nats_py_internals_are_as_hopwire_assumes(nc: Client) -> None:
    sub = await nc.subscribe("hopwire.probe")
    assert hopwire.compatible(nc, sub)
    assert isinstance(nc._pending, list)  # pyright: ignore[reportPrivateUsage]
    assert isinstance(sub._pending_queue, asyncio.Queue)  # pyright: ignore[reportPrivateUsage]
    assert callable(getattr(nc._transport, "writelines", None))  # pyright: ignore[reportPrivateUsage]
    assert isinstance(hopwire.backlog(nc), int)  # the socket's buffer can be read: direct path
    assert hopwire.backlog_limit(nc) == nc._max_pending_size > 0  # pyright: ignore[reportPrivateUsage]
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


async def test_an_inbox_goes_with_its_connection(nats_url: str) -> None:
    responder = await nats.connect(nats_url)
    try:
        await _echo(responder, "hopwire.gone")
        asker = await nats.connect(nats_url)
        box = hopwire.inbox(asker)
        assert (await box.request("hopwire.gone", b"0", timeout=5)).data == b"re:0"
        box_ref, nc_ref = weakref.ref(box), weakref.ref(asker)
        await asker.close()
        del box, asker

        def collected() -> tuple[bool, bool]:
            gc.collect()
            return box_ref() is None, nc_ref() is None

        await eventually(collected, lambda c: c == (True, True), timeout=10, what="both freed")
    finally:
        await responder.close()


async def test_an_inbox_remembers_only_recent_subjects(nc: Client, nats_url: str) -> None:
    responder = await nats.connect(nats_url)
    try:

        async def answer(msg: Msg) -> None:
            await responder.publish(msg.reply, msg.data)

        await responder.subscribe("hopwire.many.*", cb=answer)
        await hopwire.settle(responder)
        box = hopwire.inbox(nc)
        count = hopwire.ROUND_TRIPS_KEPT + 40
        for i in range(count):
            await box.request(f"hopwire.many.{i}", b"x", timeout=5)
        await box.request("hopwire.many.0", b"x", timeout=5)  # asked again: recent once more
    finally:
        await responder.close()
    kept = box._round_trip  # pyright: ignore[reportPrivateUsage]
    assert len(kept) == hopwire.ROUND_TRIPS_KEPT
    assert "hopwire.many.1" not in kept  # the oldest went first
    assert {"hopwire.many.0", f"hopwire.many.{count - 1}"} <= kept.keys()


async def test_a_failed_inbox_start_is_tried_again(
    nc: Client, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscribe that fails once (injected: no failure of a live connection's subscribe is
    transient with a real server) fails the requests that waited on it, not later ones."""
    real = hopwire.deliver_to
    calls: list[str] = []

    async def fails_once(
        conn: Client, subject: str, on_msg: Callable[[Msg], None]
    ) -> tuple[Subscription, bool]:
        calls.append(subject)
        if len(calls) == 1:
            raise nats.errors.ConnectionReconnectingError
        return await real(conn, subject, on_msg)

    monkeypatch.setattr(hopwire, "deliver_to", fails_once)
    responder = await nats.connect(nats_url)
    try:
        await _echo(responder, "hopwire.retry")
        box = hopwire.inbox(nc)
        with pytest.raises(nats.errors.ConnectionReconnectingError):
            await box.request("hopwire.retry", b"0", timeout=5)
        assert (await box.request("hopwire.retry", b"0", timeout=5)).data == b"re:0"
        assert (await box.request("hopwire.retry", b"1", timeout=5)).data == b"re:1"
    finally:
        await responder.close()
    assert len(calls) == 2  # subscribed again once, then kept


async def test_a_stalled_server_holds_publishers_back() -> None:
    """With the server stopped (SIGSTOP) the socket fills; a publisher must then wait, as with
    nats-py's own publish, instead of queueing without bound in this process; a request then
    times out within its budget."""
    payload = b"\0" * (256 * 1024)
    async with NatsServer() as server:
        nc = await nats.connect(server.url)
        box = hopwire.inbox(nc)
        await hopwire.settle(nc)
        assert server.proc is not None
        pid = server.proc.pid
        os.kill(pid, signal.SIGSTOP)
        held: list[int] = []
        try:
            for _ in range(400):  # 100 MiB: far beyond any socket's buffers
                task = asyncio.create_task(hopwire.publish(nc, "hopwire.stall", payload))
                # A publisher not held back is done in its first turn.
                done, _ = await asyncio.wait({task}, timeout=2)
                if not done:
                    task.cancel()
                    break
                held.append(hopwire.backlog(nc) or 0)
            else:
                pytest.fail(f"400 publishes never waited; {held[-1]} bytes held for the socket")
            # What the direct path holds (its limit), what nats-py's flusher had written when
            # it stalled, and nats-py's own queue (the same limit again), a frame over each.
            limit = hopwire.backlog_limit(nc)
            assert max(held) <= 3 * (limit + len(payload)), held
            started = time.monotonic()
            with pytest.raises(nats.errors.TimeoutError):
                await box.request("hopwire.stall", b"x", timeout=0.5)
            assert time.monotonic() - started < 5
        finally:
            os.kill(pid, signal.SIGCONT)
            await nc.close()


async def test_ask_hands_the_reply_or_nats_pys_error_to_its_callback(
    nc: Client, nats_url: str
) -> None:
    box = hopwire.inbox(nc)
    got: dict[str, list[Msg | nats.errors.Error]] = {"echo": [], "nobody": [], "silent": []}
    assert not box.ask("hopwire.ask", b"x", 5, got["echo"].append)  # not subscribed yet
    await box.start()
    responder = await nats.connect(nats_url)
    try:
        await _echo(responder, "hopwire.ask")
        await responder.subscribe("hopwire.ask.silent")  # takes the request, never answers
        await hopwire.settle(responder)
        assert box.ask("hopwire.ask", b"0", 5, got["echo"].append)
        assert box.ask("hopwire.ask.nobody", b"x", 5, got["nobody"].append)
        started = time.monotonic()
        assert box.ask("hopwire.ask.silent", b"x", 0.3, got["silent"].append)
        await eventually(
            lambda: [len(v) for v in got.values()], lambda n: n == [1, 1, 1], what="answers"
        )
        assert time.monotonic() - started >= 0.25
    finally:
        await responder.close()
    (reply,), (nobody,), (silent,) = got.values()
    assert isinstance(reply, Msg) and reply.data == b"re:0"
    assert isinstance(nobody, nats.errors.NoRespondersError)
    assert isinstance(silent, nats.errors.TimeoutError)
    await asyncio.sleep(0.4)
    assert [len(v) for v in got.values()] == [1, 1, 1]  # once each: answered ones' timers gone
    assert box._waiting == {}  # pyright: ignore[reportPrivateUsage]
