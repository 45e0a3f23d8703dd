"""Who may do what on the bus: one NATS user per role, each with allow-lists of exactly the
subjects it needs, authenticated by an nkey (an Ed25519 key pair: the server holds only public
keys, the client proves itself by signing the server's nonce, no secret crosses the wire).

Why allow-lists per role: an anonymous client could forge a ``placement.assigned.<node>``, write
a fake 10,000 GiB device into ``cluster_state`` or delete a KV key that hid memory still held.
With roles, only the planner publishes assignments and the ledger, only the projector writes
``cluster_state``, an agent publishes only its own nodes' telemetry, a worker acks only its own
durable and reports only its own nodes' status, the API reads the state and sends requests, and
only ``admin`` creates or changes streams and buckets (so services stop provisioning once
they connect as a role: :func:`may_provision`).

Every user also gets a private reply-inbox prefix (``_INBOX.<user>``): nats-py's
``inbox_prefix`` makes its requests, JetStream pulls and KV watches answer there, and no other
role may subscribe to it, so nobody reads another's replies.

The credentials file is ours, not the JWT ``.creds`` format (that needs an operator and
``nsc``): a few ``# key: value`` header lines (user, role, nodes, inbox) and the seed. The
server's authorization block is a pure function of the credential files in a folder
(:func:`render_authorization`), so adding a node is writing two files and re-rendering.
"""

from __future__ import annotations

import os
import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nkeys

from shardplane.bus import subjects
from shardplane.bus.errors import BusError
from shardplane.bus.ids import node_id
from shardplane.bus.lease import CONTROLLER_LEASE_BUCKET, LEASE_BUCKET
from shardplane.bus.streams import (
    CLUSTER_STATE,
    DEADLETTER,
    LEDGER,
    MAX_PARTITIONS,
    PLACEMENTS,
    SHARDS,
    TELEMETRY,
    kv_stream,
    kv_subject,
    partition_node_stream,
    partition_stream,
)

Role = Literal["admin", "agent", "worker", "projector", "planner", "controller", "api"]
ROLES: tuple[Role, ...] = ("admin", "agent", "worker", "projector", "planner", "controller", "api")
NODE_ROLES: tuple[Role, ...] = ("agent", "worker")  # scoped to the nodes they speak for
WORKER_DURABLE = "worker-{node}"  # agents.worker.durable_name
PROJECTOR_DURABLE = "projector_{stream}"  # projector.service.CONSUMERS
CREDS_SUFFIX = ".creds"
AUTH_CONF = "auth.conf"
SERVER_CONF = "server.conf"
JS = "$JS.API"

ROLE_PURPOSE: dict[Role, str] = {
    "admin": "creates and changes streams and buckets; anything else (operators, `auth`)",
    "agent": "publishes its own nodes' telemetry; answers sim.fault for simulated nodes",
    "worker": "consumes its own nodes' assignments, publishes their shard status, reads the ledger",
    "projector": "consumes telemetry, assignments and statuses; the only writer of cluster_state",
    "planner": "serves placement.request; the only publisher of assignments and the ledger",
    "controller": "reads cluster_state and the ledger, re-places through placement.request",
    "api": "reads and watches cluster_state, sends placement requests (also `place`, `status`), "
    "reads the ledger (a plan's batch, for serving)",
}


class AuthError(BusError, ValueError):
    """A credentials file or folder that cannot be used; ``str()`` says which and why."""


# --- permissions (pure) ------------------------------------------------------------------------


def _consume(stream: str, consumer: str = "*") -> list[str]:
    """Read ``stream`` through consumers named ``consumer`` (``*``: any, ephemerals included;
    a name: that durable only, so its holder can neither ack nor pull anyone else's)."""
    create = (
        [f"{JS}.CONSUMER.CREATE.{stream}", f"{JS}.CONSUMER.CREATE.{stream}.>"]
        if consumer == "*"
        else [
            f"{JS}.CONSUMER.CREATE.{stream}.{consumer}",
            f"{JS}.CONSUMER.CREATE.{stream}.{consumer}.>",
        ]
    )
    return [
        f"{JS}.STREAM.INFO.{stream}",
        *create,
        f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"{JS}.CONSUMER.INFO.{stream}.{consumer}",
        f"{JS}.CONSUMER.DELETE.{stream}.{consumer}",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
        f"$JS.FC.{stream}.>",
    ]


def _read_kv(bucket: str) -> list[str]:
    stream = kv_stream(bucket)
    return [
        *_consume(stream),
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.STREAM.MSG.GET.{stream}",
    ]


