"""A discrete-event simulation of the decode pipeline, to check the planner's closed form.

Not a benchmark (``shardplane bench schedule-sim`` only prints a demonstration): the placement
benchmark and the tests use :func:`simulate` as an independent judge of what a plan delivers.
It knows nothing of the planner's formula: stages are single servers serving micro-batches in
arrival order (FIFO); a micro-batch leaving stage s reaches stage s + 1 after that hop's delay;
leaving the last stage, its sampled tokens reach the first stage after the return hop, and only
then can its next step start there. Links are pure delays. The step time is measured from the
simulated clock in the steady state.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Sequence


def simulate(
    stage_ms: Callable[[int, int], float],
    hop_ms: Callable[[int, int], float],
    sizes: Sequence[int],
    stages: int,
    *,
    steps: int = 60,
) -> float:
    """Steady-state ms per step (every sequence gains one token per step).

    ``stage_ms(s, b)``/``hop_ms(s, b)``: stage s's time and its outgoing hop (the last stage's
    is the return hop) for a micro-batch of b sequences; ``sizes``: the micro-batches.
    """
    free = [0.0] * stages  # when each stage is next idle
    done: list[list[float]] = [[] for _ in sizes]  # per micro-batch, when each step's token returns
    events: list[tuple[float, int, int, int]] = []  # (arrival time, tie order, micro-batch, stage)
    order = 0
    for i in range(len(sizes)):
        heapq.heappush(events, (0.0, order, i, 0))
        order += 1
    while events:
        arrival, _, i, s = heapq.heappop(events)
        start = max(arrival, free[s])  # arrivals are popped in time order: FIFO per stage
        finish = start + stage_ms(s, sizes[i])
        free[s] = finish
        nxt = finish + hop_ms(s, sizes[i])
        if s + 1 < stages:
            heapq.heappush(events, (nxt, order, i, s + 1))
        else:
            done[i].append(nxt)
            if len(done[i]) < steps:
                heapq.heappush(events, (nxt, order, i, 0))
        order += 1
    warm = steps // 3
    periods = [(d[-1] - d[warm]) / (len(d) - 1 - warm) for d in done]
    return max(periods)


def split(batch: int, microbatches: int) -> list[int]:
    """B sequences as M micro-batches as even as they go (sizes differ by at most one)."""
    base, extra = divmod(batch, microbatches)
    return [base + (1 if i < extra else 0) for i in range(microbatches)]


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    """Two stages of 4 ms and 4.5 ms, 0.2 ms hops, at M = 1 and M = 2 (planner/README.md)."""
    del quick, argv
    times = (4.0, 4.5)
    rows: dict[str, float] = {}
    for m in (1, 2):
        rows[f"m{m}"] = simulate(lambda s, b: times[s], lambda s, b: 0.2, [1] * m, 2)
        print(f"M = {m}: {rows[f'm{m}']:.3f} ms per step")
    print(json.dumps(rows))
    return 0
