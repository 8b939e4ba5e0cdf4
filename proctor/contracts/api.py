"""REST bodies of the analyzer API (/api/v1/...)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator, model_validator

from livekit_proctor.contracts.alerts import check_room_keys

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
    "presentation_attack",
    "antispoof_model",
)
# Features that are off unless a session names them (features_enabled: in a list, or true in an object): the
# presentation-attack heuristics (SPOOF_SUSPECTED, docs/rules.md "Presentation attacks"), whose false alarms on
# real candidates are measured on very little data.
OPT_IN_FEATURES = ("presentation_attack", "antispoof_model")


def feature_default(name: str) -> bool:
    """Whether a feature the session does not name is on."""
    return name not in OPT_IN_FEATURES


# Free-form JSON a client may store with a session (metadata, extra verification fields): it is kept in the
# database and echoed back, so its size and nesting are bounded (422 beyond).
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 8
EXTRA_MAX_BYTES = 4 * 1024
Name = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, [] and {} are 1); iterative, so no recursion limit."""
    depth, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list | tuple):
            depth = max(depth, d + 1)
            stack.extend((x, d + 1) for x in v)
    return depth


def check_bounded_json(value: Any, what: str, max_bytes: int, max_depth: int = METADATA_MAX_DEPTH) -> Any:
    """Raises ValueError (a 422 with this reason) when `value` nests deeper or serializes larger than allowed."""
    depth = json_depth(value)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep; at most {max_depth} allowed")
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
    except ValueError:  # Python's JSON parser takes NaN and Infinity; JSON (and Postgres) do not
        raise ValueError(f"{what} holds a non-finite number (NaN or Infinity)") from None
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes as JSON; at most {max_bytes} allowed")
    return value


class VerificationPolicy(BaseModel):
    """Face checks against the candidate's enrollment (docs/rules.md, "Face verification"), opt-in per session:
    none (the default: no checks, nothing said about identity); start (checks until the first match); periodic
    or continuous (a check every interval_s of analysed video all session long; the two are the same today). A
    verifying session whose candidate has no enrollment raises IDENTITY_UNVERIFIED once. threshold: cosine
    similarity below which a check is a mismatch (default: the model's MATCH_THRESHOLD, 0.60)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    mode: Literal["none", "start", "periodic", "continuous"] = "none"
    interval_s: float = Field(default=2.0, gt=0, le=3600, description="Seconds of analysed video between checks")
    threshold: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _bounded_extra(self) -> VerificationPolicy:
        if self.model_extra:
            check_bounded_json(self.model_extra, "verification_policy's extra fields", EXTRA_MAX_BYTES)
        return self


class RuleOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    enabled: bool | None = None
    trigger_after_s: float | None = Field(default=None, ge=0, le=3600)
    clear_after_s: float | None = Field(default=None, ge=0, le=3600)
    cooldown_s: float | None = Field(default=None, ge=0, le=3600)


class Thresholds(BaseModel):
    """Measured-value thresholds of the rules (degrees are relative to the calibrated baseline)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


# Names the server knows, listed in the schema; checked by validators with a message naming the unknown ones.
FeatureName = Annotated[Name, WithJsonSchema({"type": "string", "enum": list(FEATURES)})]
ThresholdName = Annotated[Name, WithJsonSchema({"type": "string", "enum": list(Thresholds.model_fields)})]


