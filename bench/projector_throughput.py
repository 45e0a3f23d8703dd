"""projector-throughput: how fast the projector turns a telemetry stream into KV state.

1. Sustained rate: a backlog of pre-encoded DeviceSamples for a large simulated fleet
   (1,000 nodes x 8 GPUs, several samples per device) is published into TELEMETRY; a projector
   process (``python -m projector``, as deployed) drains it into ``cluster_state``. Rate =
   messages / (time from taking the lead to the last acknowledgement). In the same run, the
   floor: a bare nats-py pull consumer (fetch 1,000, ack each) draining the same backlog
   (``ratio`` is against this one, as the issue defines it); and a second floor, the
   projector's own pull loop and acks (one cumulative ack per round, as the projector
   acknowledges telemetry) with no work at all (``ratio_vs_lean_drain``), which shows what
   the decoding, reducing and KV writes cost on top of the transport.
2. Lag at a steady 4,000 msg/s (8,000 GPUs at a 2 s interval): each sample's publish time to
   the moment a KV watcher sees it, p50/p99; ``lost`` = samples neither seen in the KV nor
   superseded there by a newer sample of the same device, plus devices whose final KV sample
   is not the last one published (after either phase).
3. ``--ablation``: the sustained phase again with the optimisations switched off one by one.
4. ``--partitions N``: the same backlog drained by N partition processes together
   (``scaleout_ratio`` = their rate / one projector's), with CPU microseconds per message per
   process for both arms and the ceiling that puts on the ratio on this machine. Copying the
   backlog into the partitions' stream happens before the timing, as storing it in TELEMETRY
   does for both arms; what it cost the server per message is reported apart
   (``sourcing_server_us_per_msg``), since live every sample pays it.

Run: ``shardplane bench projector-throughput [--quick] [--ablation] [--nats-url URL]``.
With ``--nats-url`` it uses that server, which must be a scratch one: the bench purges
TELEMETRY and ``cluster_state`` and deletes the projector's consumers. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

import shardplane
from shardplane.bus import keys, subjects
from shardplane.bus.messages import DeviceSample, DeviceState
from shardplane.bus.streams import CLUSTER_STATE, TELEMETRY, kv_stream, kv_subject, provision
from shardplane.natsserver import NatsServer
from shardplane.projector import cursor
from shardplane.projector import partition as partitions
from shardplane.projector.decode import parse_ack_subject
from shardplane.projector.lease import LEASE_BUCKET, LEASE_KEY
from shardplane.projector.partition import Partition
from shardplane.projector.service import CONSUMERS
from shardplane.projector.transport import Inbox, Puller, ack_all

ROOT = Path(shardplane.__file__).resolve().parent.parent  # holds the package
TARGET_RATIO = 0.5
TARGET_SCALEOUT = 1.6  # 2 partitions / 1
TARGET_RATE = 15_000.0
TARGET_P99_MS = 250.0
LAG_RATE = 4_000.0

_ENCODER = msgspec.msgpack.Encoder()
_STATE = msgspec.msgpack.Decoder(DeviceState)


@dataclass(frozen=True)
class Fleet:
    nodes: int
    gpus: int

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus

    def device(self, i: int) -> tuple[str, int]:
        return f"bench-{i // self.gpus:05d}", i % self.gpus


def make_sample(node: str, index: int, seq: int, ts: float) -> DeviceSample:
    """A realistic sample (about 300 bytes encoded: names, memory, clocks, power, links)."""
    return DeviceSample(
        node=node,
        index=index,
        uuid=f"GPU-{node}-{index:02d}-0000-0000-000000000000",
        seq=seq,
        ts=ts,
        epoch=1.0,
        vendor="sim",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{index + 16:02X}:00.0",
        memory_total_bytes=85_520_809_984,
        memory_used_bytes=1_000_000 * (seq % 1000),
        memory_free_bytes=85_520_809_984 - 1_000_000 * (seq % 1000),
        utilization_gpu_pct=float(seq % 100),
        utilization_memory_pct=float(seq % 50),
        temperature_c=40.0 + seq % 30,
        power_w=300.0,
        power_limit_w=700.0,
        sm_clock_mhz=1980.0,
        sm_clock_max_mhz=1980.0,
        memory_clock_mhz=2619.0,
        memory_clock_max_mhz=2619.0,
        memory_bus_width_bits=5120,
        bandwidth_gbps=3352.0,
        tflops=989.0,
        pcie_gen=5,
        pcie_width=16,
    )


# --- server plumbing ---------------------------------------------------------------------------


async def reset(js: JetStreamContext, *, purge_telemetry: bool) -> None:
    """Fresh projector state: no consumers, empty bucket, no lease; optionally no backlog."""
    await provision(js)
    for stream, durable in CONSUMERS.items():
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
    await js.purge_stream(kv_stream(CLUSTER_STATE))
    with contextlib.suppress(NotFoundError):
        await js.purge_stream(kv_stream(LEASE_BUCKET))
    if purge_telemetry:
        await js.purge_stream(TELEMETRY)


async def publish_backlog(js: JetStreamContext, fleet: Fleet, rounds: int) -> int:
    payloads = [
        (
            subjects.gpu_sample(*fleet.device(i)),
            _ENCODER.encode(make_sample(*fleet.device(i), r, 1.0 + r)),
        )
        for r in range(rounds)
        for i in range(fleet.devices)
    ]
    for subject, data in payloads:
        await js.publish_async(subject, data)
    await js.publish_async_completed()
    info = await js.stream_info(TELEMETRY)
    return int(info.state.messages)


def spawn_projector(url: str, extra: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardplane.projector", "--nats-url", url, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_projector(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")


async def wait_leading(
    js: JetStreamContext, proc: subprocess.Popen[bytes], key: str = LEASE_KEY
) -> float:
    """The moment the projector process holds the lease (it starts consuming right after)."""
    kv = None
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the projector exited: " + stop_projector(proc)[-2000:])
        with contextlib.suppress(Exception):
            kv = kv or await js.key_value(LEASE_BUCKET)
            entry = await kv.get(key)
            if f"-{proc.pid}-" in (entry.value or b"").decode():
                return time.perf_counter()
        await asyncio.sleep(0.005)


async def wait_drained(js: JetStreamContext, stream: str, durable: str, last_seq: int) -> float:
    while True:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:  # the projector has not created it yet
            await asyncio.sleep(0.01)
            continue
        if info.ack_floor and (info.ack_floor.stream_seq or 0) >= last_seq:
            return time.perf_counter()
        await asyncio.sleep(0.02)


async def kv_devices(js: JetStreamContext) -> dict[str, DeviceState]:
    out: dict[str, DeviceState] = {}
    sub = await js.subscribe(
        kv_subject(CLUSTER_STATE, "devices.>"),
        stream=kv_stream(CLUSTER_STATE),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    try:
        info = await js.stream_info(kv_stream(CLUSTER_STATE))
        if info.state.messages:
            while True:
                msg = await sub.next_msg(timeout=10)
                out[msg.subject.removeprefix(kv_subject(CLUSTER_STATE))] = _STATE.decode(msg.data)
                if msg.metadata.num_pending == 0:
                    break
    finally:
        await sub.unsubscribe()
    return out


# --- phase 1: sustained rate ----------------------------------------------------------------


async def fresh_consumer(
    js: JetStreamContext, durable: str, policy: AckPolicy = AckPolicy.EXPLICIT
) -> None:
    """A new durable on TELEMETRY that starts at the first message (any old one removed)."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(TELEMETRY, durable)
    await js.add_consumer(
        TELEMETRY,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=policy,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=20_000,
        ),
    )


