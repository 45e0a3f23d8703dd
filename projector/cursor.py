"""Telemetry is acknowledged by position (``AckPolicy.ALL``): one ack per round, not per sample.

Why: per telemetry message the server delivered it, took an ack for it and stored a KV write;
the ack was a fifth of the server's work per message (4.2 us with an ack each against 2.5 us
with one ack per 1,000 on nats-server 2.15.1 here) and a framed publish per message for the
projector, and both share the same two cores when the projector is partitioned.

Why that is safe for telemetry and only for telemetry:

- A round is acknowledged only once every KV write it caused is stored, and rounds are
  stored and acknowledged in delivery order (``projector.service``), so the last message of
  a round acknowledges exactly the messages of this round and the rounds before it.
- Telemetry is never deferred (a sample or heartbeat always applies: the reducer keeps the
  newest by ``(epoch, seq, ts)``), so no message waits for a delayed redelivery that a later
  cumulative ack would swallow. Statuses and assignments are deferred (nak with a delay), so
  PLACEMENTS and SHARDS keep an ack each.
- Poison is copied to the dead-letter stream and terminated before the round's ack; if a copy
  was not stored, the round is not acknowledged and the leadership starts over (a later
  cumulative ack would otherwise drop it unrecorded).
- What a cumulative ack cannot cover is a message delivered to an earlier leadership and not
  acknowledged (a killed process, deliveries lost with a closed subscription): JetStream
  would redeliver it only after the ack wait, and an ack of a later message would cover it
  first. So each leadership starts by *rewinding*: where anything is still unacknowledged, the
  consumer is recreated at its ack floor + 1, which redelivers at once everything after the
  last acknowledged round. Redelivery is harmless (the reducer is a join); the rewind also
  makes a takeover after a crash immediate instead of waiting out the ack wait.
- Within a leadership, deliveries can still be lost on the way (a reconnect drops a pull
  request with what it was carrying): every delivery's consumer sequence (in its ack subject)
  must follow the one before; a gap ends the leadership before anything after it is
  acknowledged, and the next one rewinds.
- A paused ex-leader acknowledges only while its lease is valid (checked right before the ack
  is sent), as it writes; where it still raced a new leader, its cumulative ack covers only
  messages it was delivered without a gap since its own rewind and stored itself.

An existing consumer that still acknowledges each message (a deployment from before) is
recreated the same way, at its ack floor + 1: the ack policy of a consumer cannot be changed
in place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from shardplane.bus.errors import ProjectorError
from shardplane.bus.streams import TELEMETRY
from shardplane.projector.rounds import Item

log = logging.getLogger("shardplane.projector.service")


def cumulative(stream: str) -> bool:
    """Whether the projector acknowledges ``stream`` by position: TELEMETRY and the
    partitions' mirrors of it (``TELEMETRY_P<count>``, ``TELEMETRY_P<count>_NODES``)."""
    return stream == TELEMETRY or stream.startswith(TELEMETRY + "_P")


def ack_policy(stream: str) -> AckPolicy:
    return AckPolicy.ALL if cumulative(stream) else AckPolicy.EXPLICIT


def to_ack(applied: Iterable[Item]) -> list[Msg]:
    """The acknowledgements for a stored round's applied messages, in delivery order: every
    message of an explicit-ack consumer, and for a cumulative one only its last (which
    acknowledges the rest)."""
    out: list[Msg] = []
    last: dict[tuple[str, str], Msg] = {}
    for item in applied:
        info = item.info
        if info is not None and cumulative(info.stream):
            last[(info.stream, info.consumer)] = item.msg
        else:
            out.append(item.msg)
    return [*out, *last.values()]


def covers(items: Iterable[Item]) -> bool:
    """Whether any of ``items`` came through a cumulative consumer (a later ack would cover
    it: it must not be left for a redelivery)."""
    return any(i.info is not None and cumulative(i.info.stream) for i in items)


def needs_rewind(info: ConsumerInfo) -> bool:
    """An existing cumulative consumer has to be recreated at its ack floor when something is
    still unacknowledged, or when it acknowledges each message (made by an older version)."""
    # nats-py leaves the policy as the server's string ("all"); the enum compares equal to it.
    return info.config.ack_policy != AckPolicy.ALL or bool(info.num_ack_pending)


async def rewind(
    js: JetStreamContext, stream: str, info: ConsumerInfo, wanted: ConsumerConfig
) -> None:
    """Recreate the consumer so that it delivers everything after its ack floor again, now."""
    floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
    durable = wanted.durable_name or ""
    log.info(
        "consumer %s on %s: %d unacknowledged (ack policy %s); redelivering from sequence %d",
        durable,
        stream,
        info.num_ack_pending or 0,
        AckPolicy(info.config.ack_policy or AckPolicy.EXPLICIT).value,
        floor + 1,
    )
    await js.delete_consumer(stream, durable)
    config = ConsumerConfig.from_response(wanted.as_dict())
    config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
    config.opt_start_seq = floor + 1
    await js.add_consumer(stream, config)


class DeliveryGap(ProjectorError, RuntimeError):
    """A cumulative consumer's deliveries skipped a sequence: nothing after it may be
    acknowledged (the leadership starts over, and the next one rewinds)."""


class Deliveries:
    """Per cumulative consumer, the delivery (consumer) sequence expected next."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str], int] = {}

    def start(self, stream: str, consumer: str, delivered: int) -> None:
        """At the start of a leadership: ``delivered`` is the consumer's last delivery."""
        self._next[(stream, consumer)] = delivered + 1

    def check(self, items: Iterable[Item]) -> None:
        for item in items:
            info = item.info
            if info is None or not cumulative(info.stream):
                continue
            key = (info.stream, info.consumer)
            want = self._next.get(key)
            if want is not None and info.consumer_seq != want:
                raise DeliveryGap(
                    f"{info.consumer} on {info.stream}: delivery {info.consumer_seq} came where "
                    f"{want} was next; the deliveries in between were lost on the way"
                )
            self._next[key] = info.consumer_seq + 1
