"""The NVML backend on a fake of the lowest layer (pynvml's functions)."""

from __future__ import annotations

import asyncio
import logging
import time

import pynvml
import pytest
from nats.aio.client import Client

from shardplane.agents.collector import CollectorConfig, NodeCollector
from shardplane.agents.factory import select_backend
from shardplane.agents.hostinfo import this_host
from shardplane.agents.nvml import open_nvml, reason_names
from shardplane.agents.publisher import Publisher
from shardplane.bus import codec
from shardplane.bus.messages import DeviceSample
from tests.agents.fakenvml import FakeGpu, FakeHandle, FakeNvml


def _two_linked() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-aaaa", pci="00000000:07:00.0", nvlink_peers=["00000000:0F:00.0"] * 2),
        FakeGpu("GPU-bbbb", pci="00000000:0F:00.0", nvlink_peers=["00000000:07:00.0"] * 2),
    ]


def test_reads_every_field_in_the_right_units(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(_two_linked()).install(monkeypatch)
    backend = open_nvml("rig-a")
    assert backend.device_count() == 2
    assert backend.interconnect == "nvlink"
    s = backend.read(1000.0)[0]
    assert s.present and s.vendor == "nvidia" and s.uuid == "GPU-aaaa"
    assert s.name == "NVIDIA A100-SXM4-80GB" and s.pci_bus_id == "00000000:07:00.0"
    assert (s.memory_total_bytes, s.memory_used_bytes) == (80 * 1024**3, 10 * 1024**3)
    assert s.memory_free_bytes == 70 * 1024**3
    assert (s.utilization_gpu_pct, s.utilization_memory_pct) == (40.0, 20.0)
    assert s.temperature_c == 55.0
    assert (s.power_w, s.power_limit_w) == (250.0, 400.0)  # NVML says mW
    assert (s.sm_clock_mhz, s.sm_clock_max_mhz) == (1200.0, 1410.0)
    assert (s.memory_clock_mhz, s.memory_clock_max_mhz) == (1593.0, 1593.0)
    assert s.memory_bus_width_bits == 5120
    # 5120 bits x 1593 MHz x 2 (DDR) / 8 = 2039 GB/s, the A100-80GB datasheet figure.
    assert s.bandwidth_gbps == pytest.approx(2039.0, abs=1.0)
    assert s.tflops == 312.0
    assert s.ecc_uncorrected == 0 and s.xid_errors == 0
    assert (s.pcie_gen, s.pcie_width) == (4, 16)
    assert [(link.link, link.peer_uuid, link.gbps) for link in s.nvlinks] == [
        (0, "GPU-bbbb", 25.0),
        (1, "GPU-bbbb", 25.0),
    ]
    assert s.unsupported == ()
    # What the collector will publish validates against the contract.
    assert codec.decode(DeviceSample, codec.encode(s)) == s


def test_switches_leave_temperature_and_power_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([FakeGpu("GPU-a")])
    fake.install(monkeypatch)
    backend = open_nvml("n")
    s = backend.read(1.0, temperature=False, power=False)[0]
    assert s.temperature_c is None and s.power_w is None and s.power_limit_w is None
    assert "nvmlDeviceGetTemperature" not in fake.calls
    assert "nvmlDeviceGetPowerUsage" not in fake.calls


def test_not_supported_empties_one_field_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpu = FakeGpu(
        "GPU-geforce",
        name="NVIDIA GeForce RTX 4090",
        not_supported={
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetNvLinkState",
            "nvmlDeviceGetMemoryBusWidth",
        },
        bus_width=384,
        mem_max=10501,
    )
    FakeNvml([gpu]).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="shardplane.agents.nvml"):
        backend = open_nvml("rig-b")
        first = backend.read(1.0)[0]
        second = backend.read(3.0)[0]
    for s in (first, second):
        assert s.present
        assert s.ecc_uncorrected is None and s.power_w is None
        assert s.memory_bus_width_bits is None
        assert s.power_limit_w == 400.0 and s.memory_used_bytes == gpu.used  # the rest is there
        assert {"ecc_uncorrected", "power_w", "memory_bus_width_bits"} <= set(s.unsupported)
        assert s.nvlinks == ()
        # No bus width: the bandwidth falls back to the known-GPU table, not to nothing.
        assert s.bandwidth_gbps == 1008.0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ecc_uncorrected" in m for m in messages) == 1, messages
    assert sum("power_w" in m for m in messages) == 1, messages
    assert backend.interconnect == "pcie"


def test_memory_info_v2_falls_back_to_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("GPU-old", memory_v2=False)]).install(monkeypatch)
    backend = open_nvml("n")
    s = backend.read(1.0)[0]
    assert s.memory_total_bytes == 80 * 1024**3 and "memory" not in s.unsupported
    assert backend.lib.memory_v2 is False  # stops asking for v2


def test_gpu_lost_between_calls_is_reported_gone_then_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = [FakeGpu("GPU-a"), FakeGpu("GPU-b", pci="00000000:0F:00.0")]
    fake = FakeNvml(gpus)
    fake.install(monkeypatch)
    backend = open_nvml("n")
    assert all(s.present for s in backend.read(1.0))

    gpus[1].lost = True  # falls off the bus between two cycles
    a, b = backend.read(3.0)
    assert a.present and a.memory_used_bytes is not None
    assert not b.present and b.uuid == "GPU-b" and b.memory_used_bytes is None
    assert codec.decode(DeviceSample, codec.encode(b)).present is False
    _, b = backend.read(5.0)
    assert not b.present

    gpus[1].lost = False  # reset by the operator: found again by UUID
    _, b = backend.read(7.0)
    assert b.present and b.memory_total_bytes == 80 * 1024**3


