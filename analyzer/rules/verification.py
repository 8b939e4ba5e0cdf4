"""Continuous face verification: the session's face checks against the candidate's enrollment (FACE_MISMATCH).

The face-embedding stage (detectors/faceembed.py) embeds the faces in view every `verification_policy.interval_s`
of analysed video while this session wants checks (the session switches the stage per session, ModelClock.off).
On each frame where it ran, `Verifier.observe` makes at most one check:

* which face: the candidate's, i.e. the face verified last, followed by box overlap / position; with no tracked
  face (the first check, or it left the picture) the face that is most similar to the enrollment, so a second
  person in view is never checked instead of the candidate (MULTIPLE_FACES covers them), and a larger face
  nearer the camera is not taken for the candidate;
* not verifiable (faceembed.verification_problem: no face-mesh landmarks, a weak detection) or low quality
  (FaceQuality.score below `face_verification_min_quality`: small, blurred, dark, turned far away): the check
  is skipped, neither a mismatch nor a match;
* similarity: faceembed.match_score, the score the /verify route uses too: the mean cosine similarity over the
  enrollment's selected embeddings (all of them when none is marked selected, the mean template when no vector
  is there), against the same MATCH_THRESHOLD. bench/face_verification.py measured it on verifiable webcam
  faces: one enrolled frame FRR 2.4% / FAR 2.3% per check at 0.60, three enrolled frames 1.7% / 2.4%. A
  false FACE_MISMATCH accuses a candidate: three consecutive mismatching checks are needed, so one bad check
  does not raise it;
* `consecutive`: checks below the threshold in a row; a match resets it, a skipped check does not.

The FACE_MISMATCH rule (catalog.py, built by `mismatch_rule`) starts an incident when `consecutive` reaches
MISMATCHES_TO_ALERT. A session without an enrollment raises IDENTITY_UNVERIFIED (a control rule) once instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from livekit_proctor.analyzer.detectors.base import Box
from livekit_proctor.analyzer.detectors.faceembed import (
    MATCH_THRESHOLD,
    FaceEmbedding,
    FaceEmbeddingStage,
    match_score,
    verification_problem,
)
from livekit_proctor.analyzer.fusion import Observation
from livekit_proctor.analyzer.rules.incident import DurationRule, RuleEvent
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import EffectivePolicy, RulePolicy

if TYPE_CHECKING:
    from livekit_proctor.analyzer.rules.catalog import Limits, RuleSpec
    from livekit_proctor.analyzer.rules.engine import RuleEngine
    from livekit_proctor.identity_store import Enrollment

STAGE = FaceEmbeddingStage.name
SIGNAL = FaceEmbeddingStage.writes
MISMATCHES_TO_ALERT = 3  # the issue: FACE_MISMATCH after 3 consecutive checks below the threshold
DEFAULT_MIN_QUALITY = 0.3  # FaceQuality.score below this: the check is skipped (catalog threshold)
TRACK_IOU = 0.3  # a face overlapping the tracked box this much is the tracked face


@dataclass(frozen=True, slots=True)
class Reference:
    """The enrolled faces a check compares with: embedding ids and unit vectors (N, 1024)."""

    ids: tuple[str, ...]
    vectors: np.ndarray

    @classmethod
    def from_enrollment(cls, e: Enrollment) -> Reference | None:
        usable = [x for x in e.embeddings if x.vector is not None]
        chosen = [x for x in usable if x.selected] or usable
        if chosen:
            vecs = np.stack([np.asarray(x.vector, np.float32) for x in chosen])
            ids = tuple(x.embedding_id for x in chosen)
        elif e.template is not None:
            vecs, ids = np.asarray(e.template, np.float32)[None, :], (f"template:{e.enrollment_id}",)
        else:
            return None
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return cls(ids, vecs)

    def best(self, embedding: np.ndarray) -> tuple[float, str]:
        """(match_score against the enrolled embeddings, the id of the most similar one)."""
        score, i = match_score(self.vectors, embedding)
        return score, self.ids[i]


@dataclass(frozen=True, slots=True)
class Check:
    """One conclusive face check."""

    ts: float  # media time of the frame
    seq: int
    at: str  # wall time, ISO 8601 (heartbeats, session state)
    similarity: float
    match: bool
    threshold: float
    embedding_id: str  # the enrolled embedding that scored best
    quality: float  # FaceQuality.score of the checked face
    consecutive: int  # mismatches in a row, this one included (0 on a match)
    box: tuple[float, float, float, float]

    def public(self) -> dict[str, Any]:
        return {"at": self.at, "similarity": round(self.similarity, 4), "match": self.match}


def _iou(a: Box, b: tuple[float, float, float, float]) -> float:
    bx, by, bw, bh = b
    ix = max(0.0, min(a.x + a.w, bx + bw) - max(a.x, bx))
    iy = max(0.0, min(a.y + a.h, by + bh) - max(a.y, by))
    inter = ix * iy
    union = a.w * a.h + bw * bh - inter
    return inter / union if union > 0 else 0.0


def _centre_dist(a: Box, b: tuple[float, float, float, float]) -> float:
    return math.hypot(a.x + a.w / 2 - b[0] - b[2] / 2, a.y + a.h / 2 - b[1] - b[3] / 2)


class Verifier:
    """One session's face checks (see the module docstring). Runs on the event loop: a check is a few dot
    products; the embeddings were computed in the inference threads."""

    def __init__(self, policy: EffectivePolicy, min_quality: float = DEFAULT_MIN_QUALITY) -> None:
        v = policy.verification
        self.mode = v.mode
        self.wanted = v.mode != "none" and policy.features.get("face_verification", True)
        self.interval_s = float(v.interval_s)
        self.threshold = float(v.threshold) if v.threshold is not None else MATCH_THRESHOLD
        self.min_quality = min_quality
        self.reference: Reference | None = None
        self.tracked: tuple[float, float, float, float] | None = None  # box of the face verified last
        self.consecutive = 0
        self.skipped = 0  # low-quality checks, for the session's record
        self.last: Check | None = None
        self.verified_once = False

    @property
    def active(self) -> bool:
        """Whether the embedding stage should run for this session now."""
        if not self.wanted or self.reference is None:
            return False
        return not (self.mode == "start" and self.verified_once)

    def enroll(self, reference: Reference | None, *, reset: bool = False) -> None:
        """Compare with `reference` from now on; reset=True (another enrollment, or none) also forgets the checks
        made against the previous one: the mismatch count, the tracked face and the first match."""
        self.reference = reference
        if reset:
            self.consecutive, self.tracked, self.verified_once = 0, None, False

    def _pick(self, faces: list[FaceEmbedding]) -> tuple[FaceEmbedding, bool]:
        """The candidate's face among those embedded, and whether it was found by tracking."""
        if self.tracked is not None:
            t = self.tracked
            best = max(faces, key=lambda f: _iou(f.box, t))
            if _iou(best.box, t) >= TRACK_IOU:
                return best, True
            near = min(faces, key=lambda f: _centre_dist(f.box, t))
            if _centre_dist(near.box, t) < 0.5 * t[2]:  # moved, but less than half a face width
                return near, True
        ref = self.reference
        assert ref is not None
        return max(faces, key=lambda f: ref.best(f.embedding)[0]), False

    def observe(self, o: Observation) -> Check | None:
        """The check made on this frame, or None (no embedding run on it, no face, low quality, no enrollment)."""
        if self.reference is None or SIGNAL not in o.ran:
            return None
        faces: list[FaceEmbedding] = o.values.get(SIGNAL) or []
        if not faces:
            return None
        face, tracked = self._pick(faces)
        if verification_problem(face) is not None or face.quality.score < self.min_quality:
            self.skipped += 1
            return None
        sim, eid = self.reference.best(face.embedding)
        match = sim >= self.threshold
        self.consecutive = 0 if match else self.consecutive + 1
        box = (face.box.x, face.box.y, face.box.w, face.box.h)
        if match or tracked:  # follow the candidate's face; an unmatched stranger is not adopted
            self.tracked = box
        self.verified_once = self.verified_once or match
        self.last = Check(
            ts=o.ts, seq=o.seq, at=datetime.now(UTC).isoformat(), similarity=sim, match=match,
            threshold=self.threshold, embedding_id=eid, quality=face.quality.score, consecutive=self.consecutive,
            box=box,
        )  # fmt: skip
        return self.last

    # ---- persistence (RuleEngine.snapshot)

    def snapshot(self) -> dict[str, Any]:
        return {
            "consecutive": self.consecutive,
            "tracked": list(self.tracked) if self.tracked else None,
            "verified_once": self.verified_once,
            "skipped": self.skipped,
            "last": asdict(self.last) if self.last else None,
        }

    def restore(self, d: dict[str, Any]) -> None:
        self.consecutive = int(d.get("consecutive", 0))
        t = d.get("tracked")
        self.tracked = (float(t[0]), float(t[1]), float(t[2]), float(t[3])) if t else None
        self.verified_once = bool(d.get("verified_once", False))
        self.skipped = int(d.get("skipped", 0))
        last = d.get("last")
        self.last = Check(**{**last, "box": tuple(last["box"])}) if last else None


