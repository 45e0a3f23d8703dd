"""What one write round of the projector carries: the messages taken together, each decoded
(or found poison), and what applying them produced (the overlay, deferred, rejected, applied).

Why its own module: the runner (``projector.service``) and the dead-letter path
(``projector.deadletter``) both handle these items; plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.aio.msg import Msg

from shardplane.projector.decode import AckInfo
from shardplane.projector.reducer import Event
from shardplane.projector.store import Overlay


@dataclass(slots=True)
class Item:
    msg: Msg
    info: AckInfo | None
    event: Event | None  # None: poison
    reason: str = ""


@dataclass(slots=True)
class Round:
    """Messages taken together: decoded, applied over a base view, written, settled."""

    items: list[Item]
    sweep_due: bool
    due_keys: list[str] | None
    size: int
    now: float  # the time liveness is judged at: never past what TELEMETRY has delivered
    overlay: Overlay = field(init=False)
    deferred: list[tuple[Item, str]] = field(default_factory=list[tuple[Item, str]])
    rejected: list[tuple[Item, str]] = field(default_factory=list[tuple[Item, str]])
    applied: list[Item] = field(default_factory=list[Item])
