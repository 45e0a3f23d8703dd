"""What the node heartbeat says about the host: name, CPUs, memory, network interfaces."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import msgspec

from shardplane.bus.messages import NetInterface

SYS_NET = Path("/sys/class/net")


class HostInfo(msgspec.Struct, frozen=True, kw_only=True):
    hostname: str
    cpu_count: int | None
    host_memory_bytes: int | None
    interfaces: tuple[NetInterface, ...] = ()
    address: str | None = None


def parse_speed_mbps(text: str) -> float | None:
    """/sys/class/net/<if>/speed: Mbit/s, or -1 (or EINVAL on read) when the link has none."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def interfaces_from_sys(root: Path = SYS_NET) -> list[NetInterface] | None:
    """Interfaces and link speeds from sysfs; None where sysfs is not there (not Linux)."""
    if not root.is_dir():
        return None
    out: list[NetInterface] = []
    for entry in sorted(root.iterdir()):
        if entry.name == "lo":
            continue
        speed: float | None = None
        try:
            speed = parse_speed_mbps((entry / "speed").read_text())
        except OSError:  # virtual interfaces and links that are down refuse the read (EINVAL)
            speed = None
        out.append(NetInterface(name=entry.name, speed_mbps=speed))
    return out


def interfaces_from_psutil() -> list[NetInterface]:
    import psutil

    out: list[NetInterface] = []
    for name, stats in sorted(psutil.net_if_stats().items()):
        if name == "lo" or name.startswith("lo"):
            continue
        out.append(
            NetInterface(name=name, speed_mbps=float(stats.speed) if stats.speed > 0 else None)
        )
    return out


def host_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
        return pages * size or None


def route_address(url: str) -> str | None:
    """The local IP address the kernel would use to reach the first server of ``url``: the
    address peers on that network can dial. A UDP connect sends nothing; it only picks a route."""
    first = url.split(",")[0].strip()
    parsed = urlparse(first if "://" in first else f"nats://{first}")
    try:
        infos = socket.getaddrinfo(
            parsed.hostname or "127.0.0.1", parsed.port or 4222, type=socket.SOCK_DGRAM
        )
        family, _, _, _, target = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            return str(sock.getsockname()[0])
    except (OSError, IndexError):
        return None


def this_host(nats_url: str | None = None) -> HostInfo:
    interfaces = interfaces_from_sys()
    if interfaces is None:
        try:
            interfaces = interfaces_from_psutil()
        except Exception:
            interfaces = []
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count(),
        host_memory_bytes=host_memory_bytes(),
        interfaces=tuple(interfaces),
        address=route_address(nats_url) if nats_url else None,
    )


def fastest_gbps(interfaces: tuple[NetInterface, ...]) -> float | None:
    """The fastest interface's speed in Gbit/s: the best any link off this host can do."""
    speeds = [i.speed_mbps for i in interfaces if i.speed_mbps]
    return max(speeds) / 1000.0 if speeds else None