async def raw_drain(js: JetStreamContext, total: int, batch: int = 1000) -> float:
    """The floor: a bare pull consumer that fetches and acks, nothing else."""
    durable = "bench_raw_drain"
    await fresh_consumer(js, durable)
    sub = await js.pull_subscribe_bind(durable=durable, stream=TELEMETRY)
    got = 0
    start = time.perf_counter()
    while got < total:
        msgs: list[Msg] = await sub.fetch(batch, timeout=5)
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await js._nc.flush()  # pyright: ignore[reportPrivateUsage]
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    await js.delete_consumer(TELEMETRY, durable)
    return got / elapsed


async def lean_drain(nc: Client, js: JetStreamContext, total: int) -> float:
    """A second floor: the projector's own pull loop and acks (as it acknowledges telemetry:
    one cumulative ack per round, projector.cursor), with no decoding, reducing or KV writes:
    what is left of the projector when its work is free."""
    durable = "bench_lean_drain"
    await fresh_consumer(js, durable, cursor.ack_policy(TELEMETRY))
    inbox = Inbox(8000)
    puller = Puller(nc, TELEMETRY, durable, inbox, batch=1000)
    task = asyncio.create_task(puller.run())
    got = 0
    start = time.perf_counter()
    try:
        while got < total:
            await inbox.ready.wait()
            msgs = inbox.take(8000)
            await ack_all(nc, msgs[-1:])
            got += len(msgs)
        await nc.flush()
        elapsed = time.perf_counter() - start
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    await js.delete_consumer(TELEMETRY, durable)
    return got / elapsed


