"""The projector's shortcuts into nats-py on a real server: direct subscriptions must see every
message, in order, byte for byte, whether it takes the fast path (plain MSG) or nats-py's own
(headers, frames split across reads), and other subscriptions on the same connection must
not notice anything."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.agents import hopwire
from shardplane.projector.wire import FastParser, fast_parser, subscribe_direct
from tests.kit import eventually


@contextlib.asynccontextmanager
async def _clients(url: str) -> AsyncGenerator[tuple[Client, Client], None]:
    """(receiver, sender): two connections, so frames cross the real socket."""
    receiver = await nats.connect(url)
    sender = await nats.connect(url)
    try:
        yield receiver, sender
    finally:
        await sender.close()
        await receiver.close()


async def test_direct_and_ordinary_subscriptions_share_a_connection_without_loss(
    nats_url: str,
) -> None:
    async with _clients(nats_url) as (receiver, sender):
        direct: list[tuple[str, bytes, dict[str, str] | None]] = []
        ordinary: list[bytes] = []

        def on_direct(msg: Msg) -> None:
            direct.append((msg.reply, msg.data, msg.headers))

        async def on_ordinary(msg: Msg) -> None:
            ordinary.append(msg.data)

        await subscribe_direct(receiver, "wire.direct", on_direct)
        await receiver.subscribe("wire.other", cb=on_ordinary)
        assert isinstance(fast_parser(receiver), FastParser)
        await hopwire.settle(receiver)  # flush() can PING ahead of the queued SUB

        rng = random.Random(7)
        expected: list[tuple[str, bytes, dict[str, str] | None]] = []
        expected_other: list[bytes] = []

        async def behind_at_most(window: int) -> None:
            # Sender and receiver share this process: on a busy machine the receiver, starved
            # of CPU, can fall so far behind that the server cuts it off as a slow consumer
            # (and drops what it had queued), which says nothing about the parser. A window
            # of ~200 messages (~9 MB) keeps it within reach; frames still straddle reads.
            sent = len(expected) + len(expected_other)
            await eventually(
                lambda: asyncio.sleep(0.01, len(direct) + len(ordinary)),
                lambda got: got >= sent - window,
                timeout=60,
            )

        for i in range(3000):
            if i and i % 100 == 0:
                await behind_at_most(200)
            # Sizes up to 200 kB: frames straddle the client's 64 kB socket reads.
            payload = rng.randbytes(rng.choice([0, 1, 300, 5000, 70_000, 200_000]))
            if i % 7 == 3:
                expected_other.append(payload)
                await sender.publish("wire.other", payload)
                continue
            reply = f"r.{i}" if i % 2 else ""
            headers = {"H": str(i)} if i % 11 == 5 else None
            expected.append((reply, payload, headers))
            await sender.publish("wire.direct", payload, reply=reply, headers=headers)
        await sender.flush()

        # About 138 MB through one process (the test's): generous on a slow, shared machine.
        await eventually(
            lambda: asyncio.sleep(0.05, len(direct)), lambda n: n >= len(expected), timeout=60
        )
        await eventually(
            lambda: asyncio.sleep(0.05, len(ordinary)),
            lambda n: n >= len(expected_other),
            timeout=60,
        )
        assert len(direct) == len(expected)
        for got, want in zip(direct, expected, strict=True):
            assert got[0] == want[0]
            assert got[1] == want[1]
            assert (got[2] or None) == want[2]
        assert ordinary == expected_other
        assert receiver.stats["in_msgs"] == len(expected) + len(expected_other)


async def test_raw_handlers_get_plain_frames_and_headers_still_reach_the_msg_handler(
    nats_url: str,
) -> None:
    async with _clients(nats_url) as (receiver, sender):
        # One log for both handlers: together they must see every frame once, in order.
        got: list[tuple[str, bytes, bytes, dict[str, str] | None]] = []

        def on_msg(msg: Msg) -> None:
            got.append(("msg", msg.subject.encode(), msg.data, msg.headers))

        def on_raw(subject: bytes, payload: bytes) -> None:
            got.append(("raw", subject, payload, None))

        await subscribe_direct(receiver, "wire.acks.*", on_msg, raw=on_raw)
        await hopwire.settle(receiver)  # flush() can PING ahead of the queued SUB
        want: list[tuple[bytes, bytes, dict[str, str] | None]] = []
        for i in range(2000):
            subject = f"wire.acks.{i}-{i % 13}"
            payload = b'{"stream":"KV_x","seq":%d}' % i * (1 + i % 300)
            headers = {"Status": "503"} if i % 17 == 0 else None
            want.append((subject.encode(), payload, headers))
            await sender.publish(subject, payload, headers=headers)
        await sender.flush()
        await eventually(lambda: asyncio.sleep(0.05, len(got)), lambda n: n >= len(want))
        assert [(s, p, h) for _, s, p, h in got] == want
        # Frames with headers always come parsed, with their headers; most plain ones raw.
        assert all(kind == "msg" for kind, _, _, h in got if h)
        assert sum(kind == "raw" for kind, *_ in got) > len(want) // 2


async def test_a_status_only_subscription_takes_headed_frames_on_the_fast_path(
    nats_url: str,
) -> None:
    async with _clients(nats_url) as (receiver, sender):
        got: list[tuple[bytes, dict[str, str] | None]] = []

        def on_msg(msg: Msg) -> None:
            got.append((msg.data, msg.headers))

        await subscribe_direct(receiver, "wire.pull", on_msg, status_only=True)
        await hopwire.settle(receiver)  # flush() can PING ahead of the queued SUB
        parser = fast_parser(receiver)
        assert parser is not None
        before = parser.fast_frames
        payloads: list[bytes] = []
        statuses: set[int] = set()
        for i in range(1000):
            payload = b"sample %d " % i * (1 + i % 50)
            payloads.append(payload)
            # A status (a heartbeat, a 404) must keep its headers. None comes first: frames after
            # one in the same read go nats-py's way, and a slow reader can get all 1000 in one.
            if i in (1, 500, 999):
                statuses.add(i)
                headers: dict[str, str] | None = {"Status": "100"}
            else:  # like a sourced stream's deliveries: a header the pull loop never reads
                headers = {"Nats-Stream-Source": f"TELEMETRY {i}"}
            await sender.publish("wire.pull", payload, headers=headers)
        await sender.flush()
        await eventually(lambda: asyncio.sleep(0.05, len(got)), lambda n: n >= len(payloads))
        assert [data for data, _ in got] == payloads
        for i, (_, headers) in enumerate(got):
            assert (headers or {}).get("Status") == ("100" if i in statuses else None), i
        # Every frame has headers: any the fast path took, it took despite them (frames after
        # a status, or after a frame nats-py's parser began, go its way, headers and all).
        assert parser.fast_frames > before
