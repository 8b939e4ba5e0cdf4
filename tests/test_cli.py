"""The `proctor` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from livekit_proctor.contracts.alerts import Alert


def proctor(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livekit_proctor.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any PROCTOR_* or LIVEKIT_* variable, plus `extra`."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PROCTOR_", "LIVEKIT_"))} | extra


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("proctor: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr.strip()


def test_inspect_json_counts_faces(data_dir: Path, oep: list[dict[str, Any]]) -> None:
    normal = [str(r["path"]) for r in oep if r["condition"] == "normal"][:3]
    absent = [str(r["path"]) for r in oep if r["condition"] == "absent"]
    couple = str(data_dir / "faces/multi_face/deepface__couple.jpg")
    r = proctor("inspect", *normal, *absent, couple, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["face_count"] for o in out] == [1, 1, 1, 0, 2]
    face = out[0]["faces"][0]
    assert {"box", "score", "keypoints", "head_pose", "gaze"} <= face.keys() and 0 < face["score"] <= 1
    assert [o["persons_present"] for o in out[:3]] == [1, 1, 1]
    assert out[0]["persons"] and out[0]["persons"][0]["label"] == "person"
    assert out[0]["shoulders_visible"] is True and isinstance(out[0]["objects"], list)
    single = json.loads(proctor("inspect", couple, "--json").stdout)
    assert single["face_count"] == 2 and single["models"]["models_verified"] is True


def test_inspect_reports_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not an image")
    r = proctor("inspect", str(bad), "--json")
    assert r.returncode == 1 and "not a readable image" in json.loads(r.stdout)["error"]
    assert "Traceback" not in r.stderr


def test_analyze_recording_gives_alerts_at_their_offsets(tmp_path: Path, oep: list[dict[str, Any]]) -> None:
    """A 10 fps recording: candidate for 3 s, gone for 7 s, back for 3 s."""
    img = cv2.imread(str(next(r["path"] for r in oep if r["condition"] == "normal")))
    assert img is not None
    h, w = img.shape[:2]
    path = tmp_path / "exam.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (w, h))
    for i in range(130):
        vw.write(img if i < 30 or i >= 100 else np.zeros_like(img))
    vw.release()
    r = proctor("analyze", str(path), "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["event_type"], x["incident_state"]) for x in lines] == [
        ("FACE_NOT_FOUND", "started"),
        ("FACE_NOT_FOUND", "ended"),
    ]
    assert 8.0 < lines[0]["offset_s"] <= 8.3 and 10.8 <= lines[1]["offset_s"] <= 11.2
    for x in lines:
        x.pop("offset_s")
        Alert.model_validate(x)  # canonical schema
    text = proctor("analyze", str(path))
    assert text.returncode == 0 and text.stderr.count("analysing") == 0  # piped: no progress bar
    header, row, summary = text.stdout.splitlines()
    assert header.split() == ["since", "alerted", "ended", "lasted", "severity", "event"]
    since, alerted, ended, lasted, severity, event = row.split()
    assert (since, event) == ("3.0s", "FACE_NOT_FOUND")  # the seat is empty from 3 s
    assert alerted.startswith("8.") and ended.startswith(("10.", "11."))  # after 5 s; 1 s after the face is back
    assert 6.5 < float(lasted.rstrip("s")) < 7.1  # the rule's duration_s: until the face was back at 10 s
    assert 0 < float(severity) <= 1
    assert summary == "-- 1 incident(s) in 12.9s of video (65 frames analysed)"


def test_analyze_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal (a pty here) a progress bar is drawn there while frames are read."""
    import pty

    path = tmp_path / "dark.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (160, 120))
    for _ in range(20):
        vw.write(np.zeros((120, 160, 3), np.uint8))
    vw.release()
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "livekit_proctor.cli", "analyze", str(path)],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        env=clean_env(COLUMNS="100"),
    )
    os.close(slave)
    terminal = bytearray()

    def drain() -> None:
        # Read while the child runs: a pty holds only a few KiB, and a slow machine redraws the bar more often.
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            terminal.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout = proc.communicate(timeout=300)[0]
    reader.join(60)
    os.close(master)
    assert proc.returncode == 0
    assert "analysing" in terminal.decode(errors="replace")
    assert stdout == "no incidents in 1.9s of video (10 frames analysed)\n"  # explicit, even when empty


def test_analyze_shared_video_without_incident(data_dir: Path) -> None:
    r = proctor("analyze", str(data_dir / "video/proctoring_ai__center_focus.mp4"))
    assert r.returncode == 0 and re.fullmatch(r"no incidents in \S+ of video \(\d+ frames analysed\)\n", r.stdout)


