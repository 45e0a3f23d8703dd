"""A fake of the lowest layer only: the ``pynvml`` module functions, swapped in with
monkeypatch. Our backend code runs unchanged on top; errors are pynvml's own NVMLError types."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    pci: str = "00000000:07:00.0"
    total: int = 80 * 1024**3
    used: int = 10 * 1024**3
    util: int = 40
    mem_util: int = 20
    temp: int = 55
    power_mw: int = 250_000
    limit_mw: int = 400_000
    sm: int = 1200
    sm_max: int = 1410
    mem: int = 1593
    mem_max: int = 1593
    bus_width: int = 5120
    reasons: int = 0
    ecc: int = 0
    pcie: tuple[int, int] = (4, 16)
    nvlink_peers: list[str] = field(default_factory=list[str])  # remote PCI bus ids
    not_supported: set[str] = field(default_factory=set[str])  # function names
    lost: bool = False
    memory_v2: bool = True
    reserved: int = 0  # driver-reserved bytes (v2 memory info only)
    energy_mj: int = 123_456_789
    replays: int = 3
    enc_util: int = 7
    dec_util: int = 11
    remapped: tuple[int, int, int, int] = (2, 1, 0, 0)  # corr, unc, pending, failure
    mem_temp: int | None = 61  # None: no HBM sensor (the field answers NOT_SUPPORTED)
    pcie_tx: int = 1_000_000  # bytes since the driver loaded
    pcie_rx: int = 4_000_000


@dataclass
class FakeHandle:
    index: int


def _err(code: int) -> Exception:
    exc: Exception = pynvml.NVMLError(code)
    return exc


class FakeNvml:
    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.xid_queue: list[int] = []  # device indices with a pending XID event

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                mp.setattr(pynvml, name, getattr(self, name))

    def _dev(self, handle: FakeHandle, fn: str) -> FakeGpu:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        if fn in gpu.not_supported:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _err(self.init_error)

    def nvmlShutdown(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if self.gpus[index].lost:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: Any) -> FakeHandle:
        for i, g in enumerate(self.gpus):
            if g.uuid == uuid and not g.lost:
                return FakeHandle(i)
        raise _err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return self._dev(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        return self._dev(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetPciInfo(self, h: FakeHandle) -> Any:
        return SimpleNamespace(busId=self._dev(h, "nvmlDeviceGetPciInfo").pci)

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: Any = None) -> Any:
        g = self._dev(h, "nvmlDeviceGetMemoryInfo")
        if version and not g.memory_v2:
            raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if version:
            return SimpleNamespace(
                total=g.total, used=g.used, free=g.total - g.used - g.reserved, reserved=g.reserved
            )
        return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> Any:
        g = self._dev(h, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=g.util, memory=g.mem_util)

    def nvmlDeviceGetTemperature(self, h: FakeHandle, sensor: int) -> int:
        return self._dev(h, "nvmlDeviceGetTemperature").temp

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetEnforcedPowerLimit").limit_mw

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, kind: int) -> int:
        g = self._dev(h, "nvmlDeviceGetClockInfo")
        return g.sm if kind == pynvml.NVML_CLOCK_SM else g.mem

    def nvmlDeviceGetMaxClockInfo(self, h: FakeHandle, kind: int) -> int:
        g = self._dev(h, "nvmlDeviceGetMaxClockInfo")
        return g.sm_max if kind == pynvml.NVML_CLOCK_SM else g.mem_max

    def nvmlDeviceGetMemoryBusWidth(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetMemoryBusWidth").bus_width

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetCurrentClocksEventReasons").reasons

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, kind: int, counter: int) -> int:
        return self._dev(h, "nvmlDeviceGetTotalEccErrors").ecc

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetCurrPcieLinkGeneration").pcie[0]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetCurrPcieLinkWidth").pcie[1]

    def nvmlDeviceGetNvLinkState(self, h: FakeHandle, link: int) -> int:
        g = self._dev(h, "nvmlDeviceGetNvLinkState")
        if link >= 12:  # an A100 has 12 links
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED if link < len(g.nvlink_peers) else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: FakeHandle, link: int) -> Any:
        g = self._dev(h, "nvmlDeviceGetNvLinkRemotePciInfo")
        return SimpleNamespace(busId=g.nvlink_peers[link])

    def nvmlDeviceGetNvLinkVersion(self, h: FakeHandle, link: int) -> int:
        self._dev(h, "nvmlDeviceGetNvLinkVersion")
        return 3

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeHandle) -> int:
        return self._dev(h, "nvmlDeviceGetPcieReplayCounter").replays

    def nvmlDeviceGetEncoderUtilization(self, h: FakeHandle) -> list[int]:
        return [self._dev(h, "nvmlDeviceGetEncoderUtilization").enc_util, 167_000]

    def nvmlDeviceGetDecoderUtilization(self, h: FakeHandle) -> list[int]:
        return [self._dev(h, "nvmlDeviceGetDecoderUtilization").dec_util, 167_000]

    def nvmlDeviceGetRemappedRows(self, h: FakeHandle) -> tuple[int, int, int, int]:
        return self._dev(h, "nvmlDeviceGetRemappedRows").remapped

    def nvmlDeviceGetFieldValues(self, h: FakeHandle, ids: list[int]) -> list[Any]:
        """Like NVML: one result per field, each with its own return code and value type."""
        g = self._dev(h, "nvmlDeviceGetFieldValues")
        known: dict[int, tuple[int, str, int | None]] = {
            pynvml.NVML_FI_DEV_MEMORY_TEMP: (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", g.mem_temp),
            pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: (
                pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", g.pcie_tx,
            ),
            pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: (
                pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", g.pcie_rx,
            ),
        }  # fmt: skip
        out: list[Any] = []
        for fid in ids:
            kind, member, value = known.get(fid, (0, "dVal", None))
            ret = pynvml.NVML_SUCCESS if value is not None else pynvml.NVML_ERROR_NOT_SUPPORTED
            out.append(
                SimpleNamespace(
                    fieldId=fid,
                    nvmlReturn=ret,
                    valueType=kind,
                    value=SimpleNamespace(**{member: value or 0}),
                )
            )
        return out

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, kinds: int, event_set: object) -> None:
        self._dev(h, "nvmlDeviceRegisterEvents")

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        if not self.xid_queue:
            raise _err(pynvml.NVML_ERROR_TIMEOUT)
        index = self.xid_queue.pop(0)
        return SimpleNamespace(device=FakeHandle(index), eventData=79)

    def nvmlEventSetFree(self, event_set: object) -> None:
        return None