async def projector_drain(
    url: str,
    js: JetStreamContext,
    fleet: Fleet,
    rounds: int,
    extra: list[str],
    server_pid: int | None = None,
) -> tuple[float, int, dict[str, float]]:
    """(messages per second, lost, CPU seconds per process) for a projector process draining
    the backlog."""
    await reset(js, purge_telemetry=False)
    info = await js.stream_info(TELEMETRY)
    total, last_seq = int(info.state.messages), int(info.state.last_seq)
    proc = spawn_projector(url, extra)
    pids = {"nats-server": server_pid, "projector": proc.pid, "bench": os.getpid()}
    try:
        start = await wait_leading(js, proc)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        done = await wait_drained(js, TELEMETRY, CONSUMERS[TELEMETRY], last_seq)
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        stop_projector(proc)
    states = await kv_devices(js)
    lost = sum(
        1
        for i in range(fleet.devices)
        if (s := states.get(keys.device_key(*fleet.device(i)))) is None
        or s.sample.seq != rounds - 1
    )
    return total / (done - start), lost, cpu


async def partitions_drain(
    url: str,
    nc: Client,
    js: JetStreamContext,
    fleet: Fleet,
    rounds: int,
    count: int,
    server_pid: int | None,
) -> tuple[float, int, dict[str, float], int, float]:
    """(messages per second, lost, CPU seconds per process, messages timed, the server's CPU
    seconds per message to source the backlog into the partitions' stream) for ``count``
    partition processes draining the backlog together (``projector.partition``): what was left
    when the last one took its lease, over the time until the last has acknowledged its share."""
    await reset(js, purge_telemetry=False)
    parts = [Partition(i, count) for i in range(count)]
    for name in partitions.stream_names(count):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
    total = int((await js.stream_info(TELEMETRY)).state.messages)
    # Sourcing is outside the timed drain (as storing the backlog in TELEMETRY is for both
    # arms), but live it is paid for every sample on top of TELEMETRY's store: say how much.
    sourcing = cpu_seconds(server_pid) if server_pid else 0.0
    await partitions.provision(nc, count)  # copies the whole backlog again
    await wait_sourced(js, partitions.stream_name(count), total)
    sourcing = (cpu_seconds(server_pid) - sourcing) / total if server_pid and total else 0.0
    procs = [spawn_projector(url, ["--partition", f"{p.index}/{count}"]) for p in parts]
    pids = {
        "nats-server": server_pid,
        **{f"partition {p.index}": q.pid for p, q in zip(parts, procs, strict=True)},
        "bench": os.getpid(),
    }
    try:
        starts = [
            await wait_leading(js, proc, p.lease_key) for p, proc in zip(parts, procs, strict=True)
        ]
        # Processes start seconds apart on a loaded machine: time only the part of the drain
        # during which every partition runs (from the last one leading, what was left).
        begun = time.perf_counter()
        done_before = sum([await share_done(js, p) for p in parts])
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ends = [await wait_share_drained(js, p) for p in parts]
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    finally:
        for proc in procs:
            stop_projector(proc)
    window = max(ends) - max(begun, *starts)
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    states = await kv_devices(js)
    lost = sum(
        1
        for i in range(fleet.devices)
        if (s := states.get(keys.device_key(*fleet.device(i)))) is None
        or s.sample.seq != rounds - 1
    )
    return (total - done_before) / window, lost, cpu, total - done_before, sourcing


