"""Continuous batching for one placed instance, as pure bookkeeping: which sequences run, which
wait, and what each micro-batch's next pipeline step carries.

Why this shape: the planner priced the instance as B sequences decoding concurrently in M
micro-batches (``planner.schedule``: P(M) with micro-batch i at stage k while micro-batch i+1
is at stage k-1), and reserved KV memory for B sequences. So at most ``capacity`` = B
sequences hold a slot; each is pinned to one of the M *lanes* (micro-batches) when it joins,
the lane with the fewest members, and each lane has at most one step in flight, so the M lanes
are the M micro-batches the schedule assumes. A request joins between two steps of its lane:
its prompt goes through in chunks, as extra entries of the lane's decode steps (at most
``prefill_chunk`` prompt rows per step, shared by the prompts in join order), so the running
decodes wait for at most one chunk's compute, never a whole prompt. Beyond the batch, requests wait in a FIFO of at most
``queue_limit``; past that, :class:`QueueFull` (the API's 429).

A sequence that leaves (done, stopped, its client gone) frees its slot at once, and the
oldest waiting request takes it. Its KV caches on the stages are released right away, unless
a step carrying it is still in flight: a release overtaking that step would make a later stage
meet a sequence it no longer knows and fail the whole step, so the release waits for the step
to come back (:meth:`Batch.finished` returns it).

Nothing here does I/O or knows about time: ``api.batcher`` is the async shell that sends the
steps and hands tokens to the requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from shardplane.bus.errors import ApiServerError


class QueueFull(ApiServerError):
    """Every slot is taken and the wait queue is at its bound."""

    def __init__(self, capacity: int, waiting: int) -> None:
        super().__init__(
            f"all {capacity} batch slots are busy and {waiting} requests already wait "
            f"(the queue holds {waiting})"
        )
        self.capacity = capacity
        self.waiting = waiting


@dataclass
class Seq:
    """One request's sequence: its prompt, how far it got, and what to feed next."""

    rid: str
    prompt: tuple[int, ...]
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    lane: int = -1  # -1: waiting in the queue
    fed: int = 0  # prompt tokens the stages hold in their caches
    produced: int = 0  # tokens sampled so far
    last: int | None = None  # the newest sampled token: the next decode step's input

    @property
    def position(self) -> int:
        """The position the next token fed goes to."""
        return self.fed + max(self.produced - 1, 0)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass(frozen=True)
class Work:
    """One entry of a step: ``tokens`` fed to ``rid`` at positions ``start ..``; ``samples``
    says whether the token the last stage draws for it is the sequence's next token (a
    prompt's inner chunk is drawn from too, and thrown away)."""

    rid: str
    start: int
    tokens: tuple[int, ...]
    samples: bool


@dataclass(frozen=True)
class Step:
    lane: int
    work: tuple[Work, ...]

    @property
    def rows(self) -> int:
        return sum(len(w.tokens) for w in self.work)


@dataclass(frozen=True)
class Sampled:
    """A sampled token for ``rid``; ``done`` when it was the sequence's last (its slot is
    already free)."""

    rid: str
    token: int
    done: bool


