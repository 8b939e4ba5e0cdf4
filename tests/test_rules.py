"""Rule engine on synthetic signal sequences: thresholds, timing edges, hysteresis, policy."""

from __future__ import annotations

from typing import Any

import pytest

from livekit_proctor.analyzer.detectors.base import Box, Face
from livekit_proctor.analyzer.rules.engine import RuleEngine
from livekit_proctor.analyzer.rules.incident import RuleEvent
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.signals import FrameSignals
from livekit_proctor.contracts.api import SessionStartRequest

FACE = Face(Box(100, 100, 80, 80), 0.9)


def engine(**kw: Any) -> RuleEngine:
    req = SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", **kw)
    return RuleEngine(effective_policy(req, 5.0))


def run(e: RuleEngine, counts: list[tuple[float, int]]) -> list[RuleEvent]:
    out: list[RuleEvent] = []
    for i, (t, n) in enumerate(counts):
        out += e.observe(FrameSignals(seq=i, ts=t, width=640, height=480, faces=[FACE] * n, model="m"))
    return out


def seq(start: float, end: float, n: int, fps: float = 10.0) -> list[tuple[float, int]]:
    k = round((end - start) * fps)
    return [(round(start + i / fps, 4), n) for i in range(k)]


@pytest.mark.parametrize(("duration", "fires"), [(2.9, False), (3.0, False), (3.1, True)])
def test_multiple_faces_timing_edge(duration: float, fires: bool) -> None:
    # Two faces seen from t=1.0 through t=1.0+duration (inclusive), then one face.
    e = engine()
    counts = seq(0, 1, 1) + [(round(1 + i / 10, 4), 2) for i in range(round(duration * 10) + 1)]
    counts += seq(1 + duration + 0.1, 1 + duration + 3, 1)
    events = run(e, counts)
    started = [ev for ev in events if ev.state == "started"]
    assert bool(started) is fires
    if fires:
        assert started[0].event_type == "MULTIPLE_FACES"
        assert started[0].ts == pytest.approx(1 + duration)
        ended = [ev for ev in events if ev.state == "ended"]
        assert len(ended) == 1 and ended[0].incident_id == started[0].incident_id
        assert ended[0].evidence["duration_s"] == pytest.approx(duration)


@pytest.mark.parametrize(("duration", "fires"), [(4.9, False), (5.1, True)])
def test_face_not_found_timing_edge(duration: float, fires: bool) -> None:
    e = engine()
    counts = seq(0, 1, 1) + [(round(1 + i / 10, 4), 0) for i in range(round(duration * 10) + 1)] + seq(7, 9, 1)
    assert any(ev.state == "started" for ev in run(e, counts)) is fires


def test_one_incident_not_one_alert_per_frame() -> None:
    e = engine()
    events = run(e, seq(0, 60, 0))  # a minute without a face
    # One start, then an update every 30 s while it lasts: never one alert per frame.
    assert [(ev.event_type, ev.state) for ev in events] == [
        ("FACE_NOT_FOUND", "started"),
        ("FACE_NOT_FOUND", "ongoing"),
    ]
    assert events[1].evidence["duration_s"] == pytest.approx(35.1, abs=0.2)
    assert e.open_incidents()[0]["event_type"] == "FACE_NOT_FOUND"


def test_flicker_neither_resets_nor_ends() -> None:
    e = engine()
    # 0 faces for 4 s with a single spurious detection at 2.0 s: still one continuous absence.
    counts = [(t, 1 if t == 2.0 else 0) for t, _ in seq(0, 5.5, 0)]
    events = run(e, counts)
    assert [ev.state for ev in events] == ["started"]
    assert events[0].evidence["condition_since"] == 0.0
    # During the incident a 0.5 s return of the face does not end it (clear_after_s = 1.0).
    events = run(e, [(5.5 + i / 10, 1) for i in range(5)] + seq(6.0, 8.0, 0))
    assert events == []
    # A face for more than 1 s ends it, once.
    events = run(e, seq(8.0, 10.0, 1))
    assert [ev.state for ev in events] == ["ended"]
    assert events[0].ts == pytest.approx(8.9)  # 1.0 s after the last frame without a face (7.9 s)


