"""The async shell around :class:`api.batching.Batch`: one per served instance, it sends each
lane's (micro-batch's) steps through the pipeline and hands the sampled tokens to the requests.

Why one task per lane: each lane has at most one step in flight and the M lanes run
concurrently, so micro-batch i is at stage k while micro-batch i+1 is at stage k-1, the
schedule the planner's P(M) prices. A lane whose sequences all left sleeps until a request
joins it.

The batch size and M come from the instance's plan in the planner's ledger (its reply stored
under the ledger entry's ``plan_key``): ``batch`` is what KV memory was reserved for, and
``microbatches`` the schedule it was priced at. An instance whose plan cannot be read (no
ledger, a plan from an older planner) runs one sequence at a time, which is what any plan
promised memory for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from shardplane.agents.pipeline import PipelineClient, PipelineError, rows_per_frame
from shardplane.api.batching import Batch, QueueFull, Sampled, Seq, Step
from shardplane.bus import authority
from shardplane.bus.messages import PlacementReply, StageEntry

log = logging.getLogger(__name__)

PREFILL_CHUNK = 64  # prompt rows per step: a joining prompt delays the running decodes by this
RECENT_STEPS = 64  # decode steps the live ms/token figure is the median of


@dataclass(frozen=True)
class PlanFigures:
    """What the plan promised the instance: the batch it holds KV for, its M, and its step time
    P(M) and tokens/s at that batch (0 when not known)."""

    batch: int = 1
    microbatches: int = 1
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    from_plan: bool = False

    @classmethod
    def of(cls, reply: PlacementReply) -> PlanFigures:
        return cls(
            batch=max(1, reply.batch),
            microbatches=max(1, reply.microbatches or 1),
            step_ms=reply.step_ms,
            tokens_per_s=reply.tokens_per_s,
            from_plan=True,
        )


async def plan_figures(nc: Client, instance: str, timeout_s: float = 5.0) -> PlanFigures:
    """The instance's plan as the ledger holds it now; the defaults when it cannot be read."""

    async def read() -> PlanFigures:
        kv = await authority.ledger_bucket(nc.jetstream())
        if kv is None:
            return PlanFigures()
        entry = (await authority.read(kv)).instances.get(instance)
        if entry is None or entry.released:
            return PlanFigures()
        reply = await authority.stored_reply(kv, entry.plan_key)
        return PlanFigures.of(reply) if reply is not None and reply.ok else PlanFigures()

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except (TimeoutError, NatsError) as exc:
        log.warning(
            "instance %s: its plan is unreadable (%s); serving one at a time", instance, exc
        )
        return PlanFigures()


@dataclass
class Ticket:
    """A request's place in the batch: sampled tokens (or the error that ended it) arrive on
    ``events``; ``queued`` while it waits for a slot."""

    seq: Seq
    events: asyncio.Queue[Sampled | PipelineError] = field(
        default_factory=lambda: asyncio.Queue[Sampled | PipelineError]()
    )
    queued: bool = False


