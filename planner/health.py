"""The controller's judgement, pure: is an instance broken, degraded enough to move, or fine?

Hard faults (a stage's device lost or offline, its node offline, its device out of memory) are
acted on at once, once the controller's cache is known to be as new as the bucket (see
``confirm_s``): the instance cannot serve. Memory has two lines. *Out of memory*: the stage
already holds its weights + KV (its own memory is inside the device's "used"), so what it
still needs is working memory for its runtime's allocations (``full_min_bytes``); with less
free than that the stage cannot run, and it moves now. *Getting full*: others ate most of the
headroom the request kept free, but the stage still fits. That is where memory flaps: the
simulator's workload phases (and real neighbours) swing for tens of seconds, so it moves only
once the line has been crossed on every check for ``full_hold_s`` (``FullWatch``); one reading
back above the line starts the count again.

Soft reasons (a throttled or busier device) are where controllers flap: telemetry is noisy,
and a plan that is 3 % faster this second is 3 % slower the next. So a soft move needs all of:

- a degradation: the current plan, priced with *smoothed* bandwidth (an exponential moving
  average per device), is worse than when it was placed by more than ``margin``;
- a better plan: the planner's dry run (``heal=True``: minimal moves) beats the current plan
  by more than ``margin`` too;
- persistence: both held for ``hold_checks`` consecutive checks;
- payback: the relative gain over ``payback_s`` of serving exceeds the time to load the bytes
  that move (``bytes_moved / load_gbps``).

The instance's own work must not count against its devices: the controller prices its devices
with ``build_fleet(own=...)``, which ignores utilisation on them (see ``planner.fleet``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shardplane.bus.messages import DeviceState, NodeState, Stage


@dataclass(frozen=True, slots=True)
class HealConfig:
    interval_s: float = 1.0  # how often every instance is checked
    margin: float = 0.15  # relative gain (and degradation) a soft move needs
    hold_checks: int = 3  # consecutive checks a soft reason must hold
    smoothing: float = 0.3  # EWMA weight of the newest bandwidth reading
    payback_s: float = 600.0  # serving time over which a move's gain must repay its load
    load_gbps: float = 2.0  # assumed load rate (GB/s) to price a move
    # A stage's device is getting full when others took more than this share of the headroom
    # the request kept free (the planner left at least the headroom free when it placed it),
    # i.e. less than ``1 - full_share`` of it is left. Measured with bench heal over 10 minutes
    # of the simulator's workload phases (others' memory swings, no fault): healed at once at
    # 0.5, the instance moved once on the demo fleet and 4 times on 64 GPUs (devices down to
    # 3.55 GiB free of 80); at 0.75 not on the demo fleet, twice on 64 GPUs (1.86 GiB free: the
    # phases can take any share). Held for ``full_hold_s`` (30 s) first: no move in the same
    # 10 minutes on 64 GPUs. A fill fault (98 % used) leaves 20 % of a 10 % headroom and is
    # still caught, ``full_hold_s`` after it began (tests/e2e/test_heal.py).
    full_share: float = 0.75
    full_hold_s: float = 30.0  # getting full must hold on every check this long (and 3 checks)
    full_hold_checks: int = 3
    # Out of memory: free below this, the stage's runtime has no working memory left.
    full_min_bytes: int = 256 * 2**20
    retry_s: float = 5.0  # after a failed heal, wait this long before trying again
    # A fault is confirmed on a cache that has every write the bucket held when the fault was
    # seen; the watch gets this long to get there (else: judged again on the next check).
    confirm_s: float = 2.0


def hard_fault(
    stages: Sequence[Stage], devices: Mapping[str, DeviceState], nodes: Mapping[str, NodeState]
) -> str | None:
    """Why the instance cannot serve now, or None."""
    for s in stages:
        node = nodes.get(s.node)
        if node is not None and not node.online:
            return f"node {s.node} offline ({node.offline_reason or 'silent'})"
        dev = devices.get(s.device)
        if dev is None:
            return f"device {s.device} gone from the cluster state"
        if not dev.sample.present:
            return f"device {s.device} lost"
        if not dev.online:
            return f"device {s.device} offline ({dev.offline_reason or 'silent'})"
    return None


def out_of_memory(
    stages: Sequence[Stage], devices: Mapping[str, DeviceState], cfg: HealConfig
) -> str | None:
    """A stage's device has less free memory than the stage still needs: its weights + KV are
    already held (inside "used"), so that is its runtime's working memory,
    ``cfg.full_min_bytes``. A device reporting everything used (others took part of what the
    stage held) is the extreme case."""
    for s in stages:
        free, total = _memory(devices, s.device)
        if free is not None and free < cfg.full_min_bytes:
            return (
                f"device {s.device} is out of memory ({free / 2**20:.0f} MiB free of "
                f"{total / 2**30:.0f} GiB; the stage holds {s.memory_bytes / 2**30:.1f} GiB and "
                f"needs {cfg.full_min_bytes / 2**20:.0f} MiB more to run)"
            )
    return None


def getting_full(
    stages: Sequence[Stage],
    devices: Mapping[str, DeviceState],
    cfg: HealConfig,
    headroom: float = 0.1,
) -> str | None:
    """A stage whose device no longer keeps the request's headroom: something else took the
    memory the plan left free (the instance's own memory is already inside "used", so its own
    load never counts). ``headroom`` is the request's ``memory_headroom``. Not a reason to move
    by itself: ``FullWatch`` wants it held."""
    for s in stages:
        free, total = _memory(devices, s.device)
        if free is None:
            continue
        line = (1.0 - cfg.full_share) * headroom * total
        if free < max(cfg.full_min_bytes, line):
            return (
                f"device {s.device} is full ({free / 2**30:.2f} GiB free of {total / 2**30:.0f}, "
                f"under {line / 2**30:.2f} GiB: {1.0 - cfg.full_share:.0%} of the "
                f"{headroom:.0%} headroom)"
            )
    return None


def _memory(devices: Mapping[str, DeviceState], ref: str) -> tuple[int | None, int]:
    dev = devices.get(ref)
    if dev is None:
        return None, 0
    free, total = dev.sample.memory_free_bytes, dev.sample.memory_total_bytes
    if free is None or not total:
        return None, 0
    return free, total


@dataclass(slots=True)
class FullWatch:
    """Since when "getting full" has held on every check of one instance. A window, not an
    average: a fill that stays is caught ``full_hold_s`` after it starts whatever its depth,
    and any one check with the headroom back (a phase that ends, a spike that passes) resets
    it."""

    since: float | None = None
    checks: int = 0

    def hold(self, reason: str | None, now: float, cfg: HealConfig) -> str | None:
        """The reason to move now (with how long it held), or None."""
        if reason is None:
            self.since, self.checks = None, 0
            return None
        if self.since is None:
            self.since = now
        self.checks += 1
        held = now - self.since
        if held >= cfg.full_hold_s and self.checks >= cfg.full_hold_checks:
            self.since, self.checks = None, 0
            return f"{reason} for {held:.0f} s"
        return None


def value(stages: Sequence[Stage], objective: str, bandwidth: Mapping[str, float]) -> float:
    """The plan's value (ms) with each stage's time rescaled from the bandwidth it was planned
    with to ``bandwidth`` (GB/s; a device missing there keeps its planned figure)."""
    per: list[float] = []
    for s in stages:
        now = bandwidth.get(s.device, s.bandwidth_gbps)
        scale = s.bandwidth_gbps / now if now > 0 else 1e6
        per.append(s.stage_ms * scale + s.hop_ms)
    if not per:
        return 0.0
    return sum(per) if objective == "latency" else max(per)


def planned_value(stages: Sequence[Stage], objective: str) -> float:
    return value(stages, objective, {})


@dataclass(slots=True)
class Smoother:
    """Per-device EWMA of effective bandwidth."""

    alpha: float
    values: dict[str, float] = field(default_factory=dict[str, float])

    def update(self, readings: Mapping[str, float]) -> dict[str, float]:
        for ref, bw in readings.items():
            old = self.values.get(ref)
            self.values[ref] = bw if old is None else old + self.alpha * (bw - old)
        return dict(self.values)


def degraded(current: float, planned: float, cfg: HealConfig) -> bool:
    return planned > 0 and current > planned * (1.0 + cfg.margin)


def worth_moving(current: float, candidate: float, moved_bytes: int, cfg: HealConfig) -> bool:
    """The candidate beats the current plan by more than the margin, and the gain over the
    payback window is worth more than the time its load takes."""
    if candidate <= 0 or current <= candidate * (1.0 + cfg.margin):
        return False
    gain = 1.0 - candidate / current
    load_s = moved_bytes / (cfg.load_gbps * 1e9)
    return gain * cfg.payback_s > load_s


@dataclass(slots=True)
class Streak:
    """How many consecutive checks a soft reason has held for one instance."""

    reason: str = ""
    count: int = 0

    def hold(self, reason: str | None) -> int:
        if reason is None:
            self.reason, self.count = "", 0
        else:
            self.reason, self.count = reason, self.count + 1
        return self.count
