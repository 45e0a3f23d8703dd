"""Failover: kill -9 the leader of a stream under load, and measure what anyone notices.

Its own 3-server cluster (replicas 3), the projector and the planner on it, simulated agents
publishing a sample per device every interval (each publish retried through elections with
its ``Nats-Msg-Id``), placement requests in a loop, and two observers of every write to
``cluster_state`` (core subscriptions pinned to two different servers, so a kill never blinds
both). Then, ``kills`` times: SIGKILL the server leading TELEMETRY, the KV or the ledger,
wait until the system works again, start the server again (same port, same store), wait until
every stream has all its replicas current, go on.

Figures (the last line, JSON):

- ``unavailable_s_p50`` / ``unavailable_s_max``: per kill, seconds from the kill until a
  placement request succeeds *and* a sample published after the kill shows in the KV;
- ``lost``: acknowledged publishes (telemetry, placements) the cluster no longer has, plus
  devices whose KV value is not the last sample acknowledged for it at the end;
- ``false_offline``: writes of a device as offline while every agent was publishing;
- the floor: the same measure for a plain publish to TELEMETRY (raw NATS, no projector or
  planner), with the ratio.

Targets: unavailable_s_max <= 15, lost = 0, false_offline = 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.bus import codec, keys, subjects
from shardplane.bus.connect import connect
from shardplane.bus.liveness import ttl_from_env
from shardplane.bus.messages import DeviceSample, DeviceState, PlacementReply
from shardplane.bus.retry import Outage, retrying
from shardplane.bus.streams import (
    CLUSTER_STATE,
    DEADLETTER,
    LEDGER,
    PLACEMENTS,
    SHARDS,
    TELEMETRY,
    kv_stream,
    kv_subject,
)
from shardplane.bus.wait import wait_set
from shardplane.cluster import NatsCluster, stream_cluster, stream_leader
from shardplane.planner import ledger
from shardplane.planner.synthetic import device_state
from shardplane.projector.lease import LEASE_BUCKET
from shardplane.projector.reducer import Liveness

log = logging.getLogger(__name__)

KV_STREAM = kv_stream(CLUSTER_STATE)
TARGETS = (TELEMETRY, KV_STREAM, kv_stream(LEDGER))
KV_PREFIX = kv_subject(CLUSTER_STATE)
TARGET_UNAVAILABLE_S = 15.0
EVERY_STREAM = (*TARGETS, PLACEMENTS, SHARDS, DEADLETTER, kv_stream(LEASE_BUCKET))


@dataclass
class Observed:
    """What the load and the observers saw, for the checks at the end."""

    acked: dict[str, list[tuple[int, int]]] = field(
        default_factory=dict[str, list[tuple[int, int]]]
    )
    last_acked: dict[str, int] = field(default_factory=dict[str, int])  # device key -> seq
    last_acked_at: dict[str, float] = field(default_factory=dict[str, float])  # -> time.time()
    published_at: dict[str, dict[int, float]] = field(default_factory=dict[str, dict[int, float]])
    placements: list[tuple[float, float, str, int]] = field(
        default_factory=list[tuple[float, float, str, int]]
    )  # (sent, answered, instance, generation) of every ok reply
    placement_errors: dict[str, int] = field(default_factory=dict[str, int])
    offline: list[tuple[float, str, str]] = field(default_factory=list[tuple[float, str, str]])
    kv_seen: dict[str, tuple[float, int]] = field(default_factory=dict[str, tuple[float, int]])
    writes_seen: int = 0
    # When the agents were told to stop (time.time()): from then on a device going offline is
    # the truth, not a false alarm, and the checks at the end can take longer than a TTL.
    load_stopped_at: float = float("inf")


@dataclass(frozen=True)
class Load:
    nodes: int = 3
    gpus: int = 4
    interval_s: float = 1.0
    placement_every_s: float = 0.5

    def devices(self) -> list[tuple[str, int]]:
        return [(f"ha-{n}", i) for n in range(self.nodes) for i in range(self.gpus)]


# --- the load ---------------------------------------------------------------------------------


async def agent(
    nc: Client,
    node: str,
    index: int,
    load: Load,
    seen: Observed,
    stop: asyncio.Event,
    outage: Outage,
) -> None:
    """One device's agent: a sample every interval, each retried with its Nats-Msg-Id until
    stored (as agents.publisher does), recording what the stream acknowledged."""
    js = nc.jetstream()
    template = device_state(node, index, "A100-80GB").sample
    epoch = time.time()
    key = keys.device_key(node, index)
    subject = subjects.gpu_sample(node, index)
    seq = 0
    while not stop.is_set():
        seq += 1
        sample = msgspec.structs.replace(template, seq=seq, ts=time.time(), epoch=epoch)
        seen.published_at.setdefault(key, {})[seq] = time.monotonic()
        data = codec.encode(sample)
        msg_id = f"{node}-{index}-{epoch}-{seq}"
        ack = await retrying(
            lambda d=data, m=msg_id: js.publish(
                subject, d, headers={"Nats-Msg-Id": m}, timeout=2.0
            ),
            f"agent {key}",
            deadline_s=120.0,
            outage=outage,
        )
        seen.acked.setdefault(subject, []).append((ack.seq, seq))
        seen.last_acked[key] = seq
        seen.last_acked_at[key] = time.time()
        await wait_set(stop, load.interval_s)


async def requester(nc: Client, load: Load, seen: Observed, stop: asyncio.Event) -> None:
    """Placement requests in a loop: four instances re-placed in turn with alternating context
    sizes, so every request is a new generation and a compare-and-set on the ledger."""
    n = 0
    while not stop.is_set():
        n += 1
        body = {
            "model": "llama-3.2-1b",
            "instance_id": f"ha-{n % 4}",
            "context_tokens": 4096 if (n // 4) % 2 else 8192,
        }
        sent = time.monotonic()
        try:
            msg = await nc.request(
                subjects.PLACEMENT_REQUEST, json.dumps(body).encode(), timeout=30.0
            )
            reply = codec.decode(PlacementReply, msg.data, "json")
        except Exception as exc:
            name = type(exc).__name__
            seen.placement_errors[name] = seen.placement_errors.get(name, 0) + 1
            log.info("placement request failed: %s", name)
            await asyncio.sleep(0.2)
            continue
        if reply.ok and reply.instance_id:
            seen.placements.append((sent, time.monotonic(), reply.instance_id, reply.generation))
        else:
            code = reply.error.code if reply.error else "?"
            seen.placement_errors[code] = seen.placement_errors.get(code, 0) + 1
            log.info("placement request failed: %s", reply.error)
        await wait_set(stop, load.placement_every_s)


async def observer(url: str, seen: Observed) -> Client:
    """A core subscription to every write to cluster_state on one server (no reconnect to
    another: two of these on different servers see every write between them)."""

    async def on_write(msg: Msg) -> None:
        key = msg.subject[len(KV_PREFIX) :]
        seen.writes_seen += 1
        if keys.prefix(key) != keys.DEVICES or not msg.data:
            return
        try:
            state = codec.decode(DeviceState, msg.data)
        except codec.DecodeError:
            return
        if not state.online:
            seen.offline.append((time.time(), key, state.offline_reason or ""))
        held = seen.kv_seen.get(key)
        if held is None or state.sample.seq > held[1]:
            seen.kv_seen[key] = (time.monotonic(), state.sample.seq)

    nc = await connect(url, "failover-observer", reconnect_time_wait=0.2)
    await nc.subscribe(kv_subject(CLUSTER_STATE, f"{keys.DEVICES}.>"), cb=on_write)
    return nc


# --- the cluster ------------------------------------------------------------------------------


async def all_current(nc: Client, streams: Iterable[str], size: int) -> bool:
    """Every stream has a leader and all its other replicas current (a kill now loses no
    quorum)."""
    for stream in streams:
        cluster = await stream_cluster(nc, stream)
        if cluster is None or not cluster.leader or len(cluster.replicas) != size - 1:
            return False
        if not all(r.current and not r.offline for r in cluster.replicas):
            return False
    return True


async def until(check: Any, timeout_s: float, every_s: float = 0.1) -> float | None:
    """Seconds until ``await check()`` is true (None: not within ``timeout_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(every_s)
    return None


def recovered(seen: Observed, killed_at: float) -> bool:
    """A placement sent after the kill succeeded, and every device's KV value holds a sample
    published after it."""
    if not any(sent >= killed_at for sent, _, _, _ in seen.placements):
        return False
    for key, published in seen.published_at.items():
        after = [s for s, t in published.items() if t >= killed_at]
        shown = seen.kv_seen.get(key)
        if not after or shown is None or shown[1] < min(after):
            return False
    return True


@dataclass
class Kill:
    target: str
    server: str
    unavailable_s: float | None
    floor_s: float | None
    rejoined_s: float | None


async def floor_probe(nc: Client, target: str, killed_at: float) -> float | None:
    """The floor: seconds from the kill until a plain write to the killed stream is stored
    again (a sample of a probe device, or a probe key in the bucket), nothing else involved."""
    js = nc.jetstream()
    # Reported lost (present=False): written to TELEMETRY, the projector stores it like any
    # sample, but no planner places on it. A placeable probe device drew placements, went
    # silent after the kill and was healed away: the probe's doing, not the system's. (Into a
    # bucket, the probe is a key "floor", which nobody reads as a device.)
    sample = msgspec.structs.replace(
        device_state("floor", 0, "A100-80GB").sample, ts=time.time(), present=False
    )
    data = codec.encode(sample)

    # Short timeouts, so the floor is not rounded up to a client timeout.
    subject = (
        subjects.gpu_sample("floor", 0)
        if target == TELEMETRY
        else kv_subject(target.removeprefix(kv_stream("")), "floor")
    )

    async def stored() -> bool:
        try:
            await js.publish(subject, data, timeout=0.5)
        except Exception:
            return False
        return True

    return None if await until(stored, 60.0, every_s=0.05) is None else time.monotonic() - killed_at


async def kill_leader(
    cluster: NatsCluster, nc: Client, target: str, seen: Observed, recover_s: float
) -> Kill:
    """SIGKILL the server leading ``target``; measure until the system and the floor work
    again; start it again and wait until every stream has all replicas current."""
    leader = await stream_leader(nc, target)
    if leader is None:
        raise RuntimeError(f"{target} has no leader before the kill")
    member = cluster.member(leader)
    killed_at = time.monotonic()
    member.kill()
    log.info("killed %s (leader of %s)", leader, target)
    floor = asyncio.create_task(floor_probe(nc, target, killed_at))

    async def back() -> bool:
        return recovered(seen, killed_at)

    took = await until(back, recover_s)
    unavailable = None if took is None else time.monotonic() - killed_at
    floor_s = await floor
    await asyncio.to_thread(member.start)
    rejoined = await until(lambda: all_current(nc, EVERY_STREAM, len(cluster.members)), 60.0, 0.25)
    log.info(
        "%s: unavailable %s s (floor %s s); %s rejoined in %s s",
        target,
        _fmt(unavailable),
        _fmt(floor_s),
        leader,
        _fmt(rejoined),
    )
    return Kill(target, leader, unavailable, floor_s, rejoined)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- the checks -------------------------------------------------------------------------------


async def lost_telemetry(nc: Client, seen: Observed, per_subject: int = 64) -> int:
    """Acknowledged samples the stream no longer holds (within its per-subject limit: older
    ones are discarded by design)."""
    js = nc.jetstream()
    lost = 0
    for acked in seen.acked.values():
        for stream_seq, sample_seq in acked[-per_subject:]:
            try:
                msg = await retrying(lambda q=stream_seq: js.get_msg(TELEMETRY, q), "get_msg")
                kept = codec.decode(DeviceSample, msg.data or b"")
            except Exception:
                lost += 1
                continue
            lost += kept.seq != sample_seq
    return lost


async def assignments(nc: Client) -> set[tuple[str, int]]:
    """Every (instance, generation) PLACEMENTS holds an assignment of."""
    js = nc.jetstream()
    assigned: set[tuple[str, int]] = set()
    only = subjects.assigned(">")
    sub = await js.subscribe(only, stream=PLACEMENTS, ordered_consumer=True)
    try:
        # The stream also holds the controller's health verdicts: count what the filter reads.
        held = (await js.stream_info(PLACEMENTS, subjects_filter=only)).state.subjects or {}
        for _ in range(sum(held.values())):
            msg = await sub.next_msg(timeout=10.0)
            body = (
                json.loads(msg.data) if msg.data[:1] == b"{" else msgspec.msgpack.decode(msg.data)
            )
            assigned.add((str(body["instance_id"]), int(body["generation"])))
    finally:
        await sub.unsubscribe()
    return assigned


async def lost_placements(nc: Client, seen: Observed) -> int:
    """Acknowledged placements whose generation the ledger or the assignments no longer have."""
    js = nc.jetstream()
    doc, _ = await ledger.read(await retrying(lambda: js.key_value(LEDGER), "the ledger"))
    # Read again from the start if a request falls in the settling after a kill (the server
    # that was killed is back, but a consumer's creation can still time out then).
    assigned = await retrying(lambda: assignments(nc), "reading the assignments")
    lost = 0
    for _, _, instance, generation in seen.placements:
        entry = doc.instances.get(instance)
        lost += entry is None or entry.generation < generation
        lost += (instance, generation) not in assigned
    return lost


def false_offline(
    seen: Observed, known: set[str], ttl_s: float | None = None
) -> list[tuple[float, str, str]]:
    """Offline writes of the load's devices seen while every agent was publishing, or within
    the projector's TTL of the device's last stored sample (after the load stops, a device
    goes offline for real, and the checks that follow can outlast a TTL)."""
    ttl = Liveness(ttl_s or ttl_from_env()).ttl(None)  # the projector's, for a node without beats
    return [
        (at, key, why)
        for at, key, why in seen.offline
        if key in known
        and (at < seen.load_stopped_at or at < seen.last_acked_at.get(key, 0.0) + ttl)
    ]


async def kv_mismatches(nc: Client, seen: Observed, timeout_s: float = 30.0) -> list[str]:
    """Devices whose KV value is not the last sample acknowledged for them (waiting up to
    ``timeout_s`` for the projector to apply what is still on its way)."""
    js = nc.jetstream()
    kv = await retrying(lambda: js.key_value(CLUSTER_STATE), "the cluster_state bucket")
    wrong: list[str] = []

    async def check() -> bool:
        wrong.clear()
        for key, last in seen.last_acked.items():
            try:
                entry = await kv.get(key)
                state = codec.decode(DeviceState, entry.value or b"")
            except Exception:
                wrong.append(f"{key}: unreadable")
                continue
            if state.sample.seq != last:
                wrong.append(f"{key}: seq {state.sample.seq}, last acknowledged {last}")
        return not wrong

    await until(check, timeout_s, every_s=0.5)
    return wrong


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Report:
    kills: list[Kill]
    lost_telemetry: int
    lost_placements: int
    kv_wrong: list[str]
    false_offline: list[tuple[float, str, str]]
    placements_ok: int
    placement_errors: dict[str, int]
    samples_acked: int

    @property
    def lost(self) -> int:
        return self.lost_telemetry + self.lost_placements + len(self.kv_wrong)

    def figures(self) -> dict[str, Any]:
        down = [
            k.unavailable_s if k.unavailable_s is not None else float("inf") for k in self.kills
        ]
        floor = [k.floor_s for k in self.kills if k.floor_s is not None]
        worst = max(down) if down else 0.0
        return {
            "kills": len(self.kills),
            "unavailable_s_p50": round(statistics.median(down), 2) if down else 0.0,
            "unavailable_s_max": round(worst, 2) if worst != float("inf") else None,
            "floor_s_p50": round(statistics.median(floor), 2) if floor else None,
            "floor_s_max": round(max(floor), 2) if floor else None,
            "vs_floor_max": round(worst / max(floor), 2)
            if floor and worst != float("inf")
            else None,
            "lost": self.lost,
            "false_offline": len(self.false_offline),
            "placements_ok": self.placements_ok,
            "samples_acked": self.samples_acked,
        }


@dataclass
class Rig:
    """The running load: clients, observers and the tasks of agents and requester."""

    nc: Client
    clients: list[Client]
    work: list[asyncio.Task[None]]
    halt: asyncio.Event

    async def close(self) -> None:
        self.halt.set()
        for task in self.work:
            task.cancel()
        await asyncio.gather(*self.work, return_exceptions=True)
        for client in [self.nc, *self.clients]:
            with contextlib.suppress(Exception):
                await client.close()


async def start_load(cluster: NatsCluster, load: Load, seen: Observed) -> Rig:
    nc = await connect(cluster.url, "failover-bench")
    observers = [await observer(m.url, seen) for m in cluster.members]
    agents = [await connect(cluster.url, f"failover-agent-{n}") for n in range(load.nodes)]
    halt = asyncio.Event()
    # One outage log per agent process (connection), as agents.publisher does.
    outages = [Outage(f"agent ha-{n}", log) for n in range(load.nodes)]
    work = [
        asyncio.create_task(agent(agents[n], node, index, load, seen, halt, outages[n]))
        for node, index in load.devices()
        for n in [int(node.split("-")[1])]
    ]
    work.append(asyncio.create_task(requester(nc, load, seen, halt)))
    return Rig(nc, [*observers, *agents], work, halt)


async def run(
    kills: int,
    *,
    load: Load | None = None,
    targets: tuple[str, ...] = TARGETS,
    recover_s: float = 40.0,
    warmup_s: float = 60.0,
) -> Report:
    """The whole experiment on a fresh cluster (see the module docstring)."""
    from shardplane.commands import run_services

    load = load or Load()
    seen = Observed()
    done: list[Kill] = []
    async with NatsCluster(3) as cluster:
        stop = asyncio.Event()
        services = await run_services(cluster.url, stop, api=False, fleet=None)
        rig = await start_load(cluster, load, seen)
        nc = rig.nc
        try:
            ready = await until(lambda: _warm(nc, seen, load, len(cluster.members)), warmup_s, 0.2)
            if ready is None:
                raise RuntimeError(
                    f"the system did not come up in {warmup_s:g} s: {seen.placement_errors}"
                )
            seen.placement_errors.clear()  # "no devices" before the first samples: not failover
            for i in range(kills):
                target = targets[i % len(targets)]
                done.append(await kill_leader(cluster, nc, target, seen, recover_s))
            seen.load_stopped_at = time.time()
            rig.halt.set()
            await asyncio.gather(*rig.work)
            return await _report(nc, seen, load, done)
        finally:
            await rig.close()
            stop.set()
            await asyncio.gather(*services, return_exceptions=True)


async def _report(nc: Client, seen: Observed, load: Load, done: list[Kill]) -> Report:
    """The checks, once the load has stopped: what was acknowledged is still there."""
    wrong = await kv_mismatches(nc, seen)
    known = {keys.device_key(n, i) for n, i in load.devices()}
    return Report(
        kills=done,
        lost_telemetry=await lost_telemetry(nc, seen),
        lost_placements=await lost_placements(nc, seen),
        kv_wrong=wrong,
        false_offline=false_offline(seen, known),
        placements_ok=len(seen.placements),
        placement_errors=dict(seen.placement_errors),
        samples_acked=sum(len(a) for a in seen.acked.values()),
    )


async def _warm(nc: Client, seen: Observed, load: Load, size: int) -> bool:
    """Every device in the KV, a placement done, every stream with all replicas current."""
    if len(seen.kv_seen) < len(load.devices()) or not seen.placements:
        return False
    return await all_current(nc, EVERY_STREAM, size)


def table(report: Report) -> str:
    rows = [
        f"{'#':>2}  {'leader of':<22} {'server':<7} {'unavailable s':>13} {'floor s':>8} {'rejoined s':>10}"
    ]
    for i, k in enumerate(report.kills, 1):
        rows.append(
            f"{i:>2}  {k.target:<22} {k.server:<7} {_fmt(k.unavailable_s):>13} "
            f"{_fmt(k.floor_s):>8} {_fmt(k.rejoined_s):>10}"
        )
    rows.append(
        f"placements ok {report.placements_ok} (errors {report.placement_errors}); "
        f"samples acknowledged {report.samples_acked}; lost: telemetry {report.lost_telemetry}, "
        f"placements {report.lost_placements}, KV {len(report.kv_wrong)}; "
        f"false offline writes {len(report.false_offline)}"
    )
    return "\n".join(rows)


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench failover")
    parser.add_argument("--kills", type=int, default=2 if quick else 5)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus", type=int, default=4, help="devices per node")
    parser.add_argument("--interval", type=float, default=1.0, help="agent sample interval, s")
    args = parser.parse_args(argv or [])
    load = Load(nodes=args.nodes, gpus=args.gpus, interval_s=args.interval)
    report = asyncio.run(run(args.kills, load=load))
    print(table(report))
    for when, key, reason in report.false_offline[:10]:
        print(f"  false offline: {key} at {when:.3f}: {reason}")
    for line in report.kv_wrong[:10]:
        print(f"  KV wrong: {line}")
    figures = report.figures()
    print(json.dumps(figures))
    ok = (
        figures["unavailable_s_max"] is not None
        and figures["unavailable_s_max"] <= TARGET_UNAVAILABLE_S
        and figures["lost"] == 0
        and figures["false_offline"] == 0
    )
    return 0 if ok else 1