def test_gpu_lost_at_start_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [FakeGpu("GPU-a"), FakeGpu("GPU-b", lost=True)]
    FakeNvml(gpus).install(monkeypatch)
    backend = open_nvml("n")
    a, b = backend.read(1.0)
    assert a.present and not b.present


def test_xid_events_are_counted_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b", pci="00000000:0F:00.0")])
    fake.install(monkeypatch)
    backend = open_nvml("n")
    fake.xid_queue += [1, 1]
    a, b = backend.read(1.0)
    assert (a.xid_errors, b.xid_errors) == (0, 2)
    # DCGM_FI_DEV_XID_ERRORS is the newest XID's code (the fake's events are XID 79).
    assert (a.xid_last, b.xid_last) == (0, 79)


def test_reads_the_other_dcgm_default_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rest of dcgm-exporter's default counter set that NVML answers, in our units."""
    gpu = FakeGpu("GPU-a", reserved=512 * 1024**2)
    FakeNvml([gpu]).install(monkeypatch)
    backend = open_nvml("n")
    first = backend.read(100.0)[0]
    assert first.driver_version == "550.54.15"
    assert first.memory_reserved_bytes == 512 * 1024**2
    # v2 memory info: free excludes what the driver reserved (used + free + reserved = total).
    assert first.memory_free_bytes == gpu.total - gpu.used - gpu.reserved
    assert first.memory_temperature_c == 61.0
    assert first.energy_mj == 123_456_789
    assert (first.utilization_encoder_pct, first.utilization_decoder_pct) == (7.0, 11.0)
    assert first.pcie_replay_count == 3
    assert first.remapped_rows_correctable == 2 and first.remapped_rows_uncorrectable == 1
    assert first.row_remap_failed is False
    # A rate needs two readings of the PCIe byte counters: none on the first.
    assert first.pcie_tx_bytes_per_s is None and first.pcie_rx_bytes_per_s is None
    assert first.unsupported == ()
    gpu.pcie_tx += 2_000_000
    gpu.pcie_rx += 500_000
    second = backend.read(102.0)[0]
    assert (second.pcie_tx_bytes_per_s, second.pcie_rx_bytes_per_s) == (1_000_000.0, 250_000.0)
    gpu.pcie_tx = 10  # the driver reloaded: the counter went back, no negative rate
    assert backend.read(104.0)[0].pcie_tx_bytes_per_s is None
    assert codec.decode(DeviceSample, codec.encode(second)) == second


def test_each_new_counter_fails_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GeForce without HBM sensor, remapping or energy counter keeps every other figure."""
    gpu = FakeGpu(
        "GPU-geforce",
        name="NVIDIA GeForce RTX 4090",
        mem_temp=None,
        not_supported={"nvmlDeviceGetRemappedRows", "nvmlDeviceGetTotalEnergyConsumption"},
    )
    FakeNvml([gpu]).install(monkeypatch)
    s = open_nvml("n").read(1.0)[0]
    assert s.memory_temperature_c is None and s.energy_mj is None
    assert s.remapped_rows_correctable is None and s.row_remap_failed is None
    assert set(s.unsupported) == {"memory_temperature_c", "remapped_rows", "energy_mj"}
    assert s.pcie_replay_count == 3 and s.utilization_encoder_pct == 7.0  # the rest is there


def test_throttle_reason_bits_have_names() -> None:
    assert reason_names(0) == ()
    assert reason_names(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")


def test_zero_devices_skips_nvml_and_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([]).install(monkeypatch)
    selection = select_backend("n")
    assert selection.backend.name in ("none", "rocm")
    assert selection.skipped["nvml"] == "initialised, but it sees no devices"


def test_library_not_found_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    selection = select_backend("n")
    assert selection.skipped["nvml"] == "NVML Shared Library Not Found"
    assert selection.backend.device_count() == 0
    assert selection.backend.read(1.0) == []


def test_nvml_is_chosen_first_when_it_sees_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("GPU-a")]).install(monkeypatch)
    selection = select_backend("n")
    assert selection.backend.name == "nvml" and "nvml" not in selection.skipped


async def test_a_slow_nvml_call_does_not_freeze_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, nc: Client
) -> None:
    fake = FakeNvml([FakeGpu("GPU-a")])
    fake.install(monkeypatch)
    backend = open_nvml("n")
    fast = fake.nvmlDeviceGetUtilizationRates

    def slow(h: FakeHandle) -> object:
        time.sleep(1.0)  # a sick GPU: NVML takes its time
        return fast(h)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", slow)
    publisher = Publisher(nc)
    collector = NodeCollector(
        node="n",
        backend=backend,
        host=this_host(),
        publisher=publisher,
        config=CollectorConfig(),
        boot="b",
        threaded=True,
    )
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(heartbeat())
    try:
        offered = await collector.tick_async()
    finally:
        ticker.cancel()
    assert offered == 2 and publisher.pending == 2  # one sample, one heartbeat
    # ~100 ticks of 0.01 s fit in the second NVML is busy; a blocked loop would manage one.
    assert beats >= 10  # the loop kept running while NVML was busy