def test_analyze_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    r = proctor("analyze", str(tmp_path / "nope.mp4"))
    assert r.returncode == 1 and r.stderr == f"proctor: {tmp_path / 'nope.mp4'}: cannot open video (no such file)\n"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    r = proctor("analyze", str(broken))
    assert r.returncode == 1 and "cannot open video" in r.stderr and "Traceback" not in r.stderr


def test_version() -> None:
    from importlib.metadata import version

    r = proctor("--version")
    assert r.returncode == 0 and r.stdout == f"proctor {version('livekit-proctor')}\n"


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"PROCTOR_PORT": "eighty"}, ["config"], "proctor: PROCTOR_PORT: input should be a valid integer"),
        ({"PROCTOR_LOG_LEVEL": "loud"}, ["keys", "create", "--role", "admin"], "proctor: PROCTOR_LOG_LEVEL: input "),
        ({"PROCTOR_VIDEO_FPS": "fast"}, ["analyze", "x.mp4"], "proctor: PROCTOR_VIDEO_FPS: input should be a valid "),
        ({"PROCTOR_AGENT_MAX_SESSIONS": "many"}, ["agent", "start"], "proctor: PROCTOR_AGENT_MAX_SESSIONS: input "),
        ({}, ["serve", "--port", "http"], "proctor: Invalid value for '--port': Input should be a valid integer"),
        ({}, ["analyze", "x.mp4", "--calibration", "-5"], "proctor: Invalid value for '--calibration': Input should"),
        ({}, ["analyze", "x.mp4", "--sensitivity", "max"], "proctor: Invalid value for '--sensitivity'"),
        ({}, ["token", "--room", "r"], "proctor: Missing option '--identity'"),
        ({}, ["servee"], "proctor: No such command 'servee'"),
        ({}, ["consume", "smtp"], "proctor: unknown consumer 'smtp': choose from grpc, kafka, webhook"),
        ({}, ["demo", "--url", "http://127.0.0.1:9"], "proctor: --url needs --api-key"),
        ({}, ["token", "--room", "r", "--identity", "i", "--role", "proctor"], "proctor: set LIVEKIT_API_KEY and"),
    ],
)
def test_bad_settings_and_arguments_are_one_line(
    tmp_path: Path, env: dict[str, str], args: list[str], expected: str
) -> None:
    """A bad value is named in one line on stderr, exit status 2, before any model loads; never a traceback."""
    line = one_line_error(proctor(*args, cwd=tmp_path, env=clean_env(**env)))
    assert line.startswith(expected), line
    if line.startswith(("proctor: Invalid", "proctor: Missing", "proctor: No such")):
        assert line.endswith("--help`)")  # where to look


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    line = one_line_error(proctor("config", cwd=tmp_path, env=clean_env(PROCTOR_WEBHOOK_CONCURRENCY="sentinel42")))
    assert line.startswith("proctor: PROCTOR_WEBHOOK_CONCURRENCY: ") and "sentinel42" not in line


