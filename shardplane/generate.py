"""`shardplane generate`: place a runnable model (or re-place an instance, which workers adopt
without reloading what they hold), wait until every stage is loaded, then generate through the
pipeline and set the measured time per token beside the plan's prediction.

Why a command and not only a library call: it is the end-to-end proof that a plan is real:
the placement's stages load, compose into the model, and run at a speed one can compare with
what the planner predicted.

The prediction is the plan's ``step_ms``: the time between two tokens of a sequence under the
decode schedule (at batch 1, M = 1, the sum of every stage's ``stage_ms + hop_ms``, the return
hop included). A planner that predates the field answers 0, and the sum stands in for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from shardplane.agents.executor import config_from_hf
from shardplane.agents.pipeline import PipelineClient, PipelineError
from shardplane.bus import codec, keys
from shardplane.bus.errors import CommandError
from shardplane.bus.messages import InstanceState, PlacementReply
from shardplane.bus.streams import cluster_state


class GenerateError(CommandError):
    """Generation could not start or finish; ``str()`` says why, with the numbers."""


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=lambda: [])
    text: str | None = None
    step_ms: list[float] = field(default_factory=lambda: [])
    prefill_ms: float = 0.0
    predicted_ms: float | None = None
    stages: int = 0
    instance_id: str = ""

    @property
    def measured_ms(self) -> float | None:
        return statistics.median(self.step_ms) if self.step_ms else None

    def as_json(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "step_ms_measured": self.measured_ms,
            "step_ms_predicted": self.predicted_ms,
            "stages": self.stages,
            "instance_id": self.instance_id,
            "prefill_ms": self.prefill_ms,
        }


def predicted_step_ms(reply: PlacementReply) -> float | None:
    """The plan's time for one decode step at batch 1 (see the module docstring)."""
    if reply.step_ms > 0:
        return reply.step_ms
    if not reply.stages:
        return None
    return sum(s.stage_ms + s.hop_ms for s in reply.stages)


def model_hidden(model: str) -> int:
    from shardplane.agents.gguf import is_packaged, packaged_path, read_config

    if is_packaged(model):
        return read_config(packaged_path(model)).hidden
    if model.startswith("hf:"):
        from shardplane.agents.loader import checkpoint_dir
        from shardplane.bus.checkpoint import read_config as hf_config

        return config_from_hf(hf_config(checkpoint_dir(model))).hidden
    raise GenerateError(
        f"model {model!r} cannot run here: only hf:<dir> checkpoints and packaged models "
        "(smollm2-135m) have weights a worker can load"
    )


class TextCodec:
    """The model's tokenizer, when it has one (packaged GGUF, or tokenizer.json in hf:<dir>)."""

    def __init__(self, model: str) -> None:
        from shardplane.agents.gguf import is_packaged, packaged_tokenizer
        from shardplane.agents.loader import LoadError

        self.inner: Any = None
        if is_packaged(model):
            try:
                self.inner = packaged_tokenizer(model)
            except LoadError as exc:  # e.g. the package that ships the weights is missing
                raise GenerateError(str(exc)) from None
        elif model.startswith("hf:"):
            path = Path(model[3:]).expanduser() / "tokenizer.json"
            if path.is_file():
                from tokenizers import Tokenizer

                self.inner = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        if self.inner is None:
            raise GenerateError("this model has no tokenizer here: pass --token-ids")
        ids = self.inner.encode(text)
        return list(ids if isinstance(ids, list) else ids.ids)  # pyright: ignore[reportUnknownArgumentType]

    def decode(self, ids: list[int]) -> str | None:
        return None if self.inner is None else str(self.inner.decode(ids))

    @property
    def eos(self) -> list[int]:
        eos = getattr(self.inner, "eos_token_id", None)
        return [] if eos is None else [int(eos)]


async def wait_loaded(nc: Client, instance: str, generation: int, timeout: float) -> InstanceState:
    """Until every stage of ``generation`` is loaded (or one failed: then say which and why)."""
    kv = await cluster_state(nc.jetstream())
    deadline = time.monotonic() + timeout
    last: InstanceState | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not written yet: keep polling
            entry = await kv.get(keys.instance_key(instance))
            if entry.value is not None:
                last = codec.decode(InstanceState, entry.value)
        if last is not None and last.generation >= generation:
            failed = [s for s in last.stages if s.state == "failed"]
            if failed:
                raise GenerateError(
                    "; ".join(f"stage {s.stage} on {s.device}: {s.reason}" for s in failed)
                )
            if all(s.state == "loaded" for s in last.stages):
                return last
        await asyncio.sleep(0.1)
    states = "none" if last is None else ", ".join(f"{s.stage}:{s.state}" for s in last.stages)
    raise GenerateError(f"instance {instance} not loaded within {timeout:g} s (stages: {states})")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the next token is chosen: greedy at ``temperature`` 0, else sampled from the
    ``top_p`` nucleus with ``seed`` (the same seed, the same tokens)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


async def generate(
    nc: Client,
    reply: PlacementReply,
    prompt: list[int],
    sampling: Sampling,
    *,
    stop_ids: list[int] | None = None,
    load_timeout: float = 120.0,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> Outcome:
    """Generate on a placed instance (the placement ``reply``), once its stages are loaded."""
    if not reply.ok or not reply.instance_id or not reply.model:
        raise GenerateError(
            "the placement failed: " + (reply.error.message if reply.error else "no instance")
        )
    out = Outcome(
        predicted_ms=predicted_step_ms(reply),
        stages=len(reply.stages),
        instance_id=reply.instance_id,
    )
    await wait_loaded(nc, reply.instance_id, reply.generation, load_timeout)
    client = PipelineClient(nc, reply.instance_id, len(reply.stages), model_hidden(reply.model))
    try:
        async for tokens, ms, _ in client.generate(
            [prompt],
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop_ids=stop_ids or [],
        ):
            if out.token_ids or out.prefill_ms:
                out.step_ms.append(ms)
            else:
                out.prefill_ms = ms
            out.token_ids += tokens
            if on_tokens is not None:
                on_tokens(tokens)
    except PipelineError as exc:
        raise GenerateError(str(exc)) from exc
    return out


def summary(out: Outcome) -> str:
    measured, predicted = out.measured_ms, out.predicted_ms
    parts = [f"{len(out.token_ids)} tokens on {out.stages} stage(s)"]
    if measured is not None:
        parts.append(f"measured {measured:.1f} ms/token ({1000 / measured:.1f} tokens/s)")
    else:
        parts.append("no decode step measured (one token)")
    if predicted is not None:
        parts.append(f"plan predicted {predicted:.2f} ms/token ({1000 / predicted:.1f} tokens/s)")
        if measured is not None:
            parts.append(f"measured/predicted {measured / predicted:.2f}")
    return ", ".join(parts)


def json_line(out: Outcome) -> str:
    return json.dumps(out.as_json())
