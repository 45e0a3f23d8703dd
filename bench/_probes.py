"""The security probes shared by ``bench/fuzz.py`` and the tests: a NATS server with role users
(:class:`SecureBus`), and every role trying every action it must not take (:func:`probe_roles`).

Why a forbidden action counts as refused only when the server says so *and* nothing arrives:
the server answers a denied publish or subscription with a permissions-violation error to the
client, and a witness (``admin``, subscribed to everything the probe touches) proves that the
denied publish went nowhere and that a denied subscription receives nothing. Allowed actions
run through the same machinery as controls, so a probe that could not see a violation (or a
delivery) fails loudly instead of passing.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nats.aio.client import Client

from shardplane.bus import auth, subjects
from shardplane.bus.connect import connect
from shardplane.natsserver import NatsServer
from shardplane.secure import admin_provision

FLEET_NODES = ("rig-a", "rig-b")  # the fleet-wide agent/worker speak for these
OWN_NODE, OTHER_NODE = "n1", "n2"  # agent-n1/worker-n1 against n2's subjects
VIOLATION_WAIT_S = 5.0

Kind = Literal["pub", "sub"]


@dataclass(frozen=True)
class Action:
    user: str
    kind: Kind
    subject: str
    why: str


@dataclass
class SecureBus:
    """A nats-server with the role users of a fresh credentials folder, provisioned by admin."""

    url: str
    folder: Path

    def creds(self, user: str) -> Path:
        return auth.creds_path(self.folder, user)

    async def connect(self, user: str, name: str | None = None, **options: object) -> Client:
        return await connect(
            self.url, name=name or f"probe-{user}", creds=self.creds(user), **options
        )


@contextlib.asynccontextmanager
async def secure_bus(
    fleet_nodes: tuple[str, ...] = FLEET_NODES, nodes: tuple[str, ...] = (OWN_NODE, OTHER_NODE)
) -> AsyncGenerator[SecureBus]:
    with tempfile.TemporaryDirectory(prefix="shardplane-auth-") as tmp:
        folder = Path(tmp) / "auth"
        auth.init_dir(folder, fleet_nodes=fleet_nodes, nodes=nodes)
        async with NatsServer(config=folder / auth.SERVER_CONF, store_dir=Path(tmp) / "nats") as s:
            bus = SecureBus(s.url, folder)
            admin = await bus.connect("admin")
            try:
                await admin_provision(admin)
            finally:
                await admin.close()
            yield bus


# --- what each role must not do ------------------------------------------------------------

USERS = (
    *("agent", f"agent-{OWN_NODE}", f"worker-{OWN_NODE}", "worker"),
    *("projector", "planner", "controller", "api"),
)


def _who_may(subject: str) -> set[str]:
    """The users that may publish ``subject`` (admin aside) in this test's folder."""
    own_agent = {"agent", f"agent-{OWN_NODE}"}
    if subject.startswith(f"{subjects.PLACEMENT_ASSIGNED}."):
        return {"planner"}
    if subject.startswith("$KV.cluster_state."):
        return {"projector"}
    if subject.startswith("$KV.placement_ledger."):
        return {"planner"}
    if subject.startswith(f"{subjects.TELEMETRY_GPU}.{OWN_NODE}.") or subject == (
        subjects.node_heartbeat(OWN_NODE)
    ):
        return own_agent - {"agent"}
    if subject == subjects.PLACEMENT_REQUEST:
        return {"controller", "api"}
    return set()


FORBIDDEN_PUBLISH = (
    subjects.assigned(OWN_NODE),
    subjects.assigned(OTHER_NODE),
    "$KV.cluster_state.devices.n1.0",
    "$KV.cluster_state.instances.x",
    "$KV.placement_ledger.ledger",
    subjects.gpu_sample(OTHER_NODE, 0),
    subjects.node_heartbeat(OTHER_NODE),
    subjects.shard_status(OTHER_NODE, "inst"),
    f"$JS.ACK.PLACEMENTS.worker-{OTHER_NODE}.1.1.1.1.1",
    subjects.PLACEMENT_REQUEST,
    "$JS.API.STREAM.CREATE.EVIL",
    "$JS.API.STREAM.UPDATE.TELEMETRY",
    "$JS.API.STREAM.DELETE.PLACEMENTS",
    "$JS.API.STREAM.PURGE.KV_cluster_state",
    "$JS.API.STREAM.PURGE.KV_placement_ledger",
    "$JS.API.STREAM.MSG.DELETE.KV_cluster_state",
    "$JS.API.KV.DELETE.cluster_state",
    "$JS.API.CONSUMER.DELETE.PLACEMENTS.worker-n2",
    "$JS.API.CONSUMER.DELETE.PLACEMENTS.projector_placements",
    "$JS.API.CONSUMER.MSG.NEXT.PLACEMENTS.projector_placements",
    "$SRV.PING",
)
FORBIDDEN_SUBSCRIBE = (
    ">",
    "_INBOX.>",
    "$KV.cluster_state.>",
    "placement.assigned.>",
    "telemetry.>",
    subjects.PLACEMENT_REQUEST,
)


