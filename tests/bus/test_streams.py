from __future__ import annotations

from nats.aio.client import Client

from shardplane.bus.streams import CLUSTER_STATE, bucket_configs, provision, stream_configs


async def test_provision_is_idempotent(nc: Client) -> None:
    js = nc.jetstream()
    await provision(js)
    first = {s.config.name: s.config for s in await js.streams_info()}
    await provision(js)
    second = {s.config.name: s.config for s in await js.streams_info()}
    expected = {c.name for c in stream_configs()} | {f"KV_{b.bucket}" for b in bucket_configs()}
    assert set(first) == expected
    assert first.keys() == second.keys()
    for name, config in first.items():
        assert second[name].subjects == config.subjects
        assert second[name].max_age == config.max_age
        assert second[name].max_msgs_per_subject == config.max_msgs_per_subject
    kv = await js.key_value(CLUSTER_STATE)
    status = await kv.status()
    assert status.bucket == CLUSTER_STATE
    assert first[f"KV_{CLUSTER_STATE}"].allow_direct is True
    telemetry = first["TELEMETRY"]
    assert telemetry.max_msgs_per_subject and telemetry.max_msgs_per_subject > 0
    assert telemetry.max_age and telemetry.max_age > 0