def test_demo_streams_a_synthetic_clip_and_prints_the_alerts(tmp_path: Path) -> None:
    """`proctor demo` alone: an analyzer in the process, an empty seat streamed, the absence reported."""
    r = proctor("demo", cwd=tmp_path, env=clean_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    alerts = [x.split() for x in lines if x.startswith("alert")]
    assert [a[1:3] for a in alerts] == [["FACE_NOT_FOUND", "started"], ["FACE_NOT_FOUND", "ended"]], r.stdout
    assert 5.0 < float(alerts[0][4].rstrip("s")) < 6.5  # "no face > 5 s" on the clip's own clock
    assert any(x.startswith("feedback  FACE_NOT_FOUND: Please return to your seat") for x in lines)
    assert lines[-1] == "-- 2 alert(s), 1 incident(s)" and not list(tmp_path.iterdir())  # nothing left behind


def test_no_command_prints_the_help(tmp_path: Path) -> None:
    r = proctor(cwd=tmp_path)
    assert r.returncode == 2 and "serve" in r.stdout and "analyze" in r.stdout and not r.stderr


@pytest.mark.parametrize("args", [["keys", "create", "--role", "system"], ["config"]])
def test_keys_and_config(tmp_path: Path, args: list[str]) -> None:
    r = proctor(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if args[0] == "keys":
        assert r.stdout.startswith("pk_")
    else:
        assert json.loads(r.stdout)["video_fps"] == 5.0


def test_config_masks_every_secret(tmp_path: Path) -> None:
    """Every secret setting (marked, or named like one) and every password inside a URL is masked."""
    import os
    import re

    from livekit_proctor.settings import SECRET, Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")}
    secret_names = [  # text settings marked secret or named like one (key file paths are not secrets)
        name
        for name, f in Settings.model_fields.items()
        if str in (f.annotation, *getattr(f.annotation, "__args__", ()))
        and (f.json_schema_extra == SECRET or re.search(r"secret|passw|credential|private|token|key", name))
        and not name.endswith("_file")
    ]
    assert {"api_keys", "stream_secret", "webhook_secrets", "livekit_api_secret"} <= set(secret_names)
    for i, name in enumerate(secret_names):
        env[f"PROCTOR_{name.upper()}"] = f"sentinel{i}x:admin"
    env |= {
        "PROCTOR_REDIS_URL": "redis://:sentinelredis@redis.internal:6379/0",
        "PROCTOR_DATABASE_URL": "postgresql+psycopg://proctor:sentineldb@db.internal/proctor?sslpassword=sentinelssl",
        "PROCTOR_KAFKA_BOOTSTRAP": "sasl_ssl://u:sentinelk1@k1:9092,sasl_ssl://u:sentinelk2@k2:9092",
        "PROCTOR_WEBHOOK_URL": "https://hooks:sentinelhook@exam.example/hook?token=sentinelquery",
    }
    r = subprocess.run(
        [sys.executable, "-m", "livekit_proctor.cli", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "sentinel" not in r.stdout
    out = json.loads(r.stdout)
    assert all(out[name] == "***" for name in secret_names)
    assert out["redis_url"] == "redis://:***@redis.internal:6379/0"  # still tells where it connects
    assert out["database_url"].startswith("postgresql+psycopg://proctor:***@db.internal/")


def test_serve_first_start_prints_a_working_admin_key(tmp_path: Path) -> None:
    import os
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "livekit_proctor.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/.well-known/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        key = (tmp_path / "proctor-data/bootstrap-admin.key").read_text().strip()
        r = httpx.get(f"{base}/api/v1/admin/stats", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["active_sessions"] == 0
        assert httpx.get(f"{base}/api/v1/admin/stats").status_code == 401
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert key in out  # shown once on first start


def mint(env: dict[str, str], *args: str) -> tuple[str, str]:
    """(url line, token) printed by `proctor token`."""
    r = proctor("token", *args, env=env)
    assert r.returncode == 0, r.stderr
    url, token = r.stdout.splitlines()
    assert url.startswith("url: ") and token.startswith("token: ")
    return url.removeprefix("url: "), token.removeprefix("token: ")


def test_token_carries_the_attributes_the_agent_reads() -> None:
    """Only LiveKit's own variables set (as for the agent and the `lk` CLI): the URL and a token it accepts."""
    from livekit import api

    env = clean_env(LIVEKIT_URL="wss://lk.example:7880", LIVEKIT_API_KEY="devkey", LIVEKIT_API_SECRET="s" * 32)
    url, tok = mint(env, "--room", "exam-7", "--identity", "alice", "--role", "candidate", "--exam-id", "math-101",
                    "--dispatch")  # fmt: skip
    assert url == "wss://lk.example:7880"
    claims = api.TokenVerifier("devkey", "s" * 32).verify(tok)
    assert claims.video is not None and claims.room_config is not None
    assert claims.identity == "alice" and claims.video.room == "exam-7" and claims.video.room_join
    assert claims.video.can_publish and claims.video.can_subscribe and claims.video.can_publish_data
    assert claims.attributes == {"role": "candidate", "exam_session_id": "exam-7-alice", "candidate_id": "alice",
                                 "exam_id": "math-101"}  # fmt: skip
    assert [a.agent_name for a in claims.room_config.agents] == ["proctor"]
    _, tok = mint(env, "--room", "exam-7", "--identity", "bob", "--role", "proctor")
    claims = api.TokenVerifier("devkey", "s" * 32).verify(tok)
    assert claims.video is not None
    assert claims.attributes == {"role": "proctor"} and not claims.video.can_publish


def test_token_proctor_livekit_variables_override() -> None:
    from livekit import api

    env = clean_env(LIVEKIT_URL="ws://a:7880", LIVEKIT_API_KEY="lk", LIVEKIT_API_SECRET="x" * 32,
                    PROCTOR_LIVEKIT_URL="ws://b:7880", PROCTOR_LIVEKIT_API_KEY="pk",
                    PROCTOR_LIVEKIT_API_SECRET="y" * 32)  # fmt: skip
    url, tok = mint(env, "--room", "r", "--identity", "i", "--role", "proctor")
    assert url == "ws://b:7880" and api.TokenVerifier("pk", "y" * 32).verify(tok).identity == "i"
    r = proctor("token", "--room", "r", "--identity", "i", "--role", "proctor", "--json", env=env)
    assert json.loads(r.stdout)["url"] == "ws://b:7880"
