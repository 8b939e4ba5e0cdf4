"""Every vision and session-state rule on synthetic signal sequences: thresholds, timing edges, calibration,
fusion, risk and candidate feedback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from livekit_proctor.analyzer.detectors.base import BodyPose, Box, Detection, Face, FaceMesh, Gaze, HeadPose
from livekit_proctor.analyzer.evidence import FeedbackLimiter, thumbnail_b64
from livekit_proctor.analyzer.rules.engine import RuleEngine, RuleEvent
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.signals import FrameSignals
from livekit_proctor.contracts.api import SessionStartRequest

W, H = 640, 480
FACE = Face(Box(270, 150, 100, 120), 0.9)
PERSON = Detection("person", 0, 0.9, Box(150, 100, 340, 380))
PHONE = Detection("cell phone", 67, 0.8, Box(400, 300, 60, 90))
SHOULDERS = {"left_shoulder": (420.0, 420.0, 0.9), "right_shoulder": (220.0, 420.0, 0.9),
             "left_ear": (370.0, 200.0, 0.9), "right_ear": (270.0, 200.0, 0.9)}  # fmt: skip


def engine(calibration_s: float = 0, **kw: Any) -> RuleEngine:
    req = SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", calibration_s=calibration_s, **kw)
    return RuleEngine(effective_policy(req, 5.0))


def mesh(yaw: float = 0, pitch: float = 0, gyaw: float | None = None, gpitch: float | None = None,
         blink: bool = False) -> FaceMesh:  # fmt: skip
    gy = yaw if gyaw is None else gyaw
    gp = pitch if gpitch is None else gpitch
    return FaceMesh(np.zeros((478, 3), np.float32), 0.99, HeadPose(yaw, pitch, 0),
                    Gaze(gy, gp, gy - yaw, gp - pitch, 0.1 if blink else 0.3, blink))  # fmt: skip


def frame(t: float, faces: int = 1, m: FaceMesh | None = None, objects: list[Detection] | None = None,
          pose: dict[str, tuple[float, float, float]] | None = None, face: Face = FACE) -> FrameSignals:  # fmt: skip
    return FrameSignals(seq=round(t * 10), ts=t, width=W, height=H,
                        faces=[face] + [Face(Box(20 + 60 * i, 20, 50, 60), 0.8) for i in range(faces - 1)]
                        if faces else [],
                        mesh=m if faces else None,
                        objects=objects, objects_ts=t if objects is not None else None,
                        pose=BodyPose(pose, 0.9) if pose else None, pose_ran=pose is not None)  # fmt: skip


def run(e: RuleEngine, t0: float, t1: float, fps: float = 5.0, **kw: Any) -> list[RuleEvent]:
    out: list[RuleEvent] = []
    n = round((t1 - t0) * fps)
    for i in range(n):
        out += e.observe(frame(round(t0 + i / fps, 4), **kw))
    return out


def started(events: list[RuleEvent]) -> list[str]:
    return [str(ev.event_type) for ev in events if ev.state == "started"]


# ---- presence fusion


def test_person_without_face_is_face_not_visible_not_absent() -> None:
    e = engine()
    events = run(e, 0, 7, faces=0, objects=[PERSON])
    assert started(events) == ["FACE_NOT_VISIBLE"]
    assert events[0].evidence["persons_present"] == 1


def test_nobody_is_face_not_found() -> None:
    e = engine()
    assert started(run(e, 0, 7, faces=0, objects=[], pose={})) == ["FACE_NOT_FOUND"]


def test_second_person_body_without_face_is_multiple_persons() -> None:
    e = engine()
    second = Detection("person", 0, 0.8, Box(500, 80, 140, 400))
    events = run(e, 0, 4, objects=[PERSON, second], m=mesh())
    assert started(events) == ["MULTIPLE_PERSONS"]
    assert events[0].evidence["persons_present"] == 2


def test_small_background_person_is_not_counted() -> None:
    tiny = Detection("person", 0, 0.9, Box(600, 10, 20, 40))  # < 2% of the frame
    assert started(run(engine(), 0, 5, objects=[PERSON, tiny], m=mesh())) == []


# ---- calibration and head / gaze rules


def test_calibration_sets_the_baseline_and_silences_head_rules_meanwhile() -> None:
    e = engine(calibration_s=10)
    # This candidate's camera sits high: looking at the screen reads as 20 degrees down.
    assert run(e, 0, 10.2, m=mesh(pitch=-35)) == []  # during calibration nothing fires
    base = e.fusion.baseline
    assert base.calibrated and base.pitch == pytest.approx(-35)
    assert run(e, 10.2, 20, m=mesh(pitch=-35)) == []  # at baseline: fine
    events = run(e, 20, 24, m=mesh(pitch=-70))  # 35 degrees below baseline
    assert started(events) == ["HEAD_DOWN"]


@pytest.mark.parametrize(("duration", "fires"), [(2.9, False), (3.1, True)])
def test_head_turned_away_timing(duration: float, fires: bool) -> None:
    e = engine()
    run(e, 0, 1, m=mesh())
    events = []
    t = 1.0
    while t <= 1.0 + duration + 1e-9:
        events += e.observe(frame(round(t, 4), m=mesh(yaw=50)))
        t += 0.1
    events += run(e, 1.0 + duration + 0.1, 1.0 + duration + 2, m=mesh())
    assert ("HEAD_TURNED_AWAY" in started(events)) is fires


def test_gaze_off_screen_then_prolonged_look_away_then_end() -> None:
    e = engine()
    run(e, 0, 1, m=mesh())
    events = run(e, 1, 12.2, m=mesh(gyaw=35))  # eyes off to the side, head straight
    assert started(events) == ["GAZE_OFF_SCREEN", "PROLONGED_LOOK_AWAY"]
    gaze = next(ev for ev in events if ev.event_type == "GAZE_OFF_SCREEN")
    assert 5.0 < gaze.ts <= 5.3 and gaze.evidence["gaze"]["yaw"] == 35
    ended = run(e, 12.2, 14, m=mesh())
    assert sorted(str(ev.event_type) for ev in ended if ev.state == "ended") == [
        "GAZE_OFF_SCREEN",
        "PROLONGED_LOOK_AWAY",
    ]


def test_blinks_neither_start_nor_break_gaze_off() -> None:
    e = engine()
    events: list[RuleEvent] = []
    for i in range(30):  # 6 s off-screen, every third frame a blink
        t = i / 5
        events += e.observe(frame(t, m=mesh(gyaw=35, blink=i % 3 == 0)))
    assert started(events) == ["GAZE_OFF_SCREEN"]
    e2 = engine()
    assert started(run(e2, 0, 10, m=mesh(gyaw=35, blink=True))) == []  # eyes closed is not "looking away"


def test_frequent_distraction_counts_episodes_in_the_window() -> None:
    e = engine()
    events: list[RuleEvent] = []
    t = 0.0
    for _ in range(7):  # seven 1-second glances away within 60 s
        events += run(e, t, t + 1, m=mesh(gyaw=40))
        events += run(e, t + 1, t + 6, m=mesh())
        t += 6
    assert started(events).count("FREQUENT_DISTRACTION") == 1
    ev = next(ev for ev in events if ev.event_type == "FREQUENT_DISTRACTION")
    assert ev.evidence["off_screen_episodes"] == 6.0  # fires on the sixth (> 5)
    assert "GAZE_OFF_SCREEN" not in started(events)  # each glance was short


def test_suspicious_movement_needs_two_fast_frames() -> None:
    e = engine()
    run(e, 0, 1, m=mesh())
    one = e.observe(frame(1.0, m=mesh(yaw=20))) + e.observe(frame(1.2, m=mesh(yaw=20)))
    assert one == []  # a single jump (jitter, a cut)
    events = e.observe(frame(3.0, m=mesh(yaw=0))) + e.observe(frame(3.2, m=mesh(yaw=20)))
    events += e.observe(frame(3.4, m=mesh(yaw=40)))
    assert started(events) == ["SUSPICIOUS_MOVEMENT"]
    assert events[0].evidence["head_speed_deg_s"] == pytest.approx(100)


def test_presence_loss_against_the_calibrated_face_size() -> None:
    e = engine(calibration_s=5)
    run(e, 0, 5.2, m=mesh())
    small = Face(Box(310, 200, 30, 36), 0.9)  # 9% of the baseline area
    events = run(e, 5.2, 11, m=mesh(), face=small)
    assert started(events) == ["PRESENCE_LOSS"]
    assert events[0].evidence["face_area_ratio"] < 0.2


# ---- objects and body


def test_phone_needs_a_second_sighting() -> None:
    e = engine()
    events = e.observe(frame(0.0, objects=[PERSON, PHONE]))
    events += [x for t in (0.2, 0.4, 0.6, 0.8) for x in e.observe(frame(t))]
    assert events == []  # held detection, not yet 1.5 s
    events = run(e, 1.0, 3.0, objects=[PERSON, PHONE])
    assert started(events) == ["PHONE_DETECTED"]
    assert events[0].evidence["phone_score"] == 0.8


def test_left_frame_when_shoulders_go_but_the_candidate_is_there() -> None:
    e = engine()
    run(e, 0, 1, m=mesh(), pose=SHOULDERS)
    no_shoulders = {k: (x, y, 0.1) if "shoulder" in k else (x, y, v) for k, (x, y, v) in SHOULDERS.items()}
    assert started(run(e, 1, 7, m=mesh(), pose=no_shoulders)) == ["LEFT_FRAME"]


def test_hand_near_ear() -> None:
    e = engine()
    hand = {**SHOULDERS, "right_wrist": (275.0, 215.0, 0.9)}
    assert started(run(e, 0, 4, m=mesh(), pose=hand)) == ["HAND_NEAR_EAR"]
    far = {**SHOULDERS, "right_wrist": (200.0, 470.0, 0.9)}
    assert started(run(engine(), 0, 4, m=mesh(), pose=far)) == []


# ---- session-state rules, fusion rule, risk


def test_camera_off_after_grace_and_back_on() -> None:
    e = engine()
    assert e.control("CAMERA_OFF", True, 100.0, "camera:track_muted") == []
    assert e.tick(101.0) == []
    ev = e.tick(102.1)
    assert started(ev) == ["CAMERA_OFF"] and ev[0].evidence["reason"] == "camera:track_muted"
    end = e.control("CAMERA_OFF", False, 110.0, "camera:track_unmuted")
    assert [x.state for x in end] == ["ended"] and end[0].evidence["duration_s"] == 10.0
    # A quick mute-unmute is no incident.
    assert e.control("CAMERA_OFF", True, 200.0, "m") == [] and e.control("CAMERA_OFF", False, 201.0, "u") == []


def test_high_confidence_cheating_needs_two_kinds_of_evidence() -> None:
    e = engine()
    events = run(e, 0, 4, faces=2, m=mesh(), objects=[PERSON, Detection("person", 0, 0.8, Box(500, 80, 140, 400))])
    assert "HIGH_CONFIDENCE_CHEATING" not in started(events)  # faces and persons: one second person
    events = run(e, 4, 8, faces=2, m=mesh(),
                 objects=[PERSON, Detection("person", 0, 0.8, Box(500, 80, 140, 400)), PHONE])  # fmt: skip
    assert "PHONE_DETECTED" in started(events) and "HIGH_CONFIDENCE_CHEATING" in started(events)
    meta = next(ev for ev in events if ev.event_type == "HIGH_CONFIDENCE_CHEATING")
    assert "PHONE_DETECTED" in meta.evidence["strong_incidents"] and meta.severity >= 0.85


def test_risk_score_rises_with_incidents_decays_and_explains() -> None:
    e = engine()
    run(e, 0, 1, m=mesh())
    assert e.risk.score(1.0) == 0
    run(e, 1, 8, objects=[PERSON, PHONE], m=mesh())
    high = e.risk_summary(8.0)
    assert high["score"] > 20 and high["top_incidents"][0]["event_type"] == "PHONE_DETECTED"
    assert e.risk.score(8.0 + 600) < high["score"] / 3  # two half-lives later
    assert (
        RuleEngine.__name__ and e.risk.band(10) == "low" and e.risk.band(45) == "medium" and e.risk.band(70) == "high"
    )


def test_updates_while_an_incident_lasts_and_cooldown_after() -> None:
    e = engine()
    events = run(e, 0, 70, faces=0)
    assert [str(x.state) for x in events] == ["started", "ongoing", "ongoing"]
    events = run(e, 70, 72)  # face back: ended
    assert [str(x.state) for x in events] == ["ended"]
    # Within the 5 s cooldown the condition does not start a new pending onset.
    events = run(e, 72, 74, faces=0) + run(e, 74, 76)
    assert events == []


def test_features_switch_rules_off() -> None:
    e = engine(features_enabled={"gaze": False, "objects": False})
    run(e, 0, 1, m=mesh())
    assert started(run(e, 1, 15, m=mesh(gyaw=40), objects=[PERSON, PHONE])) == []


def test_feedback_is_rate_limited_per_kind_and_overall() -> None:
    f = FeedbackLimiter(per_code_s=30, min_gap_s=10)
    assert f.allow("A", 0) and not f.allow("B", 5) and f.allow("B", 11)
    assert not f.allow("A", 20) and f.allow("A", 31)


def test_thumbnail_fits_10_kb() -> None:
    noise = np.random.default_rng(1).integers(0, 255, (120, 160, 3), np.uint8)
    import base64

    data = base64.b64decode(thumbnail_b64(noise) or "")
    assert data[:2] == b"\xff\xd8" and len(data) <= 10 * 1024
