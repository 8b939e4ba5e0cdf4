"""Load generator for the analyzer's media stream: N concurrent sessions, real video + audio.

Usage: python bench/loadgen.py --sessions N [--video PATH] [--duration S] [--url URL --key KEY]

Each session is started over REST, streamed to over one WebSocket (binary protocol v1: JPEG
frames at the video's native frame rate, 16 kHz mono s16le audio in 100 ms chunks), then ended.
During part of every period the video is replaced by black frames so FACE_NOT_FOUND fires; the
latency from sending the alert's trigger frame to receiving the alert is measured.

Prints a per-session table, a summary and one JSON line (the last line of stdout).

Exit codes: 0 all checks passed; 1 the run finished but a check failed (audio lost, frames not
received, session errors, no session streamed); 2 bad arguments or input; 3 the server could not be
started or reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.client import AnalyzerClient, AnalyzerError, StreamConnection  # noqa: E402
from livekit_proctor.contracts.alerts import Alert  # noqa: E402
from livekit_proctor.contracts.wire import (  # noqa: E402
    AUDIO_SAMPLE_RATE,
    AlertMessage,
    ErrorMessage,
    FeedbackMessage,
    FlowMessage,
    HeartbeatMessage,
    SessionEndedMessage,
)

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "video" / "proctoring_ai__center_focus.mp4"
DEFAULT_AUDIO = (
    REPO.parent / "shared" / "data" / "audio" / "single_speaker" / "librispeech_1688" / "1688-142285-0000.flac"
)
API_KEY = "benchkey"
AUDIO_CHUNK_S = 0.1
AUDIO_CHUNK_BYTES = int(AUDIO_SAMPLE_RATE * AUDIO_CHUNK_S) * 2
MAX_LONG_SIDE = 640
JPEG_QUALITY = 80

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class BenchError(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------- media preparation


@dataclass
class Media:
    frames: list[bytes]  # JPEG, long side <= 640
    absent_frame: bytes  # black JPEG of the same size
    fps: float
    width: int
    height: int
    audio: bytes  # s16le 16 kHz mono, looped by the sender
    audio_source: str


def load_video(path: Path, duration: float) -> tuple[list[bytes], bytes, float, int, int]:
    """Decodes up to `duration` seconds once and encodes each frame once (shared by all sessions)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise BenchError(f"cannot open video {path}", EXIT_USAGE)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not 1.0 <= fps <= 120.0:
        fps = 25.0
    limit = max(1, int(duration * fps) + 1)
    frames: list[bytes] = []
    size = (0, 0)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    while len(frames) < limit:
        ok, bgr = cap.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        scale = min(1.0, MAX_LONG_SIDE / max(h, w))
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        size = (bgr.shape[1], bgr.shape[0])
        ok, buf = cv2.imencode(".jpg", bgr, params)
        if ok:
            frames.append(buf.tobytes())
    cap.release()
    if not frames:
        raise BenchError(f"no frames decoded from {path}", EXIT_USAGE)
    ok, black = cv2.imencode(".jpg", np.zeros((size[1], size[0], 3), np.uint8), params)
    assert ok
    return frames, black.tobytes(), fps, size[0], size[1]


def load_audio(path: Path) -> tuple[bytes, str]:
    """Speech as s16le 16 kHz mono: soundfile if installed, else PyAV; a 440 Hz tone when unavailable."""
    if path.is_file():
        try:
            import soundfile  # type: ignore[import-not-found]

            data, sr = soundfile.read(str(path), dtype="int16", always_2d=True)
            mono = data.mean(axis=1).astype(np.int16)
            if sr != AUDIO_SAMPLE_RATE:
                idx = np.arange(0, len(mono), sr / AUDIO_SAMPLE_RATE).astype(np.int64)
                mono = mono[idx[idx < len(mono)]]
            if len(mono):
                return mono.astype("<i2").tobytes(), f"{path.name} (soundfile)"
        except ImportError:
            pass
        except Exception as e:  # unreadable file: fall through to PyAV / tone
            print(f"warning: soundfile could not read {path}: {e}", file=sys.stderr)
        try:
            import av

            out = bytearray()
            with av.open(str(path)) as container:
                resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_SAMPLE_RATE)
                for frame in container.decode(audio=0):
                    for rf in resampler.resample(frame):
                        out += rf.to_ndarray().astype("<i2").tobytes()
                for rf in resampler.resample(None):
                    out += rf.to_ndarray().astype("<i2").tobytes()
            if out:
                return bytes(out), f"{path.name} (PyAV)"
        except Exception as e:
            print(f"warning: PyAV could not decode {path}: {e}", file=sys.stderr)
    t = np.arange(AUDIO_SAMPLE_RATE * 2) / AUDIO_SAMPLE_RATE
    tone = (0.2 * 32767 * np.sin(2 * np.pi * 440.0 * t)).astype("<i2")
    return tone.tobytes(), "440 Hz tone"


