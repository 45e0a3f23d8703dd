"""The ROCm backend on a fake of the lowest layer (pyrsmi.rocml's functions), and pyrsmi's
real root-logger noise kept out of our logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pyrsmi import rocml

from shardplane.agents.factory import select_backend
from shardplane.agents.rocm import format_bdf, open_rocm, quiet_pyrsmi
from shardplane.bus import codec
from shardplane.bus.messages import DeviceSample

GIB = 1024**3


class FakeRocml:
    """Two MI250X GCDs; ``broken`` names the getters that answer -1 like pyrsmi does."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.broken: set[str] = set()
        self.lost: set[int] = set()

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("smi_"):
                mp.setattr(rocml, name, getattr(self, name))

    def _v(self, fn: str, dev: int, value: Any) -> Any:
        if fn in self.broken or dev in self.lost:
            logging.error("pyrsmi-style error from %s", fn)  # what pyrsmi does: the root logger
            return -1
        return value

    def smi_initialize(self) -> None:
        return None

    def smi_shutdown(self) -> None:
        return None

    def smi_get_device_count(self) -> int:
        return self.count

    def smi_get_device_name(self, dev: int) -> Any:
        return self._v("name", dev, "AMD Instinct MI250X")

    def smi_get_device_uuid(self, dev: int, format: str = "roc") -> Any:
        return self._v("uuid", dev, f"GPU-{dev:016x}")

    def smi_get_device_pci_id(self, dev: int) -> Any:
        return self._v("pci", dev, (0xC1 + dev) << 8)

    def smi_get_device_memory_total(self, dev: int, type: str = "VRAM") -> Any:
        return self._v("total", dev, 64 * GIB)

    def smi_get_device_memory_used(self, dev: int, type: str = "VRAM") -> Any:
        return self._v("used", dev, 3 * GIB)

    def smi_get_device_utilization(self, dev: int) -> Any:
        return self._v("util", dev, 37)

    def smi_get_device_memory_busy(self, dev: int) -> Any:
        return self._v("busy", dev, 12)

    def smi_get_device_average_power(self, dev: int) -> Any:
        return self._v("power", dev, 212.5)


def test_reads_pyrsmi_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeRocml().install(monkeypatch)
    backend = open_rocm("rig-d")
    assert backend.device_count() == 2 and backend.interconnect == "xgmi"
    s = backend.read(1.0)[1]
    assert s.vendor == "amd" and s.present and s.uuid == "GPU-0000000000000001"
    assert s.pci_bus_id == "0000:c2:00.0"
    assert (s.memory_total_bytes, s.memory_used_bytes, s.memory_free_bytes) == (
        64 * GIB,
        3 * GIB,
        61 * GIB,
    )
    assert (s.utilization_gpu_pct, s.utilization_memory_pct, s.power_w) == (37.0, 12.0, 212.5)
    assert s.bandwidth_gbps == 1600.0  # from the known-GPU table: pyrsmi has no bus width
    # No amdsmi here: temperature and clocks are honestly empty, not invented.
    assert s.temperature_c is None and s.sm_clock_mhz is None
    assert codec.decode(DeviceSample, codec.encode(s)) == s


def test_minus_one_empties_the_field_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRocml()
    fake.broken = {"power", "util", "pci"}
    fake.install(monkeypatch)
    quiet_pyrsmi(rocml)
    with caplog.at_level(logging.DEBUG):
        backend = open_rocm("rig-d")
        backend.read(1.0)
        s = backend.read(3.0)[0]
    assert s.present and s.memory_used_bytes == 3 * GIB
    assert s.power_w is None and s.utilization_gpu_pct is None and s.pci_bus_id is None
    assert {"power_w", "utilization_gpu_pct", "pci_bus_id"} <= set(s.unsupported)
    ours = [
        r
        for r in caplog.records
        if r.name == "shardplane.agents.rocm" and r.levelno >= logging.WARNING
    ]
    # once per device and field, however many cycles
    assert sum("power_w" in r.getMessage() for r in ours) == 2


def test_device_whose_memory_cannot_be_read_any_more_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRocml()
    fake.install(monkeypatch)
    backend = open_rocm("rig-d")
    backend.read(1.0)
    fake.lost.add(0)
    a, b = backend.read(3.0)
    assert not a.present and a.uuid == "GPU-0000000000000000" and b.present
    fake.lost.clear()
    assert backend.read(5.0)[0].present


def test_pyrsmi_root_logger_noise_stays_out(caplog: pytest.LogCaptureFixture) -> None:
    """The real pyrsmi, uninitialised: its getters log errors on the root logger and
    return -1. After quiet_pyrsmi those records are ours, at DEBUG, not root ERRORs."""
    quiet_pyrsmi(rocml)
    with caplog.at_level(logging.DEBUG):
        value = rocml.smi_get_device_pci_id(0)
    assert value == -1
    assert not [r for r in caplog.records if r.name == "root" and r.levelno >= logging.WARNING]
    assert any(r.name == "shardplane.agents.rocm.pyrsmi" for r in caplog.records)


def test_rocm_library_not_found_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    monkeypatch.setattr(
        pynvml,
        "nvmlInit",
        lambda: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)),
    )
    selection = select_backend("n")  # the real pyrsmi: no ROCm on this machine
    assert selection.backend.name == "none"
    assert "not found" in selection.skipped["rocm"].lower()


def test_bdf_format() -> None:
    assert format_bdf((1 << 32) | (0x3F << 8) | (0x2 << 3) | 1) == "0001:3f:02.1"
