"""connect_unless_stopped in-process: retries until stopped, connects when it can."""

from __future__ import annotations

import asyncio

import pytest

from shardplane.natsserver import free_port
from shardplane.reach import NatsUnreachable, connect_unless_stopped, redact


async def test_keeps_retrying_until_stopped_then_says_why() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.2, stop.set)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NatsUnreachable) as caught:
        await connect_unless_stopped(url, stop, "test-reach")
    took = loop.time() - started
    assert 1.1 < took < 2.0, f"gave up after {took:.2f} s, not when stopped (1.2 s)"
    message = str(caught.value)
    assert message.startswith(f"could not reach NATS at {url}: "), message
    # Refused at once, retried every 0.5 s: more than one attempt in 1.2 s, and it says so.
    assert "refused" in message.lower() or "connect call failed" in message.lower(), message
    assert "failed attempts in 1." in message, message


async def test_connects_when_the_server_answers(nats_url: str) -> None:
    stop = asyncio.Event()
    nc = await connect_unless_stopped(nats_url, stop, "test-reach")
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_a_stop_already_set_gives_up_at_once() -> None:
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(NatsUnreachable, match=r"could not reach NATS at nats://127\.0\.0\.1:"):
        await asyncio.wait_for(
            connect_unless_stopped(f"nats://127.0.0.1:{free_port()}", stop, "test-reach"), 2
        )


def test_messages_hide_credentials() -> None:
    assert (
        redact("nats://alice:s3cret@h1:4222,nats://h2:4222") == "nats://***@h1:4222,nats://h2:4222"
    )
    assert redact("tls://tok3n@[::1]:4222") == "tls://***@[::1]:4222"
    assert "s3cret" not in str(NatsUnreachable("nats://alice:s3cret@h1:4222", "refused"))
