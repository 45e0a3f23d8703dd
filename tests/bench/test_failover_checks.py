"""The failover bench's end-of-run checks judge what they claim to, against a real server.

Its test (tests/shardplane/test_ha.py) kills a leader and trusts these checks' verdicts; there
a wrong count shows as a timeout or a false alarm only when the controller happened to heal or
the checks ran long, so each check is pinned here on its own."""

from __future__ import annotations

import json

from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.bench import failover
from shardplane.bus import keys, subjects


async def test_lost_placements_reads_only_assignments_past_the_health_verdicts(
    nc: Client, js: JetStreamContext
) -> None:
    """PLACEMENTS also holds the controller's verdicts: the check must not wait for those to
    come through its assignments-only consumer (it timed out when the controller had healed)."""
    body = {"instance_id": "ha-1", "generation": 1}
    await js.publish(subjects.assigned("ha-0"), json.dumps(body).encode())
    for verdict in ("degraded", "healed"):
        await js.publish(subjects.placement_health("ha-1"), verdict.encode())
    seen = failover.Observed()
    seen.placements.append((0.0, 0.1, "ha-1", 1))  # assigned, but not in the (empty) ledger
    seen.placements.append((0.0, 0.1, "ha-2", 1))  # neither
    assert await failover.lost_placements(nc, seen) == 1 + 2


def test_an_offline_write_counts_as_false_while_the_agents_publish_and_a_ttl_after() -> None:
    """Once the load stops, devices do go silent: the checks that follow may outlast a TTL.
    Within a TTL of a device's last stored sample, offline is still a false alarm."""
    seen = failover.Observed()
    mine, other = keys.device_key("ha-0", 0), keys.device_key("floor", 0)
    seen.offline += [(100.0, mine, "x"), (100.0, other, "x"), (106.0, mine, "no telemetry")]
    assert failover.false_offline(seen, {mine}, 6.0) == seen.offline[:1] + seen.offline[2:]
    seen.load_stopped_at, seen.last_acked_at[mine] = 105.0, 104.5
    seen.offline += [(110.4, mine, "too soon"), (110.6, mine, "no telemetry for 6s")]
    assert failover.false_offline(seen, {mine}, 6.0) == [
        (100.0, mine, "x"),
        (106.0, mine, "no telemetry"),
        (110.4, mine, "too soon"),
    ]
