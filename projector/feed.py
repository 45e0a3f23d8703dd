"""Feeding the projector: its durable pull consumers and the loops that pull each stream into
the bounded inbox the writer takes its rounds from.

Why apart from the runner: fetching is independent of what is done with the messages (the
writer only sees the inbox); two pull loops (the lean ``transport.Puller`` and nats-py's
fetch, kept to measure what the lean one buys) live here side by side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from shardplane.projector import cursor
from shardplane.projector.config import ProjectorConfig
from shardplane.projector.transport import Inbox, Puller

# The runner's logger: these lines keep the name they had before this module was split off.
log = logging.getLogger("shardplane.projector.service")


async def nak_quietly(msgs: Iterable[Msg]) -> None:
    for msg in msgs:
        with contextlib.suppress(Exception):
            await msg.nak()


async def ensure_consumer(
    js: JetStreamContext,
    config: ProjectorConfig,
    stream: str,
    durable: str,
    only: str | None = None,
) -> int:
    """Create the durable consumer, or update the fields this configuration may change; a
    cumulative one (``projector.cursor``) is rewound where anything is unacknowledged.
    Returns the consumer's last delivery sequence (where the next leadership's deliveries
    must follow on)."""
    wanted = ConsumerConfig(
        durable_name=durable,
        filter_subject=only,
        description="shardplane projector: stream -> cluster_state",
        ack_policy=cursor.ack_policy(stream),
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=config.ack_wait_s,
        max_ack_pending=config.max_ack_pending,
        max_deliver=-1,
    )
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        await js.add_consumer(stream, wanted)
        return 0
    if cursor.cumulative(stream) and cursor.needs_rewind(info):
        await cursor.rewind(js, stream, info, wanted)
        return 0
    current = info.config
    if (current.ack_wait, current.max_ack_pending) != (wanted.ack_wait, wanted.max_ack_pending):
        # An update of editable fields; where it was rewound, it keeps its start.
        wanted.deliver_policy, wanted.opt_start_seq = current.deliver_policy, current.opt_start_seq
        await js.add_consumer(stream, wanted)
    return info.delivered.consumer_seq or 0 if info.delivered else 0


async def feed(
    nc: Client,
    js: JetStreamContext,
    config: ProjectorConfig,
    stream: str,
    durable: str,
    inbox: Inbox,
) -> None:
    """Pull ``stream`` through ``durable`` into ``inbox`` until cancelled."""
    if config.lean_pull:
        # Several requests outstanding, so the server always holds one to fill while the
        # answer to the other is on its way (one at a time left the stream idle each RTT).
        pullers = [
            Puller(
                nc,
                stream,
                durable,
                inbox,
                batch=config.fetch_batch,
                fast=config.direct_delivery,
            )
            for _ in range(config.pull_depth)
        ]
        await asyncio.gather(*(puller.run() for puller in pullers))
        return
    # nats-py's own fetch: kept to measure what the lean puller buys (bench --ablation).
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    try:
        while True:
            await inbox.room.wait()
            try:
                msgs = await sub.fetch(config.fetch_batch, timeout=config.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                inbox.caught_up[stream] = time.time()  # nothing left to deliver
                continue
            except Exception as exc:
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                inbox.put(msg)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
