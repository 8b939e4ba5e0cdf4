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
    trigger_after_s: float | None = Field(default=None, gt=0, le=3600)
    clear_after_s: float | None = Field(default=None, ge=0, le=3600)


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


class EffectivePolicy(BaseModel):
    sensitivity: Sensitivity
    features: dict[str, bool]
    video_fps: float
    verification: VerificationPolicy
    rules: dict[str, RulePolicy]


class CalibrationSettings(BaseModel):
    duration_s: float = 30.0
    min_frames: int = 50


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
    alerts_by_type: dict[str, int] = Field(default_factory=dict)


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
    last_verification_at: str | None
    policy: EffectivePolicy
    metadata: dict[str, Any]


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
