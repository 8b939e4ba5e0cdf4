"""Rules over the session's audio: VOICE_DETECTED (speech heard for longer than trigger_after_s) and
MULTIPLE_SPEAKERS (more than one voice heard within the speaker stage's 10 s window).

Audio rules are catalog entries of kind "audio" (catalog.py). The engine feeds them one `AudioObservation` per
32 ms VAD frame of each analysed audio window (RuleEngine.observe_audio), in capture time, so their timing is as
fine as the VAD's and independent of how the session's audio was cut into windows. They are DurationRules like
the frame rules: hysteresis, cooldown, snapshot / restore across restarts work the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from livekit_proctor.analyzer.detectors.vad import FRAME_S
from livekit_proctor.analyzer.rules.incident import DurationRule, RuleEvent
from livekit_proctor.contracts.alerts import EventType as E
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import RulePolicy

if TYPE_CHECKING:
    from livekit_proctor.analyzer.rules.catalog import Limits, RuleSpec
    from livekit_proctor.analyzer.rules.engine import RuleEngine

VOICE_DETECTED = E.VOICE_DETECTED
MULTIPLE_SPEAKERS = E.MULTIPLE_SPEAKERS
OTHER_VOICE = E.OTHER_VOICE
FEATURE = "audio"
THRESHOLDS = {
    "voice_probability": 0.8,  # a 32 ms frame counts toward VOICE_DETECTED above this speech probability
    # OTHER_VOICE below this mean similarity of the last 10 s of voiced partials to the enrolled voice: the
    # enrollment ROC's equal-error point on the shared LibriSpeech speakers (bench/speakers.py)
    "voice_match": 0.66,
}


@dataclass(slots=True)
class AudioObservation:
    """One 32 ms VAD frame of an analysed audio window."""

    seq: int  # the audio window's number in this session
    ts: float  # capture time of the frame's first sample
    model: str
    speech_probability: float
    values: dict[str, Any] = field(default_factory=dict, repr=False)  # the window's signals (analyzer/stages.py)

    @property
    def preview(self) -> np.ndarray | None:
        return None  # no picture: audio alerts carry no thumbnail

    def evidence(self) -> dict[str, Any]:
        return {"audio_window_seq": self.seq, "speech_probability": round(self.speech_probability, 3)}


class AudioRule(DurationRule[AudioObservation]):
    """A DurationRule over VAD frames; its evidence names audio windows, not video frames."""

    def _event(
        self,
        state: IncidentState,
        ts: float,
        o: AudioObservation | None,
        value: float | None,
        reason: str | None = None,
    ) -> RuleEvent:
        ev = super()._event(state, ts, o, value, reason)
        # The observations' seq numbers are audio windows, not video frames: say so in the evidence's names.
        for which in ("first", "trigger"):
            if f"{which}_frame_seq" in ev.evidence:
                ev.evidence[f"{which}_audio_window_seq"] = ev.evidence.pop(f"{which}_frame_seq")
        ev.evidence.update(self.extra_evidence())
        return ev

    def extra_evidence(self) -> dict[str, Any]:
        """What this rule adds to its events' evidence."""
        return {}


