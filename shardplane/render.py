"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence

from shardplane.bus.messages import InstanceState, PlacementReply

GIB = 1024**3


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
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
