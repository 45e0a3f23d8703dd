"""The controller: re-places instances whose devices fail or degrade (``shardplane controller``).

A thin async shell around ``planner.health``: it watches ``cluster_state`` (the planner's own
watch-fed cache) and reads the ledger every check; it never plans or numbers generations
itself. A heal is the instance's own request, stored in its ledger entry, sent again over
``placement.request`` with ``heal=True``: the planner re-plans with minimal moves and owns the
new generation like any other. The controller's verdicts go out as InstanceHealth on
``placement.health.<instance>`` (the projector folds them into the instance's KV value):
``degraded`` when it decides, ``healing`` once the new generation is committed, ``ready`` when
every stage of it is loaded (or reserved), ``failed`` with the planner's reason.

Any number of replicas may run: only the holder of the ``controller_lease`` bucket's key acts
(``bus.lease``, the projector's mechanism). Two active controllers for a moment would at worst
send the same heal twice; the ledger's compare-and-set orders them and the second finds the
instance already healed (its devices are fine), so nothing moves twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue

from shardplane.bus import codec, subjects
from shardplane.bus.lease import CONTROLLER_LEASE_BUCKET, Lease
from shardplane.bus.messages import (
    DeviceState,
    ErrorInfo,
    HealthState,
    InstanceHealth,
    PlacementReply,
    PlacementRequest,
    Stage,
)
from shardplane.bus.streams import CLUSTER_STATE, LEDGER, kv_stream, provision
from shardplane.bus.wait import wait_set
from shardplane.bus.watchguard import stream_head
from shardplane.planner import health, ledger
from shardplane.planner.fleet import UTIL_FLOOR, build_fleet, peak_bandwidth
from shardplane.planner.service import StateCache

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0
LAG_WARN_S = 10.0  # a cache behind the bucket this long (no heals meanwhile) is warned of
_READY = frozenset({"loaded", "reserved"})


@dataclass(frozen=True, slots=True)
class Decision:
    """One heal the controller started (tests and the bench read these)."""

    at: float
    instance_id: str
    reason: str
    soft: bool
    generation: int = 0  # the generation it healed to (0: the heal failed)


@dataclass(slots=True)
class _Healing:
    generation: int
    reason: str


@dataclass(slots=True)
class Controller:
    nc: Client
    config: health.HealConfig = field(default_factory=health.HealConfig)
    decisions: list[Decision] = field(default_factory=list[Decision])
    leading: asyncio.Event = field(default_factory=asyncio.Event)
    cache: StateCache = field(default_factory=StateCache)
    _smoother: health.Smoother = field(init=False)
    _streaks: dict[str, health.Streak] = field(default_factory=dict[str, health.Streak])
    _filling: dict[str, health.FullWatch] = field(default_factory=dict[str, health.FullWatch])
    _healing: dict[str, _Healing] = field(default_factory=dict[str, _Healing])
    _retry_at: dict[str, float] = field(default_factory=dict[str, float])
    _replies: dict[str, PlacementReply] = field(default_factory=dict[str, PlacementReply])
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Confirming hard faults (see _confirmed): this pass's verdict (None: not asked yet), the
    # bucket revision last asked for, and since when the cache has been behind it.
    _pass_confirmed: bool | None = None
    _target: int = 0
    _lagging_since: float | None = None
    _lag_warned_at: float = 0.0

    def __post_init__(self) -> None:
        self._smoother = health.Smoother(self.config.smoothing)

    async def run(self, stop: asyncio.Event) -> None:
        js = self.nc.jetstream()
        await provision(js)
        ledger_kv = await js.key_value(LEDGER)
        follower = asyncio.create_task(self.cache.follow(js, stop))
        lease = Lease(js, bucket=CONTROLLER_LEASE_BUCKET, role="controller")
        try:
            while not stop.is_set():
                if not await lease.acquire(stop):
                    break
                lost = asyncio.Event()
                holder = asyncio.create_task(lease.hold(lost))
                self.leading.set()
                try:
                    await self._lead(ledger_kv, stop, lost)
                finally:
                    self.leading.clear()
                    holder.cancel()
                    with contextlib.suppress(BaseException):
                        await holder
        finally:
            await lease.release()
            follower.cancel()
            with contextlib.suppress(BaseException):
                await follower

    async def _lead(self, ledger_kv: KeyValue, stop: asyncio.Event, lost: asyncio.Event) -> None:
        await wait_set(self.cache.ready, 10.0)
        while not stop.is_set() and not lost.is_set():
            try:
                await self.check_all(ledger_kv)
            except Exception:  # the bus is away, a bad value...: the next check tries again
                log.exception("controller check failed")
            await wait_set(stop, self.config.interval_s)

    async def check_all(self, ledger_kv: KeyValue) -> None:
        doc, _ = await ledger.read(ledger_kv)
        self._pass_confirmed = None
        # What is kept per instance and plan is only kept while the ledger still has it.
        live_keys = {e.plan_key for e in doc.instances.values()}
        self._replies = {k: v for k, v in self._replies.items() if k in live_keys}
        prefixes = tuple(f"{i}:" for i in doc.instances)
        self._smoother.values = {
            k: v for k, v in self._smoother.values.items() if k.startswith(prefixes)
        }
        for instance_id, entry in sorted(doc.instances.items()):
            if entry.released or entry.request is None:
                self._forget(instance_id)
                continue
            if not entry.published:
                continue  # the planner's repair finishes it first
            stored = await self._reply(ledger_kv, entry)
            if stored is not None:
                await self.check(instance_id, entry, stored)

    def _forget(self, instance_id: str) -> None:
        self._healing.pop(instance_id, None)
        self._streaks.pop(instance_id, None)
        self._filling.pop(instance_id, None)
        self._retry_at.pop(instance_id, None)

    async def _reply(self, kv: KeyValue, entry: ledger.LedgerEntry) -> PlacementReply | None:
        if (hit := self._replies.get(entry.plan_key)) is None:
            hit = await ledger.stored_reply(kv, entry.plan_key)
            if hit is not None:
                self._replies[entry.plan_key] = hit
        return hit

    async def check(
        self, instance_id: str, entry: ledger.LedgerEntry, stored: PlacementReply
    ) -> None:
        if (healing := self._healing.get(instance_id)) is not None:
            await self._follow_heal(instance_id, healing)
            return
        if time.monotonic() < self._retry_at.get(instance_id, 0.0):
            return
        judged, reason = await self._hard_fault(instance_id, stored.stages)
        if not judged:
            return  # judged on a later check, on a cache that holds what the plan was made from
        if reason is not None:
            await self._heal(instance_id, entry, reason, soft=False)
            return
        headroom = entry.request.memory_headroom if entry.request is not None else 0.1
        filling = self._filling.setdefault(instance_id, health.FullWatch())
        full = health.getting_full(stored.stages, self.cache.devices, self.config, headroom)
        if (why := filling.hold(full, time.monotonic(), self.config)) is not None:
            await self._heal(instance_id, entry, why, soft=True)
            return
        await self._check_soft(instance_id, entry, stored)

    def _fault_now(self, stages: tuple[Stage, ...]) -> str | None:
        devices = self.cache.devices
        return health.hard_fault(stages, devices, self.cache.nodes) or health.out_of_memory(
            stages, devices, self.config
        )

    async def _hard_fault(
        self, instance_id: str, stages: tuple[Stage, ...]
    ) -> tuple[bool, str | None]:
        """(judged, why the instance cannot serve). A fault is judged again once this
        controller's cache holds every write the bucket had: the plan may be newer than this
        cache (the planner's own watch saw a device join, or come back, a moment before this
        one did, or this one is replaying after a lost server), and a heal on the older view
        would move an instance off devices that are fine. Not judged when the cache could not
        get there in time."""
        if (seen := self._fault_now(stages)) is None:
            return True, None
        if not await self._confirmed(instance_id, seen):
            return False, None
        return True, self._fault_now(stages)

    async def _confirmed(self, instance_id: str, seen: str) -> bool:
        """Whether the cache has caught up with the bucket, asked once per pass: every plan a
        pass checks was committed before it read the ledger, so one target taken after that
        covers them all (and a cache that cannot get there costs the pass one wait, not one
        per faulty instance)."""
        if self._pass_confirmed is None:
            self._pass_confirmed = await self._catch_up()
            if self._pass_confirmed:
                self._lagging_since = None
            else:
                self._report_lag(instance_id, seen)
        return self._pass_confirmed

    async def _catch_up(self) -> bool:
        wait = self.config.confirm_s
        try:
            self._target = await stream_head(self.nc.jetstream(), kv_stream(CLUSTER_STATE), wait)
        except Exception as exc:  # an election, a lost server: the next pass asks again
            log.debug("controller: cluster_state's last revision unknown: %r", exc)
            return False
        return await self.cache.reached(self._target, wait)

    def _report_lag(self, instance_id: str, seen: str) -> None:
        now = time.monotonic()
        first = self._lagging_since is None
        since = self._lagging_since = self._lagging_since or now
        level = logging.DEBUG
        if first:
            level = logging.INFO
        elif now - since >= LAG_WARN_S and now - self._lag_warned_at >= LAG_WARN_S:
            self._lag_warned_at, level = now, logging.WARNING
        log.log(
            level,
            "controller: %s looks broken (%s) to a cache at revision %d of %d, behind the bucket "
            "for %.0f s: judged again once it has caught up",
            instance_id,
            seen,
            self.cache.revision,
            self._target,
            now - since,
        )

    async def _check_soft(
        self, instance_id: str, entry: ledger.LedgerEntry, stored: PlacementReply
    ) -> None:
        cfg = self.config
        streak = self._streaks.setdefault(instance_id, health.Streak())
        readings = self._readings(stored.stages)
        smoothed = self._smoother.update({f"{instance_id}:{k}": v for k, v in readings.items()})
        mine = {k: smoothed[f"{instance_id}:{k}"] for k in readings}
        current = health.value(stored.stages, stored.objective, mine)
        planned = health.planned_value(stored.stages, stored.objective)
        if not health.degraded(current, planned, cfg):
            streak.hold(None)
            return
        assert entry.request is not None
        dry = await self._request(
            msgspec.structs.replace(entry.request, heal=True, dry_run=True), soft=True
        )
        better = dry.ok and health.worth_moving(
            current, health.planned_value(dry.stages, dry.objective), dry.bytes_moved or 0, cfg
        )
        slow = ", ".join(
            f"{st.device} at {mine[st.device]:.0f} GB/s (placed at {st.bandwidth_gbps:.0f})"
            for st in stored.stages
            if mine.get(st.device, st.bandwidth_gbps) < st.bandwidth_gbps / (1.0 + cfg.margin)
        )
        why = (
            f"{slow or 'slower devices'}: step {current:.2f} ms vs {planned:.2f} ms as placed; "
            f"a new plan gives {health.planned_value(dry.stages, dry.objective):.2f} ms"
            if better
            else None
        )
        if streak.hold(why) >= cfg.hold_checks and why is not None:
            streak.hold(None)
            await self._heal(instance_id, entry, why, soft=True)

    def _readings(self, stages: tuple[Stage, ...]) -> dict[str, float]:
        """Effective bandwidth now of the instance's devices, its own load not counted; a
        device the planner would leave out for heat runs at its clock ratio."""
        own = frozenset(s.device for s in stages)
        mine = [d for ref, d in self.cache.devices.items() if ref in own]
        fleet = build_fleet(mine, self.cache.nodes, own=own)
        out = {d.ref: d.bandwidth_gbps for d in fleet.devices}
        for ref, _why in fleet.excluded:
            state = self.cache.devices.get(ref)
            if state is not None and state.online and state.sample.present:
                out[ref] = _throttled_bandwidth(state)
        return out

    async def _heal(
        self, instance_id: str, entry: ledger.LedgerEntry, reason: str, *, soft: bool
    ) -> None:
        log.warning("controller: healing %s: %s", instance_id, reason)
        self._filling.pop(instance_id, None)  # the new plan's devices start their own count
        await self._verdict(instance_id, entry.generation, "degraded", reason)
        assert entry.request is not None
        reply = await self._request(msgspec.structs.replace(entry.request, heal=True), soft=soft)
        now = time.time()
        if not reply.ok:
            why = reply.error.message if reply.error is not None else "no reason given"
            self.decisions.append(Decision(now, instance_id, reason, soft))
            self._retry_at[instance_id] = time.monotonic() + self.config.retry_s
            await self._verdict(instance_id, entry.generation, "failed", f"{reason}; {why}")
            return
        self.decisions.append(Decision(now, instance_id, reason, soft, reply.generation))
        self._healing[instance_id] = _Healing(reply.generation, reason)
        moved = f"{(reply.bytes_moved or 0) / 1e9:.1f} GB moved, {(reply.bytes_kept or 0) / 1e9:.1f} GB kept"
        await self._verdict(instance_id, reply.generation, "healing", f"{reason}; {moved}")

    async def _follow_heal(self, instance_id: str, healing: _Healing) -> None:
        state = self.cache.instances.get(instance_id)
        if state is None or state.generation < healing.generation:
            return
        if state.generation > healing.generation:
            self._healing.pop(instance_id, None)  # someone placed it again meanwhile
            return
        if state.stages and len(state.stages) == state.stage_count:
            if all(s.state in _READY for s in state.stages):
                self._healing.pop(instance_id, None)
                await self._verdict(instance_id, healing.generation, "ready", healing.reason)
            elif any(s.state == "failed" for s in state.stages):
                self._healing.pop(instance_id, None)
                self._retry_at[instance_id] = time.monotonic() + self.config.retry_s
                failed = next(s for s in state.stages if s.state == "failed")
                await self._verdict(
                    instance_id,
                    healing.generation,
                    "failed",
                    f"stage {failed.stage} on {failed.device}: {failed.reason or 'failed'}",
                )

    async def _request(self, req: PlacementRequest, *, soft: bool) -> PlacementReply:
        try:
            msg = await self.nc.request(
                subjects.PLACEMENT_REQUEST, codec.encode(req), timeout=REQUEST_TIMEOUT_S
            )
            return codec.decode(PlacementReply, msg.data)
        except Exception as exc:
            log.log(logging.DEBUG if soft else logging.WARNING, "heal request failed: %r", exc)
            return PlacementReply(
                ok=False,
                error=ErrorInfo(code="unavailable", message=f"{type(exc).__name__}: {exc}"),
            )

    async def _verdict(
        self, instance_id: str, generation: int, state: HealthState, reason: str
    ) -> None:
        msg = InstanceHealth(
            instance_id=instance_id,
            generation=max(1, generation),
            state=state,
            ts=time.time(),
            seq=next(self._seq),
            reason=reason[:1000],
        )
        with contextlib.suppress(Exception):
            await self.nc.jetstream().publish(
                subjects.placement_health(instance_id), codec.encode(msg), timeout=2.0
            )


def _throttled_bandwidth(state: DeviceState) -> float:
    peak, _ = peak_bandwidth(state)
    s = state.sample
    ratio = 1.0
    if s.sm_clock_mhz and s.sm_clock_max_mhz:
        ratio = min(1.0, max(UTIL_FLOOR, s.sm_clock_mhz / s.sm_clock_max_mhz))
    return (peak or 0.0) * ratio


async def run_controller(
    nc: Client, *, stop: asyncio.Event, config: health.HealConfig | None = None
) -> None:
    """Watch and heal until ``stop`` is set (one active replica among any number)."""
    await Controller(nc, config or health.HealConfig()).run(stop)
