"""The telemetry collector: reads a node's backend every interval and offers a DeviceSample per
device and a NodeHeartbeat to the publisher. One scheduler drives every node of the process, so
thousands of simulated nodes cost one task, spread evenly over the interval (no thundering herd).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from shardplane.agents.backend import Backend
from shardplane.agents.hostinfo import HostInfo
from shardplane.agents.publisher import Publisher
from shardplane.bus import VERSION as AGENT_VERSION
from shardplane.bus import codec, subjects
from shardplane.bus.messages import DeviceSample, NetLink, NodeHeartbeat
from shardplane.bus.wait import wait_set

log = logging.getLogger(__name__)

SLOTS_PER_INTERVAL = 20  # scheduler wake-ups per interval when many nodes share a process


def boot_id(epoch: float | None = None) -> str:
    """Distinguishes this agent run in message ids: seq restarts at 1 after a restart, and a
    restarted agent's first samples must not be taken for duplicates of the last run's."""
    epoch = time.time() if epoch is None else epoch
    return f"{int(epoch * 1000):x}{os.getpid() & 0xFFFF:04x}"


def sample_msg_id(node: str, index: int, boot: str, seq: int) -> str:
    return f"{node}.{index}.{boot}.{seq}"


def heartbeat_msg_id(node: str, boot: str, seq: int) -> str:
    return f"{node}.hb.{boot}.{seq}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    interval_s: float = 2.0
    temperature: bool = True
    power: bool = True


@dataclass(slots=True, kw_only=True)
class NodeCollector:
    """One node: its backend, what its heartbeat says, and its sequence numbers."""

    node: str
    backend: Backend
    host: HostInfo
    publisher: Publisher
    config: CollectorConfig
    boot: str
    epoch: float = 0.0  # when this agent run started: readers order samples by (epoch, seq)
    links: tuple[NetLink, ...] = ()
    default_link_gbps: float | None = None
    default_link_latency_ms: float | None = None
    skipped: dict[str, str] = field(default_factory=dict[str, str])
    seqs: dict[int, int] = field(default_factory=dict[int, int])
    heartbeat_seq: int = 0
    ticks: int = 0
    threaded: bool = False  # real hardware: read in a worker thread (see tick_async)
    skipped_cycles: int = 0
    _reading: asyncio.Future[list[DeviceSample]] | None = None
    read_errors: int = 0
    _last_error: str | None = None
    totals: dict[int, int] = field(default_factory=dict[int, int])  # index -> memory, last read

    def memory_total(self, index: int) -> int | None:
        """The device's total memory as last read (None before the first reading): what the
        shard worker checks an assignment's bytes against."""
        return self.totals.get(index)

    def read(self, ts: float) -> list[DeviceSample]:
        """The backend's samples stamped with per-device sequence numbers. A backend that raises
        (it should not) costs this cycle's samples, never the agent."""
        try:
            raw = self.backend.read(
                ts, temperature=self.config.temperature, power=self.config.power
            )
        except Exception as exc:
            self.read_errors += 1
            text = f"{type(exc).__name__}: {exc}"
            if text != self._last_error:
                log.exception("%s: the %s backend failed to read", self.node, self.backend.name)
            self._last_error = text
            return []
        out: list[DeviceSample] = []
        for sample in raw:
            if sample.memory_total_bytes is not None:
                self.totals[sample.index] = sample.memory_total_bytes
            seq = self.seqs.get(sample.index, 0) + 1
            self.seqs[sample.index] = seq
            out.append(msgspec.structs.replace(sample, seq=seq, epoch=self.epoch))
        return out

    def heartbeat(
        self, ts: float, *, online: bool = True, device_count: int | None = None
    ) -> NodeHeartbeat:
        self.heartbeat_seq += 1
        return NodeHeartbeat(
            node=self.node,
            seq=self.heartbeat_seq,
            ts=ts,
            epoch=self.epoch,
            online=online,
            hostname=self.host.hostname,
            agent_version=AGENT_VERSION,
            cpu_count=self.host.cpu_count,
            host_memory_bytes=self.host.host_memory_bytes,
            interfaces=self.host.interfaces,
            links=self.links,
            interconnect=self.backend.interconnect,
            backend=self.backend.name,
            skipped=self.skipped,
            device_count=self.backend.device_count() if device_count is None else device_count,
            interval_s=self.config.interval_s,
            default_link_gbps=self.default_link_gbps,
            default_link_latency_ms=self.default_link_latency_ms,
            address=self.host.address,
        )

    def tick(self, ts: float | None = None) -> int:
        """Read once and offer every message; returns how many were offered."""
        ts = time.time() if ts is None else ts
        return self.offer_samples(ts, self.read(ts))

    async def tick_async(self) -> int:
        """``tick``, with a real backend's read in a worker thread: an NVML or SMI call can hang
        on a sick GPU, and that must not freeze publishing, the worker or shutdown. While one
        read is stuck no second one is started (threads would pile up); the cycle is skipped."""
        ts = time.time()
        if not self.threaded:
            return self.tick(ts)
        if self._reading is not None and not self._reading.done():
            self.skipped_cycles += 1
            return 0
        self._reading = asyncio.ensure_future(asyncio.to_thread(self.read, ts))
        done, _ = await asyncio.wait((self._reading,), timeout=max(5.0, 2 * self.config.interval_s))
        if not done:
            self.skipped_cycles += 1
            log.warning(
                "%s: reading the %s backend is taking over %.0f s",
                self.node,
                self.backend.name,
                max(5.0, 2 * self.config.interval_s),
            )
            return 0
        return self.offer_samples(ts, self._reading.result())

    def offer_samples(self, ts: float, samples: list[DeviceSample]) -> int:
        self.ticks += 1
        silenced: Callable[[], bool] | None = getattr(self.backend, "silenced", None)
        if silenced is not None and silenced():
            return 0  # a simulated node gone silent: it reads (its clock runs) but says nothing
        for s in samples:
            self.publisher.offer(
                subjects.gpu_sample(self.node, s.index),
                codec.encode(s),
                sample_msg_id(self.node, s.index, self.boot, s.seq),
            )
        self.offer_heartbeat(ts, online=True, device_count=len(samples))
        return len(samples) + 1

    def offer_heartbeat(self, ts: float, *, online: bool, device_count: int | None = None) -> None:
        hb = self.heartbeat(ts, online=online, device_count=device_count)
        self.publisher.offer(
            subjects.node_heartbeat(self.node),
            codec.encode(hb),
            heartbeat_msg_id(self.node, self.boot, hb.seq),
        )


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        return
    await wait_set(stop, delay)


