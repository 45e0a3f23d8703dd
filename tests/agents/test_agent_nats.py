"""The agent against a real NATS server: what it publishes, how it rides out a restart, and
that a retried publish is stored once."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shardplane.agents.publisher import Publisher
from shardplane.agents.service import run_agents
from shardplane.bus import codec, subjects
from shardplane.bus.messages import DeviceSample, NodeHeartbeat
from shardplane.bus.streams import TELEMETRY, provision
from shardplane.natsserver import NatsServer, free_port
from tests.kit import eventually, running

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "fleets" / "demo.toml"


@contextlib.asynccontextmanager
async def agents(nc: Client, **kwargs: Any) -> AsyncGenerator[asyncio.Event, None]:
    async with running(lambda stop: run_agents(nc, stop=stop, **kwargs), stop_timeout=15) as stop:
        yield stop


async def collect(nc: Client, subject: str) -> tuple[list[Msg], object]:
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    sub = await nc.subscribe(subject, cb=cb)
    return got, sub


async def test_samples_arrive_decodable_with_increasing_seq(
    nc: Client, js: JetStreamContext
) -> None:
    got, _ = await collect(nc, "telemetry.>")
    async with agents(nc, fleet=DEMO, interval_s=0.2, workers=False):
        await eventually(lambda: sum(".gpu." in m.subject for m in got) >= 7 * 4)
    await nc.flush()
    await asyncio.sleep(0.2)

    seqs: dict[str, list[int]] = {}
    beats: dict[str, list[NodeHeartbeat]] = {}
    for msg in got:
        assert msg.headers and msg.headers.get("Nats-Msg-Id")
        if ".gpu." in msg.subject:
            s = codec.decode(DeviceSample, msg.data)
            assert msg.subject == subjects.gpu_sample(s.node, s.index)
            assert s.epoch > 0 and s.uuid and s.bandwidth_gbps
            seqs.setdefault(f"{s.node}/{s.index}", []).append(s.seq)
        else:
            hb = codec.decode(NodeHeartbeat, msg.data)
            beats.setdefault(hb.node, []).append(hb)
    assert len(seqs) == 7
    for device, series in seqs.items():
        assert series == sorted(series) and len(set(series)) == len(series), device
        assert series[0] == 1
    for node, series in beats.items():
        assert series[-1].online is False, node  # graceful shutdown says so
        assert all(hb.online for hb in series[:-1])
        assert series[0].backend == "sim" and series[0].links
    rig_d = beats["rig-d"][0]
    assert rig_d.interconnect == "xgmi" and rig_d.device_count == 2
    assert {link.peer: link.gbps for link in rig_d.links}["rig-a"] == 100.0
    # ...and JetStream stored them.
    info = await js.stream_info(TELEMETRY)
    assert info.state.messages >= len(got) - 7  # the very last ones may race the info call


async def test_fault_by_command(nc: Client, js: JetStreamContext) -> None:
    got, _ = await collect(nc, "telemetry.gpu.rig-b.1")
    async with agents(nc, fleet=DEMO, interval_s=0.2, workers=False):
        await eventually(lambda: len(got) >= 1)
        reply = await nc.request(
            subjects.sim_fault("rig-b"),
            json.dumps({"kind": "vanish", "device": 1}).encode(),
            timeout=5,
        )
        assert json.loads(reply.data)["ok"] is True
        await eventually(lambda: not codec.decode(DeviceSample, got[-1].data).present)
        bad = await nc.request(subjects.sim_fault("rig-b"), b'{"kind": "melt"}', timeout=5)
        answer = json.loads(bad.data)
        assert answer["ok"] is False and "kind" in answer["error"]
        reply = await nc.request(
            subjects.sim_fault("rig-b"), b'{"kind": "return", "device": 1}', timeout=5
        )
        assert json.loads(reply.data)["ok"] is True
        await eventually(lambda: codec.decode(DeviceSample, got[-1].data).present)


async def test_host_without_gpus_heartbeats_with_zero_devices(
    nc: Client, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDPLANE_CPU_BANDWIDTH_GBPS", "40")
    got, _ = await collect(nc, "telemetry.>")
    async with agents(nc, node="bare-host", interval_s=0.2, cpu_device=True, workers=False):
        await eventually(lambda: len(got) >= 4)
    hb = next(codec.decode(NodeHeartbeat, m.data) for m in got if ".node." in m.subject)
    assert hb.node == "bare-host" and hb.backend == "none"
    assert "nvml" in hb.skipped and "rocm" in hb.skipped
    assert hb.cpu_count and hb.host_memory_bytes and hb.hostname
    # The address peers dial (exports print it): the one this host reaches NATS from.
    assert hb.address is not None
    reached_from = ipaddress.ip_address(hb.address)
    if urlparse(nc.connected_url.geturl() if nc.connected_url else "").hostname == "127.0.0.1":
        assert reached_from.is_loopback, hb.address
    cpu = next(codec.decode(DeviceSample, m.data) for m in got if ".gpu." in m.subject)
    assert cpu.vendor == "cpu" and cpu.index == 0 and cpu.bandwidth_gbps == 40.0
    assert cpu.memory_total_bytes == hb.host_memory_bytes


async def test_retried_publish_is_not_stored_twice(nats_url: str, nc: Client) -> None:
    publisher = Publisher(nc, ack_timeout_s=10.0)
    subject = subjects.gpu_sample("n", 0)
    # No stream yet: no stream answers, and the message waits with its id.
    publisher.offer(subject, b"one", "n.0.boot.1")
    assert await publisher.flush_once() is False
    assert publisher.pending == 1 and publisher.stats.failures == 1
    js = nc.jetstream()
    await provision(js)
    assert await publisher.flush_once() is True
    assert publisher.stats.retried == 1 and publisher.stats.published == 1
    # The ack was "lost" and the same message is sent again: the stream keeps one copy.
    publisher.offer(subject, b"one", "n.0.boot.1")
    assert await publisher.flush_once() is True
    assert publisher.stats.duplicates == 1
    info = await js.stream_info(TELEMETRY)
    assert info.state.messages == 1


async def test_only_the_newest_pending_sample_per_device_is_kept(nc: Client) -> None:
    publisher = Publisher(nc)
    for seq in range(1, 101):
        publisher.offer(subjects.gpu_sample("n", 0), f"{seq}".encode(), f"n.0.b.{seq}")
        publisher.offer(subjects.gpu_sample("n", 1), f"{seq}".encode(), f"n.1.b.{seq}")
    assert publisher.pending == 2 and publisher.stats.superseded == 198


async def _stored(js: JetStreamContext, subject: str) -> list[int]:
    info = await js.stream_info(TELEMETRY)
    seqs: list[int] = []
    for n in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            msg = await js.get_msg(TELEMETRY, n)
            if msg.subject == subject and msg.data:
                seqs.append(codec.decode(DeviceSample, msg.data).seq)
    return seqs


async def test_rides_out_a_server_restart(tmp_path: Path) -> None:
    fleet = tmp_path / "one.toml"
    fleet.write_text('[[nodes]]\nname = "solo"\ngpus = [{ model = "T4" }]\n')
    server = NatsServer(port=free_port(), store_dir=tmp_path / "store")
    await asyncio.to_thread(server.start)
    nc = await nats.connect(
        server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=1
    )
    js = nc.jetstream()
    subject = subjects.gpu_sample("solo", 0)
    try:
        await provision(js)
        async with agents(nc, fleet=fleet, interval_s=0.1, workers=False):

            async def last_seq() -> int:
                try:
                    msg = await js.get_last_msg(TELEMETRY, subject)
                except Exception:
                    return 0
                assert msg.data
                return codec.decode(DeviceSample, msg.data).seq

            await eventually(last_seq, lambda seq: seq >= 3, timeout=10, what="3 samples stored")
            at_stop = await last_seq()
            await asyncio.to_thread(server.stop)
            # ~30 samples are taken while the server is away: even with the loop stalled for a
            # second or two by a busy machine, several, so all but the newest are never sent.
            await asyncio.sleep(3.0)
            await asyncio.to_thread(server.start)

            async def until_stored_beyond(seq: int) -> int:
                with contextlib.suppress(AssertionError):  # the caller says what was missed
                    return await eventually(last_seq, lambda after: after > seq, timeout=15)
                return await last_seq()

            # Publishing resumes, and goes on after the first (pending) sample is out.
            resumed = await until_stored_beyond(at_stop + 14)
            assert resumed >= at_stop + 15, f"publishing did not resume (last seq {resumed})"
            later = await until_stored_beyond(resumed)
            assert later > resumed, f"publishing stopped after the reconnect (last seq {later})"
        stored = await _stored(js, subject)
        assert stored == sorted(stored) and len(stored) == len(set(stored)), stored
        # The outage left a gap (only the newest pending sample went out), not a flood.
        assert len(stored) < stored[-1] - stored[0] + 1, stored
    finally:
        await nc.close()
        await asyncio.to_thread(server.cleanup)


@pytest.mark.slow
async def test_thousands_of_simulated_nodes_in_one_process(
    tmp_path: Path, nc: Client, js: JetStreamContext
) -> None:
    fleet = tmp_path / "big.toml"
    fleet.write_text(
        'seed = 5\n[[nodes]]\nname = "s"\ncount = 2000\ngpus = [{ model = "A10", count = 4 }]\n'
    )
    t0 = time.process_time()
    async with agents(nc, fleet=fleet, interval_s=2.0, workers=False):
        await asyncio.sleep(6.5)
    cpu = time.process_time() - t0
    info = await js.stream_info(TELEMETRY)
    # at least 2-3 full cycles of 2000 heartbeats and 8000 samples (noisy shared machine)
    assert info.state.messages >= 2 * 10_000, info.state.messages
    assert cpu < 6.5, f"{cpu:.1f} s of CPU for 6.5 s of 2000 nodes"
