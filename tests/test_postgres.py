"""The same service on PostgreSQL (production storage): runs when a local PostgreSQL can be started."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, StreamClient, black_jpeg, stream_url


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg not installed")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    root = os.geteuid() == 0
    if root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser")
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="proctor-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    if root:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*as_pg, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_pg,
            str(bindir / "pg_ctl"),
            "-D",
            str(data / "db"),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(data, ignore_errors=True)


async def test_sessions_alerts_and_restart_on_postgres(pg_url: str, tmp_path: Path) -> None:
    srv = LiveServer(tmp_path, database_url=pg_url).start()
    try:
        cfg = srv.start_session("pg-1")
        base = time.time() - 30
        async with StreamClient.connect(stream_url(cfg)) as c:
            for i in range(30):
                await c.video(black_jpeg(), base + i * 0.2)
                await c.sync()  # every frame analysed (none replaced by a newer one), however slow the machine
        # A slow machine may add CAMERA_OFF (no frame for 10 s while one is analysed): look for ours.
        assert "FACE_NOT_FOUND" in [a["event_type"] for a in c.alerts()], c.alerts()
        assert srv.app.state.sink.pending() >= 1  # outbox rows are in PostgreSQL
    finally:
        srv.stop()
    srv2 = LiveServer(tmp_path, port=srv.port, database_url=pg_url).start()
    try:
        st = srv2.session("pg-1")
        assert st["state"] == "active" and st["counters"]["frames_received"] == 30
        with srv2.http() as h:
            assert h.post("/api/v1/session/pg-1/end").json()["state"] == "ended"
    finally:
        srv2.stop()
