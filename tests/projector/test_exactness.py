"""Single writer and compare-and-set on a real server: a lost lease stops the writes, and a
value someone else stored in between is joined, never overwritten."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bus import codec, keys, subjects
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import cluster_state
from shardplane.projector.lease import LEASE_BUCKET, LEASE_KEY
from tests.kit import eventually, until_logged
from tests.projector.helpers import device, projector, sample

LEASE_LOG = "shardplane.bus.lease"


async def test_a_newer_value_stored_by_another_writer_is_never_overwritten(
    nats_url: str, nc: Client, js: JetStreamContext
) -> None:
    async with projector(nats_url) as runner:
        await js.publish(subjects.gpu_sample("n1", 0), codec.encode(sample("n1", 0, 5)))
        await eventually(lambda: device(nc, "n1", 0), lambda s: s is not None and s.sample.seq == 5)
        # Another writer (say, a replica that still held the lease) stores seq 10, by CAS.
        kv = await cluster_state(js)
        entry = await kv.get(keys.device_key("n1", 0))
        newer = DeviceState(sample=sample("n1", 0, 10), online=True, last_seen=time.time())
        await kv.update(keys.device_key("n1", 0), codec.encode(newer), last=entry.revision)
        # The projector's cached revision is stale now: its write of seq 6 must conflict,
        # re-read, and join (seq 10 stays), not overwrite.
        await js.publish(subjects.gpu_sample("n1", 0), codec.encode(sample("n1", 0, 6)))
        await eventually(lambda: asyncio.sleep(0.05, runner.stats.conflicts), lambda c: c >= 1)
        state = await device(nc, "n1", 0)
        assert state is not None and state.sample.seq == 10
        await js.publish(subjects.gpu_sample("n1", 0), codec.encode(sample("n1", 0, 11)))
        await eventually(
            lambda: device(nc, "n1", 0), lambda s: s is not None and s.sample.seq == 11
        )


async def test_a_projector_that_loses_its_lease_stops_writing_until_it_holds_it_again(
    nats_url: str, nc: Client, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LEASE_LOG)
    async with projector(nats_url) as runner:
        published = time.monotonic()
        await js.publish(subjects.gpu_sample("n1", 0), codec.encode(sample("n1", 0, 1)))
        await eventually(lambda: device(nc, "n1", 0), lambda s: s is not None)
        leader_took = time.monotonic() - published  # from publish to the KV, while leading
        lease_kv = await js.key_value(LEASE_BUCKET)
        await lease_kv.put(LEASE_KEY, b"someone-else")  # the lease is taken from it

        async def intruder() -> None:
            # Keeps its key alive (the bucket expires it 1.5 s after the last put), so the
            # projector cannot take the lease back however slowly the checks below run.
            while True:
                await asyncio.sleep(0.3)
                await lease_kv.put(LEASE_KEY, b"someone-else")

        holding = asyncio.create_task(intruder())
        try:
            await eventually(
                lambda: asyncio.sleep(0.02, runner.leading.is_set()), lambda lead: not lead
            )
            # The marker: it asked for the lease again and was refused (so it is out of its
            # rounds, waiting to lead).
            await until_logged(caplog, LEASE_LOG, "is standing by")
            rounds = runner.stats.rounds
            await js.publish(subjects.gpu_sample("n1", 0), codec.encode(sample("n1", 0, 2)))
            # A projector that stands by does nothing at all, so no event can say "it did not
            # write": the absence is asserted after a bounded wait, sized from this run's own
            # publish-to-KV time while it led (seq 1 above: a loaded machine waits longer), so
            # that one still writing would have been seen.
            await asyncio.sleep(max(0.3, 3 * leader_took))
            state = await device(nc, "n1", 0)
            assert state is not None and state.sample.seq == 1, "wrote without the lease"
            assert runner.stats.rounds == rounds
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding
        # The intruder stops renewing: its key ages out, the projector takes over and catches up.
        await eventually(lambda: asyncio.sleep(0.05, runner.leading.is_set()), bool, timeout=10)
        await eventually(lambda: device(nc, "n1", 0), lambda s: s is not None and s.sample.seq == 2)
