"""Models as stages: what one model declares so that `ModelSet` (pipeline.py) can run it.

A stage names itself, its typed settings, when it is due (rate, motion gate, only with / without a face, only with
speech), the signals it reads and the one signal it writes. `ModelSet` runs the registered stages in order on each
analysed frame (or audio window); their cost shows in the metrics (`proctor_inference_seconds{model}`), in the
`model <name>` trace spans and in `bench/model_cost.py` with no further edit.

Adding a model (docs/architecture.md, "Adding a model"): one module with a `Stage` subclass, and its registration:
a line in BUILTIN_STAGES for a stage shipped here, or `register_stage(MyStage)` from a plugin or a test.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from copy import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.settings import Settings

Media = Literal["video", "audio"]


class StageSettings(BaseSettings):
    """A stage's typed settings. Fields are read from PROCTOR_<FIELD> (like proctor/settings.py); a field of the
    same name in the service's Settings, when there is one, wins, so `proctor config` shows the built-ins."""

    model_config = SettingsConfigDict(env_prefix="PROCTOR_", env_file=".env", extra="ignore")


def service_setting(name: str) -> Any:
    """The field `name` of proctor/settings.py, for a stage whose setting the service lists (`proctor config`,
    docs/operations.md): declared once there, typed and validated the same in the stage."""
    return copy(Settings.model_fields[name])


@dataclass(frozen=True, slots=True)
class Due:
    """When a stage runs, per session. Without a session clock (a single image) every stage runs whose face /
    speech condition holds."""

    interval_s: float = 0.0  # at most once per this much media time (0: every analysed frame or window)
    # Video: once due, skip the run and reuse the last result while the scene moved less than this (mean absolute
    # difference of a 64x48 grey thumbnail against the frame of the last run, grey levels 0-255) ...
    motion_threshold: float | None = None
    max_gated_s: float = 5.0  # ... but run at least this often
    if_face: bool | None = None  # True: only on frames with a face; False: only on frames without one
    if_speech: bool | None = None  # audio: True: only on windows with speech (the "speech" signal); False: without


class Stage(ABC):
    """One model in the pipeline. Constructed once per process (loading its model), then called from inference
    threads: `run` must be thread-safe and must not touch the event loop."""

    name: ClassVar[str]  # the stage's name: settings and `describe()` key, e.g. "objects"
    writes: ClassVar[str]  # the signal it writes (Signals.values key; rules read Observation.values[writes])
    reads: ClassVar[tuple[str, ...]] = ()  # signals of earlier stages it needs
    media: ClassVar[Media] = "video"  # video: an RGB frame (H x W x 3 uint8); audio: a window of int16 mono PCM
    required: ClassVar[bool] = False  # True: the service does not start without it; else a failed load turns it off
    settings_model: ClassVar[type[StageSettings]] = StageSettings

    model: str = ""  # the backend's name: ai_model_source, metrics label, span name
    verified: bool = False  # the model file matched models/manifest.json

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @classmethod
    def enabled(cls, settings: Any) -> bool:
        """False when the settings switch the stage off (then it is not loaded)."""
        return True

    def due(self) -> Due:
        return Due()

    @abstractmethod
    def run(self, media: np.ndarray, signals: Signals) -> Any:
        """The signal for this frame or window; `signals` holds what earlier stages wrote on it."""


S = TypeVar("S")


class StatefulStage(Stage, Generic[S]):
    """A stage whose result depends on what came before in the same stream (an RNN's state, audio left over from
    the previous window). Stage objects are shared by all sessions, so the state is not kept here: each session's
    ModelClock owns one `new_state()` per stateful stage (created on its first run) and `ModelSet` passes it to
    `step`, always from that session's single in-flight job (no lock needed). A unit it was not due on (or switched
    off for) does not reach it: a stage that needs every sample is due on every unit, or handles the gap (`signals.ts`
    says where the stream resumes). docs/architecture.md, "Per-session stage state"."""

    @abstractmethod
    def new_state(self) -> S:
        """A fresh state: the start of a stream."""

    @abstractmethod
    def step(self, media: np.ndarray, signals: Signals, state: S) -> Any:
        """The signal for this unit, continuing `state` (which it updates in place)."""

    def run(self, media: np.ndarray, signals: Signals) -> Any:
        """Without a session (one window on its own): a fresh state."""
        return self.step(media, signals, self.new_state())


# Stages shipped here, in pipeline order ("module:Class", imported when first needed).
BUILTIN_STAGES: tuple[str, ...] = (
    "livekit_proctor.analyzer.detectors.blazeface:FaceStage",
    "livekit_proctor.analyzer.detectors.facemesh:FaceMeshStage",
    "livekit_proctor.analyzer.detectors.faceembed:FaceEmbeddingStage",
    "livekit_proctor.analyzer.detectors.antispoof:AntiSpoofStage",
    "livekit_proctor.analyzer.detectors.objects:ObjectsStage",
    "livekit_proctor.analyzer.detectors.pose:PoseStage",
    "livekit_proctor.analyzer.detectors.segmentation:SegmentationStage",
    "livekit_proctor.analyzer.detectors.vad:VadStage",
    "livekit_proctor.analyzer.detectors.speaker:SpeakerStage",
)
_registered: list[type[Stage]] = []


def register_stage(stage: type[Stage]) -> type[Stage]:
    """Adds a stage after the built-in ones (and those registered before it); usable as a class decorator.
    ModelSets built afterwards run it."""
    if stage not in _registered:
        _registered.append(stage)
    return stage


def unregister_stage(stage: type[Stage]) -> None:
    if stage in _registered:
        _registered.remove(stage)


def _load(path: str) -> type[Stage]:
    module, _, cls = path.partition(":")
    stage: type[Stage] = getattr(importlib.import_module(module), cls)
    return stage


def registered_stages() -> list[type[Stage]]:
    """Every stage in pipeline order: the built-in ones, then the registered ones."""
    return [*(_load(p) for p in BUILTIN_STAGES), *_registered]


def check_order(stages: list[type[Stage]]) -> None:
    """Raises ValueError when a stage reads a signal that no earlier stage of its media writes."""
    written: dict[str, set[str]] = {"video": set(), "audio": set()}
    for s in stages:
        missing = [r for r in s.reads if r not in written[s.media]]
        if missing:
            raise ValueError(f"stage {s.name} reads {missing}, which no earlier {s.media} stage writes")
        written[s.media].add(s.writes)
