"""The AMD backend: ``pyrsmi`` (memory, utilisation, power, PCI id, UUID), plus ``amdsmi``
where it is importable for what pyrsmi lacks (temperature, clocks, throttle status).

pyrsmi signals failure by returning -1 (or an empty string) and logging through the *root*
logger. Here a -1 empties that one field (logged once, by us), and a filter on the root logger
turns pyrsmi's records into DEBUG records of ``agents.rocm.pyrsmi``, so they stay out of the
operator's log. Both libraries are untyped; ``Rocm`` and ``AmdSmi`` are the only places that
touch them, always through module attributes at call time (so tests can fake those functions).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from shardplane.agents.backend import BackendUnavailable, LogOnce
from shardplane.bus.errors import AgentError
from shardplane.bus.gpus import gpu_spec
from shardplane.bus.messages import DeviceSample

log = logging.getLogger(__name__)
pyrsmi_log = logging.getLogger("shardplane.agents.rocm.pyrsmi")

T = TypeVar("T")


class Failed(AgentError):
    """A getter said -1: the field is unavailable this time."""


class QuietPyrsmi(logging.Filter):
    """On the root logger: drop records logged by pyrsmi's own modules, re-logging them at
    DEBUG under our name (they are its error returns, which we report ourselves)."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(self.package_dir):
            pyrsmi_log.debug("%s", record.getMessage())
            return False
        return True


_quiet: QuietPyrsmi | None = None


def quiet_pyrsmi(module: Any) -> None:
    """Install the root-logger filter once (idempotent)."""
    global _quiet
    if _quiet is not None:
        return
    package_dir = str(Path(str(getattr(module, "__file__", "pyrsmi"))).resolve().parent)
    _quiet = QuietPyrsmi(package_dir)
    logging.getLogger().addFilter(_quiet)


def _ok_number(value: object) -> float:
    """pyrsmi's getters return -1 (or None) on error."""
    if value is None or isinstance(value, bool):
        raise Failed("no value")
    if isinstance(value, int | float):
        if value < 0:
            raise Failed(f"returned {value}")
        return float(value)
    raise Failed(f"returned {value!r}")


def _ok_text(value: object) -> str:
    if value is None or value == -1 or value == "":
        raise Failed(f"returned {value!r}")
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def format_bdf(bdfid: int) -> str:
    """pyrsmi's 64-bit BDF id -> ``DDDD:BB:DD.F`` (domain, bus, device, function)."""
    domain = (bdfid >> 32) & 0xFFFFFFFF
    bus = (bdfid >> 8) & 0xFF
    device = (bdfid >> 3) & 0x1F
    function = bdfid & 0x7
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function}"


class Rocm:
    """A thin typed face on ``pyrsmi.rocml``; every getter raises Failed instead of -1."""

    def __init__(self, module: Any) -> None:
        self.m: Any = module

    def init(self) -> None:
        self.m.smi_initialize()

    def shutdown(self) -> None:
        self.m.smi_shutdown()

    def count(self) -> int:
        return int(_ok_number(self.m.smi_get_device_count()))

    def name(self, i: int) -> str:
        return _ok_text(self.m.smi_get_device_name(i))

    def uuid(self, i: int) -> str:
        return _ok_text(self.m.smi_get_device_uuid(i))

    def pci_bus_id(self, i: int) -> str:
        return format_bdf(int(_ok_number(self.m.smi_get_device_pci_id(i))))

    def memory_total(self, i: int) -> int:
        return int(_ok_number(self.m.smi_get_device_memory_total(i)))

    def memory_used(self, i: int) -> int:
        return int(_ok_number(self.m.smi_get_device_memory_used(i)))

    def utilization(self, i: int) -> float:
        return _ok_number(self.m.smi_get_device_utilization(i))

    def memory_busy(self, i: int) -> float:
        return _ok_number(self.m.smi_get_device_memory_busy(i))

    def power_w(self, i: int) -> float:
        return _ok_number(self.m.smi_get_device_average_power(i))


