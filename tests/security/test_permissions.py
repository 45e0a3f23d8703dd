"""Each role tries every action it must not take against a real nats-server with the role
users of ``shardplane auth``, and the server refuses every one; controls prove the probes
would have seen an allowed action go through."""

from __future__ import annotations

import asyncio
import logging

import nats
import pytest
from nats.errors import Error as NatsError

from shardplane.bench._probes import forbidden_actions, probe_roles, secure_bus
from shardplane.bus import auth, streams
from shardplane.bus.streams import provision
from tests.kit import eventually


async def test_every_role_is_refused_every_forbidden_action() -> None:
    async with secure_bus() as bus:
        result = await probe_roles(bus)
        # Nothing was broken by the attempts: every stream and bucket is still there.
        admin = await bus.connect("admin")
        try:
            js = admin.jetstream()
            names = {s.config.name for s in await js.streams_info()}
        finally:
            await admin.close()
    assert result.tried == len(forbidden_actions()) > 100
    assert [a.why for a in result.allowed] == []
    assert result.refused == result.tried
    assert result.controls_failed == []
    assert {streams.TELEMETRY, streams.PLACEMENTS, f"KV_{streams.CLUSTER_STATE}"} <= names


async def test_anonymous_and_unknown_keys_are_refused(tmp_path: object) -> None:
    async with secure_bus() as bus:
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(bus.url, allow_reconnect=False, max_reconnect_attempts=0)
        stranger = auth.new_credentials("admin", user="stranger")
        path = bus.folder / "stranger.txt"  # not a .creds file: the server never heard of it
        path.write_text(stranger.text())
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(
                bus.url,
                nkeys_seed_str=stranger.seed,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )


async def test_a_role_waits_for_admin_instead_of_provisioning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service connected as a role never creates streams: provision() only checks them."""
    async with secure_bus() as bus:
        planner = await bus.connect("planner")
        try:
            assert not auth.may_provision(planner)
            await provision(planner.jetstream())  # all exist: returns without writing
        finally:
            await planner.close()
        admin = await bus.connect("admin")
        planner = await bus.connect("planner")
        try:
            assert auth.may_provision(admin)
            # A stream goes missing: the planner waits for it rather than creating it...
            await admin.jetstream().delete_stream(streams.DEADLETTER)
            caplog.set_level(logging.WARNING, logger=streams.log.name)
            waiting = asyncio.create_task(provision(planner.jetstream()))
            # It has found the stream missing (and says so) before this looks at it.
            await eventually(
                lambda: [r for r in caplog.records if "waiting for an admin" in r.getMessage()],
                bool,
                what="provision() saying it waits for an admin",
            )
            assert not waiting.done()
            # ...and carries on once the admin has provisioned again.
            await provision(admin.jetstream())
            await asyncio.wait_for(waiting, 15)
        finally:
            await planner.close()
            await admin.close()