def forbidden_actions() -> list[Action]:
    actions: list[Action] = []
    for user in USERS:
        for subject in FORBIDDEN_PUBLISH:
            if user in _who_may(subject):
                continue
            if user == "projector" and subject.endswith("PLACEMENTS.projector_placements"):
                continue  # the projector's own consumer
            if user == "planner" and subject == "$SRV.PING":
                continue  # the planner answers $SRV (its reply goes to the asker)
            if user.startswith("worker") and subject.endswith("worker-n2"):
                continue  # the restart replay deletes its ephemeral consumer (any name)
            actions.append(Action(user, "pub", subject, f"{user} may not publish {subject}"))
        for subject in FORBIDDEN_SUBSCRIBE:
            if user == "planner" and subject == subjects.PLACEMENT_REQUEST:
                continue
            actions.append(Action(user, "sub", subject, f"{user} may not subscribe {subject}"))
        other = "planner" if user != "planner" else "api"
        actions.append(
            Action(user, "sub", f"_INBOX.{other}.>", f"{user} may not read {other}'s replies")
        )
    return actions


def allowed_actions() -> list[Action]:
    """Controls: each must go through (no violation, and a publish reaches the witness)."""
    return [
        Action(f"agent-{OWN_NODE}", "pub", subjects.gpu_sample(OWN_NODE, 0), "own telemetry"),
        Action("agent", "pub", subjects.node_heartbeat(FLEET_NODES[0]), "fleet telemetry"),
        Action(f"worker-{OWN_NODE}", "pub", subjects.shard_status(OWN_NODE, "i"), "own status"),
        Action("planner", "pub", subjects.assigned(OTHER_NODE), "assignments"),
        Action("api", "pub", subjects.PLACEMENT_REQUEST, "requests"),
        Action("api", "sub", "_INBOX.api.probe", "own inbox"),
        Action("planner", "sub", subjects.PLACEMENT_REQUEST, "serves requests"),
    ]


# --- running them ------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    tried: int = 0
    refused: int = 0
    allowed: list[Action] = field(default_factory=list[Action])  # forbidden, yet it went through
    controls_failed: list[Action] = field(default_factory=list[Action])


async def _witness(bus: SecureBus) -> tuple[Client, dict[str, int]]:
    seen: dict[str, int] = {}
    admin = await bus.connect("admin", name="probe-witness")

    async def count(msg: object) -> None:
        subject = str(getattr(msg, "subject", ""))
        seen[subject] = seen.get(subject, 0) + 1

    await admin.subscribe(">", cb=count)
    await admin.flush()
    return admin, seen


async def _run_user(
    bus: SecureBus,
    user: str,
    actions: list[Action],
    witness: Client,
    seen: dict[str, int],
    expect_refusal: bool = True,
) -> dict[Action, bool]:
    """For each action: True when the server refused it (violation seen, nothing delivered)."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await bus.connect(user, error_cb=on_error)
    received: dict[str, int] = {}
    before = dict(seen)
    try:
        for action in actions:
            if action.kind == "pub":
                await nc.publish(action.subject, b"probe")
            else:

                async def got(msg: object, subject: str = action.subject) -> None:
                    received[subject] = received.get(subject, 0) + 1

                await nc.subscribe(action.subject, cb=got)
        # The server sends a violation before the PONG that ends the flush; waiting longer is
        # only for a loaded machine, and only while some expected violation is still missing.
        await nc.flush()
        expected = {a.subject.lower() for a in actions} if expect_refusal else set[str]()
        deadline = time.monotonic() + VIOLATION_WAIT_S
        while time.monotonic() < deadline:
            if all(any(f'"{s}"' in e for e in errors) for s in expected):
                break
            await asyncio.sleep(0.02)
        # What reached the witness from this user's publishes (before its own, below).
        reached = {a.subject: seen.get(a.subject, 0) - before.get(a.subject, 0) for a in actions}
        # Subscriptions: the witness publishes to each subject; a refused one receives nothing.
        for action in actions:
            if action.kind == "sub":
                await witness.publish(_concrete(action.subject), b"witness")
        await witness.flush()
        await nc.flush()
        await asyncio.sleep(0.05)
        result: dict[Action, bool] = {}
        for action in actions:
            violation = any(f'"{action.subject.lower()}"' in e for e in errors)
            if action.kind == "pub":
                delivered = reached[action.subject] > 0
            else:
                delivered = received.get(action.subject, 0) > 0
            result[action] = violation and not delivered
        return result
    finally:
        await nc.close()


def _concrete(subject: str) -> str:
    return subject.replace(">", "probe.x").replace("*", "probe")


async def probe_roles(bus: SecureBus) -> ProbeResult:
    """Every forbidden action (must be refused) and every control (must go through)."""
    out = ProbeResult()
    witness, seen = await _witness(bus)
    try:
        forbidden = forbidden_actions()
        controls = allowed_actions()
        for user in dict.fromkeys(a.user for a in [*forbidden, *controls]):
            mine = [a for a in forbidden if a.user == user]
            if mine:
                verdict = await _run_user(bus, user, mine, witness, seen)
                out.tried += len(mine)
                out.refused += sum(verdict.values())
                out.allowed += [a for a, refused in verdict.items() if not refused]
            checks = [a for a in controls if a.user == user]
            for control in checks:
                seen.pop(control.subject, None)
                verdict = await _run_user(bus, user, [control], witness, seen, False)
                if verdict[control] or (control.kind == "pub" and not seen.get(control.subject, 0)):
                    out.controls_failed.append(control)
    finally:
        await witness.close()
    return out