class AmdSmi:
    """What pyrsmi lacks, from ``amdsmi`` (ROCm 6+), when it is importable."""

    def __init__(self, module: Any) -> None:
        self.m: Any = module
        self.handles: list[Any] = list(module.amdsmi_get_processor_handles())

    def temperature(self, i: int) -> float:
        m = self.m
        return float(
            m.amdsmi_get_temp_metric(
                self.handles[i], m.AmdSmiTemperatureType.EDGE, m.AmdSmiTemperatureMetric.CURRENT
            )
        )

    def clocks(self, i: int, kind: Literal["gfx", "mem"]) -> tuple[float, float]:
        m = self.m
        which = m.AmdSmiClkType.GFX if kind == "gfx" else m.AmdSmiClkType.MEM
        info: dict[str, Any] = m.amdsmi_get_clock_info(self.handles[i], which)
        return float(info["clk"]), float(info["max_clk"])

    def throttle_status(self, i: int) -> int:
        metrics: dict[str, Any] = self.m.amdsmi_get_gpu_metrics_info(self.handles[i])
        return int(metrics.get("throttle_status", 0) or 0)


def load_amdsmi() -> tuple[AmdSmi | None, str | None]:
    try:
        module = importlib.import_module("amdsmi")
    except ImportError as exc:
        return None, f"amdsmi not importable ({exc}): no temperature or clocks"
    try:
        module.amdsmi_init()
        return AmdSmi(module), None
    except Exception as exc:
        return None, f"amdsmi failed to start ({exc}): no temperature or clocks"