class MismatchRule(DurationRule):
    """FACE_MISMATCH: the session's latest check is a mismatch, MISMATCHES_TO_ALERT or more in a row. Frames
    without a check say nothing (None); a match is the condition gone (clear_after_s ends the incident)."""

    def __init__(self, spec: RuleSpec, policy: RulePolicy, verifier: Verifier) -> None:
        self.verifier = verifier
        self._check: Check | None = None
        super().__init__(
            spec.event_type, self._cond, lambda o: self._check.similarity if self._check else None,
            "current_similarity", verifier.threshold, policy, spec.severity, spec.severity_per_unit,
        )  # fmt: skip

    def _cond(self, o: Observation) -> bool | None:
        c = self.verifier.last
        if c is None or c.seq != o.seq or c.ts != o.ts:
            return None  # no check on this frame
        self._check = c
        return c.consecutive >= MISMATCHES_TO_ALERT

    def _event(
        self, state: IncidentState, ts: float, o: Observation | None, value: float | None, reason: str | None = None
    ) -> RuleEvent:
        ev = super()._event(state, ts, o, value, reason)
        c = self._check
        if c is not None:
            ev.evidence.update(
                {
                    "enrolled_embedding_id": c.embedding_id,
                    "current_similarity": round(c.similarity, 4),
                    "threshold": c.threshold,
                    "frame_quality_score": round(c.quality, 3),
                    "consecutive_mismatches": c.consecutive,
                    "face_box": [round(x, 1) for x in c.box],
                }
            )
        return ev


def mismatch_rule(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> MismatchRule:
    engine.verifier.min_quality = t.face_verification_min_quality
    return MismatchRule(spec, p, engine.verifier)