def _write_kv(bucket: str) -> list[str]:
    return [kv_subject(bucket, ">")]


# Every role may look at stream and bucket configs (to wait for an admin to provision them),
# never at other roles' messages through that.
_STREAM_INFO = f"{JS}.STREAM.INFO.*"


def permissions(role: Role, user: str, nodes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The server-side permissions of ``user`` acting as ``role`` (for ``nodes`` where the role
    is node-scoped), as the dict that :func:`render_authorization` writes."""
    inbox = inbox_prefix(user)
    pub: list[str] = [_STREAM_INFO]
    deny: list[str] = []
    sub: list[str] = [f"{inbox}.>"]
    responses = False
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if role == "agent":
        for node in nodes:
            pub += [f"{subjects.TELEMETRY_GPU}.{node}.*", subjects.node_heartbeat(node)]
        sub += [subjects.SIM_FAULT_ANY]  # simulated nodes only; the reply goes to the asker
        responses = True
    elif role == "worker":
        for node in nodes:
            durable = WORKER_DURABLE.format(node=node)
            pub += [
                f"{JS}.CONSUMER.DURABLE.CREATE.{PLACEMENTS}.{durable}",
                f"{JS}.CONSUMER.CREATE.{PLACEMENTS}.{durable}.>",
                # the restart replay's ephemeral consumer: any name, but filtered to this node
                f"{JS}.CONSUMER.CREATE.{PLACEMENTS}.*.{subjects.assigned(node)}",
                f"{JS}.CONSUMER.INFO.{PLACEMENTS}.{durable}",
                f"{JS}.CONSUMER.DELETE.{PLACEMENTS}.{durable}",
                f"{JS}.CONSUMER.MSG.NEXT.{PLACEMENTS}.{durable}",
                f"$JS.ACK.{PLACEMENTS}.{durable}.>",
                subjects.shard_status(node, "*"),
                subjects.deadletter(subjects.assigned(node)),
            ]
        # The restart replay pulls through that ephemeral consumer (no acks) and deletes it;
        # its name is random, so pulling, reading and deleting take any name. A worker can thus
        # pull from another node's durable (delaying, never acking, never forging its work).
        # Read-only: the ledger, to check an assignment's generation against what the planner
        # promised (a forged or stale assignment then fails that check too).
        pub += _read_kv(LEDGER)
        # Running models: a stage serves its requests and calls the next stage (core
        # request-reply). The subject names the instance and stage, not the node, so this is
        # every pipeline's; a stage answers only for the stages its worker loaded.
        pub += [f"{subjects.PIPELINE}.>"]
        sub += [f"{subjects.PIPELINE}.>"]
        responses = True
        # An agent process's nodes share one assignment consumer (agents.assignments) whose
        # filter names several subjects, so its create request names no filter: workers may
        # thus read (never ack or forge) other nodes' assignments, as they already could pull.
        pub += [f"{JS}.CONSUMER.CREATE.{PLACEMENTS}.*"]
        pub += [
            f"{JS}.CONSUMER.MSG.NEXT.{PLACEMENTS}.*",
            f"{JS}.CONSUMER.DELETE.{PLACEMENTS}.*",
            f"{JS}.CONSUMER.INFO.{PLACEMENTS}.*",
        ]
        # ...but never the projector's: a deny wins over those wildcards.
        projector = PROJECTOR_DURABLE.format(stream=PLACEMENTS.lower())
        deny += [
            f"{JS}.CONSUMER.*.{PLACEMENTS}.{projector}",
            f"{JS}.CONSUMER.MSG.NEXT.{PLACEMENTS}.{projector}",
        ]
    elif role == "projector":
        for stream in (TELEMETRY, PLACEMENTS, SHARDS):
            pub += _consume(stream, PROJECTOR_DURABLE.format(stream=stream.lower()))
        # Partitions (projector.partition): each consumes its share of streams that hold
        # only copies of TELEMETRY, which this role reads whole anyway, so any consumer name.
        for count in range(1, MAX_PARTITIONS + 1):
            pub += _consume(partition_stream(count)) + _consume(partition_node_stream(count))
        pub += _read_kv(CLUSTER_STATE) + _write_kv(CLUSTER_STATE)
        pub += _read_kv(LEASE_BUCKET) + _write_kv(LEASE_BUCKET)
        # The ledger, to act only on the generation the planner committed (bus.authority).
        pub += _read_kv(LEDGER)
        pub += [f"{subjects.DEADLETTER}.>", f"{JS}.STREAM.INFO.{DEADLETTER}"]
    elif role == "planner":
        pub += _read_kv(CLUSTER_STATE) + _read_kv(LEDGER) + _write_kv(LEDGER)
        pub += [f"{subjects.PLACEMENT_ASSIGNED}.>"]
        sub += [subjects.PLACEMENT_REQUEST, subjects.PLACEMENT_RELEASE, "$SRV.>"]
        responses = True
    elif role in ("controller", "api"):
        pub += [*_read_kv(CLUSTER_STATE), subjects.PLACEMENT_REQUEST, subjects.PLACEMENT_RELEASE]
        if role == "api":
            pub += [f"{subjects.PIPELINE}.>"]  # generation: requests to a pipeline's first stage
            pub += _read_kv(LEDGER)  # the plan's batch and micro-batches, for serving
        if role == "controller":
            pub += _read_kv(LEDGER)
            pub += _read_kv(CONTROLLER_LEASE_BUCKET) + _write_kv(CONTROLLER_LEASE_BUCKET)
            pub += [f"{subjects.PLACEMENT_HEALTH}.>"]  # its verdicts, into PLACEMENTS
    publish: dict[str, Any] = {"allow": pub, "deny": deny} if deny else {"allow": pub}
    perms: dict[str, Any] = {"publish": publish, "subscribe": {"allow": sub}}
    if responses:
        perms["allow_responses"] = True
    return perms


def inbox_prefix(user: str) -> str:
    return f"_INBOX.{user}"


# --- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """One user: its role, the nodes it speaks for (agent, worker), its inbox and nkey seed."""

    user: str
    role: Role
    seed: str
    nodes: tuple[str, ...] = ()

    @property
    def inbox(self) -> str:
        return inbox_prefix(self.user)

    @property
    def public_key(self) -> str:
        pair: Any = nkeys.from_seed(bytearray(self.seed.encode()))
        return str(pair.public_key.decode())

    def text(self) -> str:
        return (
            "# shardplane credentials: give this file as NATS_CREDS or --creds; keep it private.\n"
            f"# user: {self.user}\n# role: {self.role}\n# nodes: {','.join(self.nodes)}\n"
            f"# inbox: {self.inbox}\n{self.seed}\n"
        )


def new_seed() -> str:
    """A fresh user nkey seed (``SU...``), from 32 random bytes."""
    raw = secrets.token_bytes(32)
    encoded: Any = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)
    return bytes(encoded).decode()


def new_credentials(
    role: Role, nodes: tuple[str, ...] = (), user: str | None = None
) -> Credentials:
    for node in nodes:
        node_id(node)
    if role in NODE_ROLES and not nodes:
        raise AuthError(f"a {role} speaks for nodes: name at least one")
    return Credentials(user=user or role, role=role, seed=new_seed(), nodes=tuple(nodes))


def parse_credentials(text: str, source: str = "credentials") -> Credentials:
    """Read a file written by :meth:`Credentials.text`; AuthError names what is missing."""
    header: dict[str, str] = {}
    seed = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                header[key.strip()] = value.strip()
        elif line:
            seed = line
    role = header.get("role", "")
    if role not in ROLES:
        raise AuthError(f"{source}: no `# role:` line naming one of {', '.join(ROLES)}")
    if not seed.startswith("SU"):
        raise AuthError(f"{source}: no user nkey seed (a line starting with SU)")
    try:
        nkeys.from_seed(bytearray(seed.encode()))
    except Exception as exc:
        raise AuthError(f"{source}: the seed is not a valid nkey: {exc!r}") from None
    nodes = tuple(n for n in header.get("nodes", "").split(",") if n)
    return Credentials(user=header.get("user") or role, role=role, seed=seed, nodes=nodes)


def read_credentials(path: str | Path) -> Credentials:
    try:
        return parse_credentials(Path(path).read_text(), str(path))
    except OSError as exc:
        raise AuthError(f"cannot read credentials {path}: {exc.strerror}") from None


# --- the server's config -------------------------------------------------------------------


def _conf_value(value: Any, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        items: list[Any] = value  # pyright: ignore[reportUnknownVariableType]
        return "[" + ", ".join(_conf_value(v, indent) for v in items) + "]"
    assert isinstance(value, dict)
    inner = indent + "  "
    fields: dict[str, Any] = value  # pyright: ignore[reportUnknownVariableType]
    body = "".join(f"{inner}{k}: {_conf_value(v, inner)}\n" for k, v in fields.items())
    return "{\n" + body + indent + "}"


def render_authorization(users: list[Credentials]) -> str:
    """The nats-server ``authorization`` block for ``users`` (public keys and permissions)."""
    entries = [
        {"nkey": c.public_key, "permissions": permissions(c.role, c.user, c.nodes)}
        for c in sorted(users, key=lambda c: c.user)
    ]
    lines = ["# generated by `shardplane auth`: one nkey user per role; do not edit by hand."]
    for c in sorted(users, key=lambda c: c.user):
        lines.append(
            f"# {c.user}: role {c.role}" + (f", nodes {','.join(c.nodes)}" if c.nodes else "")
        )
    lines.append("authorization " + _conf_value({"users": entries}, "") + "\n")
    return "\n".join(lines)


# --- a credentials folder -------------------------------------------------------------------


def load_dir(folder: Path) -> dict[str, Credentials]:
    """Every credentials file in ``folder``, by user."""
    found: dict[str, Credentials] = {}
    for path in sorted(folder.glob(f"*{CREDS_SUFFIX}")):
        creds = read_credentials(path)
        found[creds.user] = creds
    return found


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def write_server_config(folder: Path, base_config: Path | None) -> Path:
    """(Re)write ``auth.conf`` from the folder's credentials and ``server.conf``: a copy of
    ``base_config`` (listen address, JetStream limits; nats-server includes only paths relative
    to the including file) followed by ``include "auth.conf"``; returns server.conf."""
    users = list(load_dir(folder).values())
    if not any(c.role == "admin" for c in users):
        raise AuthError(f"{folder}: no admin credentials; run `shardplane auth init {folder}`")
    _write_private(folder / AUTH_CONF, render_authorization(users))
    lines = ["# generated by `shardplane auth`: the base config plus the role users."]
    if base_config is not None:
        lines += [f"# --- copied from {base_config.resolve()}", base_config.read_text().rstrip()]
    lines += ["# --- the role users", f'include "{AUTH_CONF}"']
    server = folder / SERVER_CONF
    _write_private(server, "\n".join(lines) + "\n")
    return server


def creds_path(folder: Path, user: str) -> Path:
    return folder / f"{user}{CREDS_SUFFIX}"


def init_dir(
    folder: Path,
    *,
    fleet_nodes: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
    base_config: Path | None = None,
) -> list[Path]:
    """Write whatever credentials ``folder`` lacks (never replacing a key that exists), then the
    server config. ``fleet_nodes``: one ``agent``/``worker`` pair speaking for all of them (a
    process simulating a fleet); ``nodes``: an ``agent-<node>``/``worker-<node>`` pair each."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    have = load_dir(folder)
    wanted: list[Credentials] = []
    for role in ROLES:
        if role not in NODE_ROLES:
            wanted.append(Credentials(user=role, role=role, seed=""))
        elif fleet_nodes:
            wanted.append(Credentials(user=role, role=role, seed="", nodes=tuple(fleet_nodes)))
    for node in nodes:
        for role in NODE_ROLES:
            wanted.append(Credentials(user=f"{role}-{node}", role=role, seed="", nodes=(node,)))
    written: list[Path] = []
    for want in wanted:
        old = have.get(want.user)
        if old is not None and set(want.nodes) <= set(old.nodes):
            continue
        merged = tuple(dict.fromkeys((*(old.nodes if old else ()), *want.nodes)))
        seed = old.seed if old is not None else new_seed()
        creds = Credentials(user=want.user, role=want.role, seed=seed, nodes=merged)
        for node in creds.nodes:
            node_id(node)
        path = creds_path(folder, creds.user)
        _write_private(path, creds.text())
        written.append(path)
    write_server_config(folder, base_config)
    return written


# --- which connection may provision ----------------------------------------------------------

_ROLE_OF: weakref.WeakKeyDictionary[Any, Role] = weakref.WeakKeyDictionary()


def remember_role(nc: Any, role: Role) -> None:
    """Called by ``bus.connect`` when it connected with a shardplane credentials file."""
    _ROLE_OF[nc] = role


def role_of(nc: Any) -> Role | None:
    return _ROLE_OF.get(nc)


def may_provision(nc: Any) -> bool:
    """True for the single-user dev mode (no shardplane role: an open server, or credentials
    we did not issue) and for ``admin``; every other role only checks that streams exist."""
    role = role_of(nc)
    return role is None or role == "admin"