@dataclass
class Batcher:
    """Serves one instance's requests as one continuously batched pipeline."""

    client: PipelineClient
    plan: PlanFigures
    queue_limit: int
    settings: dict[str, dict[str, Any]] = field(default_factory=lambda: {})
    tickets: dict[str, Ticket] = field(default_factory=lambda: {})
    recent_ms: deque[float] = field(default_factory=lambda: deque[float](maxlen=RECENT_STEPS))
    widest: int = 0  # the most sequences one step carried (how much batching happened)
    steps: int = 0
    batch: Batch = field(init=False)
    _wake: list[asyncio.Event] = field(init=False)
    _lanes: list[asyncio.Task[None]] = field(default_factory=lambda: [])
    _releases: set[asyncio.Task[None]] = field(default_factory=lambda: set[asyncio.Task[None]]())

    def __post_init__(self) -> None:
        per_frame = rows_per_frame(self.client.nc.max_payload, self.client.hidden)
        self.batch = Batch(
            capacity=self.plan.batch,
            microbatches=self.plan.microbatches,
            queue_limit=self.queue_limit,
            prefill_chunk=min(PREFILL_CHUNK, per_frame),
        )
        self._wake = [asyncio.Event() for _ in range(self.batch.microbatches)]

    # --- what the requests call -------------------------------------------------------------

    def submit(self, seq: Seq, settings: dict[str, Any]) -> Ticket:
        """Join the batch or its queue; QueueFull when both are full."""
        ticket = Ticket(seq)
        ticket.queued = not self.batch.submit(seq)
        self.tickets[seq.rid] = ticket
        self.settings[seq.rid] = settings
        self._start()
        if not ticket.queued:
            self._wake[seq.lane].set()
        return ticket

    def leave(self, rid: str) -> None:
        """The request is over (done, stopped, client gone): free its slot now."""
        self.tickets.pop(rid, None)
        self.settings.pop(rid, None)
        release, joined = self.batch.leave(rid)
        self._release(release)
        self._joined(joined)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the running sequence closest to its end, at
        the recent step time (the plan's before any step ran)."""
        step_ms = self.step_ms() or self.plan.step_ms or 100.0
        left = min((s.max_tokens - s.produced for s in self.batch.running.values()), default=1)
        return max(1, math.ceil(left * step_ms / 1000))

    def step_ms(self) -> float | None:
        """The median time between two tokens of a sequence over the recent decode steps."""
        return statistics.median(self.recent_ms) if self.recent_ms else None

    async def close(self) -> None:
        for task in [*self._lanes, *self._releases]:
            task.cancel()
        for task in [*self._lanes, *self._releases]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._lanes.clear()

    # --- the lanes ---------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._lanes:
            self._lanes = [
                asyncio.create_task(
                    self._lane(lane), name=f"batch-{self.client.instance_id}-{lane}"
                )
                for lane in range(self.batch.microbatches)
            ]

    def _joined(self, joined: Sequence[Seq]) -> None:
        for seq in joined:
            ticket = self.tickets.get(seq.rid)
            if ticket is not None:
                ticket.queued = False
            self._wake[seq.lane].set()

    def _release(self, rids: Sequence[str]) -> None:
        if rids:
            task = asyncio.create_task(self.client.release(list(rids)))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _lane(self, lane: int) -> None:
        last_round: float | None = None
        while True:
            step = self.batch.next_step(lane)
            if step is None:
                last_round = None
                self._wake[lane].clear()
                await self._wake[lane].wait()
                continue
            self.widest = max(self.widest, len(step.work))
            self.steps += 1
            try:
                reply = await self.client.step(self._entries(step), self._inputs(step))
            except PipelineError as exc:
                self._fail(step, exc)
                continue
            except Exception as exc:  # a transport failure is the step's, never the lane's
                log.exception("instance %s: a step failed", self.client.instance_id)
                self._fail(step, PipelineError(f"step failed: {exc!r}", "internal"))
                continue
            if len(reply.tokens) != len(step.work):  # a stage bug: never let it kill the lane
                got = len(reply.tokens)
                message = f"a step of {len(step.work)} entries came back with {got} tokens"
                self._fail(step, PipelineError(message, "internal"))
                continue
            now = time.perf_counter()
            if last_round is not None and all(len(w.tokens) == 1 for w in step.work):
                self.recent_ms.append((now - last_round) * 1000)
            last_round = now
            sampled, release = self.batch.finished(step, reply.tokens)
            self._release(release)
            self._joined(self.batch.promote())
            # The requests get their tokens once the lane's next step is on its way: handed
            # over now, their handlers (a server-sent event each) would run before nats-py's
            # flusher writes that step out, and every step would wait for them.
            asyncio.get_running_loop().call_soon(self._deliver, sampled)

    def _deliver(self, sampled: Sequence[Sampled]) -> None:
        for token in sampled:
            ticket = self.tickets.get(token.rid)
            if ticket is not None:
                ticket.events.put_nowait(token)

    def _entries(self, step: Step) -> list[StageEntry]:
        return [
            StageEntry(seq_id=w.rid, start=w.start, count=len(w.tokens), **self.settings[w.rid])
            if w.rid in self.settings
            else StageEntry(seq_id=w.rid, start=w.start, count=len(w.tokens))
            for w in step.work
        ]

    @staticmethod
    def _inputs(step: Step) -> list[int]:
        return [t for w in step.work for t in w.tokens]

    def _fail(self, step: Step, exc: PipelineError) -> None:
        lost, release = self.batch.failed(step)
        self._release(release)
        for rid in lost:
            ticket = self.tickets.get(rid)
            if ticket is not None:
                ticket.events.put_nowait(exc)
        self._joined(self.batch.promote())


__all__ = ["Batcher", "PlanFigures", "QueueFull", "Ticket", "plan_figures"]
