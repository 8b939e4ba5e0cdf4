"""Agent settings, from PROCTOR_ environment variables (or .env), kept apart from the analyzer's Settings.

LiveKit credentials fall back to the LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET variables that
livekit-agents itself reads.
"""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROCTOR_", env_file=".env", extra="ignore")

    livekit_url: str | None = None
    livekit_api_key: str | None = None
    livekit_api_secret: str | None = None
    agent_name: str = Field(default="proctor", description="Explicit-dispatch name of the worker")
    analyzer_url: str = Field(default="http://127.0.0.1:8080", description="Base URL of the analyzer REST API")
    analyzer_api_key: str | None = Field(default=None, description="Analyzer API key with role system")
    agent_video_long_side: int = Field(default=640, gt=0, description="Frames are downscaled to this long side")
    agent_jpeg_quality: int = Field(default=80, ge=1, le=100)
    agent_max_sessions: int = Field(default=8, gt=0, description="Candidate sessions at which the worker is full")
    agent_audio_buffer_s: float = Field(
        default=30.0, gt=0, description="Audio kept while the analyzer is unreachable; older audio is dropped"
    )
    agent_leave_grace_s: float = Field(
        default=30.0, ge=0, description="A candidate who left and is not back within this ends the session"
    )

    log_format: str | None = Field(
        default=None, description="json or text; default json for `start`, text for `dev` (PROCTOR_LOG_FORMAT)"
    )
    log_level: str | None = Field(default=None, description="default INFO for `start`, DEBUG for `dev`")

    def resolved_livekit(self) -> tuple[str, str, str]:
        """(url, key, secret); empty strings where neither PROCTOR_LIVEKIT_* nor LIVEKIT_* is set."""
        return (
            self.livekit_url or os.environ.get("LIVEKIT_URL", ""),
            self.livekit_api_key or os.environ.get("LIVEKIT_API_KEY", ""),
            self.livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET", ""),
        )
