"""Fleets for planner tests: the demo fleet, and helpers that put synthetic fleets
(``planner.synthetic``) into the real ``cluster_state`` bucket, standing in for the projector."""

from __future__ import annotations

from collections.abc import Sequence

from nats.js import JetStreamContext

from shardplane.bus import codec, keys
from shardplane.bus.messages import DeviceState
from shardplane.bus.streams import CLUSTER_STATE
from shardplane.planner.fleet import Device, Fleet, build_fleet
from shardplane.planner.profile import ModelProfile
from shardplane.planner.synthetic import HostSpec, states


def gb_layers(layers: int, *, name: str, ends_bytes: int, hidden: int) -> ModelProfile:
    """A model of ``layers`` 1 GB layers with 1000 B of KV per token per layer, an embedding
    and a head of ``ends_bytes`` each: sizes a test can add up by hand."""
    return ModelProfile(
        name=name,
        layer_bytes=(10**9,) * layers,
        kv_bytes_per_token=(1000,) * layers,
        embed_bytes=ends_bytes,
        head_bytes=ends_bytes,
        hidden=hidden,
    )


def fleet_of(hosts: Sequence[HostSpec]) -> Fleet:
    devices, node_states = states(hosts)
    return build_fleet(devices, node_states)


# The demo fleet (fleets/demo.toml): a mixed shop.
DEMO = (
    HostSpec("rig-a", ("A100-80GB",), links=(("rig-d", 100.0, 0.01), ("rig-b", 25.0, 0.05))),
    HostSpec("rig-b", ("RTX-4090", "RTX-4090")),
    HostSpec("rig-c", ("RTX-3060-12GB", "P40")),
    HostSpec("rig-d", ("MI250X", "MI250X"), nvlink=True),
)


async def publish_fleet(js: JetStreamContext, hosts: Sequence[HostSpec]) -> None:
    """Write the fleet into cluster_state as the projector would."""
    kv = await js.key_value(CLUSTER_STATE)
    devices, node_states = states(hosts)
    for d in devices:
        await kv.put(keys.device_key(d.sample.node, d.sample.index), codec.encode(d))
    for name, n in node_states.items():
        await kv.put(keys.node_key(name), codec.encode(n))


async def put_device(js: JetStreamContext, state: DeviceState) -> None:
    kv = await js.key_value(CLUSTER_STATE)
    await kv.put(keys.device_key(state.sample.node, state.sample.index), codec.encode(state))


def device(ref: str, bw: float, *, gib: float = 80, tflops: float = 0.0) -> Device:
    """A planner device ``<node>/<index>`` with ``gib`` GiB, all free, and the given speeds."""
    node, _, idx = ref.partition("/")
    return Device(
        ref=ref,
        node=node,
        index=int(idx),
        gpu="g",
        bandwidth_gbps=bw,
        total_bytes=int(gib * 1024**3),
        free_bytes=int(gib * 1024**3),
        tflops=tflops,
    )
