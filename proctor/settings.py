"""All settings in one place. Environment variables prefixed PROCTOR_ (or a .env file) override them.

The LiveKit credentials also come from LiveKit's own LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET (as
livekit-agents and the `lk` CLI read them); PROCTOR_LIVEKIT_* override those.

docs/operations.md lists every setting; `proctor config` prints the effective values.
"""

from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# json_schema_extra of a setting whose value is secret: `proctor config` (Settings.redacted) masks it.
SECRET: dict[str, Any] = {"secret": True}
# Names that say "secret" (file paths aside): masked even when a new setting forgets the marker.
_SECRET_NAME = re.compile(r"secret|passw|credential|private|token|key(?!.*_file$)")
# A password inside any value: scheme://user:password@host, ?password=... (Redis, Postgres, Kafka SASL URLs).
_URL_PASSWORD = re.compile(r"(://[^/@\s:,]*:)[^@\s]+@")
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|secret|token|api_key|sslpassword)=)[^&\s,]+", re.IGNORECASE)


def redact_url(value: str) -> str:
    """`value` with the passwords of any URLs in it replaced by ***."""
    return _QUERY_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", value))


class Settings(BaseSettings):
    # populate_by_name: Settings(livekit_url=...) still works for the fields whose variables are aliases.
    model_config = SettingsConfigDict(env_prefix="PROCTOR_", env_file=".env", extra="ignore", populate_by_name=True)

    # --- server
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = Field(
        default=None, description="Base URL clients use to reach this server (default http://host:port)"
    )
    data_dir: Path = Field(default=Path("proctor-data"), description="SQLite database, JSONL outbox, secrets")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/proctor.db (Postgres in production)"
    )
    node_id: str = Field(default_factory=socket.gethostname)
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line; text: readable lines for development"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    max_request_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Largest REST request body (413 beyond); a route may declare more"
    )

    # --- auth
    api_keys: str = Field(
        default="",
        description="Static API keys 'key:role,key:role' (roles: system, proctor, admin), besides those in the DB",
        json_schema_extra=SECRET,
    )
    stream_secret: str | None = Field(
        default=None,
        description="HMAC secret for stream tokens; generated into data_dir when unset",
        json_schema_extra=SECRET,
    )
    stream_token_ttl_s: int = 900
    embedding_key: str | None = Field(
        default=None,
        description="Current key for face embeddings at rest: base64 of 32 bytes (AES-256-GCM); "
        "default: <data_dir>/embedding-keys, generated on first use",
        json_schema_extra=SECRET,
    )
    embedding_old_keys: str = Field(
        default="",
        description="Earlier embedding keys, comma-separated base64, still readable (rotation)",
        json_schema_extra=SECRET,
    )
    legacy_ws_auth: str = Field(
        default="token",
        description="Auth on the /ws/proctor/... endpoints: 'token' (stream token as ?token=) or 'none' "
        "(old clients unchanged; only for sessions started through the authenticated REST API)",
    )
    legacy_audio_sample_rate: int = Field(
        default=16_000,
        ge=8_000,
        le=192_000,
        description="Sample rate (Hz) of PCM on /ws/proctor/{id}/audio when the client names none "
        "(?sample_rate=); other rates are resampled to 16 kHz. 48000 for LiveKit clients that send their "
        "default frames",
    )
    metrics_public: bool = Field(default=False, description="Serve /metrics without an API key")

    # --- sessions
    session_ttl_s: int = Field(default=4 * 3600, description="An active session expires after this long")
    ended_session_retention_s: int = Field(default=3600, description="Ended sessions stay queryable this long")
    expiry_sweep_s: float = Field(
        default=30.0, gt=0, description="How often sessions past expires_at are ended (in memory or in the database)"
    )

    # --- streaming
    video_fps: float = Field(default=5.0, description="Frames analysed per second per session")
    max_frame_bytes: int = Field(default=2 * 1024 * 1024, description="Largest accepted JPEG")
    max_frame_pixels: int = Field(
        default=1920 * 1080, gt=0, description="Largest accepted frame (width x height), read from the JPEG header"
    )
    max_audio_chunk_bytes: int = 64 * 1024
    max_clock_skew_s: float = Field(
        default=600.0, gt=0, description="Capture and control times must lie within this of the server clock"
    )
    incident_burst: int = Field(
        default=10, ge=0, description="Incidents a session may raise per type before the rate limit (0: no limit)"
    )
    incident_refill_s: float = Field(default=60.0, gt=0, description="One more incident per type after this long")
    state_flush_s: float = Field(
        default=5.0, gt=0, description="Counters and rule state of live sessions are saved at least this often"
    )
    audio_queue_seconds: float = Field(default=10.0, description="Audio buffered per session before backpressure")
    heartbeat_s: float = 10.0
    subscriber_queue: int = Field(default=256, description="Messages buffered per events subscriber")
    verify_frame_buffer_s: float = Field(
        default=5.0, gt=0, description="Media time of received frames kept per session for verify-frame"
    )
    verify_frame_buffer_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="JPEG bytes kept per session for verify-frame (the frames as received, not decoded)",
    )
    enrollment_recheck_s: float = Field(
        default=30.0,
        ge=0,
        description="Verifying sessions re-check their candidate's enrollment id this often, to see a change made "
        "through another analyzer sharing the database (one query per check for all sessions; 0: never)",
    )

    # --- inference (the model fields below are declared here once and read by their stages through
    # analyzer/stages.py service_setting; a new stage declares its own settings in its module)
    inference_workers: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1))
    face_model: str = Field(default="full", description="BlazeFace variant: full (counting) or short")
    face_score_threshold: float = Field(
        default=0.4, description="BlazeFace score threshold (0.3-0.4 count best on webcam frames)"
    )

    face_mesh: bool = Field(default=True, description="Face mesh with iris: head pose and gaze")
    face_embedding: bool = Field(
        default=True,
        description="Face embeddings (HSE FaceRes) for continuous verification: loaded at start, run only in "
        "sessions that verify an enrolled candidate, every verification_policy.interval_s (false: no "
        "continuous verification; enrollment and verify compute theirs regardless)",
    )
    antispoof: bool = Field(
        default=False,
        description="Presentation-attack scores (human-models antispoof + liveness CNNs, a labelled heuristic) of "
        "the largest face every 1 s; off: measured unreliable on webcam frames (models/antispoof/README.md)",
    )
    objects_model: str = Field(
        default="nanodet",
        description="Person / phone detector: nanodet (shipped), yolo:/path/model.onnx, ultralytics:/path.pt, none",
    )
    objects_fps: float = Field(default=1.0, gt=0, description="Object detector runs per second per session")
    motion_threshold: float = Field(
        default=3.0, ge=0, description="Object detection skipped while the scene moves less than this (grey levels)"
    )
    body_pose: bool = Field(default=True, description="Body pose: shoulders in frame, hand near ear")
    pose_fps: float = Field(default=2.0, gt=0, description="Body pose runs per second per session")
    segmentation: bool = Field(default=True, description="Person segmentation when no face is found (presence)")
    vad: bool = Field(default=True, description="Voice activity (Silero VAD) on session audio: the speech signal")
    vad_threshold: float = Field(
        default=0.55, ge=0, le=1, description="Speech probability above which a 32 ms audio frame counts as voiced"
    )
    speaker_embedding: bool = Field(
        default=False,
        description="Speaker embeddings on voiced audio (Resemblyzer): counting speakers (MULTIPLE_SPEAKERS), the "
        "enrolled voice (OTHER_VOICE). Off by default: counting is weak on meeting-like audio (bench/speakers.py)",
    )
    speaker_threshold: float = Field(
        default=0.67, ge=-1, le=1, description="Cosine similarity at which a voice joins a speaker cluster"
    )
    voice_enroll_s: float = Field(
        default=4.0,
        ge=0,
        le=60,
        description="Seconds of the first voice a session hears (its largest speaker cluster) that enroll it as the "
        "candidate's voice, for OTHER_VOICE; 0: no enrollment from the session",
    )

    # --- outbox and dispatcher
    outbox: str = Field(default="sql", description="Where alerts wait for delivery: sql (embedded) or redis")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis for the outbox stream")
    outbox_stream: str = Field(default="proctor:alerts", description="Redis Stream of the outbox")
    dispatcher_embedded: bool = Field(default=True, description="Run the dispatcher inside `proctor serve`")
    dispatch_mode: str = Field(default="fanout", description="fanout (every transport) or fallback (first that works)")
    dispatch_order: str = Field(default="grpc,kafka,webhook,redis,livekit", description="Fallback chain order")
    dispatch_max_attempts: int = Field(default=5, ge=1, description="Attempts before an alert is dead-lettered")
    dispatcher_id: str | None = Field(default=None, description="Consumer name (default host-pid)")
    dispatcher_host: str = "127.0.0.1"
    dispatcher_port: int = Field(default=8081, description="`proctor dispatcher`: /metrics and health")
    claim_idle_s: float = Field(default=30.0, description="Redis: claim a dead dispatcher's entries after this")
    grpc_target: str | None = Field(default=None, description="gRPC delivery target host:port")
    grpc_tls: bool = False
    grpc_ca_file: str | None = None
    grpc_cert_file: str | None = Field(default=None, description="Client certificate (mTLS)")
    grpc_key_file: str | None = None
    kafka_bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers")
    kafka_topic: str = "proctoring.alerts.v1"
    kafka_dlq_topic: str = "proctoring.alerts.dlq"
    kafka_idempotence: str = Field(default="auto", description="auto (fall back if the broker refuses), true, false")
    webhook_url: str | None = Field(default=None, description="Webhook endpoint (Standard Webhooks)")
    webhook_secrets: str = Field(
        default="", description="Comma-separated whsec_ secrets (several for rotation)", json_schema_extra=SECRET
    )
    webhook_timeout_s: float = 5.0
    webhook_concurrency: int = Field(
        default=1, ge=1, le=64, description="Parallel POSTs (across sessions; each session stays in order)"
    )
    redis_publish_stream: str | None = Field(default=None, description="Also XADD every alert to this stream")
    agent_name: str = Field(default="proctor", description="Agent name for explicit dispatch")
    livekit_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROCTOR_LIVEKIT_URL", "LIVEKIT_URL"),
        description="LiveKit server (PROCTOR_LIVEKIT_URL, else LIVEKIT_URL)",
    )
    livekit_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROCTOR_LIVEKIT_API_KEY", "LIVEKIT_API_KEY"),
        json_schema_extra=SECRET,
    )
    livekit_api_secret: str | None = Field(
        default=None,
        validation_alias=AliasChoices("PROCTOR_LIVEKIT_API_SECRET", "LIVEKIT_API_SECRET"),
        json_schema_extra=SECRET,
    )
    room_transport: bool = Field(default=False, description="Dispatcher sends alerts into the room (no agent)")

    # --- outbox (embedded)
    outbox_jsonl: Path | None = Field(
        default=None, description="JSONL copy of every alert; default <data_dir>/alerts.jsonl"
    )

    # --- retention (0 keeps that kind of data forever; docs/operations.md "How long each kind of data lives")
    outbox_retention_s: int = Field(
        default=7 * 86400, ge=0, description="Outbox rows every lane delivered are deleted this long after append"
    )
    alerts_jsonl_retention_s: int = Field(
        default=7 * 86400, ge=0, description="alerts.jsonl lines are removed this long after the alert's timestamp"
    )
    audit_retention_s: int = Field(default=90 * 86400, ge=0, description="Audit log rows are deleted after this")
    dlq_retention_s: int = Field(
        default=30 * 86400, ge=0, description="Dead letters never replayed are deleted this long after dying"
    )
    identity_retention_s: int = Field(
        default=90 * 86400,
        ge=0,
        description="A candidate's enrollment (embeddings, template) is deleted this long after their last session",
    )
    purge_interval_s: float = Field(
        default=3600.0, ge=0, description="How often the running server applies retention (0: only `proctor purge`)"
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _case_insensitive(cls, v: object, info: ValidationInfo) -> object:
        if not isinstance(v, str):
            return v
        return v.strip().upper() if info.field_name == "log_level" else v.strip().lower()

    def redacted(self) -> dict[str, Any]:
        """The effective settings as JSON with every secret masked (`proctor config`)."""
        out = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            value = out.get(name)
            if (extra.get("secret") or _SECRET_NAME.search(name)) and isinstance(value, str | list | dict) and value:
                out[name] = "***"
            elif isinstance(value, str):
                out[name] = redact_url(value)
        return out

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'proctor.db').as_posix()}"

    def resolved_outbox_jsonl(self) -> Path:
        return self.outbox_jsonl or self.data_dir / "alerts.jsonl"

    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


def env_name(field: str) -> str:
    """The environment variable of a setting (its first alias where it has several)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field if field.isupper() else f"PROCTOR_{field.upper()}"


def describe_settings_error(e: ValidationError) -> str:
    """One line naming each bad variable and why, never its value (it may be a secret)."""
    parts = []
    for err in e.errors(include_url=False, include_input=False, include_context=False):
        loc = str(err["loc"][0]) if err["loc"] else "settings"
        msg = err["msg"]
        parts.append(f"{env_name(loc)}: {msg[:1].lower()}{msg[1:]}")
    return "; ".join(parts)


@lru_cache
def get_settings() -> Settings:
    return Settings()
