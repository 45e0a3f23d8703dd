"""The NVIDIA backend, on NVML through the ``pynvml`` module of nvidia-ml-py.

Every field is read on its own: a call that is NotSupported (or fails otherwise) empties that
field for the sample, names it in ``unsupported`` and is logged once; it never drops the sample.
A GPU that falls off the bus (``GPU is lost``) is reported as ``present=False`` and re-probed by
UUID on later cycles; it is never a crash.

pynvml is untyped; ``Nvml`` below is the only place that touches it, always through the module
attribute at call time, so tests can replace the module's functions (the lowest layer) with fakes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from shardplane.agents.backend import BackendUnavailable, LogOnce, theoretical_bandwidth_gbps
from shardplane.bus.errors import AgentError
from shardplane.bus.gpus import gpu_spec
from shardplane.bus.messages import DeviceSample, NvLink

log = logging.getLogger(__name__)

T = TypeVar("T")

# nvmlClocksEventReason* bits -> short names (the DCGM / nvidia-smi wording, snake-cased).
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

# NVLink GB/s per link and direction by NVLink version (1: P100; 2-4: V100, A100, H100).
NVLINK_GBPS_BY_VERSION = {1: 20.0, 2: 25.0, 3: 25.0, 4: 25.0, 5: 50.0}


def reason_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in CLOCK_EVENT_REASONS if mask & bit)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class GpuLost(AgentError):
    """The device fell off the bus: stop reading it for this cycle."""


class Nvml:
    """A thin typed face on pynvml: each method is one NVML call, converted to plain types."""

    def __init__(self, module: Any) -> None:
        self.nv: Any = module
        self.lost_code: int = int(module.NVML_ERROR_GPU_IS_LOST)
        self.not_supported_code: int = int(module.NVML_ERROR_NOT_SUPPORTED)
        self.error_type: type[BaseException] = module.NVMLError
        self.memory_v2: bool = hasattr(module, "nvmlMemory_v2")

    def error_code(self, exc: BaseException) -> int | None:
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None

    def init(self) -> None:
        self.nv.nvmlInit()

    def shutdown(self) -> None:
        self.nv.nvmlShutdown()

    def count(self) -> int:
        return int(self.nv.nvmlDeviceGetCount())

    def handle(self, index: int) -> Any:
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def handle_by_uuid(self, uuid: str) -> Any:
        return self.nv.nvmlDeviceGetHandleByUUID(uuid)

    def uuid(self, h: Any) -> str:
        return _text(self.nv.nvmlDeviceGetUUID(h))

    def name(self, h: Any) -> str:
        return _text(self.nv.nvmlDeviceGetName(h))

    def pci_bus_id(self, h: Any) -> str:
        return _text(self.nv.nvmlDeviceGetPciInfo(h).busId)

    def memory(self, h: Any) -> tuple[int, int, int, int | None]:
        """(total, used, free, reserved) bytes; v2 (which leaves out driver-reserved memory from
        "used" and reports it apart) where the driver has it, else v1 (no reserved figure; and
        we stop asking for v2)."""
        if self.memory_v2:
            try:
                m = self.nv.nvmlDeviceGetMemoryInfo(h, version=self.nv.nvmlMemory_v2)
                reserved = getattr(m, "reserved", None)
                return (
                    int(m.total),
                    int(m.used),
                    int(m.free),
                    None if reserved is None else int(reserved),
                )
            except self.error_type as exc:
                if self.error_code(exc) == self.lost_code:
                    raise
                self.memory_v2 = False
            except TypeError:  # an older binding without the version argument
                self.memory_v2 = False
        m = self.nv.nvmlDeviceGetMemoryInfo(h)
        return int(m.total), int(m.used), int(m.free), None

    def utilization(self, h: Any) -> tuple[float, float]:
        u = self.nv.nvmlDeviceGetUtilizationRates(h)
        return float(u.gpu), float(u.memory)

    def temperature(self, h: Any) -> float:
        return float(self.nv.nvmlDeviceGetTemperature(h, self.nv.NVML_TEMPERATURE_GPU))

    def power_w(self, h: Any) -> float:
        return int(self.nv.nvmlDeviceGetPowerUsage(h)) / 1000.0  # NVML says mW

    def power_limit_w(self, h: Any) -> float:
        return int(self.nv.nvmlDeviceGetEnforcedPowerLimit(h)) / 1000.0

    def clock(self, h: Any, kind: Literal["sm", "mem"]) -> float:
        which = self.nv.NVML_CLOCK_SM if kind == "sm" else self.nv.NVML_CLOCK_MEM
        return float(self.nv.nvmlDeviceGetClockInfo(h, which))

    def max_clock(self, h: Any, kind: Literal["sm", "mem"]) -> float:
        which = self.nv.NVML_CLOCK_SM if kind == "sm" else self.nv.NVML_CLOCK_MEM
        return float(self.nv.nvmlDeviceGetMaxClockInfo(h, which))

    def bus_width(self, h: Any) -> int:
        return int(self.nv.nvmlDeviceGetMemoryBusWidth(h))

    def clock_event_reasons(self, h: Any) -> int:
        fn = getattr(self.nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:  # older bindings: the deprecated name
            fn = self.nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(fn(h))

    def ecc_uncorrected(self, h: Any) -> int:
        return int(
            self.nv.nvmlDeviceGetTotalEccErrors(
                h, self.nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, self.nv.NVML_VOLATILE_ECC
            )
        )

    def driver_version(self) -> str:
        return _text(self.nv.nvmlSystemGetDriverVersion())

    def energy_mj(self, h: Any) -> int:
        return int(self.nv.nvmlDeviceGetTotalEnergyConsumption(h))  # mJ since the driver loaded

    def pcie_replays(self, h: Any) -> int:
        return int(self.nv.nvmlDeviceGetPcieReplayCounter(h))

    def codec_util(self, h: Any, kind: Literal["encoder", "decoder"]) -> float:
        fn = (
            self.nv.nvmlDeviceGetEncoderUtilization
            if kind == "encoder"
            else self.nv.nvmlDeviceGetDecoderUtilization
        )
        return float(fn(h)[0])  # [utilisation %, sampling period us]

    def remapped_rows(self, h: Any) -> tuple[int, int, bool]:
        """(correctable, uncorrectable, remapping failed); Ampere and newer only."""
        corr, unc, _pending, failed = self.nv.nvmlDeviceGetRemappedRows(h)
        return int(corr), int(unc), bool(failed)

    def field_values(self, h: Any, ids: tuple[int, ...]) -> dict[int, float | BaseException]:
        """NVML field values, each with its own outcome: one unsupported field (no HBM sensor)
        costs that field, not the others. A call that fails as a whole fails every field."""
        try:
            values = self.nv.nvmlDeviceGetFieldValues(h, list(ids))
        except self.error_type as exc:
            if self.error_code(exc) == self.lost_code:
                raise
            return dict.fromkeys(ids, exc)
        out: dict[int, float | BaseException] = {}
        for fid, v in zip(ids, values, strict=False):
            code = int(v.nvmlReturn)
            if code != 0:
                out[fid] = self.nv.NVMLError(code)
                continue
            kind = int(v.valueType)
            member = _FIELD_MEMBERS.get(kind)
            if member is None:
                out[fid] = TypeError(f"NVML field {fid}: value type {kind} not known")
                continue
            out[fid] = float(getattr(v.value, member))
        return out

    def pcie(self, h: Any) -> tuple[int, int]:
        return (
            int(self.nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
            int(self.nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
        )

    def nvlinks(self, h: Any) -> list[tuple[int, str | None, int | None]]:
        """(link, remote PCI bus id, NVLink version) of each active link."""
        out: list[tuple[int, str | None, int | None]] = []
        max_links = int(getattr(self.nv, "NVML_NVLINK_MAX_LINKS", 18))
        for link in range(max_links):
            try:
                state = int(self.nv.nvmlDeviceGetNvLinkState(h, link))
            except self.error_type as exc:
                if self.error_code(exc) == self.lost_code:
                    raise
                if link == 0:
                    raise  # no NVLink at all: let the caller record it as unsupported
                break  # past the last link this GPU has
            if state != int(self.nv.NVML_FEATURE_ENABLED):
                continue
            remote: str | None = None
            version: int | None = None
            try:
                remote = _text(self.nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId)
            except self.error_type:
                remote = None
            try:
                version = int(self.nv.nvmlDeviceGetNvLinkVersion(h, link))
            except self.error_type:
                version = None
            out.append((link, remote, version))
        return out

    # XID errors arrive as events; a set is created once and drained each cycle.
    def xid_event_set(self, handles: list[Any]) -> Any:
        event_set = self.nv.nvmlEventSetCreate()
        for h in handles:
            self.nv.nvmlDeviceRegisterEvents(h, self.nv.nvmlEventTypeXidCriticalError, event_set)
        return event_set

    def xid_events(self, event_set: Any) -> list[tuple[str, int]]:
        """(device UUID, XID code) of each XID event since the last call (non-blocking)."""
        uuids: list[tuple[str, int]] = []
        timeout_code = int(self.nv.NVML_ERROR_TIMEOUT)
        for _ in range(1000):
            try:
                data = self.nv.nvmlEventSetWait_v2(event_set, 0)
            except self.error_type as exc:
                if self.error_code(exc) == timeout_code:
                    break
                raise
            uuids.append((self.uuid(data.device), int(getattr(data, "eventData", 0) or 0)))
        return uuids


# nvmlValueType_t -> the member of the nvmlValue_t union that holds it.
_FIELD_MEMBERS: dict[int, str] = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal"}
_FIELD_MEMBERS.update({5: "siVal", 6: "usVal"})


def load_pynvml() -> Nvml:
    try:
        module = importlib.import_module("pynvml")
    except ImportError as exc:
        raise BackendUnavailable(f"nvidia-ml-py is not installed ({exc})") from exc
    return Nvml(module)


class _Device:
    __slots__ = (
        "bandwidth_gbps",
        "bus_width",
        "handle",
        "index",
        "mem_clock_max",
        "name",
        "nvlinks",
        "pci",
        "pcie_bytes",
        "present",
        "sm_clock_max",
        "tflops",
        "unsupported_static",
        "uuid",
        "xid",
        "xid_last",
    )

    def __init__(self, index: int, handle: Any) -> None:
        self.index = index
        self.handle: Any = handle
        self.uuid = f"nvml-index-{index}"
        self.name: str | None = None
        self.pci: str | None = None
        self.bus_width: int | None = None
        self.sm_clock_max: float | None = None
        self.mem_clock_max: float | None = None
        self.bandwidth_gbps: float | None = None
        self.tflops: float | None = None
        self.nvlinks: tuple[NvLink, ...] = ()
        self.present = handle is not None
        self.unsupported_static: tuple[str, ...] = ()
        self.xid: int | None = None
        self.xid_last: int | None = None
        # (tx, rx, ts) of the previous reading of the PCIe byte counters: the rate needs two.
        self.pcie_bytes: tuple[float, float, float] | None = None


class NvmlBackend:
    name = "nvml"

    def __init__(self, lib: Nvml, node: str) -> None:
        self.lib = lib
        self.node = node
        self._once = LogOnce(log)
        self._event_set: Any = None
        self.driver_version = self._driver_version()
        self.devices: list[_Device] = []
        for index in range(lib.count()):
            handle: Any = None
            try:
                handle = lib.handle(index)
            except lib.error_type as exc:
                self._once(
                    ("handle", index),
                    "nvml: device %d has no handle (%s); reported as lost",
                    index,
                    exc,
                )
            dev = _Device(index, handle)
            if handle is not None:
                self._static(dev)
            self.devices.append(dev)
        self._link_peers()
        self._open_xid()

    def _driver_version(self) -> str | None:
        try:
            return self.lib.driver_version()[:64]
        except Exception as exc:  # a label we can do without
            self._once(("driver",), "nvml: no driver version (%s)", exc)
            return None

    # -- reading helpers -----------------------------------------------------------------------
    def _get(self, dev: _Device, field: str, fn: Callable[[], T], missing: list[str]) -> T | None:
        """One field: its value, or None (noted in ``missing``, logged once) when NVML can't."""
        try:
            return fn()
        except self.lib.error_type as exc:
            if self.lib.error_code(exc) == self.lib.lost_code:
                raise GpuLost(str(exc)) from exc
            unsupported = self.lib.error_code(exc) == self.lib.not_supported_code
            reason = "not supported" if unsupported else str(exc)
            # NotSupported is a fact about the hardware (no ECC on a GeForce), not a fault.
            self._once(
                (dev.index, field, reason),
                "nvml: device %d: %s: %s",
                dev.index,
                field,
                reason,
                level=logging.INFO if unsupported else logging.WARNING,
            )
        except Exception as exc:  # a binding quirk must cost one field, not the sample
            self._once(
                (dev.index, field, type(exc).__name__),
                "nvml: device %d: %s failed: %r",
                dev.index,
                field,
                exc,
            )
        missing.append(field)
        return None

    def _static(self, dev: _Device) -> None:
        lib, h = self.lib, dev.handle
        missing: list[str] = []
        try:
            uuid = self._get(dev, "uuid", lambda: lib.uuid(h), missing)
            dev.uuid = uuid or dev.uuid
            dev.name = self._get(dev, "name", lambda: lib.name(h), missing)
            dev.pci = self._get(dev, "pci_bus_id", lambda: lib.pci_bus_id(h), missing)
            dev.bus_width = self._get(
                dev, "memory_bus_width_bits", lambda: lib.bus_width(h), missing
            )
            dev.sm_clock_max = self._get(
                dev, "sm_clock_max_mhz", lambda: lib.max_clock(h, "sm"), missing
            )
            dev.mem_clock_max = self._get(
                dev, "memory_clock_max_mhz", lambda: lib.max_clock(h, "mem"), missing
            )
        except GpuLost as exc:
            dev.present = False
            self._once(("lost", dev.index), "nvml: device %d is lost (%s)", dev.index, exc)
            return
        spec = gpu_spec(dev.name) if dev.name else None
        dev.bandwidth_gbps = theoretical_bandwidth_gbps(dev.bus_width, dev.mem_clock_max) or (
            spec.bandwidth_gbps if spec else None
        )
        dev.tflops = spec.tflops if spec else None
        dev.unsupported_static = tuple(missing)

    def _link_peers(self) -> None:
        by_pci = {d.pci.upper(): d.uuid for d in self.devices if d.pci}
        for dev in self.devices:
            if not dev.present:
                continue
            missing: list[str] = []
            try:
                links = self._get(dev, "nvlinks", lambda d=dev: self.lib.nvlinks(d.handle), missing)
            except GpuLost:
                dev.present = False
                continue
            dev.nvlinks = tuple(
                NvLink(
                    link=link,
                    peer_pci_bus_id=remote,
                    peer_uuid=by_pci.get(remote.upper()) if remote else None,
                    gbps=NVLINK_GBPS_BY_VERSION.get(version or 0),
                )
                for link, remote, version in (links or [])
            )

    def _open_xid(self) -> None:
        handles = [d.handle for d in self.devices if d.present]
        if not handles:
            return
        try:
            self._event_set = self.lib.xid_event_set(handles)
        except Exception as exc:
            self._once(("xid",), "nvml: XID events unavailable (%s); xid_errors stays empty", exc)
            self._event_set = None
            return
        for d in self.devices:
            d.xid = 0 if d.present else None
            d.xid_last = 0 if d.present else None

    def _drain_xid(self) -> None:
        if self._event_set is None:
            return
        try:
            uuids = self.lib.xid_events(self._event_set)
        except Exception as exc:
            self._once(("xid-wait",), "nvml: reading XID events failed (%s)", exc)
            return
        for uuid, code in uuids:
            for d in self.devices:
                if d.uuid == uuid and d.xid is not None:
                    d.xid += 1
                    d.xid_last = code

    # -- Backend protocol ----------------------------------------------------------------------
    @property
    def interconnect(self) -> str | None:
        return "nvlink" if any(d.nvlinks for d in self.devices) else "pcie"

    def device_count(self) -> int:
        return len(self.devices)

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]:
        self._drain_xid()
        return [self._read_one(d, ts, temperature, power) for d in self.devices]

    def hold(self, index: int, delta_bytes: int) -> None:
        return None  # a real GPU's memory counters already include what the worker loaded

    def close(self) -> None:
        if self._event_set is not None:
            try:
                self.lib.nv.nvmlEventSetFree(self._event_set)
            except Exception as exc:
                log.debug("nvml: freeing the event set failed: %s", exc)
        try:
            self.lib.shutdown()
        except Exception as exc:
            log.debug("nvml: shutdown failed: %s", exc)

    def _reacquire(self, dev: _Device) -> bool:
        """A lost GPU comes back only after a reset; look it up again by UUID, cheaply."""
        try:
            dev.handle = self.lib.handle_by_uuid(dev.uuid)
            self.lib.uuid(dev.handle)
        except Exception:
            return False
        log.info("nvml: device %d (%s) is back", dev.index, dev.uuid)
        self._once.forget(("lost", dev.index))
        dev.present = True
        return True

    def _lost(self, dev: _Device, ts: float, why: str) -> DeviceSample:
        dev.present = False
        self._once(
            ("lost", dev.index), "nvml: device %d (%s) is lost: %s", dev.index, dev.uuid, why
        )
        vendor: Literal["nvidia"] = "nvidia"
        return DeviceSample(
            node=self.node, index=dev.index, uuid=dev.uuid, seq=0, ts=ts, present=False,
            vendor=vendor, name=dev.name, pci_bus_id=dev.pci,
        )  # fmt: skip

    def _counters(self, dev: _Device, ts: float, missing: list[str]) -> dict[str, Any]:
        """The DCGM exporter's other default counters that NVML has, each read on its own."""
        lib, h = self.lib, dev.handle
        rows = self._get(dev, "remapped_rows", lambda: lib.remapped_rows(h), missing)
        fields = self._get(dev, "field_values", lambda: lib.field_values(h, FIELDS), missing) or {}
        mem_temp = self._get(
            dev, "memory_temperature_c", lambda: _field(fields, FI_MEMORY_TEMP), missing
        )
        pcie_bytes = self._get(
            dev,
            "pcie_bytes",
            lambda: (_field(fields, FI_PCIE_TX_BYTES), _field(fields, FI_PCIE_RX_BYTES)),
            missing,
        )
        tx = rx = None
        if pcie_bytes is not None:
            tx, rx = _rate(dev.pcie_bytes, *pcie_bytes, ts)
            dev.pcie_bytes = (*pcie_bytes, ts)
        return {
            "driver_version": self.driver_version,
            "memory_temperature_c": (
                mem_temp if mem_temp is not None and -60.0 <= mem_temp <= 200.0 else None
            ),
            "energy_mj": self._get(dev, "energy_mj", lambda: lib.energy_mj(h), missing),
            "utilization_encoder_pct": _pct_or_none(
                self._get(
                    dev, "utilization_encoder_pct", lambda: lib.codec_util(h, "encoder"), missing
                )
            ),
            "utilization_decoder_pct": _pct_or_none(
                self._get(
                    dev, "utilization_decoder_pct", lambda: lib.codec_util(h, "decoder"), missing
                )
            ),
            "pcie_replay_count": self._get(
                dev, "pcie_replay_count", lambda: lib.pcie_replays(h), missing
            ),
            "pcie_tx_bytes_per_s": tx,
            "pcie_rx_bytes_per_s": rx,
            "xid_last": dev.xid_last,
            "remapped_rows_correctable": rows[0] if rows else None,
            "remapped_rows_uncorrectable": rows[1] if rows else None,
            "row_remap_failed": rows[2] if rows else None,
        }

    def _read_one(self, dev: _Device, ts: float, temperature: bool, power: bool) -> DeviceSample:
        if not dev.present and (dev.handle is None or not self._reacquire(dev)):
            return self._lost(dev, ts, "no handle")
        lib, h = self.lib, dev.handle
        missing: list[str] = list(dev.unsupported_static)
        try:
            mem = self._get(dev, "memory", lambda: lib.memory(h), missing)
            util = self._get(dev, "utilization", lambda: lib.utilization(h), missing)
            temp = (
                self._get(dev, "temperature_c", lambda: lib.temperature(h), missing)
                if temperature
                else None
            )
            draw = self._get(dev, "power_w", lambda: lib.power_w(h), missing) if power else None
            limit = (
                self._get(dev, "power_limit_w", lambda: lib.power_limit_w(h), missing)
                if power
                else None
            )
            sm = self._get(dev, "sm_clock_mhz", lambda: lib.clock(h, "sm"), missing)
            memclk = self._get(dev, "memory_clock_mhz", lambda: lib.clock(h, "mem"), missing)
            reasons = self._get(
                dev, "throttle_reasons", lambda: lib.clock_event_reasons(h), missing
            )
            ecc = self._get(dev, "ecc_uncorrected", lambda: lib.ecc_uncorrected(h), missing)
            pcie = self._get(dev, "pcie", lambda: lib.pcie(h), missing)
            counters = self._counters(dev, ts, missing)
        except GpuLost as exc:
            return self._lost(dev, ts, str(exc))
        vendor: Literal["nvidia"] = "nvidia"
        return DeviceSample(
            **counters,
            memory_reserved_bytes=mem[3] if mem else None,
            node=self.node,
            index=dev.index,
            uuid=dev.uuid,
            seq=0,
            ts=ts,
            vendor=vendor,
            name=dev.name,
            pci_bus_id=dev.pci,
            memory_total_bytes=mem[0] if mem else None,
            memory_used_bytes=mem[1] if mem else None,
            memory_free_bytes=mem[2] if mem else None,
            utilization_gpu_pct=_pct(util[0]) if util else None,
            utilization_memory_pct=_pct(util[1]) if util else None,
            temperature_c=temp if temp is not None and -60.0 <= temp <= 200.0 else None,
            power_w=draw,
            power_limit_w=limit,
            sm_clock_mhz=sm,
            sm_clock_max_mhz=dev.sm_clock_max,
            memory_clock_mhz=memclk,
            memory_clock_max_mhz=dev.mem_clock_max,
            memory_bus_width_bits=dev.bus_width,
            bandwidth_gbps=dev.bandwidth_gbps,
            tflops=dev.tflops,
            throttle_reasons=reason_names(reasons) if reasons is not None else (),
            ecc_uncorrected=ecc,
            xid_errors=dev.xid,
            nvlinks=dev.nvlinks,
            pcie_gen=pcie[0] if pcie else None,
            pcie_width=pcie[1] if pcie else None,
            unsupported=tuple(missing),
        )


