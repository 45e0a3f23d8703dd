"""`shardplane bench fuzz`: bad input against the whole secured system, and every role trying
every forbidden action.

The services run as their roles on a nats-server with the ``shardplane auth`` users; hypothesis
draws arbitrary bytes and near-valid documents for ``placement.request``, the HTTP API and the
telemetry, status and assignment streams (``bench._fuzzing``), and the permission probes
(``bench._probes``) run on a second secured server. The floor is an echo responder on the same
kind of server: how fast a bare request-reply goes, next to how fast the fuzz went.

Targets: answered = inputs, crashes = 0, internal_errors = 0, forbidden_allowed = 0.
Needs hypothesis (the ``test`` extra, which ``make install`` includes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

from shardplane.bench._fuzzing import TARGETS, fuzz_system
from shardplane.bench._probes import probe_roles, secure_bus


async def echo_floor(requests: int) -> float:
    """Request-reply round trips per second through a secured server, nothing else."""
    async with secure_bus() as bus:
        server = await bus.connect("planner")
        client = await bus.connect("api")
        try:

            async def echo(msg: object) -> None:
                await msg.respond(b"{}")  # type: ignore[attr-defined]

            await server.subscribe("placement.request", cb=echo)
            await server.flush()
            started = time.perf_counter()
            for _ in range(requests):
                await client.request("placement.request", b"{}", timeout=10.0)
            return requests / (time.perf_counter() - started)
        finally:
            await client.close()
            await server.close()


async def run(total: int, seed: int) -> dict[str, object]:
    per = max(1, total // len(TARGETS))
    counts = dict.fromkeys(TARGETS, per)
    floor = await echo_floor(min(2000, max(200, per)))
    result = await fuzz_system(counts, seed=seed, progress=lambda m: print(f"  {m}", flush=True))
    async with secure_bus() as bus:
        probes = await probe_roles(bus)
    inputs = sum(result.inputs.values())
    answered = sum(result.answered.values())
    print(f"{'target':<12} {'inputs':>8} {'answered':>9} {'internal':>9}")
    for target in TARGETS:
        print(
            f"{target:<12} {result.inputs[target]:>8} {result.answered[target]:>9} "
            f"{result.internal_errors[target]:>9}"
        )
    rate = inputs / result.seconds if result.seconds else 0.0
    print(
        f"{inputs} inputs in {result.seconds:.1f} s ({rate:.0f}/s; bare request-reply floor "
        f"{floor:.0f}/s, ratio {rate / floor if floor else 0:.2f}); dead-lettered "
        f"{result.deadlettered}, valid lost {result.valid_lost}, crashes {result.crashes}"
    )
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(result.codes.items())))
    print(
        f"permissions: {probes.tried} forbidden actions tried, {probes.refused} refused, "
        f"{len(probes.allowed)} allowed, {len(probes.controls_failed)} controls failed"
    )
    for line in result.failures + [a.why for a in probes.allowed]:
        print(f"  ! {line}")
    return {
        "inputs": inputs,
        "answered": answered,
        "crashes": result.crashes,
        "internal_errors": sum(result.internal_errors.values()),
        "valid_lost": result.valid_lost,
        "deadlettered": result.deadlettered,
        "per_target": {t: result.inputs[t] for t in TARGETS},
        "inputs_per_s": round(rate, 1),
        "floor_requests_per_s": round(floor, 1),
        "ratio_to_floor": round(rate / floor, 3) if floor else None,
        "forbidden_actions_tried": probes.tried,
        "forbidden_allowed": len(probes.allowed),
        "controls_failed": len(probes.controls_failed),
    }


def main(quick: bool = False, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardplane bench fuzz")
    parser.add_argument("--inputs", type=int, default=2000 if quick else 20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv or [])
    # Every rejected input is logged as a warning by the service that rejected it.
    logging.getLogger("shardplane").setLevel(logging.ERROR)
    figures = asyncio.run(run(args.inputs, args.seed))
    print(json.dumps(figures))
    ok = (
        figures["answered"] == figures["inputs"]
        and figures["crashes"] == figures["internal_errors"] == figures["forbidden_allowed"] == 0
    )
    return 0 if ok else 1