def test_gap_in_frames_restarts_a_pending_condition() -> None:
    e = engine()
    # 3 s without a face, then no frames for 10 s (camera muted), then 1 s without a face.
    events = run(e, seq(0, 3, 0) + seq(13, 14, 0))
    assert events == []


def test_close_all_ends_open_incidents() -> None:
    e = engine()
    run(e, seq(0, 6, 0))
    events = e.close_all(6.0, "session_ended")
    assert [(ev.state, ev.evidence["end_reason"]) for ev in events] == [("ended", "session_ended")]
    assert e.close_all(7.0, "again") == []


def test_sensitivity_presets_and_overrides() -> None:
    high = effective_policy(
        SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", sensitivity="high"), 5.0
    )
    low = effective_policy(
        SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", sensitivity="low"), 5.0
    )
    assert high.rules["FACE_NOT_FOUND"].trigger_after_s < 5.0 < low.rules["FACE_NOT_FOUND"].trigger_after_s
    e = engine(rules={"MULTIPLE_FACES": {"trigger_after_s": 1.0}})
    assert any(ev.state == "started" for ev in run(e, seq(0, 1.2, 2)))
    e = engine(features_enabled={"multiple_faces": False})
    assert run(e, seq(0, 10, 3)) == []
    e = engine(rules={"FACE_NOT_FOUND": {"enabled": False}})
    assert run(e, seq(0, 10, 0)) == []
    with pytest.raises(ValueError, match="unknown rules"):
        engine(rules={"NOT_A_RULE": {"enabled": False}})


def test_severity_in_range_and_grows_with_faces() -> None:
    two = next(ev for ev in run(engine(), seq(0, 4, 2)) if ev.state == "started")
    five = next(ev for ev in run(engine(), seq(0, 4, 5)) if ev.state == "started")
    assert 0 < two.severity < five.severity <= 1


def test_incident_rate_limit_suppresses_whole_incidents_and_says_so() -> None:
    from livekit_proctor.analyzer.rules.engine import RuleEvent
    from livekit_proctor.analyzer.rules.limits import IncidentLimiter
    from livekit_proctor.contracts.alerts import EventType
    from livekit_proctor.contracts.alerts import IncidentState as S

    def ev(i: int, state: S, kind: EventType = EventType.CAMERA_OFF) -> RuleEvent:
        return RuleEvent(kind, state, f"inc-{kind}-{i}", float(i), 0.5, "m", {})

    lim = IncidentLimiter(burst=3, refill_s=10.0)
    out = []
    for i in range(6):  # six incidents within one second
        out += lim.filter([ev(i, S.STARTED), ev(i, S.ONGOING), ev(i, S.ENDED)], now=i * 0.1)
    assert [e.incident_id for e in out if e.state is S.STARTED] == [
        "inc-CAMERA_OFF-0",
        "inc-CAMERA_OFF-1",
        "inc-CAMERA_OFF-2",
    ]
    assert len(out) == 9  # every reported incident keeps its update and end; the others left nothing
    assert lim.filter([ev(9, S.STARTED, EventType.PHONE_DETECTED)], now=0.6)  # other types have their own bucket
    # Ten seconds later one more gets through and tells how many were not reported before it.
    late = lim.filter([ev(7, S.STARTED)], now=10.6)
    assert late and late[0].evidence["incidents_suppressed_before"] == 3
    assert lim.filter([ev(8, S.STARTED)], now=10.7) == []
    # A restart keeps a suppressed incident suppressed until its end.
    again = IncidentLimiter(burst=3, refill_s=10.0)
    again.restore(lim.snapshot())
    assert again.filter([ev(8, S.ENDED)], now=11.0) == []
    assert IncidentLimiter(burst=0, refill_s=1.0).filter([ev(i, S.STARTED) for i in range(50)], now=0.0).__len__() == 50
