"""Real servers the tests start themselves (installed by .ci/run): Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from redis.typing import StreamRangeResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wait_serving(proc: subprocess.Popen[Any], output: Callable[[], str]) -> None:
    """Waits until a `proctor serve` process says it listens (uvicorn's "Uvicorn running on", logged once its
    startup, models included, is complete) or fails when the process exits first. No wall-clock deadline: a slow
    start on a busy machine is not a failure; a server that dies is, at once, with its output."""
    while "Uvicorn running on" not in output():
        assert proc.poll() is None, f"proctor serve exited ({proc.returncode}) before listening:\n{output()[-3000:]}"
        time.sleep(0.1)


def stream_entries(reply: StreamRangeResponse | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """An XRANGE reply as a client without decode_responses returns it: [(entry id, {field: value})]. redis-py
    annotates ids and fields as bytes | str and the reply and each entry's fields as optional, to cover every
    client mode."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], reply)


class RedisServer:
    """redis-server on a loopback port with AOF persistence (survives kill -9 and restart)."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = data_dir or Path(tempfile.mkdtemp(prefix="proctor-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
