"""Defence in depth: the planner does not trust implausible telemetry, and a worker refuses an
assignment whose bytes cannot fit on its device, whoever sent it."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from shardplane.agents.worker import misfit
from shardplane.bus.messages import DeviceSample, DeviceState, ShardAssignment
from shardplane.planner.fleet import build_fleet
from shardplane.planner.plausible import MAX_MEMORY, implausible
from tests import kit
from tests.agents.busutil import StatusLog, assign, workers

GIB = 1024**3


def _state(node: str, **fields: object) -> DeviceState:
    sample = DeviceSample(
        node=node,
        index=0,
        uuid=f"GPU-{node}",
        seq=1,
        ts=1.0,
        name="NVIDIA A100-SXM4-80GB",
        memory_total_bytes=80 * GIB,
        memory_free_bytes=70 * GIB,
        bandwidth_gbps=2039.0,
    )
    return DeviceState(sample=msgspec.structs.replace(sample, **fields), online=True, last_seen=1.0)


def test_a_fake_huge_device_is_excluded_with_the_reason() -> None:
    fake = _state("evil", memory_total_bytes=10_000 * GIB, memory_free_bytes=10_000 * GIB)
    fleet = build_fleet([_state("good"), fake], {})
    assert [d.ref for d in fleet.devices] == ["good/0"]
    (ref, why), *_ = fleet.excluded
    assert ref == "evil/0"
    assert "implausible telemetry, not trusted: memory_total_bytes 10,000 GiB is over" in why


def test_plausibility_limits() -> None:
    assert implausible(_state("a").sample) is None
    # A GPU twice the size of anything known is still trusted (a generation ahead).
    big = _state("a", memory_total_bytes=2 * MAX_MEMORY // 4, memory_free_bytes=GIB).sample
    assert implausible(big) is None
    assert "exceeds memory_total_bytes" in str(
        implausible(_state("a", memory_free_bytes=90 * GIB).sample)
    )
    assert "bandwidth" in str(implausible(_state("a", bandwidth_gbps=1e6).sample))
    host = _state("a", vendor="cpu", memory_total_bytes=2048 * GIB, memory_free_bytes=GIB)
    assert implausible(host.sample) is None  # host RAM as a device may be large


def _assignment(memory_gib: float) -> ShardAssignment:
    memory = int(memory_gib * GIB)
    return kit.assignment(
        "big", 1, "n1", 0, 1, layer_end=4, layers_total=4, memory_bytes=memory, ts=0.0
    )


def test_misfit_names_the_numbers() -> None:
    assert misfit(_assignment(10), 24 * GIB, 0) is None
    assert misfit(_assignment(10), None, 0) is None
    why = misfit(_assignment(60), 24 * GIB, 4 * GIB)
    assert why is not None
    assert "needs 60.00 GiB on device 0, which has 24.00 GiB in total (4.00 GiB already" in why


async def test_a_worker_refuses_an_assignment_that_cannot_fit(
    nc: Client, js: JetStreamContext
) -> None:
    log = await StatusLog().start(nc)
    held: list[int] = []

    def capacity(_index: int) -> int:
        return 24 * GIB

    def hold_memory(_index: int, nbytes: int) -> None:
        held.append(nbytes)

    async with workers(nc, ["n1"], capacity=capacity, hold_memory=hold_memory):
        await assign(js, _assignment(60))
        final = await log.settled("big", 1, 1, states=("reserved",))
    await log.stop()
    assert final[0].state == "failed"
    assert "needs 60.00 GiB on device 0, which has 24.00 GiB" in (final[0].reason or "")
    assert held == []  # nothing was held for it
