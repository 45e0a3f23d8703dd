"""Tokens through a placed model: stage servers chained over NATS core request-reply, and the
client that drives a generation.

Why core request-reply and not JetStream: a hidden state is worth something for one step only;
persisting it would add a disk write per hop and buy nothing. A step that fails is retried from
the start by the caller, with a fresh sequence.

Shape of one step: the caller asks stage 0 on ``pipeline.<instance>.0``; each stage runs its
layers and asks the next one with its output, awaiting the answer; the last stage samples and
its reply (tokens, per-stage compute times) travels back along the chain. So each hop carries a
hidden state one way and a few bytes back, and the caller sees one request per step.

Failure is bounded, never a hang: every request carries the budget it has left
(``deadline_ms``). A stage asks the next one with what remains minus a margin, so when stage
k+1 is gone (no responders: at once) or stuck (its budget runs out), stage k answers first, with
an error naming stage k+1, before the caller's own timeout. A stage that fails a step drops
that step's sequences (its cache is no longer consistent); a caller that stops (done, error,
cancel) sends ``op="release"`` to every stage, and caches idle for ``IDLE_S`` are dropped anyway.

Prefill is cut into chunks so that a frame of hidden states stays under the server's
``max_payload``; only the last chunk samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg

from shardplane.agents import hopwire
from shardplane.agents.executor import Entry, ExecutorError, StageBackend, sample
from shardplane.agents.steptiming import StepTimer, StepTiming
from shardplane.bus import subjects
from shardplane.bus.errors import AgentError
from shardplane.bus.messages import ErrorInfo, StageEntry, StageReply, StageRequest

log = logging.getLogger(__name__)

IDLE_S = 300.0  # a sequence untouched this long is dropped (its caller died without releasing)
HOP_MARGIN_S = 0.25  # a stage answers this much before its caller's deadline
FRAME_OVERHEAD = 4096  # bytes kept free in a frame for everything but the hidden state
DECODE_DEADLINE_S = 10.0
# Steps of at most this many rows (decode) run on the event loop: a thread handoff costs two
# context switches per hop, as much as the hop itself; a prefill chunk runs in a thread so the
# loop (telemetry, other stages of this process) keeps going. An inline step blocks the loop,
# so every request and answer of a step is written to the socket as it is published
# (``hopwire.flush_now``), not left to nats-py's flusher task: that task would be queued behind
# a step waiting for the lock, two micro-batches that reach a stage together would leave it
# together (the first one's answer waiting out the second one's compute), and every later
# stage would see them together too: the M micro-batches would move in lockstep through the
# stages, one stage at a time, and the pipeline would never overlap (bench serve: 2 x 8 rows
# over 2 stages took 2 (t0 + t1) per step instead of about 2 max(t0, t1)).
INLINE_ROWS = 8
WARM_PERIOD_MAX_S = 2.0  # steps further apart than this are not a generation's steps

# Called with the median of a run of decode steps of one size (agents.steptiming); the worker
# publishes it in ShardStatus.
StepReport = Callable[[StepTiming], Awaitable[None]]
PREFILL_DEADLINE_PER_ROW_S = 0.05

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(StageRequest)
_reply_decoder = msgspec.msgpack.Decoder(StageReply)


class PipelineError(AgentError):
    """A step failed; ``str()`` names the stage and why, ``code`` is an ErrorInfo code."""

    def __init__(self, message: str, code: str = "internal", stage: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.stage = stage


def _fail(code: Any, message: str, stage: int) -> StageReply:
    return StageReply(ok=False, error=ErrorInfo(code=code, message=message), failed_stage=stage)


def entries_of(request: StageRequest) -> list[Entry]:
    return [Entry(e.seq_id, e.start, e.count) for e in request.entries]


def rows_per_frame(max_payload: int, hidden: int) -> int:
    """How many rows of fp32 hidden states fit a frame under ``max_payload``."""
    rows = (max_payload - FRAME_OVERHEAD) // (hidden * 4)
    if rows < 1:
        raise PipelineError(
            f"max_payload {max_payload} bytes cannot carry one hidden state of {hidden * 4} bytes"
        )
    return rows


def _decode(data: bytes) -> StageRequest | msgspec.DecodeError:
    """Decoded once, where the request arrives (a prefill chunk's hidden state is copied by
    each decode); what was wrong with it, for the answer."""
    try:
        return _request_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return exc


def _inline_rows(req: StageRequest, reply_to: str) -> int | None:
    """The rows of a request a stage may run in nats-py's reader: a decode-sized forward with a
    reply subject; None for anything else (the task path takes it)."""
    rows = sum(e.count for e in req.entries)
    if req.op != "forward" or rows > INLINE_ROWS or not reply_to:
        return None
    return rows


@dataclass
class StageServer:
    """Serves one loaded stage on ``pipeline.<instance>.<stage>``."""

    nc: Client
    instance_id: str
    stage: int
    backend: StageBackend
    last: bool
    on_steps: StepReport | None = None
    timer: StepTimer = field(default_factory=StepTimer)  # decode compute times, by step size
    _timed: list[tuple[Sequence[Entry], float]] = field(default_factory=lambda: [])
    _sub: Any = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _touched: dict[str, float] = field(default_factory=lambda: {})
    _sweeper: asyncio.Task[None] | None = None
    _steps: set[asyncio.Task[None]] = field(default_factory=lambda: set[asyncio.Task[None]]())
    _chores: set[asyncio.Task[None]] = field(default_factory=lambda: set[asyncio.Task[None]]())
    _warmer: hopwire.Warmer | None = None
    _arrived: float = 0.0

    @property
    def subject(self) -> str:
        return subjects.pipeline(self.instance_id, self.stage)

    async def start(self) -> None:
        self._sub, _ = await hopwire.deliver_to(self.nc, self.subject, self._dispatch)
        hopwire.inbox(self.nc)  # subscribed now, not on the first step
        self._warmer = hopwire.Warmer(self.nc, hopwire.WARM_LEAD_S)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._warmer is not None:
            self._warmer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in [*self._steps, *self._chores]:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        async with self._lock:
            for seq in self.backend.sequences():
                self.backend.release(seq)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(IDLE_S / 10)
            cutoff = time.monotonic() - IDLE_S
            async with self._lock:
                for seq, at in list(self._touched.items()):
                    if at < cutoff:
                        self._release(seq)

    def _release(self, seq: str) -> None:
        self._touched.pop(seq, None)
        self.backend.release(seq)

    def _dispatch(self, msg: Msg) -> None:
        # Called by nats-py's reader as the request is parsed (``hopwire.deliver_to``): a
        # decode step with nothing else in flight runs right here (``_answer_now``,
        # ``_forward_now``), any other request is its own task, so that a stage awaiting the
        # next stage's answer still takes the next request (micro-batches pipeline: batch i at
        # stage k+1 while batch i+1 is at stage k); the lock runs one forward at a time, in
        # arrival order (a step run here holds no lock: nothing else can run meanwhile).
        now = time.monotonic()
        since, self._arrived = now - self._arrived, now
        if self._warmer is not None and hopwire.WARM and since < WARM_PERIOD_MAX_S:
            self._warmer.expect(now + since)  # steps come as often as the last two did
        req = _decode(msg.data)
        if (
            isinstance(req, StageRequest)
            and not self._steps
            and not self._lock.locked()
            and (rows := _inline_rows(req, msg.reply)) is not None
        ):
            (self._answer_now if self.last else self._forward_now)(msg.reply, req, rows)
            return
        self._spawn(self._handle(msg.reply, req), self._steps)

    def _spawn(self, work: Coroutine[Any, Any, None], into: set[asyncio.Task[None]]) -> None:
        task = asyncio.create_task(work)
        into.add(task)
        task.add_done_callback(into.discard)

    def _answer_now(self, reply_to: str, req: StageRequest, rows: int) -> None:
        """The last stage's decode step, run and answered right here in nats-py's reader,
        sparing the loop turn a task's start costs. Only when no other step is in flight (so
        none waits for the lock: order is kept) and for a decode-sized forward with a reply
        subject (``_inline_rows``)."""
        entries = entries_of(req)
        try:
            out, ms = self._run(entries, self._input(req, rows))
            self._timed.append((entries, ms))
            reply = self._finish(req, out, ms)
        except ExecutorError as exc:
            reply = _fail("invalid_request", f"stage {self.stage}: {exc}", self.stage)
        except Exception as exc:  # every request is answered, whatever went wrong
            self._crashed(reply_to, exc)
            return
        self._reply(reply_to, reply)

    def _forward_now(self, reply_to: str, req: StageRequest, rows: int) -> None:
        """A first or middle stage's decode step with no task: run here in nats-py's reader,
        the next stage asked at once (``hopwire.Inbox.ask``), and its answer relayed upstream
        by the reader that parses it. That spares the loop turn a task's start costs on the
        way down and the one its wake-up costs on the way back, at every such stage of every
        crossing. Only as ``_answer_now`` (no other step in flight, a decode-sized forward
        with a reply subject). Once computed the step is answered whatever happens: should the
        next stage not be asked at once, a task asks it."""
        received = time.monotonic()
        entries = entries_of(req)
        try:
            out, ms = self._run(entries, self._input(req, rows))
        except ExecutorError as exc:
            self._reply(
                reply_to, _fail("invalid_request", f"stage {self.stage}: {exc}", self.stage)
            )
            return
        except Exception as exc:  # every request is answered, whatever went wrong
            self._crashed(reply_to, exc)
            return
        self._timed.append((entries, ms))
        try:
            asked = self._downstream(req, out, received)
            if isinstance(asked, StageReply):  # the deadline passed already
                self._relayed(reply_to, entries, ms, asked)
                return
            downstream, subject, left_s = asked
            sent = time.perf_counter()

            def on_reply(got: Msg | nats.errors.Error) -> None:
                try:
                    self._relayed(reply_to, entries, ms, self._settled(got, left_s, sent))
                except Exception as exc:
                    self._crashed(reply_to, exc)

            data = _encoder.encode(downstream)
            if not hopwire.inbox(self.nc).ask(subject, data, left_s, on_reply):
                relay = self._relay_later(reply_to, entries, ms, req, out, received)
                self._spawn(relay, self._steps)
        except Exception as exc:
            self._crashed(reply_to, exc)

    def _crashed(self, reply_to: str, exc: Exception) -> None:
        log.exception("stage %s/%d: step crashed", self.instance_id, self.stage)
        fail = _fail("internal", f"stage {self.stage}: internal error: {exc!r}", self.stage)
        with contextlib.suppress(Exception):
            self._reply(reply_to, fail)

    async def _relay_later(
        self,
        reply_to: str,
        entries: Sequence[Entry],
        ms: float,
        req: StageRequest,
        out: np.ndarray[Any, Any],
        received: float,
    ) -> None:
        self._relayed(reply_to, entries, ms, await self._forward(req, out, received))

    def _relayed(
        self, reply_to: str, entries: Sequence[Entry], ms: float, reply: StageReply
    ) -> None:
        """Answer a step computed by ``_forward_now`` with what the next stage said."""
        if reply.ok:
            reply = self._joined(entries, ms, reply)
        elif self._lock.locked():  # a forward runs in a thread: drop them after it, in order
            self._spawn(self._drop(entries), self._chores)
        else:  # as the task path does, before the answer: a retry finds them gone
            for e in entries:
                self._release(e.seq_id)
        self._reply(reply_to, reply)

    def _joined(self, entries: Sequence[Entry], ms: float, reply: StageReply) -> StageReply:
        """The next stage's good answer with this stage's crossing timed and its compute
        prepended."""
        self.timer.add_hop(entries, reply.hop_ms[0])
        return msgspec.structs.replace(reply, stage_ms=(ms, *reply.stage_ms))

    def _reply(self, reply_to: str, reply: StageReply) -> None:
        """Answer now where the socket takes it, else in a task; then the bookkeeping."""
        data = _encoder.encode(reply)
        if not hopwire.publish_now(self.nc, reply_to, data):
            self._spawn(self._answer(reply_to, data), self._chores)
        if self._timed:
            self._spawn(self._bookkeeping(), self._chores)

    async def _drop(self, entries: Sequence[Entry]) -> None:
        async with self._lock:  # the step did not complete: these caches are now stale
            for e in entries:
                self._release(e.seq_id)

    def _run(self, entries: Sequence[Entry], x: np.ndarray[Any, Any]) -> tuple[Any, float]:
        """The stage's forward, timed; its sequences marked as used."""
        started = time.perf_counter()
        out = self.backend.forward(entries, x)
        ms = (time.perf_counter() - started) * 1000
        for e in entries:
            self._touched[e.seq_id] = time.monotonic()
        return out, ms

    async def _answer(self, subject: str, data: bytes) -> None:
        with contextlib.suppress(Exception):
            await hopwire.publish(self.nc, subject, data)

    async def _handle(self, reply_to: str, req: StageRequest | msgspec.DecodeError) -> None:
        try:
            reply = await self._serve(req)
        except Exception as exc:  # every request is answered, whatever went wrong
            log.exception("stage %s/%d: step crashed", self.instance_id, self.stage)
            reply = _fail("internal", f"stage {self.stage}: internal error: {exc!r}", self.stage)
        if reply_to:
            await self._answer(reply_to, _encoder.encode(reply))
        await self._bookkeeping()

    async def _bookkeeping(self) -> None:
        # Step-time bookkeeping waits until the reply is out: it is no part of the step.
        while self._timed:
            await self._measured(*self._timed.pop())

    async def _serve(self, req: StageRequest | msgspec.DecodeError) -> StageReply:
        received = time.monotonic()
        if isinstance(req, msgspec.DecodeError):
            return _fail(
                "invalid_request", f"stage {self.stage}: invalid StageRequest: {req}", self.stage
            )
        if req.op == "release":
            async with self._lock:
                for e in req.entries:
                    self._release(e.seq_id)
            return StageReply(ok=True)
        entries = entries_of(req)
        try:
            rows = sum(e.count for e in entries)
            x = self._input(req, rows)
            async with self._lock:
                if rows <= INLINE_ROWS:
                    out, ms = self._run(entries, x)
                else:
                    out, ms = await asyncio.to_thread(self._run, entries, x)
        except ExecutorError as exc:
            return _fail("invalid_request", f"stage {self.stage}: {exc}", self.stage)
        self._timed.append((entries, ms))
        if self.last:
            return self._finish(req, out, ms)
        reply = await self._forward(req, out, received)
        if not reply.ok:
            await self._drop(entries)
            return reply
        return self._joined(entries, ms, reply)

    async def _measured(self, entries: Sequence[Entry], ms: float) -> None:
        timing = self.timer.add(self.backend, entries, ms)
        if timing is not None and self.on_steps is not None:
            try:
                await self.on_steps(timing)
            except Exception:
                log.exception("stage %s/%d: step report failed", self.instance_id, self.stage)

    def _input(self, req: StageRequest, rows: int) -> np.ndarray[Any, Any]:
        if self.backend.embeddings:
            if len(req.tokens) != rows * 4:
                raise ExecutorError(
                    f"{rows} rows need {rows * 4} bytes of token ids, got {len(req.tokens)}"
                )
            return np.frombuffer(req.tokens, dtype="<i4")
        hidden = self.backend.config.hidden
        if len(req.hidden) != rows * hidden * 4:
            raise ExecutorError(
                f"{rows} rows of {hidden} float32 need {rows * hidden * 4} bytes, got {len(req.hidden)}"
            )
        return np.frombuffer(req.hidden, dtype="<f4").reshape(rows, hidden)

    def _finish(self, req: StageRequest, logits: np.ndarray[Any, Any], ms: float) -> StageReply:
        tokens: tuple[int, ...] = ()
        if req.sample:
            tokens = tuple(
                sample(
                    logits[i],
                    temperature=e.temperature,
                    top_p=e.top_p,
                    seed=e.seed,
                    position=e.start + e.count,
                )
                for i, e in enumerate(req.entries)
            )
        data = np.ascontiguousarray(logits, dtype="<f4").tobytes() if req.want_logits else b""
        return StageReply(ok=True, tokens=tokens, logits=data, stage_ms=(ms,))

    async def _forward(
        self, req: StageRequest, out: np.ndarray[Any, Any], received: float
    ) -> StageReply:
        asked = self._downstream(req, out, received)
        if isinstance(asked, StageReply):
            return asked
        downstream, subject, left_s = asked
        sent = time.perf_counter()
        got: Msg | nats.errors.Error
        try:
            got = await hopwire.inbox(self.nc).request(
                subject, _encoder.encode(downstream), timeout=left_s
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            got = exc
        return self._settled(got, left_s, sent)

    def _downstream(
        self, req: StageRequest, out: np.ndarray[Any, Any], received: float
    ) -> tuple[StageRequest, str, float] | StageReply:
        """The request for the next stage, its subject and the budget left for it; or the
        failure to answer with when the step's deadline has passed already."""
        left_s = req.deadline_ms / 1000 - (time.monotonic() - received) - HOP_MARGIN_S
        if left_s <= 0:
            return _fail(
                "timeout",
                f"stage {self.stage}: the step's deadline passed before stage {self.stage + 1} was asked",
                self.stage,
            )
        downstream = msgspec.structs.replace(
            req,
            stage=self.stage + 1,
            tokens=b"",
            hidden=np.ascontiguousarray(out, dtype="<f4").tobytes(),
            deadline_ms=left_s * 1000,
        )
        return downstream, subjects.pipeline(self.instance_id, self.stage + 1), left_s

    def _settled(self, got: Msg | nats.errors.Error, left_s: float, sent: float) -> StageReply:
        """The next stage's answer (sent at ``sent``, ``time.perf_counter()``) with this
        crossing's time put first in ``hop_ms``, or the failure that names it."""
        nxt = self.stage + 1
        if isinstance(got, nats.errors.NoRespondersError):
            return _fail(
                "unavailable",
                f"stage {nxt} of instance {self.instance_id} is not serving "
                f"({subjects.pipeline(self.instance_id, nxt)} has no responders)",
                nxt,
            )
        if not isinstance(got, Msg):
            return _fail(
                "timeout",
                f"stage {nxt} of instance {self.instance_id} did not answer within {left_s:.1f} s",
                nxt,
            )
        try:
            reply = _reply_decoder.decode(got.data)
        except msgspec.DecodeError as exc:
            return _fail("internal", f"stage {nxt}: invalid StageReply: {exc}", nxt)
        spent = (time.perf_counter() - sent) * 1000
        hop = max(0.0, spent - sum(reply.stage_ms) - sum(reply.hop_ms))
        return msgspec.structs.replace(reply, hop_ms=(hop, *reply.hop_ms))


# --- the caller -------------------------------------------------------------------------------


@dataclass
class Generated:
    """What a generation produced, with its timing (decode steps only in ``step_ms``)."""

    token_ids: list[int]
    prefill_ms: float
    step_ms: list[float]
    stage_ms: list[list[float]]


@dataclass
class PipelineClient:
    """Drives steps through ``stage_count`` stages of an instance from stage 0."""

    nc: Client
    instance_id: str
    stage_count: int
    hidden: int

    async def step(
        self,
        entries: Sequence[StageEntry],
        tokens: Sequence[int],
        *,
        sample: bool = True,
        want_logits: bool = False,
        deadline_s: float | None = None,
    ) -> StageReply:
        rows = sum(e.count for e in entries)
        budget = deadline_s or DECODE_DEADLINE_S + PREFILL_DEADLINE_PER_ROW_S * rows
        req = StageRequest(
            instance_id=self.instance_id,
            stage=0,
            entries=tuple(entries),
            tokens=np.asarray(tokens, dtype="<i4").tobytes(),
            sample=sample,
            want_logits=want_logits,
            deadline_ms=budget * 1000,
        )
        subject = subjects.pipeline(self.instance_id, 0)
        try:
            msg = await hopwire.inbox(self.nc).request(
                subject, _encoder.encode(req), timeout=budget
            )
        except nats.errors.NoRespondersError:
            raise PipelineError(
                f"stage 0 of instance {self.instance_id} is not serving ({subject} has no responders)",
                "unavailable",
                0,
            ) from None
        except nats.errors.TimeoutError:
            raise PipelineError(
                f"stage 0 of instance {self.instance_id} did not answer within {budget:.1f} s",
                "timeout",
                0,
            ) from None
        reply = _reply_decoder.decode(msg.data)
        if not reply.ok:
            err = reply.error
            raise PipelineError(
                err.message if err else "step failed",
                err.code if err else "internal",
                reply.failed_stage,
            )
        return reply

    async def release(self, seq_ids: Sequence[str]) -> None:
        """Drop the sequences' caches at every stage (fire and forget: a dead stage holds none)."""
        entries = tuple(StageEntry(seq_id=s, start=0, count=1) for s in seq_ids)
        for stage in range(self.stage_count):
            req = StageRequest(
                instance_id=self.instance_id, stage=stage, entries=entries, op="release"
            )
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    subjects.pipeline(self.instance_id, stage), _encoder.encode(req)
                )
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)

    async def prefill(
        self, seqs: Sequence[tuple[str, Sequence[int]]], settings: dict[str, Any]
    ) -> StageReply:
        """Feed whole prompts, chunked under max_payload; the last chunk samples."""
        per_frame = rows_per_frame(self.nc.max_payload, self.hidden)
        # Sequences go one after another so a chunk never mixes a finished and an open prompt.
        tokens: dict[str, int] = {}
        stage_ms: list[float] = []
        for seq_id, ids in seqs:
            for start in range(0, len(ids), per_frame):
                chunk = list(ids[start : start + per_frame])
                final = start + len(chunk) == len(ids)
                entry = StageEntry(seq_id=seq_id, start=start, count=len(chunk), **settings)
                reply = await self.step([entry], chunk, sample=final)
                if final:
                    tokens[seq_id] = reply.tokens[0]
                    stage_ms = list(reply.stage_ms)
        return StageReply(
            ok=True, tokens=tuple(tokens[s] for s, _ in seqs), stage_ms=tuple(stage_ms)
        )

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> AsyncIterator[tuple[list[int], float, StageReply]]:
        """Yield each step's new tokens (one per prompt), the step's wall ms and its reply
        (per-stage compute ``stage_ms``, per-crossing ``hop_ms``).
        A batch runs until every sequence has ``max_new_tokens`` (stop ids end a single one)."""
        if not prompts or any(not p for p in prompts):
            raise PipelineError("every prompt needs at least one token", "invalid_request")
        run = uuid.uuid4().hex[:12]
        seq_ids = [f"{run}-{i}" for i in range(len(prompts))]
        settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "seed": seed}
        try:
            started = time.perf_counter()
            reply = await self.prefill(list(zip(seq_ids, prompts, strict=True)), settings)
            last = list(reply.tokens)
            yield last, (time.perf_counter() - started) * 1000, reply
            positions = [len(p) for p in prompts]
            for _ in range(max_new_tokens - 1):
                if len(prompts) == 1 and last[0] in stop_ids:
                    return
                entries = [
                    StageEntry(seq_id=s, start=pos, count=1, **settings)
                    for s, pos in zip(seq_ids, positions, strict=True)
                ]
                started = time.perf_counter()
                reply = await self.step(entries, last)
                positions = [p + 1 for p in positions]
                last = list(reply.tokens)
                yield last, (time.perf_counter() - started) * 1000, reply
        finally:
            await asyncio.shield(self.release(seq_ids))