async def kv_last_seq(js: JetStreamContext) -> int:
    """The KV stream's last sequence: a purge keeps it, so the difference over a drain is the
    KV writes it made (a backlog holds several samples per device, and a round that holds two
    of one device writes once: the writes per message say how much of that a drain got)."""
    return int((await js.stream_info(kv_stream(CLUSTER_STATE))).state.last_seq)


async def share_done(js: JetStreamContext, part: Partition) -> int:
    """Messages of its share a partition has acknowledged so far."""
    durable = part.consumers()[part.stream][0]
    try:
        info = await js.consumer_info(part.stream, durable)
    except NotFoundError:
        return 0
    delivered = info.delivered.consumer_seq if info.delivered else 0
    return max(0, (delivered or 0) - (info.num_ack_pending or 0))


async def wait_sourced(js: JetStreamContext, stream: str, total: int) -> None:
    """Until the partitions' stream holds the whole backlog (the server copies it over)."""
    while True:
        if int((await js.stream_info(stream)).state.messages) >= total:
            return
        await asyncio.sleep(0.05)


async def wait_share_drained(js: JetStreamContext, part: Partition) -> float:
    """A filtered consumer's ack floor stops at its last message, not the stream's: done is
    nothing pending and nothing unacknowledged."""
    durable = part.consumers()[part.stream][0]
    while True:
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(part.stream, durable)
            delivered = info.delivered.stream_seq if info.delivered else 0
            if info.num_pending == 0 and info.num_ack_pending == 0 and delivered:
                return time.perf_counter()
        await asyncio.sleep(0.02)


# --- phase 2: lag at a steady rate ---------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass
class LagResult:
    lags_ms: list[float]  # publish -> visible in a KV watch, for the watched devices
    stage_ms: list[float]  # server clock: sample stored in TELEMETRY -> its value stored in KV
    published: int
    lost: int
    cpu_pct: dict[str, float]


