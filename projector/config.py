"""The projector's knobs (``ProjectorConfig``), its counters (``ProjectorStats``) and the
durable consumers it reads through.

Why apart from the runner: benchmarks, tests and the command line build configurations and
read the counters without needing the runner's machinery; the defaults and their reasons are
easier to review in one short file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardplane.bus.errors import ProjectorError
from shardplane.bus.streams import PLACEMENTS, SHARDS, TELEMETRY
from shardplane.projector.lease import DEFAULT_LEASE_TTL_S

CONSUMERS = {
    TELEMETRY: "projector_telemetry",
    PLACEMENTS: "projector_placements",
    SHARDS: "projector_shards",
}


@dataclass(frozen=True, slots=True)
class ProjectorConfig:
    ttl_s: float | None = None  # liveness TTL; None: 3 x each node's heartbeat interval
    fetch_batch: int = 1000
    max_round: int = 8000  # messages applied (and coalesced) per write round
    lean_pull: bool = True  # our pull loop (transport.Puller) instead of nats-py's fetch()
    # Pull requests outstanding per consumer (lean pull loop). Four, not two: while the
    # projector applies and writes, the server goes on delivering, so a backlog (a takeover,
    # a partition catching up) comes in full rounds; a partition's round then holds more
    # samples per device of its share, which coalesce into one write. Measured (bench
    # projector-throughput --partitions 2): partitioned drain +10-20 %, one projector unchanged.
    pull_depth: int = 4
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 10.0  # redelivery after a crash waits this long
    max_ack_pending: int = 40_000  # >= the round being written + the next + the inbox
    sweep_interval_s: float = 0.5
    full_sweep_interval_s: float = 30.0  # safety net under the deadline heap (TTL changes)
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    defer_delay_s: float = 0.25
    max_defers: int = 240  # a status whose assignment never comes is dead-lettered (~1 min)
    write_timeout_s: float = 10.0
    # A graceful stop finishes the round being written for at most this long (holding the
    # lease); past it the round is abandoned and its messages handed back for redelivery, so
    # a write the server is slow to answer cannot hold the standby off for write_timeout_s.
    stop_grace_s: float = 2.0
    stats_interval_s: float = 60.0  # log the counters this often
    probe_interval_s: float = 0.5  # how often TELEMETRY's leader is asked whether it is there
    slow_round_s: float = 0.25  # log rounds slower than this (latency diagnosis)
    pipeline_writes: bool = True  # False: one write at a time (only to measure what it buys)
    # Atomic batch writes where the server has them (2.12+): one PubAck per 1,000 writes, but
    # measured slower on the server than one PubAck each (README "Throughput"), so opt-in.
    atomic_batches: bool = False
    direct_delivery: bool = True  # deliveries and PubAcks straight from the read loop (wire.py)
    overlap_rounds: bool = True  # apply the next round while the last one is being written
    # Apply an assignment only at the generation the planner's ledger names (bus.authority);
    # off only where tests publish assignments by hand, without a planner.
    verify_generations: bool = True


@dataclass(slots=True)
class ProjectorStats:
    received: int = 0
    applied: int = 0
    rounds: int = 0
    writes: int = 0
    conflicts: int = 0
    write_errors: int = 0
    deferred: int = 0
    deadlettered: int = 0
    sweeps: int = 0
    leaderships: int = 0
    # Where the writer's time goes (seconds): applying, waiting for the KV's answers, acking.
    apply_s: float = 0.0
    write_wait_s: float = 0.0
    ack_s: float = 0.0
    idle_s: float = 0.0
    deadletter_reasons: dict[str, int] = field(default_factory=dict[str, int])

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "applied": self.applied,
            "rounds": self.rounds,
            "writes": self.writes,
            "conflicts": self.conflicts,
            "write_errors": self.write_errors,
            "deferred": self.deferred,
            "deadlettered": self.deadlettered,
            "sweeps": self.sweeps,
            "leaderships": self.leaderships,
            "apply_s": round(self.apply_s, 3),
            "write_wait_s": round(self.write_wait_s, 3),
            "ack_s": round(self.ack_s, 3),
            "idle_s": round(self.idle_s, 3),
        }


class LeaseLost(ProjectorError):
    pass