# --- the worker's side: what serves a loaded stage ----------------------------------------------


def runnable(model: str) -> bool:
    """Models whose weights a worker can load and run: ``hf:<dir>`` and packaged models."""
    from shardplane.agents.gguf import is_packaged

    return model.startswith("hf:") or is_packaged(model)


def build_backend(assignment: Any, tensors: dict[str, Any]) -> StageBackend:
    """The executor for a loaded stage (agents.backends chooses numpy or torch; the
    architecture comes from config.json or GGUF)."""
    from shardplane.agents.backends import build_stage
    from shardplane.agents.executor import config_from_hf
    from shardplane.agents.gguf import is_packaged, packaged_path
    from shardplane.agents.gguf import read_config as gguf_config
    from shardplane.agents.loader import checkpoint_dir
    from shardplane.bus.checkpoint import read_config

    model: str = assignment.model
    if is_packaged(model):
        config = gguf_config(packaged_path(model))
    else:
        config = config_from_hf(read_config(checkpoint_dir(model)))
    return build_stage(
        config,
        tensors,
        layer_start=assignment.layer_start,
        layer_end=assignment.layer_end,
        embeddings=assignment.embeddings,
        head=assignment.head,
    )


@dataclass
class PipelineHost:
    """A worker's stage servers, one per loaded stage of a runnable model (keyed like the
    worker's shards). Failing to serve never fails the load: the bytes are still held, and a
    caller asking the stage hears 'not serving'."""

    nc: Client
    on_steps: Callable[[Any, StepTiming], Awaitable[None]] | None = None  # (key, timing)
    servers: dict[Any, StageServer] = field(default_factory=lambda: {})

    async def serve(self, key: Any, assignment: Any, tensors: dict[str, Any]) -> None:
        await self.stop(key)
        if not runnable(assignment.model):
            return
        try:
            backend = await asyncio.to_thread(build_backend, assignment, tensors)
        except Exception as exc:
            log.warning(
                "%s stage %d loaded but cannot run: %s",
                assignment.instance_id,
                assignment.stage,
                exc,
            )
            return
        server = StageServer(
            self.nc,
            instance_id=assignment.instance_id,
            stage=assignment.stage,
            backend=backend,
            last=assignment.head,
            on_steps=self._reporter(key),
        )
        await server.start()
        self.servers[key] = server

    def _reporter(self, key: Any) -> StepReport | None:
        report = self.on_steps
        if report is None:
            return None

        async def reported(timing: StepTiming) -> None:
            await report(key, timing)

        return reported

    async def stop(self, key: Any) -> None:
        server = self.servers.pop(key, None)
        if server is not None:
            await server.stop()

    async def stop_all(self) -> None:
        for key in list(self.servers):
            await self.stop(key)


