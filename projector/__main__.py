"""``python -m projector``: one projector process (what the crash tests SIGKILL)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from shardplane.bus.connect import connect
from shardplane.cli import part_arg
from shardplane.projector.partition import Partition
from shardplane.projector.service import ProjectorConfig, run_projector

DEFAULTS = ProjectorConfig()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projector", description=__doc__)
    parser.add_argument("--nats-url", default=None)
    parser.add_argument("--ttl", type=float, default=None, help="liveness TTL, seconds")
    parser.add_argument("--ack-wait", type=float, default=DEFAULTS.ack_wait_s)
    parser.add_argument("--lease-ttl", type=float, default=DEFAULTS.lease_ttl_s)
    # Tuning knobs, for benchmarks and tests (the defaults are what production runs).
    parser.add_argument("--fetch-batch", type=int, default=DEFAULTS.fetch_batch)
    parser.add_argument("--pull-depth", type=int, default=DEFAULTS.pull_depth)
    parser.add_argument("--max-round", type=int, default=DEFAULTS.max_round)
    parser.add_argument("--max-ack-pending", type=int, default=DEFAULTS.max_ack_pending)
    parser.add_argument("--nats-py-fetch", action="store_true", help="nats-py's fetch() loop")
    parser.add_argument("--no-pipeline", action="store_true", help="write one key at a time")
    parser.add_argument(
        "--batches", action="store_true", help="atomic batch KV writes (nats-server 2.12+)"
    )
    parser.add_argument(
        "--no-direct", action="store_true", help="deliveries through nats-py's queue and task"
    )
    parser.add_argument(
        "--serial-rounds", action="store_true", help="write each round before applying the next"
    )
    parser.add_argument(
        "--no-verify-generations",
        action="store_true",
        help="apply assignments the planner's ledger does not name (hand-made test traffic)",
    )
    parser.add_argument(
        "--partition",
        type=part_arg,
        default=None,
        metavar="I/K",
        help="run partition I of K (projector.partition); default: one projector for every key",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
    )
    config = ProjectorConfig(
        ttl_s=args.ttl,
        ack_wait_s=args.ack_wait,
        lease_ttl_s=args.lease_ttl,
        fetch_batch=args.fetch_batch,
        max_round=args.max_round,
        pull_depth=args.pull_depth,
        max_ack_pending=args.max_ack_pending,
        lean_pull=not args.nats_py_fetch,
        pipeline_writes=not args.no_pipeline,
        atomic_batches=args.batches,
        direct_delivery=not args.no_direct,
        overlap_rounds=not args.serial_rounds,
        verify_generations=not args.no_verify_generations,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        nc = await connect(args.nats_url, name="shardplane-projector")
        try:
            partition = Partition(*args.partition) if args.partition else None
            await run_projector(nc, stop=stop, config=config, partition=partition)
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
