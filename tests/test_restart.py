"""Nothing is lost across a restart: `proctor serve` stopped (SIGTERM) or killed (-9) with an incident open
continues that incident when it comes back, instead of forgetting it or opening a second one; sessions that
expired while it was down are ended, with the end alerts of their open incidents."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SYSTEM_KEY, StreamClient, black_jpeg, stream_url
from tests.servers import free_port, wait_serving


def wait_for_sweeps(count: Callable[[], float], n: int, stuck_s: float = 600.0) -> None:
    """Waits until n more expiry sweeps have completed (proctor_expiry_sweeps_total). Progress, not a deadline:
    it fails only when the counter stands still for stuck_s (the housekeeping task is stuck, not slow)."""
    target = count() + n
    last, moved = count(), time.monotonic()
    while (now := count()) < target:
        if now != last:
            last, moved = now, time.monotonic()
        assert time.monotonic() - moved < stuck_s, f"no expiry sweep completed in {stuck_s:g} s"
        time.sleep(0.2)


class Serve:
    """`proctor serve` as a real process on a loopback port, restartable on the same data dir."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "PROCTOR_DATA_DIR": str(data_dir),
            "PROCTOR_PORT": str(self.port),
            "PROCTOR_API_KEYS": f"{SYSTEM_KEY}:system",
            "PROCTOR_INFERENCE_WORKERS": "1",
            "PROCTOR_LOG_FORMAT": "text",
            **env,
        }
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        path = self.data_dir.parent / f"serve-{self.port}.log"
        offset = path.stat().st_size if path.exists() else 0  # the log of this start only (restarts append)
        with path.open("ab") as log:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "livekit_proctor.cli", "serve"], env=self.env, stdout=log, stderr=log
            )
        wait_serving(self.p, lambda: path.read_bytes()[offset:].decode(errors="replace"))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(sig)
            self.p.wait(60)
        self.p = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = httpx.post(self.base + path, json=body, headers={"Authorization": f"Bearer {SYSTEM_KEY}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path: str) -> dict[str, Any]:
        r = httpx.get(self.base + path, headers={"Authorization": f"Bearer {SYSTEM_KEY}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def alerts(self) -> list[dict[str, Any]]:
        path = self.data_dir / "alerts.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def absent(cfg: dict[str, Any], start: float, seconds: float, base: float) -> None:
    async with StreamClient.connect(stream_url(cfg)) as c:
        t = start
        while t < start + seconds - 1e-9:
            await c.video(black_jpeg(), base + t)
            await c.sync()
            t = round(t + 0.2, 6)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_an_open_incident_continues_after_a_restart(tmp_path: Path, how: int) -> None:
    srv = Serve(tmp_path / "data").start()
    try:
        cfg = srv.post("/api/v1/session/start", {"exam_session_id": "r1", "candidate_id": "c", "exam_id": "e"})
        base = time.time() - 60
        await absent(cfg, 0.0, 6.0, base)  # FACE_NOT_FOUND starts after 5 s
        started = [a for a in srv.alerts() if a["incident_state"] == "started"]
        assert [a["event_type"] for a in started] == ["FACE_NOT_FOUND"]
        srv.stop(how)
        srv.start()  # same port and data dir: the token, the session and its open incident are still valid
        assert srv.get("/api/v1/session/r1")["open_incidents"][0]["incident_id"] == started[0]["incident_id"]
        await absent(cfg, 6.2, 8.0, base)  # the seat is still empty: the same incident, not a new one
        srv.post("/api/v1/session/r1/end")
        alerts = [a for a in srv.alerts() if a["exam_session_id"] == "r1"]
    finally:
        srv.stop()
    states = [(a["event_type"], a["incident_state"]) for a in alerts]
    assert states == [("FACE_NOT_FOUND", "started"), ("FACE_NOT_FOUND", "ended")], states
    end = alerts[-1]
    assert end["incident_id"] == started[0]["incident_id"] and end["evidence"]["end_reason"] == "ended_by_api"
    # It lasted from 0 s to the last absent frame at 14 s, across the restart.
    assert end["evidence"]["duration_s"] == pytest.approx(14.0, abs=0.3)


async def test_sessions_that_expired_while_the_server_was_down_are_ended(tmp_path: Path) -> None:
    srv = Serve(tmp_path / "data", PROCTOR_SESSION_TTL_S="8").start()
    try:
        cfg = srv.post("/api/v1/session/start", {"exam_session_id": "x1", "candidate_id": "c", "exam_id": "e"})
        srv.post("/api/v1/session/start", {"exam_session_id": "x2", "candidate_id": "c", "exam_id": "e"})
        await absent(cfg, 0.0, 6.0, time.time() - 60)
        srv.stop(signal.SIGKILL)
        # The TTL runs out while the server is down (expires_at is in the database).
        expires_at = datetime.fromisoformat(cfg["expires_at"]).timestamp()
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.5)
        srv.start()
        x1, x2 = srv.get("/api/v1/session/x1"), srv.get("/api/v1/session/x2")
        alerts = [a for a in srv.alerts() if a["exam_session_id"] == "x1"]
    finally:
        srv.stop()
    assert x1["state"] == x2["state"] == "expired"
    assert [(a["event_type"], a["incident_state"]) for a in alerts] == [
        ("FACE_NOT_FOUND", "started"),
        ("FACE_NOT_FOUND", "ended"),
    ]
    assert alerts[-1]["evidence"]["end_reason"] == "expired"


def test_the_expiry_sweep_covers_sessions_nobody_reconnected_to(tmp_path: Path) -> None:
    """A session restored at startup whose client never comes back still expires on time (at startup if the
    restart took longer than its TTL, else by the sweep)."""
    srv = Serve(
        tmp_path / "data", PROCTOR_SESSION_TTL_S="12", PROCTOR_EXPIRY_SWEEP_S="1", PROCTOR_METRICS_PUBLIC="true"
    ).start()
    try:
        srv.post("/api/v1/session/start", {"exam_session_id": "y1", "candidate_id": "c", "exam_id": "e"})
        srv.stop(signal.SIGKILL)
        srv.start()
        expires_at = datetime.fromisoformat(srv.get("/api/v1/session/y1")["expires_at"])

        def sweeps() -> float:
            assert srv.p is not None and srv.p.poll() is None, "proctor serve died"
            text = httpx.get(srv.base + "/metrics", timeout=30).text
            m = re.search(r"^proctor_expiry_sweeps_total (\S+)$", text, flags=re.M)
            assert m is not None, text
            return float(m[1])

        # The TTL is wall time by definition; then a sweep that began after it must have ended the session,
        # however long that sweep took to come round on a busy machine.
        while datetime.now(UTC) <= expires_at:
            time.sleep(0.2)
        wait_for_sweeps(sweeps, 2)
        assert srv.get("/api/v1/session/y1")["state"] == "expired"
    finally:
        srv.stop()


async def test_the_expiry_sweep_reads_the_database(tmp_path: Path) -> None:
    """The sweep ends sessions that are active in the database but not in this process's memory."""
    from sqlalchemy import update

    from livekit_proctor.db import SessionRow, utcnow
    from tests.conftest import LiveServer

    server = LiveServer(tmp_path, expiry_sweep_s=0.2).start()
    try:
        server.start_session("z1")
        mgr = server.app.state.sessions
        mgr.live.pop("z1").stop()  # as if another process had served it, or none since a restart
        with mgr.sm.begin() as db:
            db.execute(update(SessionRow).where(SessionRow.id == "z1").values(expires_at=utcnow()))
        registry = server.app.state.metrics.registry
        # Two completed sweeps from now: the second began after expires_at and must have ended it.
        await asyncio.to_thread(
            wait_for_sweeps, lambda: registry.get_sample_value("proctor_expiry_sweeps_total") or 0.0, 2
        )
        assert server.session("z1")["state"] == "expired"
    finally:
        server.stop()