async def lag_run(
    url: str,
    nc: Client,
    js: JetStreamContext,
    fleet: Fleet,
    seconds: float,
    rate: float,
    server_pid: int | None,
) -> LagResult:
    """Publish at ``rate`` msg/s for ``seconds`` (round-robin over the fleet: every GPU once
    per fleet/rate seconds) and time each watched sample until a KV watcher sees it.

    The watcher follows GPU 0 of every node (1 in 8 samples, 1,000 devices): watching all
    8,000 would double the bench process's own load on this 2-core machine and measure that
    instead. ``lost`` still covers every device (final KV value vs last published) and every
    message (stream count vs published)."""
    await reset(js, purge_telemetry=True)
    proc = spawn_projector(url, [])
    sent_at: dict[tuple[str, int], dict[int, float]] = {}
    last_seq: dict[tuple[str, int], int] = {}
    seen_seq: dict[tuple[str, int], int] = {}
    visible: set[tuple[str, int, int]] = set()
    lags: list[float] = []
    stage: list[float] = []

    async def on_update(msg: Msg) -> None:
        now = time.perf_counter()
        state = _STATE.decode(msg.data)
        device = (state.sample.node, state.sample.index)
        seq = state.sample.seq
        if (*device, seq) in visible:
            return
        visible.add((*device, seq))
        seen_seq[device] = max(seen_seq.get(device, -1), seq)
        t = sent_at.get(device, {}).get(seq)
        if t is not None:
            lags.append((now - t) * 1000.0)
            info = parse_ack_subject(msg.reply or "")
            if info is not None:
                stage.append((info.timestamp - state.last_seen) * 1000.0)

    watcher = await js.subscribe(
        kv_subject(CLUSTER_STATE, "devices.*.0"),
        stream=kv_stream(CLUSTER_STATE),
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
        cb=on_update,
        pending_msgs_limit=1_000_000,
    )
    published = 0
    cpu: dict[str, float] = {}
    try:
        await wait_leading(js, proc)
        await asyncio.sleep(0.5)  # consumers bound, cache loaded
        pids = {
            "projector": proc.pid,
            "nats-server": server_pid,
            "bench (publisher+watcher)": os.getpid(),
        }
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        deadline = start + seconds
        while (now := time.perf_counter()) < deadline:
            due = int((now - start) * rate)
            while published < due:
                i = published % fleet.devices
                seq = published // fleet.devices
                device = fleet.device(i)
                data = _ENCODER.encode(make_sample(*device, seq, time.time()))
                if device[1] == 0:
                    sent_at.setdefault(device, {})[seq] = time.perf_counter()
                last_seq[device] = seq
                # Core publish: the stream stores it all the same; whether it did is checked
                # below from the stream's count, without 4,000 PubAcks/s on this process.
                await nc.publish(subjects.gpu_sample(*device), data)
                published += 1
            await asyncio.sleep(0.005)
        await nc.flush()
        wall = time.perf_counter() - start
        cpu = {
            name: round(100.0 * (cpu_seconds(pid) - cpu_before[name]) / wall, 1)
            for name, pid in pids.items()
        }
        # Let the tail land: every watched device's last sample visible (or 10 s).
        watched_last = {device: max(seqs) for device, seqs in sent_at.items()}
        settle = time.perf_counter() + 10
        while time.perf_counter() < settle:
            if all(seen_seq.get(d, -1) >= seq for d, seq in watched_last.items()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the other devices' last writes
    finally:
        await watcher.unsubscribe()
        log = stop_projector(proc)
    slow = [line for line in log.splitlines() if "slow round" in line]
    if slow:
        print(f"projector logged {len(slow)} slow rounds during the lag run, e.g. {slow[0]}")
    stored = int((await js.stream_info(TELEMETRY)).state.messages)
    lost = max(0, published - stored)
    for device, seqs in sent_at.items():
        newest_seen = seen_seq.get(device, -1)
        lost += sum(1 for seq in seqs if (*device, seq) not in visible and seq > newest_seen)
    final = await kv_devices(js)
    lost += sum(
        1
        for device, seq in last_seq.items()
        if (s := final.get(keys.device_key(*device))) is None or s.sample.seq != seq
    )
    return LagResult(lags, stage, published, lost, cpu)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --- main -------------------------------------------------------------------------------------------

_NATS_PY = ["--nats-py-fetch", "--no-direct", "--serial-rounds"]
_LATER = ["--no-direct", "--serial-rounds"]
ABLATION: list[tuple[str, list[str]]] = [
    (
        "nats-py fetch(100), rounds of 100, 1 write at a time",
        [*_NATS_PY, "--fetch-batch", "100", "--max-round", "100", "--no-pipeline"],
    ),
    (
        "+ fetch(1000), rounds of 1000",
        [*_NATS_PY, "--fetch-batch", "1000", "--max-round", "1000", "--no-pipeline"],
    ),
    ("+ pipelined CAS writes", [*_NATS_PY, "--fetch-batch", "1000", "--max-round", "1000"]),
    ("+ rounds of up to 8000 (coalescing)", _NATS_PY),
    ("+ lean pull loop", _LATER),
    ("+ direct delivery from the read loop", _LATER[1:]),
    ("+ next round applied during writes (= default)", []),
    ("  with atomic batch writes (one PubAck per 1000)", ["--batches"]),
    ("  rounds of up to 32000", ["--max-round", "32000", "--max-ack-pending", "50000"]),
]


async def run(
    url: str, quick: bool, args: argparse.Namespace, server_pid: int | None = None
) -> dict[str, Any]:
    fleet = Fleet(args.nodes, args.gpus)
    rounds = args.rounds or (3 if quick else 10)
    lag_seconds = args.lag_seconds or (5.0 if quick else 15.0)
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=8000)
    try:
        await reset(js, purge_telemetry=True)
        total = await publish_backlog(js, fleet, rounds)
        raw_rates: list[float] = []
        lean_rates: list[float] = []
        rates: list[float] = []
        lost_total = 0
        repeats = 1 if quick else 3
        ablation: list[tuple[str, float]] = []
        single_cpu: dict[str, float] = {}
        parted: list[float] = []
        parted_cpu: dict[str, float] = {}
        parted_msgs = 0
        sourcing: list[float] = []
        writes: dict[str, list[float]] = {"single": [], "partitioned": []}
        for _ in range(repeats):
            raw_rates.append(await raw_drain(js, total))
            lean_rates.append(await lean_drain(nc, js, total))
            kv_before = await kv_last_seq(js)
            rate, lost, single_cpu = await projector_drain(url, js, fleet, rounds, [], server_pid)
            writes["single"].append((await kv_last_seq(js) - kv_before) / total)
            rates.append(rate)
            lost_total += lost
            if args.partitions >= 1:
                # Right after the one-projector drain it is compared with: on a shared machine
                # whose load drifts, both arms of each pair meet the same conditions (all of
                # one arm's runs first, then all of the other's, did not).
                kv_before = await kv_last_seq(js)
                rate_n, lost, parted_cpu, parted_msgs, sourced = await partitions_drain(
                    url, nc, js, fleet, rounds, args.partitions, server_pid
                )
                writes["partitioned"].append((await kv_last_seq(js) - kv_before) / total)
                parted.append(rate_n)
                sourcing.append(sourced)
                lost_total += lost
        if args.ablation:
            for name, extra in ABLATION:
                rate, lost, _ = await projector_drain(url, js, fleet, rounds, extra)
                lost_total += lost
                ablation.append((name, rate))
        lag = await lag_run(url, nc, js, fleet, lag_seconds, args.rate, server_pid)
        lost_total += lag.lost
    finally:
        await nc.close()
    raw = statistics.median(raw_rates)
    lean = statistics.median(lean_rates)
    rate = statistics.median(rates)
    return {
        "fleet": f"{fleet.nodes} nodes x {fleet.gpus} GPUs",
        "backlog_msgs": total,
        "msgs_per_s": round(rate),
        "raw_drain_msgs_per_s": round(raw),
        "ratio": round(rate / raw, 3),
        "lean_drain_msgs_per_s": round(lean),
        "ratio_vs_lean_drain": round(rate / lean, 3),
        "runs_msgs_per_s": [round(r) for r in rates],
        "runs_raw_drain_msgs_per_s": [round(r) for r in raw_rates],
        "lag_rate_msgs_per_s": args.rate,
        "lag_published": lag.published,
        "lag_samples": len(lag.lags_ms),
        "lag_p50_ms_at_4000": round(percentile(lag.lags_ms, 50), 1),
        "lag_p99_ms_at_4000": round(percentile(lag.lags_ms, 99), 1),
        "lag_max_ms": round(max(lag.lags_ms), 1) if lag.lags_ms else None,
        "projector_stage_p50_ms": round(percentile(lag.stage_ms, 50), 1),
        "projector_stage_p99_ms": round(percentile(lag.stage_ms, 99), 1),
        "lost": lost_total,
        "lag_cpu_pct": lag.cpu_pct,
        "ablation": {name: round(r) for name, r in ablation},
        **partition_figures(
            args.partitions, parted, rate, parted_cpu, parted_msgs, sourcing, rates
        ),
        **cpu_accounting(args.partitions, total, single_cpu, parted_msgs, parted_cpu, rate),
        # KV writes per backlog message, each run: below 1 where a round merged samples of one
        # device (a backlog only; live, a round holds each device once)
        **{
            f"kv_writes_per_msg_{arm}": [round(w, 3) for w in ws]
            for arm, ws in writes.items()
            if ws
        },
    }


