"""`shardplane`: one console command for every service and tool."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

SUBCOMMANDS = (
    "up",
    "nats",
    "agent",
    "projector",
    "planner",
    "api",
    "place",
    "generate",
    "release",
    "controller",
    "status",
    "demo",
    "bench",
    "models",
    "auth",
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats-url", default=None, help="NATS server (default: $NATS_URL or nats://127.0.0.1:4222)"
    )
    p.add_argument(
        "--creds",
        type=Path,
        default=None,
        help="credentials file of this process's role (default: $NATS_CREDS)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def _no_auth(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="development: an open NATS server and API (no role users, no API token)",
    )


def _one_shot(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="give up if NATS has not answered after this many seconds (default 5)",
    )


def part_arg(text: str) -> tuple[int, int]:
    """``I/K`` -> (I, K): the I-th (0-based) of K shares of a fleet's nodes."""
    index, _, count = text.partition("/")
    try:
        i, k = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/K (e.g. 0/4)") from None
    if k < 1 or not 0 <= i < k:
        raise argparse.ArgumentTypeError(f"{text!r}: need K >= 1 and 0 <= I < K")
    return i, k


def add_share(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An ``I/K`` option (``part_arg``): which share of K this process takes."""
    p.add_argument(flag, type=part_arg, default=None, metavar="I/K", help=help)


def _fleet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fleet",
        type=Path,
        default=None,
        help="simulated fleet file (TOML); default fleets/demo.toml for up/demo",
    )


def _one_to(text: str, high: int) -> int:
    """``text`` as a whole number from 1 to ``high``, or argparse's error saying which."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is out of range: 1 to {high}")
    return value


def _replica_count(text: str) -> int:
    return _one_to(text, 5)


def _partitions(text: str) -> int:
    from shardplane.bus.streams import MAX_PARTITIONS

    return _one_to(text, MAX_PARTITIONS)


def _ha(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run a local cluster of N nats-servers (3 for high availability)",
    )
    p.add_argument(
        "--replicas",
        type=_replica_count,
        default=None,
        help="stream and bucket replicas (default $SHARDPLANE_REPLICAS, else 1, or 3 on a cluster)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardplane", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shardplane {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run NATS (if none answers), projector, planner, API and agents")
    _common(p)
    _fleet(p)
    p.add_argument("--api-host", default="127.0.0.1")
    p.add_argument("--api-port", type=int, default=8080)
    p.add_argument(
        "--no-agents", action="store_true", help="run no agents (real nodes run their own)"
    )
    p.add_argument("--interval", type=float, default=None, help="agent sample interval, seconds")
    p.add_argument(
        "--partitions",
        type=_partitions,
        default=None,
        metavar="N",
        help="projector partitions, each its own process (default: one per 10,000 samples/s "
        "of the fleet, at most one per two cores)",
    )
    _no_auth(p)
    _ha(p)

    p = sub.add_parser("nats", help="run the embedded nats-server (JetStream) in the foreground")
    p.add_argument("--config", type=Path, default=None, help="config file (default ./nats.conf)")
    p.add_argument("--port", type=int, default=4222, help="client port (a cluster: the first)")
    p.add_argument(
        "--store", type=Path, default=None, help="store (default data/nats; data/nats-cluster)"
    )
    p.add_argument("--monitor-port", type=int, default=8222)
    p.add_argument(
        "--auth-dir",
        type=Path,
        default=None,
        help="run with the role users of this folder (created if missing, as `auth init`)",
    )
    _ha(p)

    p = sub.add_parser("agent", help="publish GPU telemetry and load assigned shards")
    _common(p)
    _fleet(p)
    p.add_argument("--node", default=None, help="node id (default: from the hostname)")
    p.add_argument(
        "--interval", type=float, default=None, help="sample interval, seconds (default 2)"
    )
    p.add_argument("--cpu-device", action="store_true", help="expose host RAM as a CPU device")
    p.add_argument("--no-temperature", action="store_true", help="do not read temperatures")
    p.add_argument("--no-power", action="store_true", help="do not read power")
    p.add_argument(
        "--worker-creds",
        type=Path,
        default=None,
        help="the worker's own credentials (default: the agent's connection)",
    )
    add_share(
        p, "--part", "with --fleet: run only the I-th of K equal shares of its nodes (0-based)"
    )

    p = sub.add_parser("projector", help="materialise cluster state into the KV bucket")
    _common(p)
    p.add_argument(
        "--ttl", type=float, default=None, help="seconds without a sample before offline"
    )
    add_share(
        p, "--partition", "write only partition I of K of the device and node keys (default: all)"
    )

    p = sub.add_parser("planner", help="answer placement.request with CP-SAT plans")
    _common(p)

    p = sub.add_parser("api", help="serve the status API and dashboard")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)

    p = sub.add_parser("place", help="ask the planner to place a model")
    _common(p)
    _one_shot(p)
    p.add_argument("model", help="catalog name, hf:<dir>, or a JSON model card")
    p.add_argument("--context", type=int, default=8192, dest="context_tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--objective", choices=("throughput", "latency"), default="throughput")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--headroom", type=float, default=0.1, dest="memory_headroom")
    p.add_argument("--exclude-node", action="append", default=[], dest="exclude_nodes")
    p.add_argument("--max-stages", type=int, default=None)
    p.add_argument(
        "--microbatches",
        default="auto",
        help='M: a number, "auto" (the planner chooses) or "stages" (one per stage); '
        "--export sets the engine's own",
    )
    p.add_argument("--min-stages", type=int, default=None, help="force a pipeline of >= N stages")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument(
        "--export",
        choices=("vllm", "llamacpp"),
        default=None,
        help="print the commands that run the plan on that engine (a dry run unless --commit)",
    )
    p.add_argument(
        "--commit", action="store_true", help="with --export: also reserve and publish the plan"
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the placement with a progress bar per stage until all are loaded or failed",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        help="with --wait: give up after this many seconds (default 600)",
    )
    p.add_argument("--timeout", type=float, default=30.0)

    p = sub.add_parser("generate", help="place a runnable model and generate through its stages")
    _common(p)
    _one_shot(p)
    p.add_argument("model", help="smollm2-135m, or hf:<dir>")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text (tokenized with the model's tokenizer)")
    prompt.add_argument("--token-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-stages", type=int, default=None)
    p.add_argument("--objective", choices=("throughput", "latency"), default="throughput")
    p.add_argument("--instance-id", default=None, help="default gen-<model>; reused if placed")
    p.add_argument("--context", type=int, default=2048, dest="context_tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--timeout", type=float, default=30.0, help="planner answer timeout")

    p = sub.add_parser("release", help="release a placed instance (idempotent)")
    _common(p)
    _one_shot(p)
    p.add_argument("instance_id", help="the instance id a placement answered")
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")
    p.add_argument("--timeout", type=float, default=30.0)

    p = sub.add_parser(
        "controller", help="re-place instances whose devices fail or degrade (one active replica)"
    )
    _common(p)

    p = sub.add_parser("status", help="print devices, nodes and instances from the KV")
    _common(p)
    _one_shot(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "-w", "--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C"
    )
    p.add_argument(
        "-n", "--interval", type=float, default=2.0, help="with --watch: seconds between redraws"
    )

    p = sub.add_parser("demo", help="everything on the simulated fleet, then place llama-3.1-70b")
    _common(p)
    _fleet(p)
    p.add_argument("--once", action="store_true", help="exit after printing the placement")
    p.add_argument("--model", default="llama-3.1-70b")
    p.add_argument(
        "--no-generate",
        action="store_false",
        dest="generate",
        help="skip placing SmolLM2 and generating a short completion",
    )
    p.add_argument("--api-port", type=int, default=8080)
    p.add_argument("--interval", type=float, default=None)
    _no_auth(p)

    p = sub.add_parser(
        "bench",
        help="run a benchmark from bench/",
        usage="shardplane bench NAME [--quick] [-- BENCH_ARGS ...]",
    )
    p.add_argument("name", help="e.g. placement-quality, projector-throughput")
    p.add_argument("--quick", action="store_true", help="a short run")
    # The benchmark's own options (after "--") are cut off before parsing, in parse_args: a
    # REMAINDER positional swallows --quick too, and a nargs="*" one is matched (empty) along
    # with NAME, so whatever follows --quick is left over.
    p.set_defaults(args=[])

    p = sub.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true", help="the cards and derived sizes as JSON")
    from shardplane.secure import add_parser as add_auth_parser

    add_auth_parser(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardplane")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from shardplane import __version__

        return __version__


def _check_place(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--export`` prints commands for another engine, so it plans without reserving here
    unless ``--commit`` asks for that too."""
    if args.commit and not args.export:
        parser.error("--commit goes with --export (place without --export already commits)")
    if args.commit and args.dry_run:
        parser.error("--commit and --dry-run contradict each other")
    if args.export and not args.commit:
        args.dry_run = True
    if args.wait and args.dry_run:
        parser.error("--wait follows a committed placement; a dry run loads nothing")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _run_bench(name: str, quick: bool, args: Sequence[str]) -> int:
    module_name = "shardplane.bench." + name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        available = sorted(
            p.stem.replace("_", "-")
            for p in (Path(__file__).resolve().parent / "bench").glob("*.py")
            if not p.stem.startswith("_")
        )
        print(
            f"no benchmark {name!r}; available: {', '.join(available) or 'none'}", file=sys.stderr
        )
        return 2
    main: Callable[..., int | None] = module.main
    return int(main(quick=quick, argv=list(args)) or 0)


BENCH_HINT = "a benchmark's own options go after --: shardplane bench NAME [--quick] -- OPTIONS"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; for ``bench``, ``args.args`` holds what follows ``--`` and only that."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    bench_args: list[str] = []
    if words[:1] == ["bench"] and "--" in words:
        cut = words.index("--")
        words, bench_args = words[:cut], words[cut + 1 :]
    args, unknown = parser.parse_known_args(words)
    if unknown:
        hint = f" ({BENCH_HINT})" if args.command == "bench" else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.command == "bench":
        args.args = bench_args
    if args.command == "place":
        _check_place(parser, args)
    if args.command == "status" and args.interval <= 0:
        parser.error(f"--interval must be above 0 seconds, got {args.interval:g}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _logging(getattr(args, "verbose", False))
    if getattr(args, "nats_url", None):
        os.environ["NATS_URL"] = args.nats_url
    if getattr(args, "creds", None) and args.command != "auth":
        os.environ["NATS_CREDS"] = str(args.creds)
    from shardplane import commands, demo, models, placing, secure, status
    from shardplane import release as release_cmd

    handler: Callable[[argparse.Namespace], int] | None = {
        "up": commands.up,
        "nats": commands.nats_server,
        "agent": commands.agent,
        "projector": commands.projector,
        "planner": commands.planner,
        "api": commands.api,
        "place": placing.place,
        "generate": models.generate,
        "release": release_cmd.release,
        "controller": commands.controller,
        "status": status.status,
        "demo": demo.demo,
        "models": models.models,
        "auth": secure.command,
    }.get(args.command)
    try:
        if args.command == "bench":
            code = _run_bench(args.name, args.quick, args.args)
        else:
            assert handler is not None
            code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader went away (``shardplane models | head``): end quietly with the status a
    default SIGPIPE gives, as other Unix tools do. SIGPIPE itself stays ignored, as Python sets
    it, because a reset NATS or HTTP socket must raise an error, not kill a service."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
