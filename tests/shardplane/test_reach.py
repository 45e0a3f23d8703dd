"""connect_unless_stopped in-process: retries until stopped, connects when it can."""

from __future__ import annotations

import asyncio
import re

import pytest

from shardplane.natsserver import free_port
from shardplane.reach import NatsUnreachable, connect_unless_stopped, redact

STOP_AFTER_S = 2.5


async def test_keeps_retrying_until_stopped_then_says_why() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stopped_at: list[float] = []

    def set_stop() -> None:
        stopped_at.append(loop.time())
        stop.set()

    # Refused at once and retried every 0.5 s: several attempts before the stop, even if a busy
    # machine stalls this process for a second.
    loop.call_later(STOP_AFTER_S, set_stop)
    with pytest.raises(NatsUnreachable) as caught:
        await connect_unless_stopped(url, stop, "test-reach")
    gave_up = loop.time()
    # It kept retrying until the stop, and gave up at once after it.
    assert stopped_at, "gave up before the stop was set"
    after = gave_up - stopped_at[0]
    assert after < 1.0, f"gave up {after:.2f} s after the stop, not at once"
    message = str(caught.value)
    assert message.startswith(f"could not reach NATS at {url}: "), message
    # More than one attempt before the stop, and it says so (the plural).
    assert "refused" in message.lower() or "connect call failed" in message.lower(), message
    assert re.search(r"\(\d+ failed attempts in \d+\.\d s\)", message), message


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
