"""REST bodies of the identity routes: enrollment, verification, privacy export / delete (docs/identity.md).

Also the hook by which the composition root lets the privacy routes reach candidate data the analyzer does not
own (alerts.jsonl): CandidateData.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from livekit_proctor.contracts.api import METADATA_MAX_BYTES, ValidationIssue, check_bounded_json

MAX_IMAGES = 10  # images of one enrollment
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # one image, decoded from base64 or uploaded
MAX_IMAGE_BASE64 = (MAX_IMAGE_BYTES + 2) // 3 * 4  # its base64 text
MAX_IMAGE_SIDE = 8192  # pixels, read from the image header before decoding
MAX_IMAGE_PIXELS = 40_000_000  # a 12 MP phone photo is well inside; decoded RGB stays under 120 MB
# The whole enrollment request (JSON or multipart): several large images, not ten of the largest.
ENROLL_MAX_BODY_BYTES = 24 * 1024 * 1024
VERIFY_MAX_BODY_BYTES = MAX_IMAGE_BASE64 + 4096

CandidateId = Field(min_length=1, max_length=128)
Base64Image = Field(
    min_length=1,
    max_length=MAX_IMAGE_BASE64,
    description=f"A JPEG, PNG or WebP, base64 (a data: URL prefix is accepted); at most {MAX_IMAGE_BYTES} bytes "
    f"decoded, {MAX_IMAGE_SIDE} px a side, {MAX_IMAGE_PIXELS} pixels",
)

# Why an image is not used (enrollment) or not verified; stable codes, with a message for humans.
ReasonCode = Literal[
    "invalid_image",
    "image_too_large",
    "no_face",
    "multiple_faces",
    "face_too_small",
    "blurred",
    "too_dark",
    "too_bright",
    "pose",
    "no_landmarks",
    "low_confidence",
]


class EnrollImage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image_base64: str = Base64Image
    capture_timestamp: str | float | None = Field(default=None, description="When it was taken (kept as given)")
    device_info: str | dict[str, Any] | None = Field(default=None, description="Camera / browser (kept as given)")

    @field_validator("capture_timestamp")
    @classmethod
    def _short_ts(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, str) and len(v) > 64:
            raise ValueError("capture_timestamp is longer than 64 characters")
        if isinstance(v, float) and v != v:  # NaN
            raise ValueError("capture_timestamp is not a number")
        return v

    @field_validator("device_info")
    @classmethod
    def _bounded_device(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return check_bounded_json(v, "device_info", 2048, 4) if v is not None else v


class EnrollRequest(BaseModel):
    """One image (`image_base64`) or several (`images`, 3-10 recommended): exactly one of the two."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    candidate_id: str = CandidateId
    exam_id: str | None = Field(default=None, min_length=1, max_length=128)
    image_base64: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE_BASE64)
    images: list[EnrollImage] | None = Field(default=None, min_length=1, max_length=MAX_IMAGES)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description=f"Free-form JSON kept with the enrollment (at most {METADATA_MAX_BYTES} B)"
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_bounded_json(v, "metadata", METADATA_MAX_BYTES)

    @model_validator(mode="after")
    def _one_source(self) -> EnrollRequest:
        if (self.image_base64 is None) == (self.images is None):
            raise ValueError("give exactly one of image_base64 (one image) or images (several)")
        return self

    def all_images(self) -> list[EnrollImage]:
        return self.images if self.images is not None else [EnrollImage(image_base64=self.image_base64 or "")]


class Reason(BaseModel):
    code: ReasonCode
    message: str


class PoseAngles(BaseModel):
    yaw: float
    pitch: float
    roll: float


class ImageCheck(BaseModel):
    """What the checks found in one image of the request (index: its position, from 0)."""

    index: int
    accepted: bool
    reasons: list[Reason] = Field(default_factory=list, description="Why it was not used; empty when accepted")
    faces: int = Field(default=0, description="Faces found")
    face_bbox: list[float] | None = Field(default=None, description="[x, y, w, h] in pixels of the largest face")
    face_px: float | None = None
    sharpness: float | None = Field(
        default=None, description="Laplacian variance on the face resized to 112 px (>= 100 needed)"
    )
    brightness: float | None = Field(default=None, description="Mean grey level of the face (40-220 needed)")
    pose_angles: PoseAngles | None = None


class EnrolledEmbedding(BaseModel):
    embedding_id: str
    image_index: int
    quality_score: float = Field(description="0-1, ranks the images; the best 3 are selected")
    face_bbox: list[float]
    pose_angles: PoseAngles | None
    sharpness_score: float
    selected: bool = Field(description="Part of the template (the mean of the selected embeddings)")