# NVML field ids (nvml.h) read in one nvmlDeviceGetFieldValues call per device and sample.
FI_MEMORY_TEMP = 82
FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES: bytes sent since the driver loaded
FI_PCIE_RX_BYTES = 198
FIELDS = (FI_MEMORY_TEMP, FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES)


def _field(values: dict[int, float | BaseException], fid: int) -> float:
    value = values[fid]
    if isinstance(value, BaseException):
        raise value
    return value


def _rate(
    prev: tuple[float, float, float] | None, tx: float, rx: float, ts: float
) -> tuple[float | None, float | None]:
    """Bytes per second from two readings of the PCIe counters; none for the first reading,
    for a clock that did not move and for a counter that went back (a driver reload)."""
    if prev is None or ts <= prev[2] or tx < prev[0] or rx < prev[1]:
        return None, None
    dt = ts - prev[2]
    return (tx - prev[0]) / dt, (rx - prev[1]) / dt


def _pct(value: float) -> float | None:
    return value if 0.0 <= value <= 100.0 else None


def _pct_or_none(value: float | None) -> float | None:
    return None if value is None else _pct(value)


def open_nvml(node: str) -> NvmlBackend:
    """Initialise NVML; raises BackendUnavailable with NVML's own words when it cannot
    (``NVML Shared Library Not Found``, ``Driver Not Loaded``, ...)."""
    lib = load_pynvml()
    try:
        lib.init()
    except lib.error_type as exc:
        raise BackendUnavailable(str(exc)) from exc
    try:
        return NvmlBackend(lib, node)
    except lib.error_type as exc:
        try:
            lib.shutdown()
        except Exception as shutdown_exc:
            log.debug("nvml: shutdown after a failed start failed: %s", shutdown_exc)
        raise BackendUnavailable(f"NVML initialised but listing devices failed: {exc}") from exc