@dataclass
class Batch:
    """The running batch of one instance and its wait queue."""

    capacity: int
    microbatches: int
    queue_limit: int
    prefill_chunk: int = 64
    running: dict[str, Seq] = field(default_factory=lambda: {})
    queue: deque[Seq] = field(default_factory=lambda: deque[Seq]())
    in_flight: dict[int, Step] = field(default_factory=lambda: {})
    _deferred: dict[int, list[str]] = field(default_factory=lambda: {})

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.microbatches < 1 or self.queue_limit < 0:
            raise ValueError(
                f"a batch needs capacity >= 1 and microbatches >= 1 and queue_limit >= 0, "
                f"got {self.capacity}, {self.microbatches}, {self.queue_limit}"
            )
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        self.microbatches = min(self.microbatches, self.capacity)

    # --- joining and leaving ---------------------------------------------------------------

    def submit(self, seq: Seq) -> bool:
        """Admit ``seq``: True when it runs now, False when it waits; QueueFull past the bound."""
        if not seq.prompt or seq.max_tokens < 1:
            raise ValueError(f"{seq.rid}: a sequence needs a prompt and max_tokens >= 1")
        if seq.rid in self.running or any(q.rid == seq.rid for q in self.queue):
            raise ValueError(f"{seq.rid}: already submitted")
        if len(self.running) < self.capacity:
            self._join(seq)
            return True
        if len(self.queue) >= self.queue_limit:
            raise QueueFull(self.capacity, len(self.queue))
        self.queue.append(seq)
        return False

    def _join(self, seq: Seq) -> None:
        sizes = self.lane_sizes()
        seq.lane = min(range(self.microbatches), key=lambda lane: (sizes[lane], lane))
        self.running[seq.rid] = seq

    def lane_sizes(self) -> list[int]:
        sizes = [0] * self.microbatches
        for seq in self.running.values():
            sizes[seq.lane] += 1
        return sizes

    def leave(self, rid: str) -> tuple[list[str], list[Seq]]:
        """Drop ``rid`` wherever it is. Returns the sequences whose caches to release now
        (empty when a step carrying it is in flight: :meth:`finished` returns it then) and the
        waiting sequences that took the freed slots."""
        for seq in self.queue:
            if seq.rid == rid:
                self.queue.remove(seq)
                return [], []
        seq = self.running.pop(rid, None)
        if seq is None:
            return [], []
        release = [rid]
        step = self.in_flight.get(seq.lane)
        if step is not None and any(w.rid == rid for w in step.work):
            self._deferred.setdefault(seq.lane, []).append(rid)
            release = []
        return release, self._promote()

    def _promote(self) -> list[Seq]:
        joined: list[Seq] = []
        while self.queue and len(self.running) < self.capacity:
            seq = self.queue.popleft()
            self._join(seq)
            joined.append(seq)
        return joined

    # --- steps -----------------------------------------------------------------------------

    def next_step(self, lane: int) -> Step | None:
        """The lane's next step: one decode row per sequence that has a token to feed, and
        prompt chunks of at most ``prefill_chunk`` rows in all (oldest prompt first); None when
        the lane has nothing to run (or a step of it is still in flight)."""
        if lane in self.in_flight:
            return None
        members = [s for s in self.running.values() if s.lane == lane]
        work = [
            Work(s.rid, s.position, (s.last,), True)
            for s in members
            if not s.prefilling and s.last is not None
        ]
        budget = self.prefill_chunk
        for filling in (s for s in members if s.prefilling):
            if budget == 0:
                break
            chunk = filling.prompt[filling.fed : filling.fed + budget]
            budget -= len(chunk)
            final = filling.fed + len(chunk) == len(filling.prompt)
            work.append(Work(filling.rid, filling.fed, chunk, final))
        if not work:
            return None
        step = Step(lane, tuple(work))
        self.in_flight[lane] = step
        return step

    def finished(self, step: Step, tokens: Sequence[int]) -> tuple[list[Sampled], list[str]]:
        """Apply a step's sampled ``tokens`` (one per work item). Returns the tokens for the
        requests, and the sequences whose caches to release now (finished or left while the
        step was in flight)."""
        if len(tokens) != len(step.work):
            raise ValueError(f"a step of {len(step.work)} entries came back with {len(tokens)}")
        self.in_flight.pop(step.lane, None)
        release = self._deferred.pop(step.lane, [])
        out: list[Sampled] = []
        for work, token in zip(step.work, tokens, strict=True):
            seq = self.running.get(work.rid)
            if seq is None:
                continue  # left while the step was in flight
            if seq.prefilling:
                seq.fed += len(work.tokens)
            if not work.samples:
                continue
            seq.produced += 1
            seq.last = token
            done = seq.produced >= seq.max_tokens or token in seq.stop_ids
            out.append(Sampled(seq.rid, token, done))
            if done:
                del self.running[seq.rid]
                release.append(seq.rid)
        return out, release

    def failed(self, step: Step) -> tuple[list[str], list[str]]:
        """A step failed: its sequences are lost (a stage that fails drops the step's caches,
        and later stages may still hold theirs). Returns the requests to tell (their slots are
        free) and every sequence of the step, to release at every stage."""
        self.in_flight.pop(step.lane, None)
        self._deferred.pop(step.lane, None)
        lost = [w.rid for w in step.work if self.running.pop(w.rid, None) is not None]
        return lost, [w.rid for w in step.work]

    def promote(self) -> list[Seq]:
        """Waiting sequences that fit the slots freed by :meth:`finished` or :meth:`failed`."""
        return self._promote()

    def lanes_with_work(self) -> list[int]:
        lanes = {s.lane for s in self.running.values()}
        return sorted(lane for lane in lanes if lane not in self.in_flight)