class SessionStartRequest(BaseModel):
    # Strict: a number is a number (not "5" or false), as the schema says. NaN / Infinity (which Python's JSON
    # parser accepts) would not survive a round trip through the database.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    exam_session_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    candidate_id: str = Field(min_length=1, max_length=128)
    exam_id: str = Field(min_length=1, max_length=128)
    frontend_instance_id: str | None = Field(default=None, max_length=128)
    verification_policy: VerificationPolicy = Field(default_factory=VerificationPolicy)
    features_enabled: (
        Annotated[list[FeatureName], Field(max_length=2 * len(FEATURES))]
        | Annotated[dict[FeatureName, bool], Field(max_length=2 * len(FEATURES))]
        | None
    ) = None
    sensitivity: Sensitivity = "medium"
    video_fps: float | None = Field(default=None, gt=0, le=30)
    rules: dict[Name, RuleOverride] = Field(default_factory=dict, max_length=64, description="Per-exam rule overrides")
    thresholds: dict[ThresholdName, float] = Field(
        default_factory=dict, max_length=len(Thresholds.model_fields), description="Overrides of Thresholds fields"
    )
    calibration_s: float | None = Field(default=None, ge=0, le=600, description="Calibration period (default 30 s)")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Free-form JSON kept with the session: at most {METADATA_MAX_BYTES} bytes serialized, "
        f"nested at most {METADATA_MAX_DEPTH} levels",
    )

    @field_validator("features_enabled")
    @classmethod
    def _known_features(cls, v: list[str] | dict[str, bool] | None) -> list[str] | dict[str, bool] | None:
        names = list(v) if v is not None else []
        unknown = sorted(set(names) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {list(FEATURES)}")
        return v

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_bounded_json(v, "metadata", METADATA_MAX_BYTES)

    @field_validator("metadata")
    @classmethod
    def _room_keys_typed(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_room_keys(v)  # alerts carry them as typed fields (AlertMetadata)
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
    audio_analysed_seconds: float = Field(
        default=0.0,
        description="Audio that went through the audio stages (voice activity); equals audio_seconds "
        "once the session's audio queue is drained (audio is never dropped)",
    )
    audio_rejected: int = 0
    messages_malformed: int = 0
    feedback_sent: int = 0
    worker_errors: int = Field(default=0, description="Internal errors in the session's analysis (each recovered)")
    alerts_by_type: dict[str, int] = Field(default_factory=dict, description="Incidents reported, by type")
    incidents_suppressed: dict[str, int] = Field(
        default_factory=dict, description="Incidents not reported because of the per-session rate limit, by type"
    )


class FaceVerification(BaseModel):
    """The session's latest conclusive face check (low-quality frames are skipped, not checks)."""

    at: str = Field(description="Server time of the check, ISO 8601")
    similarity: float = Field(description="Cosine similarity to the enrollment (best enrolled embedding)")
    match: bool = Field(description="similarity >= the policy's threshold")


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
    last_face_verification: FaceVerification | None = None
    policy: EffectivePolicy
    metadata: dict[str, Any]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the REST API (the 422 of a malformed request is a ValidationErrorBody)."""

    error: str = Field(description="What went wrong, for a human")
    detail: Any = None


class ValidationIssue(BaseModel):
    loc: list[str] = Field(description='Where: ["body", "metadata"], ["query", "limit"], ...')
    msg: str


class ValidationErrorBody(BaseModel):
    """422: the request did not validate; one issue per bad field."""

    error: str = Field(description='"invalid request"')
    detail: list[ValidationIssue]


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    uptime_s: float


class Readiness(BaseModel):
    """200 when ready, 503 (same body) when not."""

    ready: bool
    models: dict[str, Any] | None = Field(description="Loaded models; null while loading")
    dispatcher: dict[str, Any] = Field(description="State of the outbox (ok: accepting alerts)")
    inference_workers: int
    delivery: dict[str, Any] | None = Field(default=None, description="Embedded dispatcher's lanes, when it runs")


class AdminSessions(BaseModel):
    sessions: list[SessionState]


class AdminTotals(BaseModel):
    frames_received: int
    frames_analysed: int
    frames_dropped: int
    audio_seconds: float


class AdminStats(BaseModel):
    node_id: str
    active_sessions: int
    connected_streams: int
    inference_inflight: int
    inference_workers: int
    totals: AdminTotals
    alerts_by_type: dict[str, int]
    dispatcher: dict[str, Any]
