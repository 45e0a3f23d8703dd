"""Plain-text tables for the terminal, colour only where it is wanted.

Colour follows the common convention (no-color.org): only when the stream is a terminal, and
never while ``NO_COLOR`` is set to anything non-empty, so pipes, logs and CI get plain text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TextIO

from shardplane.bus.messages import InstanceState, PlacementReply

GIB = 1024**3


_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def visible_len(text: str) -> int:
    """Columns ``text`` takes on a terminal: colour escapes take none."""
    return len(_ESCAPE.sub("", text))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(visible_len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c + " " * (w - visible_len(c)) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def placement(reply: PlacementReply) -> str:
    if not reply.ok:
        err = reply.error
        return f"placement failed [{err.code if err else '?'}]: {err.message if err else 'no reason given'}"
    rows = [
        (
            i,
            s.node,
            s.device,
            s.gpu,
            f"{s.layer_start}-{s.layer_end - 1}",
            s.layer_end - s.layer_start,
            f"{(s.memory_bytes or s.weight_bytes + s.kv_bytes) / GIB:.1f}",
            f"{s.stage_ms:.2f}",
            f"{s.hop_ms:.3f}",
        )
        for i, s in enumerate(reply.stages)
    ]
    head = (
        f"{reply.model}  instance={reply.instance_id}  generation={reply.generation}  "
        f"solver={reply.solver} ({reply.status}, {reply.solve_ms:.1f} ms)"
    )
    body = table(
        ("stage", "node", "device", "GPU", "layers", "n", "GiB", "est. ms", "hop ms"), rows
    )
    foot = schedule_line(reply)
    excluded = "".join(f"\n  excluded {e.device}: {e.reason}" for e in reply.excluded)
    if (more := reply.excluded_total - len(reply.excluded)) > 0:
        excluded += f"\n  and {more} more excluded"
    return f"{head}\n{body}\n{foot}{excluded}"


def schedule_line(reply: PlacementReply) -> str:
    """What the plan delivers: the time between two tokens of every sequence (step_ms), tokens/s
    at the batch, the micro-batches it runs as, and how many sequences the memory would hold."""
    m = reply.microbatches or 1
    micro = -(-reply.batch // m) if reply.batch else 0
    bound = f"lower bound {reply.lower_bound_ms:.2f} ms"
    if reply.gap_pct is not None:
        bound += f", gap {reply.gap_pct:.1f}%"
    return (
        f"step {reply.step_ms:.2f} ms per token per sequence -> {reply.tokens_per_s:.1f} tokens/s "
        f"at batch {reply.batch} ({m} micro-batch{'es' if m != 1 else ''} of {micro}; {bound}); "
        f"memory holds up to {reply.max_batch} sequences at {reply.context_tokens} tokens"
    )


def instance(state: InstanceState) -> str:
    rows = [
        (
            s.stage,
            s.node,
            s.device or "-",
            f"{s.layer_start}-{s.layer_end - 1}",
            s.state,
            f"{s.bytes_loaded / GIB:.2f}" if s.bytes_loaded else "-",
            s.where or "-",
            s.reason or "",
        )
        for s in state.stages
    ]
    body = table(
        ("stage", "node", "device", "layers", "state", "GiB loaded", "where", "reason"), rows
    )
    return f"instance {state.instance_id} ({state.model}) generation {state.generation}: {state.state}\n{body}"


_SGR: Mapping[str, str] = {"red": "31", "green": "32", "yellow": "33", "cyan": "36", "dim": "2"}


def colour_enabled(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, colour: str, enabled: bool) -> str:
    """``text`` in ``colour`` (a key of _SGR) when enabled, else unchanged; :func:`table`
    pads by visible width, so painted cells line up."""
    return f"\x1b[{_SGR[colour]}m{text}\x1b[0m" if enabled else text


STATE_COLOUR: Mapping[str, str] = {
    "loaded": "green",
    "reserved": "green",
    "loading": "yellow",
    "pending": "dim",
    "failed": "red",
    "unloaded": "dim",
}


def bar(fraction: float, width: int = 24) -> str:
    """``[#########.......]``; ``fraction`` is clamped to 0..1."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress(state: InstanceState, colour: bool = False) -> list[str]:
    """One line per stage: a bar from ``bytes_loaded`` over the stage's weights, the bytes and
    the state (``place --wait``). A reserved stage (no weights to read here) shows full."""
    lines = [
        f"instance {state.instance_id} ({state.model}) generation {state.generation}: {state.state}"
    ]
    for s in state.stages:
        total = s.weight_bytes or s.memory_bytes
        done = (
            1.0 if s.state in ("loaded", "reserved") else (s.bytes_loaded / total if total else 0.0)
        )
        figures = f"{s.bytes_loaded / GIB:6.2f}/{total / GIB:.2f} GiB" if total else ""
        if s.state == "reserved":  # memory held, no weights to read on this host
            figures = f"{total / GIB:.2f} GiB held, nothing to read"
        reason = f" ({s.reason})" if s.reason else ""
        lines.append(
            f"  stage {s.stage:<3} {(s.device or s.node):<14} {bar(done)} {done * 100:5.1f}%  "
            f"{figures}  " + paint(s.state, STATE_COLOUR.get(s.state, "dim"), colour) + reason
        )
    return lines