# --------------------------------------------------------------------------- server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in KiB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    vals: dict[str, int] = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        if m:
            vals[key] = int(m.group(1))
    return vals.get("VmRSS"), vals.get("VmHWM")


class Server:
    """`python -m livekit_proctor.cli serve` in a subprocess with a throwaway data dir."""

    def __init__(self, log_path: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.update(
            PROCTOR_DATA_DIR=str(data_dir),
            PROCTOR_API_KEYS=f"{API_KEY}:admin",
            PROCTOR_METRICS_PUBLIC="true",
            PROCTOR_HOST="127.0.0.1",
            PROCTOR_PORT=str(self.port),
        )
        env.pop("PROCTOR_PUBLIC_URL", None)  # stream_url must point at this server
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livekit_proctor.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=data_dir,  # keep a stray .env in the caller's directory out of the benchmark
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    async def wait_ready(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        async with httpx.AsyncClient(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}", EXIT_SERVER)
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(f"{self.url}/.well-known/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise BenchError(f"server not ready after {limit_s:.0f}s:\n{self.log_tail()}", EXIT_SERVER)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def error_lines(self) -> list[str]:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln]
        return []


class ResourceSampler:
    """Samples the server's RSS every `interval` seconds (peak kept)."""

    def __init__(self, pid: int | None, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.pid is not None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self.pid is not None
        while True:
            rss, _ = proc_rss_kib(self.pid)
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --------------------------------------------------------------------------- one session


@dataclass
class SessionResult:
    index: int
    session_id: str
    stream_s: float = 0.0
    frames_sent: int = 0
    absent_frames_sent: int = 0
    audio_bytes_sent: int = 0
    max_send_lag_s: float = 0.0  # how far the sender fell behind its schedule (client overload)
    alerts_started: int = 0
    alerts_ended: int = 0
    alerts_by_type: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    unmatched_alerts: int = 0  # started alerts whose trigger frame was not found in the send log
    heartbeats: int = 0
    feedback: int = 0
    flow: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # counters from GET / end
    close: str = ""
    got_session_ended: bool = False

    @property
    def audio_s_sent(self) -> float:
        return self.audio_bytes_sent / (AUDIO_SAMPLE_RATE * 2)


class Session:
    def __init__(self, index: int, args: argparse.Namespace, media: Media, client: AnalyzerClient, run_id: str) -> None:
        self.args = args
        self.media = media
        self.client = client
        self.r = SessionResult(index, f"bench-{run_id}-{index:03d}")
        self.sent_at: dict[int, float] = {}  # video seq -> perf_counter at send
        self.audio_paused = False
        self.ended = asyncio.Event()
        self.stream_url = ""
        self.token = ""

    async def start(self) -> None:
        body = {"exam_session_id": self.r.session_id, "candidate_id": f"cand-{self.r.index}", "exam_id": "bench"}
        try:
            cfg = await self.client.start_session(body)
        except AnalyzerError as e:
            raise BenchError(f"session start failed: {e}", EXIT_SERVER) from None
        self.stream_url, self.token = cfg["stream_url"], cfg["stream_token"]

    async def run(self, delay: float, go: asyncio.Event) -> None:
        await go.wait()
        await asyncio.sleep(delay)
        try:
            async with StreamConnection.connect(
                self.stream_url, self.token, token_in="query", max_size=None, open_timeout=30
            ) as ws:
                reader = asyncio.create_task(self._reader(ws))
                try:
                    await self._stream(ws)
                    await self._sync(ws)
                    await self._collect_counters()
                    await self._end()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.ended.wait(), 5)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        except (OSError, ConnectionClosed, TimeoutError) as e:
            self.r.errors.append(f"websocket: {type(e).__name__}: {e}")
            if "final" not in self.r.server:
                with contextlib.suppress(Exception):
                    await self._end()

    async def _stream(self, ws: StreamConnection) -> None:
        a, m, r = self.args, self.media, self.r
        frame_dt = 1.0 / m.fps
        period, absent_for = a.absent_every, a.absent_for
        t0, wall0 = time.perf_counter(), time.time()
        end = t0 + a.duration
        vseq = aseq = 0
        audio_total = round(a.duration / AUDIO_CHUNK_S)  # chunks "recorded" during the run
        next_video, next_audio = t0, t0 + AUDIO_CHUNK_S  # a chunk is sent once its 100 ms are "recorded"
        audio_pos = 0
        alen = len(m.audio)
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if now >= next_video:
                r.max_send_lag_s = max(r.max_send_lag_s, now - next_video)
                phase = (now - t0) % period if period > 0 else 0.0
                absent = period > 0 and phase >= period - absent_for
                jpeg = m.absent_frame if absent else m.frames[vseq % len(m.frames)]
                ts = time.time()
                self.sent_at[vseq] = time.perf_counter()
                await ws.send_video(jpeg, ts, vseq)
                r.frames_sent += 1
                r.absent_frames_sent += absent
                vseq += 1
                next_video += frame_dt
                if now - next_video > 1.0:  # hopelessly behind: skip ahead instead of bursting
                    next_video = now
                continue
            if now >= next_audio and not self.audio_paused and aseq < audio_total:
                chunk = self._audio_chunk(audio_pos)
                audio_pos = (audio_pos + AUDIO_CHUNK_BYTES) % alen
                await ws.send_audio(chunk, wall0 + aseq * AUDIO_CHUNK_S, aseq)
                r.audio_bytes_sent += len(chunk)
                aseq += 1
                next_audio = t0 + (aseq + 1) * AUDIO_CHUNK_S
                continue
            wake = next_video if self.audio_paused else min(next_video, next_audio)
            await asyncio.sleep(max(0.0, min(wake, end) - time.perf_counter()))
        r.stream_s = time.perf_counter() - t0
        # Audio that was "recorded" while the server asked us to slow down is sent now: nothing is lost.
        while aseq < audio_total:
            chunk = self._audio_chunk(audio_pos)
            audio_pos = (audio_pos + AUDIO_CHUNK_BYTES) % alen
            await ws.send_audio(chunk, wall0 + aseq * AUDIO_CHUNK_S, aseq)
            r.audio_bytes_sent += len(chunk)
            aseq += 1

    def _audio_chunk(self, pos: int) -> bytes:
        a = self.media.audio
        chunk = a[pos : pos + AUDIO_CHUNK_BYTES]
        while len(chunk) < AUDIO_CHUNK_BYTES:
            chunk += a[: AUDIO_CHUNK_BYTES - len(chunk)]
        return chunk

    async def _sync(self, ws: StreamConnection) -> None:
        """The protocol's ping: the server answers it after it has taken every earlier message."""
        try:
            await ws.sync(15)
        except TimeoutError:
            self.r.errors.append("no pong within 15 s after streaming")

    async def _collect_counters(self) -> None:
        """Waits (up to 5 s) until the server has accounted for all audio, then reads the counters."""
        deadline = time.monotonic() + 5
        state: dict[str, Any] = {}
        while True:
            try:
                state = await self.client.session(self.r.session_id)
            except AnalyzerError as e:
                self.r.errors.append(f"GET session: {e}")
                return
            c = state["counters"]
            done = round(c["audio_seconds"], 2) >= round(self.r.audio_s_sent, 2)
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.r.server["live"] = state["counters"]

    async def _end(self) -> None:
        try:
            state = await self.client.end_session(self.r.session_id)
        except AnalyzerError as e:
            self.r.errors.append(f"end: {e}")
            return
        if state is None:
            self.r.errors.append("end: the session is unknown to the server (404)")
            return
        self.r.server["final"] = state["counters"]

    async def _reader(self, ws: StreamConnection) -> None:
        r = self.r
        try:
            async for msg in ws:
                got = time.perf_counter()
                if isinstance(msg, AlertMessage):
                    self._on_alert(msg.alert, got)
                elif isinstance(msg, HeartbeatMessage):
                    r.heartbeats += 1
                elif isinstance(msg, FlowMessage):
                    r.flow.append(msg.model_dump(mode="json"))
                    self.audio_paused = msg.audio == "slow_down"
                elif isinstance(msg, FeedbackMessage):
                    r.feedback += 1  # candidate feedback (rate-limited by the server)
                elif isinstance(msg, ErrorMessage):
                    r.errors.append(f"server error {msg.code}: {msg.reason}")
                elif isinstance(msg, SessionEndedMessage):
                    r.got_session_ended = True
                    self.ended.set()
                # hello, pong (the pong resolves ws.sync())
            r.close = f"{ws.close_code} {ws.close_reason}" if ws.close_code is not None else "no close frame"
        finally:
            for what, n in ws.skipped.items():
                r.errors.append(f"{n} server message(s) skipped: {what}")
            self.ended.set()
            self.audio_paused = False

    def _on_alert(self, alert: Alert, got: float) -> None:
        r = self.r
        state = alert.incident_state
        if state == "ended":
            r.alerts_ended += 1
            return
        if state != "started":
            return
        r.alerts_started += 1
        et = str(alert.event_type)
        r.alerts_by_type[et] = r.alerts_by_type.get(et, 0) + 1
        seq = alert.evidence.get("trigger_frame_seq")
        if seq is None and "trigger_audio_window_seq" in alert.evidence:
            return  # an audio incident (VOICE_DETECTED): no frame to measure the latency from
        sent = self.sent_at.get(seq) if isinstance(seq, int) else None
        if sent is None:
            r.unmatched_alerts += 1
        else:
            r.latencies_s.append(got - sent)


# --------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def fmt(v: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def summarize(
    args: argparse.Namespace,
    media: Media,
    results: list[SessionResult],
    cpu_s: float | None,
    rss_peak_kib: int | None,
    rss_hwm_kib: int | None,
    client_cpu_s: float,
    server_errors: list[str],
    metrics: dict[str, float],
) -> tuple[str, dict[str, Any], list[str]]:
    failures: list[str] = []
    warnings: list[str] = []
    rows = [
        [
            "session",
            "sent",
            "recv",
            "analysed",
            "fps",
            "dropped",
            "sampled_out",
            "alerts",
            "lat_p50_ms",
            "audio_sent_s",
            "audio_srv_s",
            "errors",
        ]
    ]
    per: list[dict[str, Any]] = []
    all_lat: list[float] = []
    for r in results:
        c = r.server.get("final") or r.server.get("live") or {}
        live = r.server.get("live") or {}
        analysed = int(live.get("frames_analysed", c.get("frames_analysed", 0)))
        received = int(c.get("frames_received", 0))
        dropped = int(c.get("frames_dropped", 0))
        rejected = int(c.get("frames_rejected", 0))
        # The REST counters have no frames_sampled_out; every received frame is analysed, dropped,
        # rejected or sampled out (the drain before reading leaves no frame in flight).
        sampled_out = received - analysed - dropped - rejected if c else 0
        fps = analysed / r.stream_s if r.stream_s else 0.0
        audio_srv = float(c.get("audio_seconds", 0.0))
        audio_analysed = float(c.get("audio_analysed_seconds", 0.0))
        all_lat.extend(r.latencies_s)
        d = {
            "session_id": r.session_id,
            "stream_s": round(r.stream_s, 3),
            "frames_sent": r.frames_sent,
            "absent_frames_sent": r.absent_frames_sent,
            "frames_received": received,
            "frames_analysed": analysed,
            "analysis_fps": round(fps, 3),
            "frames_dropped": dropped,
            "frames_sampled_out": sampled_out,
            "frames_rejected": rejected,
            "alerts_started": r.alerts_started,
            "alerts_ended": r.alerts_ended,
            "alerts_by_type": r.alerts_by_type,
            "alerts_unmatched": r.unmatched_alerts,
            "latency_ms": [round(x * 1000, 1) for x in r.latencies_s],
            "audio_s_sent": round(r.audio_s_sent, 3),
            "audio_s_server": audio_srv,
            "audio_s_analysed": audio_analysed,
            "audio_rejected": int(c.get("audio_rejected", 0)),
            "heartbeats": r.heartbeats,
            "flow_messages": len(r.flow),
            "feedback_messages": r.feedback,
            "max_send_lag_ms": round(r.max_send_lag_s * 1000, 1),
            "close": r.close,
            "got_session_ended": r.got_session_ended,
            "errors": r.errors,
        }
        per.append(d)
        rows.append(
            [
                str(r.index),
                str(r.frames_sent),
                str(received),
                str(analysed),
                f"{fps:.2f}",
                str(dropped),
                str(sampled_out),
                str(r.alerts_started),
                fmt(pct([x * 1000 for x in r.latencies_s], 50), ".0f"),
                f"{r.audio_s_sent:.1f}",
                f"{audio_srv:.1f}",
                str(len(r.errors)),
            ]
        )
        tag = f"session {r.index}"
        if not c:
            failures.append(f"{tag}: no counters from the server")
            continue
        if received != r.frames_sent:
            failures.append(f"{tag}: sent {r.frames_sent} frames, server received {received}")
        if abs(audio_srv - r.audio_s_sent) > 0.002:
            failures.append(f"{tag}: sent {r.audio_s_sent:.3f} s of audio, server reports {audio_srv:.3f} s")
        # After the session's end (its last part window analysed): every second sent went through the audio stages.
        if r.server.get("final") and abs(audio_analysed - r.audio_s_sent) > 0.002:
            failures.append(f"{tag}: sent {r.audio_s_sent:.3f} s of audio, {audio_analysed:.3f} s analysed")
        for e in r.errors:
            failures.append(f"{tag}: {e}")
        # Not failures of the run, but worth seeing: every incident is ended by the session end.
        if r.alerts_ended != r.alerts_started:
            warnings.append(f"{tag}: {r.alerts_started} incident(s) started, {r.alerts_ended} ended alert(s) received")
        if not r.got_session_ended:
            warnings.append(f"{tag}: no session_ended message before the close ({r.close or 'not closed'})")

    n = len(results)
    dur = float(np.mean([r.stream_s for r in results])) if results else 0.0
    fps_mean = float(np.mean([d["analysis_fps"] for d in per])) if per else 0.0
    p50, p95 = pct(all_lat, 50), pct(all_lat, 95)
    cores = os.cpu_count() or 1
    cpu_per_session = cpu_s / n if cpu_s is not None and n else None
    core_pct = 100.0 * cpu_per_session / dur if cpu_per_session is not None and dur else None
    summary = {
        "bench": "loadgen",
        "sessions": n,
        "duration_s": args.duration,
        "video": str(args.video),
        "video_fps": round(media.fps, 3),
        "frame_size": f"{media.width}x{media.height}",
        "jpeg_bytes_mean": round(float(np.mean([len(f) for f in media.frames]))),
        "audio_source": media.audio_source,
        "absent_every_s": args.absent_every,
        "absent_for_s": args.absent_for,
        "cores": cores,
        "analysis_fps_mean": round(fps_mean, 3),
        "frames_sent": sum(d["frames_sent"] for d in per),
        "frames_analysed": sum(d["frames_analysed"] for d in per),
        "frames_dropped": sum(d["frames_dropped"] for d in per),
        "frames_sampled_out": sum(d["frames_sampled_out"] for d in per),
        "alerts_started": sum(r.alerts_started for r in results),
        "alerts_unmatched": sum(r.unmatched_alerts for r in results),
        "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
        "latency_p95_ms": None if p95 is None else round(p95 * 1000, 1),
        "latency_max_ms": round(max(all_lat) * 1000, 1) if all_lat else None,
        "audio_s_sent": round(sum(r.audio_s_sent for r in results), 3),
        "audio_s_server": round(sum(d["audio_s_server"] for d in per), 3),
        "audio_s_analysed": round(sum(d["audio_s_analysed"] for d in per), 3),
        "server_cpu_s": None if cpu_s is None else round(cpu_s, 2),
        "server_cpu_s_per_session": None if cpu_per_session is None else round(cpu_per_session, 3),
        "server_core_pct_per_session": None if core_pct is None else round(core_pct, 1),
        "server_rss_peak_mib": None if rss_peak_kib is None else round(rss_peak_kib / 1024, 1),
        "server_rss_hwm_mib": None if rss_hwm_kib is None else round(rss_hwm_kib / 1024, 1),
        "client_cpu_s": round(client_cpu_s, 2),
        "max_send_lag_ms": max((d["max_send_lag_ms"] for d in per), default=0.0),
        "server_log_errors": len(server_errors),
        "server_metrics": metrics,
        "failures": failures,
        "warnings": warnings,
        "per_session": per,
    }
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines += [
        f"sessions={n} duration={dur:.1f}s cores={cores} video={media.width}x{media.height}@{media.fps:.2f}fps "
        f"jpeg~{summary['jpeg_bytes_mean'] // 1024}KiB audio={media.audio_source}",
        f"analysis fps mean {fps_mean:.2f} | frames sent {summary['frames_sent']} dropped {summary['frames_dropped']} "
        f"sampled_out {summary['frames_sampled_out']}",
        f"alerts {summary['alerts_started']} started (unmatched {summary['alerts_unmatched']}) | frame->alert latency "
        f"p50 {fmt(summary['latency_p50_ms'], '.0f', ' ms')} p95 {fmt(summary['latency_p95_ms'], '.0f', ' ms')} "
        f"max {fmt(summary['latency_max_ms'], '.0f', ' ms')}",
        f"audio sent {summary['audio_s_sent']:.1f} s, server {summary['audio_s_server']:.1f} s, analysed "
        f"{summary['audio_s_analysed']:.1f} s",
        f"server CPU {fmt(cpu_s, '.1f', ' s')} = {fmt(cpu_per_session, '.2f', ' s')}/session "
        f"= {fmt(core_pct, '.1f', '%')} of a core per session | RSS peak "
        f"{fmt(summary['server_rss_peak_mib'], '.0f', ' MiB')} "
        f"(HWM {fmt(summary['server_rss_hwm_mib'], '.0f', ' MiB')})"
        f" | client CPU {client_cpu_s:.1f} s, max send lag {summary['max_send_lag_ms']:.0f} ms",
    ]
    return "\n".join(lines), summary, failures


async def scrape_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """A few server-wide numbers from /metrics (empty when it is not reachable)."""
    out: dict[str, float] = {}
    with contextlib.suppress(httpx.HTTPError):
        resp = await http.get("/metrics")
        if resp.status_code != 200:
            return out
        for line in resp.text.splitlines():
            m = re.match(r'^proctor_frames_total\{outcome="(\w+)"\} (\S+)', line)
            if m:
                out[f"frames_{m.group(1)}"] = float(m.group(2))
            m = re.match(r"^proctor_(frame_pipeline|inference)_seconds_(sum|count)(\{[^}]*\})? (\S+)", line)
            if m:
                label = re.sub(r"\W+", "_", (m.group(3) or "")).strip("_")
                key = "_".join(p for p in (m.group(1), label, m.group(2)) if p)
                out[key] = float(m.group(4))
            m = re.match(r'^proctor_protocol_errors_total\{code="(\w+)"\} (\S+)', line)
            if m:
                out[f"protocol_errors_{m.group(1)}"] = float(m.group(2))
    return out


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> int:
    media_t0 = time.perf_counter()
    frames, absent, fps, w, h = load_video(args.video, args.duration)
    audio, audio_src = load_audio(args.audio)
    media = Media(frames, absent, fps, w, h, audio, audio_src)
    print(
        f"prepared {len(frames)} frames {w}x{h} @ {fps:.2f} fps, audio {len(audio) / 32000:.1f} s ({audio_src}) "
        f"in {time.perf_counter() - media_t0:.1f}s",
        file=sys.stderr,
    )

    server: Server | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    pid: int | None = args.server_pid
    if args.url:
        base, key = args.url.rstrip("/"), args.key
        if pid is not None and proc_cpu_s(pid) is None:
            print(f"warning: no /proc/{pid}: server CPU and RSS are n/a", file=sys.stderr)
            pid = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="proctor-loadgen-")
        data = Path(tmp.name)
        server = Server(data / "server.log", data)
        base, key, pid = server.url, API_KEY, server.pid
    try:
        if server:
            await server.wait_ready(args.ready_timeout)
        async with AnalyzerClient(base, key, timeout=30.0) as client:
            try:
                ready = await client.http.get("/.well-known/ready")
            except httpx.HTTPError as e:
                raise BenchError(f"server {base} not reachable: {e}", EXIT_SERVER) from None
            if ready.status_code != 200:
                raise BenchError(f"server {base} not ready: {ready.status_code} {ready.text[:200]}", EXIT_SERVER)
            print(f"server {base} ready: {ready.json()}", file=sys.stderr)

            run_id = uuid.uuid4().hex[:8]
            sessions = [Session(i, args, media, client, run_id) for i in range(args.sessions)]
            started: list[Session] = []
            try:
                for s in sessions:
                    await s.start()
                    started.append(s)
            except (BenchError, httpx.HTTPError):
                for s in started:  # leave no active session behind on a shared server
                    with contextlib.suppress(Exception):
                        await s._end()
                raise
            sampler = ResourceSampler(pid)
            sampler.start()
            go = asyncio.Event()
            tasks = [asyncio.create_task(s.run(args.stagger * s.r.index / args.sessions, go)) for s in sessions]
            cpu0 = proc_cpu_s(pid) if pid is not None else None
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            go.set()
            await asyncio.gather(*tasks)
            cpu1 = proc_cpu_s(pid) if pid is not None else None
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            await sampler.stop()
            _, hwm = proc_rss_kib(pid) if pid is not None else (None, None)
            metrics = await scrape_metrics(client.http)
    finally:
        rc_server = server.stop() if server else None
    server_errors = server.error_lines() if server else []
    cpu_s = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    table, summary, failures = summarize(
        args,
        media,
        [s.r for s in sessions],
        cpu_s,
        sampler.peak_kib or None,
        hwm,
        client_cpu,
        server_errors,
        metrics,
    )
    if server is not None and rc_server not in (0, None):
        summary["server_exit_code"] = rc_server
    if server_errors:
        summary["server_log_error_lines"] = server_errors[:20]
        failures.append(f"server log has {len(server_errors)} ERROR/Traceback line(s)")
    if args.keep_log and server is not None:
        await asyncio.to_thread(shutil.copyfile, server.log_path, args.keep_log)
    if tmp is not None:
        tmp.cleanup()
    print(table)
    for f in failures:
        print(f"CHECK FAILED: {f}")
    for w in summary["warnings"]:
        print(f"WARNING: {w}")
    for line in server_errors[:10]:
        print(f"server log: {line}")
    print(json.dumps(summary, separators=(",", ":")))
    if not any(r.stream_s > 0 for r in (s.r for s in sessions)):
        return EXIT_CHECK_FAILED
    return EXIT_CHECK_FAILED if failures else EXIT_OK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="loadgen.py",
        description=__doc__.split("\n\n")[0].strip() if __doc__ else None,
        epilog=(__doc__ or "").split("\n\n", 1)[1].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sessions", "-n", type=int, required=True, help="concurrent sessions (one WebSocket each)")
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="video streamed at its native fps, looped")
    ap.add_argument(
        "--audio",
        type=Path,
        default=DEFAULT_AUDIO,
        help="speech file sent as 16 kHz mono s16le, looped (soundfile or PyAV; a 440 Hz tone when unreadable)",
    )
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of streaming per session (default 30)")
    ap.add_argument(
        "--absent-every",
        type=float,
        default=15.0,
        metavar="P",
        help="period of the absence pattern in seconds (default 15; 0 disables it)",
    )
    ap.add_argument(
        "--absent-for",
        type=float,
        default=7.0,
        metavar="A",
        help="black frames during the last A seconds of every period, so FACE_NOT_FOUND (> 5 s) fires (default 7)",
    )
    ap.add_argument("--stagger", type=float, default=1.0, help="spread session starts over this many seconds")
    ap.add_argument("--url", help="use this running server (http://host:port) instead of starting one")
    ap.add_argument("--key", help="API key for --url (a role that can manage sessions)")
    ap.add_argument(
        "--server-pid",
        type=int,
        help="with --url: pid of the local server process, for CPU and RSS (else they are n/a)",
    )
    ap.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for a started server")
    ap.add_argument("--keep-log", metavar="PATH", help="copy the started server's log here")
    args = ap.parse_args(argv)
    if args.sessions < 1:
        ap.error("--sessions must be >= 1")
    if args.duration <= 0:
        ap.error("--duration must be > 0")
    if args.absent_every < 0 or args.absent_for < 0:
        ap.error("--absent-every and --absent-for must be >= 0")
    if args.absent_every > 0 and args.absent_for >= args.absent_every:
        ap.error("--absent-for must be shorter than --absent-every")
    if bool(args.url) != bool(args.key):
        ap.error("--url and --key go together")
    if args.server_pid is not None and not args.url:
        ap.error("--server-pid only applies with --url (a started server is measured anyway)")
    if not args.video.is_file():
        ap.error(f"video not found: {args.video}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