def load_assigned(
    model: str, spec: Any, *, expected_bytes: int | None = None, **kwargs: Any
) -> Any:
    """Load a stage of ``model``: an ``hf:<dir>`` checkpoint through ``agents.loader``, a
    packaged GGUF model through ``agents.gguf`` (dequantised, so held as fp32 bytes, which is
    what the catalog card counts)."""
    from shardplane.agents.gguf import is_packaged, load_packaged_stage
    from shardplane.agents.loader import LoadError, checkpoint_dir, load_stage

    if not is_packaged(model):
        return load_stage(checkpoint_dir(model), spec, expected_bytes=expected_bytes, **kwargs)
    _, shard = load_packaged_stage(model, spec)
    if expected_bytes is not None and shard.nbytes != expected_bytes:
        raise LoadError(
            f"byte mismatch: {model} layers [{spec.layer_start}, {spec.layer_end}) holds "
            f"{shard.nbytes} bytes as fp32 but the plan says weight_bytes={expected_bytes} "
            f"({expected_bytes - shard.nbytes:+d})"
        )
    return shard


def even_bounds(layers: int, stages: int) -> list[int]:
    """Stage boundaries cutting ``layers`` into ``stages`` nearly equal runs (tests, benches)."""
    if not 1 <= stages <= layers:
        raise PipelineError(f"cannot cut {layers} layers into {stages} stages", "invalid_request")
    return [round(i * layers / stages) for i in range(stages + 1)]


async def serve_split(
    nc: Client,
    instance_id: str,
    config: Any,
    tensors: dict[str, Any],
    bounds: Sequence[int],
    backend_kind: str | None = None,
) -> list[StageServer]:
    """Stage servers for a model cut at ``bounds``, all in this process (tests, benches);
    ``backend_kind`` as ``agents.backends.choose`` reads it."""
    from shardplane.agents.backends import build_stage

    servers: list[StageServer] = []
    last = len(bounds) - 2
    for stage, (start, end) in enumerate(itertools.pairwise(bounds)):
        backend = build_stage(
            config,
            tensors,
            layer_start=start,
            layer_end=end,
            embeddings=stage == 0,
            head=stage == last,
            backend=backend_kind,
        )
        server = StageServer(
            nc, instance_id=instance_id, stage=stage, backend=backend, last=stage == last
        )
        await server.start()
        servers.append(server)
    return servers
