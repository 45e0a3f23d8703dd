"""Auth for the commands: ``shardplane auth``, and what ``up``/``demo`` do to run secured by
default (the folder of role credentials and the server config in the data dir, the admin-only
provisioning, the API token) so that the command modules only pass paths around.

Why a data-dir folder: ``up`` and ``demo`` start the embedded server themselves, so they can
generate every role's credentials on first start and reuse them after (the keys of a running
fleet must not change under it); the one-shot commands (``place``, ``status``) run later in the
same place and find the ``api`` credentials there without any flag.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from nats.aio.client import Client

from shardplane.api.auth import InsecureBinding, check_binding, env_token
from shardplane.bus import auth
from shardplane.bus.auth import AuthError
from shardplane.bus.streams import CLUSTER_STATE, allow_atomic_batches, kv_stream, provision

__all__ = [
    "AuthError",
    "InsecureBinding",
    "admin_provision",
    "api_token",
    "check_binding",
    "client_creds",
    "env_token",
    "prepare",
    "role_creds",
]

DATA_DIR = Path("data")
AUTH_DIR = DATA_DIR / "auth"
TOKEN_FILE = "api-token"
TOKEN_ENV = "SHARDPLANE_API_TOKEN"
CLIENT_ROLE = "api"  # what `place` and `status` connect as: read the state, send requests


def prepare(folder: Path, base_config: Path | None, fleet_nodes: tuple[str, ...]) -> Path:
    """Credentials for every role (agent and worker speaking for ``fleet_nodes``) and the server
    config in ``folder``, created once and extended as the fleet grows; returns server.conf."""
    auth.init_dir(folder, fleet_nodes=fleet_nodes, base_config=base_config)
    return folder / auth.SERVER_CONF


def role_creds(folder: Path) -> dict[str, Path]:
    """The credentials file of each role present in ``folder`` (the fleet-wide agent/worker)."""
    return {
        user: auth.creds_path(folder, user)
        for user, creds in auth.load_dir(folder).items()
        if user == creds.role
    }


def client_creds(folder: Path = AUTH_DIR) -> Path | None:
    """The ``api`` credentials for a one-shot command, unless the environment names its own."""
    if any(os.environ.get(v) for v in ("NATS_CREDS", "NATS_USER", "NATS_TOKEN")):
        return None
    path = auth.creds_path(folder, CLIENT_ROLE)
    return path if path.is_file() else None


def api_token(folder: Path) -> str:
    """SHARDPLANE_API_TOKEN when set, else the one kept in ``folder`` (made on first use)."""
    if token := os.environ.get(TOKEN_ENV):
        return token
    path = folder / TOKEN_FILE
    if path.is_file() and (kept := path.read_text().strip()):
        return kept
    token = secrets.token_urlsafe(24)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


async def admin_provision(nc: Client, partitions: int = 1) -> None:
    """Everything the roles may not create themselves: streams, buckets, the projector's and
    the controller's lease buckets, atomic batches on ``cluster_state`` (an update of the
    stream), and with ``partitions`` > 1 the projector partitions' stream."""
    from shardplane.bus.lease import CONTROLLER_LEASE_BUCKET, LEASE_BUCKET, Lease
    from shardplane.projector import partition

    js = nc.jetstream()
    await provision(js)
    # A lease creates its bucket (replicated like the rest) on first use: as admin, here.
    await Lease(js, bucket=LEASE_BUCKET, role="projector").bucket()
    await Lease(js, bucket=CONTROLLER_LEASE_BUCKET, role="controller").bucket()
    await allow_atomic_batches(nc, kv_stream(CLUSTER_STATE))
    if partitions > 1:
        await partition.provision(nc, partitions)


# --- `shardplane auth` ----------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:  # pyright: ignore[reportPrivateUsage]
    p = sub.add_parser("auth", help="role credentials and the server config (nkeys)")
    actions = p.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    q = actions.add_parser("init", help="write the server config include and one file per role")
    q.add_argument("dir", type=Path)
    q.add_argument(
        "--node",
        action="append",
        default=[],
        help="also an agent-NODE and worker-NODE pair for this node (repeatable)",
    )
    q.add_argument(
        "--fleet", type=Path, default=None, help="agent/worker speaking for a simulated fleet"
    )
    q.add_argument("--base-config", type=Path, default=None, help="config to include (nats.conf)")
    q = actions.add_parser("add-node", help="credentials for one more node; re-renders the config")
    q.add_argument("dir", type=Path)
    q.add_argument("node")
    q.add_argument("--base-config", type=Path, default=None)
    q = actions.add_parser("provision", help="as admin: create or update streams and buckets")
    q.add_argument("--creds", type=Path, required=True, help="the admin credentials file")
    q.add_argument("--nats-url", default=None)


def command(args: argparse.Namespace) -> int:
    from shardplane.natsserver import default_config

    try:
        if args.auth_command == "provision":
            return _provision_command(args)
        base = args.base_config or default_config()
        fleet_nodes: tuple[str, ...] = ()
        if getattr(args, "fleet", None) is not None:
            from shardplane.agents.fleet import load

            fleet_nodes = tuple(n.name for n in load(args.fleet).nodes)
        nodes: tuple[str, ...] = tuple(args.node) if args.auth_command == "init" else ()
        if args.auth_command == "add-node":
            nodes = (args.node,)
            if not (args.dir / auth.AUTH_CONF).is_file():
                print(
                    f"shardplane: {args.dir} has no auth config; run `auth init`", file=sys.stderr
                )
                return 1
        written = auth.init_dir(args.dir, fleet_nodes=fleet_nodes, nodes=nodes, base_config=base)
    except (auth.AuthError, ValueError) as exc:
        print(f"shardplane: {exc}", file=sys.stderr)
        return 2
    for path in written:
        role = auth.read_credentials(path).role
        print(f"wrote {path}  ({role}: {auth.ROLE_PURPOSE[role]})")
    print(
        f"server config: {args.dir / auth.SERVER_CONF} (nats-server -c it; after a change, "
        "reload the server: nats-server --signal reload)"
    )
    return 0


def _provision_command(args: argparse.Namespace) -> int:
    import asyncio

    from shardplane.bus.connect import connect

    async def main() -> int:
        nc = await connect(args.nats_url, name="shardplane-admin", creds=args.creds)
        try:
            await admin_provision(nc)
        finally:
            await nc.close()
        print("streams and buckets provisioned")
        return 0

    return asyncio.run(main())