class VoiceRule(AudioRule):
    """Speech probability above `voice_probability` for more than trigger_after_s (short pauses between words,
    under PENDING_GAP_TOLERANCE_S, do not break it). The evidence says how long was voiced and the mean speech
    probability from the condition's start to its last voiced frame (the silence that ends it is not counted)."""

    def __init__(self, spec: RuleSpec, p: RulePolicy, t: Limits) -> None:
        threshold = t.voice_probability
        super().__init__(
            spec.event_type, lambda o: o.speech_probability > threshold, lambda o: o.speech_probability,
            "speech_probability", threshold, p, spec.severity, spec.severity_per_unit,
        )  # fmt: skip
        self._frames = self._voiced = 0
        self._prob_sum = 0.0
        self._upto = (0, 0, 0.0)  # (frames, voiced frames, probability sum) up to the last voiced frame

    def observe(self, o: AudioObservation) -> list[RuleEvent]:
        if self._onset is None:  # a new condition (or none yet): count from here
            self._frames = self._voiced = 0
            self._prob_sum = 0.0
            self._upto = (0, 0, 0.0)
        voiced = self.threshold is not None and o.speech_probability > self.threshold
        self._frames += 1
        self._voiced += voiced
        self._prob_sum += o.speech_probability
        if voiced:
            self._upto = (self._frames, self._voiced, self._prob_sum)
        return super().observe(o)

    def extra_evidence(self) -> dict[str, Any]:
        frames, voiced, prob_sum = self._upto
        if not frames:
            return {}
        return {"voiced_s": round(voiced * FRAME_S, 3), "mean_speech_probability": round(prob_sum / frames, 3)}


def voice_rule(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> VoiceRule:
    return VoiceRule(spec, p, t)


def speakers_heard(o: AudioObservation) -> int | None:
    """Voices the speaker stage heard in its window (detectors/speaker.py Speakers.speakers), or None on a window
    it did not run on (no speech, or the stage is off): such frames neither extend nor break the condition."""
    sp = o.values.get("speakers")
    return None if sp is None else int(sp.speakers)


class SpeakersRule(AudioRule):
    """More than one speaker heard within the speaker stage's 10 s window (each voice at least 2.4 s of it:
    detectors/speaker.py). Needs the speaker stage (PROCTOR_SPEAKER_EMBEDDING); without it the rule sees nothing.
    Evidence: `speakers_in_window` and the session's `speaker_clusters`."""

    def __init__(self, spec: RuleSpec, p: RulePolicy) -> None:
        super().__init__(
            spec.event_type, lambda o: None if (n := speakers_heard(o)) is None else n >= 2, speakers_heard,
            "speakers_in_window", 2.0, p, spec.severity, spec.severity_per_unit,
        )  # fmt: skip
        self._clusters = 0

    def observe(self, o: AudioObservation) -> list[RuleEvent]:
        sp = o.values.get("speakers")
        if sp is not None:
            self._clusters = int(sp.clusters)
        return super().observe(o)

    def extra_evidence(self) -> dict[str, Any]:
        return {"speaker_clusters": self._clusters}


def speakers_rule(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> SpeakersRule:
    return SpeakersRule(spec, p)


def enrolled_similarity(o: AudioObservation) -> float | None:
    """Mean similarity of the speaker stage's last 10 s of voiced partials to the enrolled voice, or None (no
    enrolled voice yet, no voiced partial in the window, or the stage did not run on this window)."""
    sp = o.values.get("speakers")
    return None if sp is None or sp.enrolled_similarity is None else float(sp.enrolled_similarity)


class OtherVoiceRule(AudioRule):
    """Voiced audio whose last 10 s do not match the candidate's enrolled voice (mean similarity below
    `voice_match`). The voice is enrolled from the session's first voice (`voice_enroll_s` of its largest speaker
    cluster: the first confident speech, normally the candidate's during calibration). It catches a helper who
    speaks while the candidate stays silent, which MULTIPLE_SPEAKERS alone needs both voices for."""

    def __init__(self, spec: RuleSpec, p: RulePolicy, t: Limits) -> None:
        threshold = t.voice_match
        super().__init__(
            spec.event_type, lambda o: None if (x := enrolled_similarity(o)) is None else x < threshold,
            enrolled_similarity, "enrolled_voice_similarity", threshold, p, spec.severity, spec.severity_per_unit,
        )  # fmt: skip

    def extra_evidence(self) -> dict[str, Any]:
        return {"enrolled_voice": "session"}  # taken from the session's first voice (no recording yet)


def other_voice_rule(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> OtherVoiceRule:
    return OtherVoiceRule(spec, p, t)
