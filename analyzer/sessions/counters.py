"""A session's counters: kept in memory, saved in its row (SessionRow.counters), shown in its state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from livekit_proctor.contracts.api import SessionCounters
from livekit_proctor.contracts.wire import AUDIO_SAMPLE_RATE, AUDIO_SAMPLE_WIDTH

_INTS = (
    "frames_received",
    "frames_analysed",
    "frames_dropped",
    "frames_rejected",
    "frames_sampled_out",
    "audio_chunks",
    "audio_rejected",
    "messages_malformed",
    "feedback_sent",
    "worker_errors",
)


@dataclass
class Counters:
    frames_received: int = 0
    frames_analysed: int = 0
    frames_dropped: int = 0  # replaced by a newer frame before analysis (latest-wins)
    frames_sampled_out: int = 0  # above the session's analysis rate
    frames_rejected: int = 0  # oversize, not JPEG, undecodable
    audio_chunks: int = 0
    audio_bytes: int = 0
    audio_analysed_bytes: int = 0  # went through the audio stages (all of audio_bytes once the queue is drained)
    audio_rejected: int = 0
    messages_malformed: int = 0
    feedback_sent: int = 0
    worker_errors: int = 0  # exceptions in this session's workers (each logged; the worker restarted)
    alerts_by_type: Counter[str] = field(default_factory=Counter)
    incidents_suppressed: Counter[str] = field(default_factory=Counter)  # over the rate limit (rules/limits.py)

    @property
    def audio_seconds(self) -> float:
        return round(self.audio_bytes / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH), 3)

    def public(self) -> SessionCounters:
        return SessionCounters(
            **{k: getattr(self, k) for k in _INTS},
            audio_seconds=self.audio_seconds,
            audio_analysed_seconds=round(self.audio_analysed_bytes / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH), 3),
            alerts_by_type=dict(self.alerts_by_type),
            incidents_suppressed=dict(self.incidents_suppressed),
        )

    def to_json(self) -> dict[str, Any]:
        d = self.public().model_dump()
        d["audio_bytes"] = self.audio_bytes  # exact; audio_seconds is rounded
        d["audio_analysed_bytes"] = self.audio_analysed_bytes
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counters:
        c = cls()
        for k in _INTS:
            setattr(c, k, int(d.get(k, 0)))
        c.audio_bytes = int(
            d.get("audio_bytes", float(d.get("audio_seconds", 0)) * AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)
        )
        c.audio_analysed_bytes = int(d.get("audio_analysed_bytes", 0))
        c.alerts_by_type = Counter(d.get("alerts_by_type", {}))
        c.incidents_suppressed = Counter(d.get("incidents_suppressed", {}))
        return c