def slot_of(i: int, n: int, slots: int) -> int:
    """Spread n nodes evenly over the slots of an interval."""
    return (i * slots) // n if n else 0


async def run_collectors(
    collectors: Sequence[NodeCollector],
    stop: asyncio.Event,
    interval_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Tick every collector once per interval until ``stop``. A late wake-up skips the ticks
    it missed rather than bursting through them (telemetry is a latest-value signal)."""
    n = len(collectors)
    slots = 1 if n <= 1 else min(SLOTS_PER_INTERVAL, n)
    groups: list[list[NodeCollector]] = [[] for _ in range(slots)]
    for i, c in enumerate(collectors):
        groups[slot_of(i, n, slots)].append(c)
    step = interval_s / slots
    start = clock()
    k = 0  # global slot counter
    while not stop.is_set():
        group = groups[k % slots]
        for c in group:
            if c.threaded:
                await c.tick_async()
            else:
                c.tick()
        k += 1
        due = start + k * step
        now = clock()
        if now > due + interval_s:  # fell behind by a whole interval: realign, do not burst
            k = int((now - start) / step) + 1
            due = start + k * step
        # Yield even when on time, so the publisher and the workers run between slots.
        await _sleep_or_stop(stop, due - clock())
        await asyncio.sleep(0)


def final_heartbeats(collectors: Sequence[NodeCollector]) -> None:
    """On a graceful shutdown, each node says it is going offline."""
    ts = time.time()
    for c in collectors:
        c.offer_heartbeat(ts, online=False)
