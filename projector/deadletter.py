"""Dead-lettering: poison (and what the reducer rejects, or gives up deferring) is copied to
``deadletter.<subject>`` with the reason and its source in headers, and only once that copy
is stored terminated.

Why its own module: the headers are what operators and tests read back from the DEADLETTER
stream; the copy-then-term order is the part that must never lose a message."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js import JetStreamContext

from shardplane.bus import subjects
from shardplane.projector.config import ProjectorStats
from shardplane.projector.rounds import Item

# The runner's logger: these lines keep the name they had before this module was split off.
log = logging.getLogger("shardplane.projector.service")

REASON_HEADER = "Shardplane-Deadletter-Reason"
SOURCE_SUBJECT_HEADER = "Shardplane-Source-Subject"
SOURCE_STREAM_HEADER = "Shardplane-Source-Stream"
SOURCE_SEQ_HEADER = "Shardplane-Source-Seq"


def header_safe(text: str, limit: int = 1024) -> str:
    return text.replace("\r", " ").replace("\n", " ")[:limit]


async def dead_letter(
    js: JetStreamContext, dead: list[tuple[Item, str]], timeout_s: float, stats: ProjectorStats
) -> list[Item]:
    """Copy each poison message to ``deadletter.<subject>`` with why, then terminate it;
    one whose copy was not stored is nak'ed to come back (never dropped unrecorded) and
    returned (a cumulative ack must not cover it: ``projector.cursor``)."""
    futures: list[asyncio.Future[Any]] = []
    failed: list[Item] = []
    for item, reason in dead:
        info = item.info
        headers = {
            REASON_HEADER: header_safe(reason),
            SOURCE_SUBJECT_HEADER: item.msg.subject,
        }
        if info is not None:
            headers[SOURCE_STREAM_HEADER] = info.stream
            headers[SOURCE_SEQ_HEADER] = str(info.stream_seq)
            # A redelivery after a crash between the copy and the term() dedups here.
            headers["Nats-Msg-Id"] = f"deadletter-{info.stream}-{info.stream_seq}"
        future = await js.publish_async(
            subjects.deadletter(item.msg.subject), item.msg.data or b"", headers=headers
        )
        futures.append(future)
    done, _ = await asyncio.wait(futures, timeout=timeout_s)
    for (item, reason), future in zip(dead, futures, strict=True):
        if future in done and future.exception() is None:
            stats.deadlettered += 1
            key = reason.split(":", 1)[0][:80]
            stats.deadletter_reasons[key] = stats.deadletter_reasons.get(key, 0) + 1
            log.warning("dead-lettered %s: %s", item.msg.subject, reason)
            await item.msg.term()
        else:
            future.cancel()
            # Not copied: leave it to come back (never drop a message unrecorded).
            await item.msg.nak(delay=1.0)
            failed.append(item)
    return failed
