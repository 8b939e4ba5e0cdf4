"""Extending the analyzer the way a contributor does (docs/architecture.md, "Adding a model" / "Adding a rule"):
a brightness stage and a TOO_DARK rule, each one definition plus one registration call, and a dark stream that
raises TOO_DARK through the real server, with the stage's cost in the metrics and its model in the alert."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import Field

from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet
from livekit_proctor.analyzer.rules import catalog
from livekit_proctor.analyzer.rules.catalog import RuleSpec, register_rule, unregister_rule
from livekit_proctor.analyzer.rules.engine import RuleEngine
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, register_stage, unregister_stage
from livekit_proctor.contracts.alerts import Alert, EventType, event_types
from livekit_proctor.contracts.api import SessionStartRequest
from tests.conftest import ADMIN_KEY, LiveServer, StreamClient, black_jpeg, stream_url

REPO = Path(__file__).resolve().parents[1]


# ---- a new model: one module (here: test-local classes) ...


class BrightnessSettings(StageSettings):
    brightness_fps: float = Field(default=5.0, gt=0, description="Brightness measurements per second per session")


class BrightnessStage(Stage):
    """Mean luma of the frame (0-255)."""

    name = "brightness"
    writes = "brightness"
    settings_model = BrightnessSettings
    model = "test.mean_luma"
    verified = True  # no model file to check

    def due(self) -> Due:
        return Due(interval_s=1.0 / self.settings.brightness_fps)

    def run(self, media: np.ndarray, signals: Signals) -> float:
        return float(media.mean())


# ---- a new rule: one catalog entry ...

TOO_DARK = RuleSpec(
    "TOO_DARK", "face_detection", trigger_after_s=2.0, clear_after_s=1.0, severity=0.4, risk_weight=3,
    feedback="It is too dark to see you. Please turn on a light.",
    condition=lambda o, t: None if o.values.get("brightness") is None else o.values["brightness"] < t.dark_luma,
    measure=lambda o: o.values.get("brightness"), measure_name="brightness", threshold="dark_luma",
    thresholds={"dark_luma": 40.0},
)  # fmt: skip


@pytest.fixture
def extended() -> Iterator[None]:
    # ... plus one registration each (in the repository: a line in BUILTIN_STAGES, an entry in catalog.BUILTIN).
    register_stage(BrightnessStage)
    register_rule(TOO_DARK)
    try:
        yield
    finally:
        unregister_stage(BrightnessStage)
        unregister_rule("TOO_DARK")


def _rgb(value: int) -> np.ndarray:
    return np.full((120, 160, 3), value, np.uint8)


def test_dark_frames_raise_too_dark_and_light_ends_it(extended: None) -> None:
    models = ModelSet.load(face_mesh=False, objects_model="none", body_pose=False, segmentation=False)
    assert models.describe()["brightness"] == "test.mean_luma"
    req = SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", calibration_s=0)
    engine, clock = RuleEngine(effective_policy(req, 5.0)), ModelClock()
    events = []
    for i in range(25):  # 3 s dark, then 2 s lit, at 5 fps
        sig = models.analyze_rgb(_rgb(10 if i < 15 else 200), i, i / 5, clock)
        events += [ev for ev in engine.observe(sig) if ev.event_type == "TOO_DARK"]
    assert [str(ev.state) for ev in events] == ["started", "ended"]
    start = events[0]
    assert start.evidence["brightness"] == 10.0 and start.evidence["threshold"] == 40.0
    assert start.feedback == TOO_DARK.feedback and "test.mean_luma" in start.model
    assert engine.risk.explain(events[-1].ts)["top_incidents"][0]["event_type"] == "TOO_DARK"


def test_registered_rule_state_survives_a_restart(extended: None) -> None:
    models = ModelSet.load(face_mesh=False, objects_model="none", body_pose=False, segmentation=False)
    req = SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e", calibration_s=0)
    policy = effective_policy(req, 5.0)
    before, clock = RuleEngine(policy), ModelClock()
    started = [ev for i in range(15) for ev in before.observe(models.analyze_rgb(_rgb(10), i, i / 5, clock))]
    state = json.loads(json.dumps(before.snapshot()))  # what the session row keeps
    assert "TOO_DARK" in state["rules"]
    after = RuleEngine(policy)
    after.restore(state)
    ended = [ev for i in range(15, 25) for ev in after.observe(models.analyze_rgb(_rgb(200), i, i / 5, clock))]
    dark = [ev for ev in [*started, *ended] if ev.event_type == "TOO_DARK"]
    assert [str(ev.state) for ev in dark] == ["started", "ended"] and dark[0].incident_id == dark[1].incident_id


def test_a_stage_reading_a_signal_nobody_writes_is_refused(extended: None) -> None:
    class Orphan(BrightnessStage):
        name = "orphan"
        reads = ("nothing_writes_this",)

    register_stage(Orphan)
    try:
        with pytest.raises(ValueError, match="orphan reads"):
            ModelSet.load()
    finally:
        unregister_stage(Orphan)


def test_audio_stages_run_on_audio_windows() -> None:
    class Speech(Stage):
        name = writes = "speech"
        media = "audio"
        model = "test.energy_vad"

        def run(self, media: np.ndarray, signals: Signals) -> bool:
            return float(np.sqrt(np.mean(media.astype(np.float64) ** 2))) > 500

    class Level(Stage):
        name = writes = "speech_level"
        media = "audio"
        model = "test.rms"

        def due(self) -> Due:
            return Due(if_speech=True)  # only on windows with speech

        def run(self, media: np.ndarray, signals: Signals) -> float:
            return float(np.sqrt(np.mean(media.astype(np.float64) ** 2)))

    register_stage(Speech)
    register_stage(Level)
    try:
        # The built-in vad stage off: this test's stage writes "speech" in its place.
        models = ModelSet.load(face_mesh=False, objects_model="none", body_pose=False, segmentation=False, vad=False)
        quiet = models.analyze_audio(np.zeros(16000, np.int16), 0, 0.0)
        loud = models.analyze_audio(np.full(16000, 3000, np.int16), 1, 1.0, clock=ModelClock())
    finally:
        unregister_stage(Speech)
        unregister_stage(Level)
    assert quiet.values == {"speech": False} and quiet.model == "test.energy_vad"
    assert loud.values == {"speech": True, "speech_level": 3000.0}
    assert set(loud.latency_ms) == {"test.energy_vad", "test.rms"}


async def test_dark_stream_raises_too_dark_through_the_server(extended: None, tmp_path: Path) -> None:
    srv = LiveServer(tmp_path).start()  # its ModelSet loads the registered stages
    try:
        cfg = srv.start_session("too-dark", calibration_s=0)
        assert cfg["policy"]["rules"]["TOO_DARK"]["trigger_after_s"] == 2.0
        t0 = time.time()
        async with StreamClient.connect(stream_url(cfg)) as c:
            for i in range(16):  # 3 s of a dark room at 5 fps; each frame analysed before the next is sent
                await c.video(black_jpeg(320, 240), t0 + i / 5)
                await c.sync()
            msg = await c.wait_for(lambda m: m["type"] == "alert" and m["alert"]["event_type"] == "TOO_DARK")
            feedback = await c.wait_for(lambda m: m["type"] == "feedback" and m["code"] == "TOO_DARK")
        alert = Alert.model_validate(msg["alert"])  # a valid alert of the canonical schema
        assert alert.incident_state == "started" and "test.mean_luma" in alert.ai_model_source
        assert alert.evidence["brightness"] < 40 and "thumbnail_jpeg_b64" in alert.evidence
        assert feedback["message"] == TOO_DARK.feedback
        with srv.http(ADMIN_KEY) as h:
            assert h.get("/.well-known/ready").json()["models"]["brightness"] == "test.mean_luma"
            metrics = h.get("/metrics").text
        counts = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.splitlines() if ln[:1] != "#"}
        # the stage's cost is measured with no edit elsewhere
        assert counts['proctor_inference_seconds_count{model="test.mean_luma"}'] >= 11
        assert counts['proctor_alerts_total{state="started",type="TOO_DARK"}'] == 1.0
    finally:
        srv.stop()


# ---- the published contract stays honest


def test_published_schema_lists_every_event_type() -> None:
    schema = json.loads((REPO / "docs" / "alert.schema.json").read_text())
    published = schema["$defs"]["EventType"]["enum"]
    assert published == list(event_types())  # regenerate with: python docs/gen_schema.py
    assert {str(s.event_type) for s in catalog.rules()} <= set(published)
    assert set(EventType) <= set(published)


def test_rules_doc_lists_every_catalog_rule() -> None:
    table = (REPO / "docs" / "rules.md").read_text()
    missing = [str(s.event_type) for s in catalog.rules() if f"| {s.event_type} |" not in table]
    assert not missing, f"docs/rules.md has no row for {missing}"


def test_unknown_rule_feature_is_refused() -> None:
    bad: Any = RuleSpec("NEVER_REGISTERED", "no_such_feature", 1.0, 1.0, condition=lambda o, t: True)
    with pytest.raises(ValueError, match="unknown feature"):
        register_rule(bad)
    assert "NEVER_REGISTERED" not in event_types()