class RocmBackend:
    name = "rocm"

    def __init__(self, lib: Rocm, node: str, amd: AmdSmi | None = None) -> None:
        self.lib = lib
        self.amd = amd
        self.node = node
        self._once = LogOnce(log)
        n = lib.count()
        self.names: list[str | None] = []
        self.uuids: list[str] = []
        self.pcis: list[str | None] = []
        self.totals: list[int | None] = []
        self.present: list[bool] = [True] * n
        self.static_missing: list[tuple[str, ...]] = []
        for i in range(n):
            missing: list[str] = []
            self.names.append(self._get(i, "name", lambda i=i: lib.name(i), missing))
            self.uuids.append(
                self._get(i, "uuid", lambda i=i: lib.uuid(i), missing) or f"rocm-index-{i}"
            )
            self.pcis.append(self._get(i, "pci_bus_id", lambda i=i: lib.pci_bus_id(i), missing))
            self.totals.append(
                self._get(i, "memory_total_bytes", lambda i=i: lib.memory_total(i), missing)
            )
            self.static_missing.append(tuple(m for m in missing if m != "memory_total_bytes"))

    def _get(self, i: int, field: str, fn: Callable[[], T], missing: list[str]) -> T | None:
        try:
            return fn()
        except Failed as exc:
            self._once((i, field), "rocm: device %d: %s unavailable (%s)", i, field, exc)
        except Exception as exc:
            self._once(
                (i, field, type(exc).__name__), "rocm: device %d: %s failed: %r", i, field, exc
            )
        missing.append(field)
        return None

    @property
    def interconnect(self) -> str | None:
        return "xgmi" if len(self.uuids) > 1 else "pcie"

    def device_count(self) -> int:
        return len(self.uuids)

    def hold(self, index: int, delta_bytes: int) -> None:
        return None  # real memory counters already include what the worker loaded

    def close(self) -> None:
        try:
            self.lib.shutdown()
        except Exception as exc:
            log.debug("rocm: shutdown failed: %s", exc)

    def read(
        self, ts: float, *, temperature: bool = True, power: bool = True
    ) -> list[DeviceSample]:
        return [self._read_one(i, ts, temperature, power) for i in range(len(self.uuids))]

    def _read_one(self, i: int, ts: float, temperature: bool, power: bool) -> DeviceSample:
        lib, amd = self.lib, self.amd
        vendor: Literal["amd"] = "amd"
        missing: list[str] = list(self.static_missing[i])
        total = self._get(i, "memory_total_bytes", lambda: lib.memory_total(i), missing)
        if total is None and self.totals[i] is not None:
            # A device whose memory size we knew and can no longer read has fallen off the bus.
            if self.present[i]:
                log.warning("rocm: device %d (%s) is lost", i, self.uuids[i])
            self.present[i] = False
            return DeviceSample(
                node=self.node, index=i, uuid=self.uuids[i], seq=0, ts=ts, present=False,
                vendor=vendor, name=self.names[i], pci_bus_id=self.pcis[i],
            )  # fmt: skip
        if not self.present[i]:
            log.info("rocm: device %d (%s) is back", i, self.uuids[i])
            self.present[i] = True
        used = self._get(i, "memory_used_bytes", lambda: lib.memory_used(i), missing)
        util = self._get(i, "utilization_gpu_pct", lambda: lib.utilization(i), missing)
        membusy = self._get(i, "utilization_memory_pct", lambda: lib.memory_busy(i), missing)
        draw = self._get(i, "power_w", lambda: lib.power_w(i), missing) if power else None
        temp: float | None = None
        gfx: tuple[float, float] | None = None
        memclk: tuple[float, float] | None = None
        throttle: int | None = None
        if amd is not None:
            if temperature:
                temp = self._get(i, "temperature_c", lambda: amd.temperature(i), missing)
            gfx = self._get(i, "sm_clock_mhz", lambda: amd.clocks(i, "gfx"), missing)
            memclk = self._get(i, "memory_clock_mhz", lambda: amd.clocks(i, "mem"), missing)
            throttle = self._get(i, "throttle_reasons", lambda: amd.throttle_status(i), missing)
        spec = gpu_spec(self.names[i] or "") if self.names[i] else None
        free = total - used if total is not None and used is not None and used <= total else None
        return DeviceSample(
            node=self.node,
            index=i,
            uuid=self.uuids[i],
            seq=0,
            ts=ts,
            vendor=vendor,
            name=self.names[i],
            pci_bus_id=self.pcis[i],
            memory_total_bytes=total,
            memory_used_bytes=used if free is not None else None,
            memory_free_bytes=free,
            utilization_gpu_pct=util if util is not None and util <= 100.0 else None,
            utilization_memory_pct=membusy if membusy is not None and membusy <= 100.0 else None,
            temperature_c=temp if temp is not None and -60.0 <= temp <= 200.0 else None,
            power_w=draw,
            power_limit_w=spec.tdp_w if spec and power else None,
            sm_clock_mhz=gfx[0] if gfx else None,
            sm_clock_max_mhz=gfx[1] if gfx else (spec.sm_clock_max_mhz if spec else None),
            memory_clock_mhz=memclk[0] if memclk else None,
            memory_clock_max_mhz=memclk[1]
            if memclk
            else (spec.memory_clock_max_mhz if spec else None),
            memory_bus_width_bits=spec.memory_bus_width_bits if spec else None,
            bandwidth_gbps=spec.bandwidth_gbps if spec else None,
            tflops=spec.tflops if spec else None,
            throttle_reasons=("throttled",) if throttle else (),
            unsupported=tuple(missing),
        )


def load_pyrsmi() -> Rocm:
    try:
        module = importlib.import_module("pyrsmi.rocml")
    except ImportError as exc:
        raise BackendUnavailable(f"pyrsmi is not installed ({exc})") from exc
    quiet_pyrsmi(module)
    return Rocm(module)


def open_rocm(node: str) -> RocmBackend:
    """Initialise ROCm SMI; raises BackendUnavailable saying why (library not found, ...)."""
    lib = load_pyrsmi()
    try:
        lib.init()
    except Exception as exc:  # ROCMLError_LibraryNotFound, RuntimeError (driver not loaded), ...
        raise BackendUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
    try:
        count = lib.count()
    except Failed as exc:
        raise BackendUnavailable(
            f"ROCm SMI initialised but the device count failed ({exc})"
        ) from exc
    amd: AmdSmi | None = None
    if count > 0:
        amd, why = load_amdsmi()
        if why:
            log.info("rocm: %s", why)
    return RocmBackend(lib, node, amd)