class EnrollResponse(BaseModel):
    status: Literal["enrolled", "partial"] = Field(description='"partial": some images were not used (see images)')
    enrollment_id: str
    candidate_id: str
    exam_id: str | None
    replaced: bool = Field(description="An earlier enrollment of the candidate was replaced")
    embeddings: list[EnrolledEmbedding]
    average_embedding_stored: bool
    images: list[ImageCheck]
    recommendations: list[str]
    model: str


class ImageRejected(BaseModel):
    """422 when no image can be used: every image's reasons and what to do about them. Its `detail` is the
    same list of issues a ValidationErrorBody has (one per rejected image)."""

    error: str
    detail: list[ValidationIssue]
    images: list[ImageCheck]
    recommendations: list[str]


class StoredEmbeddingInfo(BaseModel):
    embedding_id: str
    position: int
    quality_score: float
    face_bbox: list[float]
    pose_angles: dict[str, float]
    sharpness_score: float
    selected: bool
    created_at: str


class EnrollmentInfo(BaseModel):
    """An enrollment as stored (never the vectors)."""

    enrollment_id: str
    candidate_id: str
    exam_id: str | None
    created_at: str
    replaced_at: str | None
    last_session_at: str | None
    model: str
    metadata: dict[str, Any]
    average_embedding_stored: bool
    embeddings: list[StoredEmbeddingInfo]


class EnrollmentDeleted(BaseModel):
    candidate_id: str
    enrollment_id: str
    embeddings_deleted: int


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    candidate_id: str = CandidateId
    image_base64: str = Base64Image


class FaceQualityOut(BaseModel):
    sharpness: float = Field(description="Laplacian variance on the face resized to 112 x 112 px")
    pose_deviation: float | None = Field(description="Largest of |yaw|, |pitch| in degrees; null without landmarks")
    lighting_quality: float = Field(description="1 when the face's mean grey level is 60-200, falling to 0 at 0/255")
    brightness: float
    face_px: float


class VerifyResponse(BaseModel):
    candidate_id: str
    match: bool
    similarity_score: float = Field(description="Cosine similarity to the enrolled template")
    threshold_used: float
    embedding_source: Literal["selected_embeddings"] = Field(
        description="similarity_score is the mean of the cosine similarities to each selected enrolled embedding"
    )
    embeddings_compared: int
    enrollment_id: str
    face_quality: FaceQualityOut
    warnings: list[Reason] = Field(
        default_factory=list, description="Enrollment quality checks this image fails (the score is less reliable)"
    )
    timestamp: str


class VerifyFrameRequest(BaseModel):
    """Which recent frame of a live session to verify: `frame_id` (the seq of the wire protocol) or
    `latest: true`, exactly one of the two."""

    model_config = ConfigDict(extra="forbid", strict=True)

    frame_id: int | None = Field(default=None, ge=0, le=2**32 - 1, description="The frame's seq (docs/protocol.md)")
    latest: bool | None = Field(default=None, description="true: the newest frame received")
    trigger: str = Field(
        default="manual",
        min_length=1,
        max_length=64,
        description='Why the check was asked for (kept in the audit record), e.g. "manual", "proctor_request"',
    )

    @model_validator(mode="after")
    def _one_frame(self) -> VerifyFrameRequest:
        if (self.frame_id is None) == (self.latest is not True):
            raise ValueError("give exactly one of frame_id or latest: true")
        return self


class VerifyFrameResponse(VerifyResponse):
    """A /verify answer for a frame of the session's stream, and which frame it was."""

    exam_session_id: str
    frame_id: int = Field(description="The frame's seq (docs/protocol.md)")
    frame_ts: str = Field(description="The frame's capture time, ISO 8601")
    trigger: str


class PrivacyDeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    candidate_id: str = CandidateId


class PrivacyDeleted(BaseModel):
    candidate_id: str
    sessions_ended: list[str] = Field(description="Live sessions of the candidate ended before the deletion")
    deleted: dict[str, int] = Field(description="Rows deleted, by kind (database) and lines / files (elsewhere)")
    session_ids: list[str] = Field(description="The candidate's sessions whose data went")


class PrivacyExport(BaseModel):
    model_config = ConfigDict(extra="allow")

    candidate_id: str
    exported_at: str | None
    enrollment: dict[str, Any] | None
    identity_audit: list[dict[str, Any]]
    sessions: list[dict[str, Any]]
    session_audit: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    files: dict[str, list[Any]] = Field(default_factory=dict, description="Data held outside the database, by place")


class CandidateData(Protocol):
    """Candidate data kept outside the identity store (alerts.jsonl), given to the privacy routes by the
    composition root. Both calls are blocking (the routes run them in a thread)."""

    name: str

    def export(self, candidate_id: str, session_ids: Sequence[str]) -> list[Any]: ...

    def erase(self, candidate_id: str, session_ids: Sequence[str]) -> int: ...