def partition_figures(
    count: int,
    rates: list[float],
    single: float,
    cpu: dict[str, float],
    msgs: int,
    sourcing: list[float],
    singles: list[float],
) -> dict[str, Any]:
    if count < 1 or not rates:
        return {}
    rate = statistics.median(rates)
    window = msgs / rates[-1] if rates[-1] else 0.0
    return {
        "partitions": count,
        "partitioned_msgs_per_s": round(rate),
        "runs_partitioned_msgs_per_s": [round(r) for r in rates],
        # of one core, during the last partitioned drain
        "partitioned_cpu_pct": {k: round(100 * v / window, 1) for k, v in cpu.items()}
        if window
        else {},
        "scaleout_ratio": round(rate / single, 3),
        # each partitioned run over the one-projector run just before it
        "runs_scaleout_ratio": [round(p / s, 3) for p, s in zip(rates, singles, strict=False)],
        # not in the timed drain: what the server spent per message copying the backlog into
        # the partitions' stream (live, every sample costs this on top)
        "sourcing_server_us_per_msg": round(1e6 * statistics.median(sourcing), 1)
        if sourcing
        else None,
    }


def cpu_accounting(
    count: int,
    single_msgs: int,
    single: dict[str, float],
    parted_msgs: int,
    parted: dict[str, float],
    single_rate: float,
) -> dict[str, Any]:
    """Where the CPU goes, in microseconds of CPU per message drained, for the last single
    and partitioned drains; and the ceiling that puts on the scale-out on this machine.

    With one projector the drain is bound by the projector (p us/msg) while the server (q)
    runs on the other core; with N partitions on C cores every message still costs p + q
    somewhere, so N / 1 is at most min(N, C / (1 + s)) with s = q / p (the server's work per
    unit of projector work). That assumes the single projector keeps its core busy; where it
    waits (for the server's acks), the measured one-projector rate is below 1 / p, and the
    ceiling is the machine's: C cores over the CPU a partitioned message costs, divided by
    the measured one-projector rate."""
    if count < 1 or not single or not parted or not single_msgs or not parted_msgs:
        return {}
    one = {k: round(v / single_msgs * 1e6, 1) for k, v in single.items()}
    many = {k: round(v / parted_msgs * 1e6, 1) for k, v in parted.items()}
    p = one.get("projector", 0.0)
    share = one.get("nats-server", 0.0) / p if p else 0.0
    cores = os.cpu_count() or 1
    spent = sum(many.values())
    bound = cores * 1e6 / spent if spent > 0 else 0.0
    return {
        "cpu_us_per_msg_single": one,
        "cpu_us_per_msg_partitioned": many,
        "server_share_s": round(share, 3),
        "scaleout_ceiling": round(min(count, cores / (1 + share)), 3),
        "cpu_bound_msgs_per_s": round(bound) if bound else None,
        "scaleout_ceiling_measured": round(min(count, bound / single_rate), 3)
        if bound and single_rate
        else None,
        "cores": cores,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench projector-throughput")
    parser.add_argument("--nats-url", default=None, help="a scratch server (default: start one)")
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--ablation", action="store_true", help="measure each optimisation")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="backlog samples per GPU")
    parser.add_argument("--lag-seconds", type=float, default=None)
    parser.add_argument("--rate", type=float, default=LAG_RATE)
    parser.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="also drain the backlog with this many partition processes (scaleout_ratio; "
        "1 measures what the partitioned path costs one projector)",
    )
    args = parser.parse_args(argv or [])
    quick = quick or args.quick

    if args.nats_url:
        result = asyncio.run(run(args.nats_url, quick, args))
    else:
        with (
            tempfile.TemporaryDirectory(prefix="shardplane-bench-") as store,
            NatsServer(store_dir=store) as server,
        ):
            pid = server.proc.pid if server.proc is not None else None
            result = asyncio.run(run(server.url, quick, args, pid))

    rows = [
        ("fleet", result["fleet"], f"backlog {result['backlog_msgs']} samples"),
        (
            "projector: stream -> KV",
            f"{result['msgs_per_s']:,} msg/s",
            f"runs {result['runs_msgs_per_s']}",
        ),
        (
            "floor: bare pull consumer",
            f"{result['raw_drain_msgs_per_s']:,} msg/s",
            f"runs {result['runs_raw_drain_msgs_per_s']}",
        ),
        ("ratio", f"{result['ratio']:.2f}", f"target >= {TARGET_RATIO}"),
        (
            "floor 2: our pull loop + bulk acks",
            f"{result['lean_drain_msgs_per_s']:,} msg/s",
            f"projector / this = {result['ratio_vs_lean_drain']:.2f}",
        ),
        *((f"  ablation: {name}", f"{r:,} msg/s", "") for name, r in result["ablation"].items()),
        (
            "lag p50 at 4,000 msg/s",
            f"{result['lag_p50_ms_at_4000']} ms",
            f"{result['lag_samples']} samples",
        ),
        (
            "lag p99 at 4,000 msg/s",
            f"{result['lag_p99_ms_at_4000']} ms",
            f"target <= {TARGET_P99_MS:g} ms",
        ),
        (
            "  of which projector (server clock)",
            f"p50 {result['projector_stage_p50_ms']} ms",
            f"p99 {result['projector_stage_p99_ms']} ms: TELEMETRY store -> KV store",
        ),
        ("lost", str(result["lost"]), "target 0"),
        *(
            [
                (
                    f"{result['partitions']} partitions: stream -> KV",
                    f"{result['partitioned_msgs_per_s']:,} msg/s",
                    f"runs {result['runs_partitioned_msgs_per_s']}",
                ),
                (
                    "scaleout ratio (N partitions / 1)",
                    f"{result['scaleout_ratio']:.2f}",
                    f"target >= {TARGET_SCALEOUT}; pairs {result['runs_scaleout_ratio']}",
                ),
                (
                    "  KV writes per message drained",
                    f"{result.get('kv_writes_per_msg_partitioned')}",
                    f"1 projector {result.get('kv_writes_per_msg_single')} (backlog merging)",
                ),
                *(
                    (f"  CPU us/msg, 1 projector: {name}", f"{us}", "")
                    for name, us in result.get("cpu_us_per_msg_single", {}).items()
                ),
                *(
                    (f"  CPU us/msg, partitioned: {name}", f"{us}", "")
                    for name, us in result.get("cpu_us_per_msg_partitioned", {}).items()
                ),
                (
                    "  not timed: server CPU us/msg to copy into the partitions' streams",
                    f"{result.get('sourcing_server_us_per_msg')}",
                    "live, paid per sample on top of storing it in TELEMETRY",
                ),
                (
                    "  ceiling: cores / CPU per partitioned msg",
                    f"{result.get('cpu_bound_msgs_per_s') or 0:,} msg/s",
                    f"/ one projector's measured rate = {result.get('scaleout_ceiling_measured')}",
                ),
                (
                    "  ceiling min(N, cores / (1 + s))",
                    f"{result.get('scaleout_ceiling', float('nan'))}",
                    f"s = server / projector CPU = {result.get('server_share_s')}, "
                    f"load average {result.get('load_avg_1m')} on {result.get('cores')} cores",
                ),
            ]
            if "scaleout_ratio" in result
            else []
        ),
        *(
            (f"  CPU during lag run: {name}", f"{pct}%", "of one core")
            for name, pct in result["lag_cpu_pct"].items()
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")
    ok = (
        result["ratio"] >= TARGET_RATIO
        and result["msgs_per_s"] >= TARGET_RATE
        and result["lag_p99_ms_at_4000"] <= TARGET_P99_MS
        and result["lost"] == 0
        and (result.get("partitions", 1) < 2 or result["scaleout_ratio"] >= TARGET_SCALEOUT)
    )
    result["targets_met"] = ok
    if not ok:
        print(
            "targets missed; on a shared 2-core machine the absolute figures follow the load "
            "(CPU shares above): compare the ratio, and rerun when the machine is quiet"
        )
    print(json.dumps(result))
    return 0
