"""REST bodies of the analyzer API (/api/v1/...)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Sensitivity = Literal["low", "medium", "high"]

# Feature names a session can switch on or off; unknown names are rejected (422).
FEATURES = (
    "face_detection",
    "multiple_faces",
    "face_verification",
    "gaze",
    "head_pose",
    "objects",
    "body_pose",
    "audio",
)


class VerificationPolicy(BaseModel):
    model_config = ConfigDict(extra="allow")

    mode: Literal["none", "start", "periodic", "continuous"] = "periodic"
    interval_s: float = Field(default=60.0, gt=0)
    threshold: float | None = Field(default=None, ge=0, le=1)


class RuleOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    trigger_after_s: float | None = Field(default=None, ge=0, le=3600)
    clear_after_s: float | None = Field(default=None, ge=0, le=3600)
    cooldown_s: float | None = Field(default=None, ge=0, le=3600)


class Thresholds(BaseModel):
    """Measured-value thresholds of the rules (degrees are relative to the calibrated baseline)."""

    model_config = ConfigDict(extra="forbid")

    gaze_yaw_deg: float = Field(default=25.0, gt=0, description="|gaze yaw| beyond this is off screen")
    gaze_pitch_up_deg: float = Field(default=20.0, gt=0)
    gaze_pitch_down_deg: float = Field(default=25.0, gt=0)
    head_down_pitch_deg: float = Field(default=-30.0, lt=0, description="HEAD_DOWN below this pitch")
    head_turn_yaw_deg: float = Field(default=45.0, gt=0, description="HEAD_TURNED_AWAY beyond this |yaw|")
    movement_deg_s: float = Field(default=60.0, gt=0, description="SUSPICIOUS_MOVEMENT above this head speed")
    presence_loss_ratio: float = Field(default=0.2, gt=0, lt=1, description="face area vs baseline")
    phone_score: float = Field(default=0.45, gt=0, le=1)
    person_score: float = Field(default=0.5, gt=0, le=1, description="person box score to count a person")
    presence_person_score: float = Field(default=0.35, gt=0, le=1, description="person box score for presence")
    presence_segmentation: float = Field(
        default=0.08, gt=0, lt=1, description="share of the frame segmented as person that means someone is there"
    )
    distraction_count: int = Field(default=5, ge=1, description="FREQUENT_DISTRACTION above this many")
    distraction_window_s: float = Field(default=60.0, gt=0)
    camera_timeout_s: float = Field(default=10.0, gt=0, description="CAMERA_OFF after this long without frames")
    hand_ear_ratio: float = Field(default=0.6, gt=0, description="hand-ear distance / shoulder width")


class SessionStartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exam_session_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    candidate_id: str = Field(min_length=1, max_length=128)
    exam_id: str = Field(min_length=1, max_length=128)
    frontend_instance_id: str | None = Field(default=None, max_length=128)
    verification_policy: VerificationPolicy = Field(default_factory=VerificationPolicy)
    features_enabled: list[str] | dict[str, bool] | None = None
    sensitivity: Sensitivity = "medium"
    video_fps: float | None = Field(default=None, gt=0, le=30)
    rules: dict[str, RuleOverride] = Field(default_factory=dict, description="Per-exam rule overrides")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Overrides of Thresholds fields")
    calibration_s: float | None = Field(default=None, ge=0, le=600, description="Calibration period (default 30 s)")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("features_enabled")
    @classmethod
    def _known_features(cls, v: list[str] | dict[str, bool] | None) -> list[str] | dict[str, bool] | None:
        names = list(v) if v is not None else []
        unknown = sorted(set(names) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {list(FEATURES)}")
        return v


class RulePolicy(BaseModel):
    enabled: bool
    trigger_after_s: float
    clear_after_s: float
    cooldown_s: float = 0.0


class CalibrationSettings(BaseModel):
    """The first duration_s of media time set the candidate's baseline (head pose, gaze, face size)."""

    duration_s: float = 30.0
    min_frames: int = 50


class EffectivePolicy(BaseModel):
    sensitivity: Sensitivity
    features: dict[str, bool]
    video_fps: float
    verification: VerificationPolicy
    rules: dict[str, RulePolicy]
    thresholds: Thresholds = Field(default_factory=Thresholds)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)


class SessionConfig(BaseModel):
    """Answer to session start: everything a streaming client needs."""

    exam_session_id: str
    candidate_id: str
    state: str
    stream_url: str
    stream_token: str
    stream_token_expires_at: str
    legacy_endpoints: dict[str, str]
    policy: EffectivePolicy
    calibration: CalibrationSettings
    protocol_version: int
    expires_at: str
    created: bool = Field(description="False when an active session for the same candidate was returned")


class SessionCounters(BaseModel):
    frames_received: int = 0
    frames_analysed: int = 0
    frames_dropped: int = 0
    frames_sampled_out: int = 0
    frames_rejected: int = 0
    audio_chunks: int = 0
    audio_seconds: float = 0.0
    audio_rejected: int = 0
    messages_malformed: int = 0
    feedback_sent: int = 0
    worker_errors: int = Field(default=0, description="Internal errors in the session's analysis (each recovered)")
    alerts_by_type: dict[str, int] = Field(default_factory=dict, description="Incidents reported, by type")
    incidents_suppressed: dict[str, int] = Field(
        default_factory=dict, description="Incidents not reported because of the per-session rate limit, by type"
    )


class SessionState(BaseModel):
    exam_session_id: str
    candidate_id: str
    exam_id: str
    frontend_instance_id: str | None
    state: Literal["active", "ended", "expired"]
    created_at: str
    ended_at: str | None
    expires_at: str
    connected: bool
    counters: SessionCounters
    open_incidents: list[dict[str, Any]]
    risk: dict[str, Any] = Field(
        default_factory=dict, description="score 0-100, band, the incidents that raised it, calibration baseline"
    )
    last_verification_at: str | None
    policy: EffectivePolicy
    metadata: dict[str, Any]


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
