"""/api/v1/enroll, /api/v1/verify and /api/v1/session/{id}/verify-frame: a candidate's face enrollment
(checked image by image) and verification, of a photo or of a recent frame of a live session.

Every image is checked at the door before anything decodes it (base64 and byte size, JPEG / PNG header,
dimensions), then in the inference pool (never on the event loop): exactly one face, at least MIN_FACE_PX,
detected with a confidence that allows verification, sharp (Laplacian variance on the face resized to 112 px
>= MIN_SHARPNESS), lit (mean grey 40-220), facing the camera (|yaw| and |pitch| <= MAX_POSE_DEG from the face
mesh). The best SELECTED accepted images form the template (their mean embedding); all accepted embeddings are
kept (encrypted, IdentityStore). /verify scores faces that pass faceembed.verification_problem, with
faceembed.match_score. docs/identity.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from livekit_proctor.analyzer.api.errors import AUTH, errors
from livekit_proctor.analyzer.auth import Principal, require
from livekit_proctor.analyzer.body_limit import body_limit
from livekit_proctor.analyzer.detectors import faceembed
from livekit_proctor.analyzer.jpeg import JpegHeaderError, image_size
from livekit_proctor.analyzer.sessions import SessionClosed, SessionNotFound
from livekit_proctor.contracts.alerts import ts_to_iso
from livekit_proctor.contracts.api import ValidationIssue
from livekit_proctor.contracts.identity import (
    ENROLL_MAX_BODY_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_IMAGES,
    VERIFY_MAX_BODY_BYTES,
    EnrolledEmbedding,
    EnrollmentDeleted,
    EnrollmentInfo,
    EnrollRequest,
    EnrollResponse,
    FaceQualityOut,
    ImageCheck,
    ImageRejected,
    PoseAngles,
    Reason,
    StoredEmbeddingInfo,
    VerifyFrameRequest,
    VerifyFrameResponse,
    VerifyRequest,
    VerifyResponse,
)
from livekit_proctor.identity_store import EmbeddingIn, Enrollment, IdentityStore

router = APIRouter(prefix="/api/v1", tags=["identity"])

# Who may do what (analyzer.auth has the roles): the exam platform and admins enroll; proctors verify too.
CAN_ENROLL = frozenset({"system", "admin"})
CAN_VERIFY = frozenset({"system", "proctor", "admin"})
Enroller = Annotated[Principal, Depends(require(CAN_ENROLL))]
Verifier = Annotated[Principal, Depends(require(CAN_VERIFY))]

# The enrollment checks (the issue's published contract).
MIN_FACE_PX = 80
MIN_SHARPNESS = 100.0
MIN_BRIGHTNESS, MAX_BRIGHTNESS = 40.0, 220.0
MAX_POSE_DEG = 20.0
SELECTED = 3  # best accepted images that form the template

RECOMMENDATIONS = {
    "invalid_image": "Send a JPEG, PNG or WebP photo",
    "image_too_large": f"Send a smaller photo (at most {MAX_IMAGE_BYTES // 2**20} MiB, {MAX_IMAGE_SIDE} px a side)",
    "no_face": "Face the camera and make sure your whole face is in the picture",
    "multiple_faces": "Make sure you are alone in the picture",
    "face_too_small": "Move closer to the camera",
    "blurred": "Hold still and make sure the camera is in focus",
    "too_dark": "More light: face a window or a lamp",
    "too_bright": "Less light: avoid a bright light or window behind or straight at the camera",
    "pose": "Look straight at the camera",
    "no_landmarks": "Face the camera with nothing covering your face",
    "low_confidence": "Face the camera in even light with nothing covering your face",
}


# ---- checks (blocking: run in the inference pool)


@dataclass
class Checked:
    check: ImageCheck
    face: faceembed.FaceEmbedding | None = None  # the one face, when the image is usable


def _reason(code: str, message: str) -> Reason:
    return Reason(code=code, message=message)  # type: ignore[arg-type]


def decode_base64(text: str) -> bytes:
    """The bytes of a base64 image (a data: URL prefix accepted); ValueError with a reason when not base64."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_base64 is not valid base64") from None


def read_image(data: bytes) -> np.ndarray | Reason:
    """RGB pixels, or why not: the size and dimensions are checked from the header before decoding."""
    if len(data) > MAX_IMAGE_BYTES:
        return _reason("image_too_large", f"the image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} allowed")
    try:
        fmt, w, h = image_size(data)
    except JpegHeaderError as e:
        return _reason("invalid_image", str(e))
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        return _reason(
            "image_too_large",
            f"the image is {w}x{h}; at most {MAX_IMAGE_SIDE} px a side and {MAX_IMAGE_PIXELS} pixels allowed",
        )
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return _reason("invalid_image", f"the {fmt.upper()} image could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def quality_reasons(q: faceembed.FaceQuality) -> list[Reason]:
    out = []
    if q.face_px < MIN_FACE_PX:
        out.append(_reason("face_too_small", f"the face is {q.face_px:.0f} px; at least {MIN_FACE_PX} px needed"))
    if q.sharpness < MIN_SHARPNESS:
        out.append(_reason("blurred", f"sharpness {q.sharpness:.0f}; at least {MIN_SHARPNESS:.0f} needed"))
    if q.brightness < MIN_BRIGHTNESS:
        out.append(_reason("too_dark", f"face brightness {q.brightness:.0f}; at least {MIN_BRIGHTNESS:.0f} needed"))
    elif q.brightness > MAX_BRIGHTNESS:
        out.append(_reason("too_bright", f"face brightness {q.brightness:.0f}; at most {MAX_BRIGHTNESS:.0f} allowed"))
    if (weak := faceembed.confidence_problem(q)) is not None:  # it could not be verified against either
        out.append(_reason(*weak))
    if q.pose is None:
        out.append(_reason("no_landmarks", "the face's landmarks were not found, so its pose is unknown"))
    elif max(abs(q.pose.yaw), abs(q.pose.pitch)) > MAX_POSE_DEG:
        out.append(
            _reason(
                "pose",
                f"head turned (yaw {q.pose.yaw:.0f}, pitch {q.pose.pitch:.0f} degrees); "
                f"at most {MAX_POSE_DEG:.0f} allowed",
            )
        )
    return out


def _pose(q: faceembed.FaceQuality) -> PoseAngles | None:
    return PoseAngles(**q.pose.to_dict()) if q.pose is not None else None


def _bbox(e: faceembed.FaceEmbedding) -> list[float]:
    b = e.box
    return [round(float(b.x), 1), round(float(b.y), 1), round(float(b.w), 1), round(float(b.h), 1)]


def analyse(index: int, blob: bytes | str, gate: bool = True) -> Checked:
    """One image through the checks: `blob` is raw bytes or base64 text. gate=False (verify): the quality
    checks are reported but the face is kept."""
    if isinstance(blob, str):
        try:
            blob = decode_base64(blob)
        except ValueError as e:
            return Checked(ImageCheck(index=index, accepted=False, reasons=[_reason("invalid_image", str(e))]))
    rgb = read_image(blob)
    if isinstance(rgb, Reason):
        return Checked(ImageCheck(index=index, accepted=False, reasons=[rgb]))
    faces = faceembed.embed_image(rgb)
    if not faces:
        return Checked(ImageCheck(index=index, accepted=False, reasons=[_reason("no_face", "no face found")]))
    top = faces[0]
    q = top.quality
    check = ImageCheck(
        index=index,
        accepted=True,
        faces=len(faces),
        face_bbox=_bbox(top),
        face_px=round(q.face_px, 1),
        sharpness=round(q.sharpness, 1),
        brightness=round(q.brightness, 1),
        pose_angles=_pose(q),
    )
    if len(faces) > 1:
        check.accepted = False
        check.reasons = [_reason("multiple_faces", f"{len(faces)} faces found; exactly one needed")]
        return Checked(check)
    check.reasons = quality_reasons(q)
    if check.reasons and gate:
        check.accepted = False
        return Checked(check)
    return Checked(check, top)


def recommendations(checks: list[ImageCheck], accepted: int) -> list[str]:
    out: list[str] = []
    for c in checks:
        for r in c.reasons:
            text = RECOMMENDATIONS[r.code]
            if text not in out:
                out.append(text)
    if 0 < accepted < SELECTED:
        out.append(f"Add more photos: {SELECTED} good ones make a stronger enrollment ({accepted} usable)")
    return out


def rejected(error: str, checks: list[ImageCheck], accepted: int = 0) -> JSONResponse:
    body = ImageRejected(
        error=error,
        detail=[
            ValidationIssue(loc=["body", "images", str(c.index)], msg="; ".join(r.message for r in c.reasons))
            for c in checks
            if c.reasons
        ],
        images=checks,
        recommendations=recommendations(checks, accepted),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=422)


# ---- OpenAPI: the two request bodies of /enroll and the 422 that carries the images' reasons


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs substituted (the document's components do not hold them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(defs[ref.rpartition("/")[2]])
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        return node

    out: dict[str, Any] = sub(schema)
    return out


_MULTIPART = {
    "type": "object",
    "required": ["candidate_id", "images"],
    "properties": {
        "candidate_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "exam_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "metadata": {"type": "string", "description": "A JSON object, kept with the enrollment"},
        "images": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_IMAGES,
            "items": {"type": "string", "format": "binary"},
            "description": "JPEG, PNG or WebP files",
        },
    },
}


def _with_image_422(responses: dict[int | str, dict[str, Any]], note: str) -> dict[int | str, dict[str, Any]]:
    responses[422] = {
        "description": note,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [{"$ref": "#/components/schemas/ValidationErrorBody"}, inline_schema(ImageRejected)]
                }
            }
        },
    }
    return responses


# ---- routes


def _store(request: Request) -> IdentityStore:
    return request.app.state.identity


class _Form(BaseModel):
    """The multipart form's fields, checked as the JSON body's are."""

    candidate_id: str
    exam_id: str | None = None
    metadata: dict[str, Any] = {}


async def _enroll_request(request: Request) -> tuple[EnrollRequest, list[bytes | str]]:
    """The request, JSON or multipart, validated; and its images (base64 text or uploaded bytes)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=MAX_IMAGES + 1, max_fields=16, max_part_size=MAX_IMAGE_BYTES + 1)
        files: list[bytes | str] = []
        for item in form.getlist("images"):
            if isinstance(item, str):
                files.append(item.encode())
            else:
                files.append(await item.read(MAX_IMAGE_BYTES + 1))
        fields: dict[str, Any] = {k: form.get(k) for k in ("candidate_id", "exam_id") if form.get(k) is not None}
        if (meta := form.get("metadata")) is not None:
            try:
                fields["metadata"] = json.loads(str(meta))
            except ValueError:
                raise RequestValidationError(
                    [{"loc": ("body", "metadata"), "msg": "metadata is not JSON", "type": "value_error"}]
                ) from None
        if not files:
            raise RequestValidationError([{"loc": ("body", "images"), "msg": "no image uploaded", "type": "missing"}])
        if len(files) > MAX_IMAGES:
            raise RequestValidationError(
                [{"loc": ("body", "images"), "msg": f"at most {MAX_IMAGES} images", "type": "too_long"}]
            )
        # The images themselves are checked one by one (each gets its own reason), not here.
        placeholder = [{"image_base64": "x"} for _ in files]
        try:
            req = EnrollRequest.model_validate({**fields, "images": placeholder}, strict=False)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return req, files
    raw = await request.body()
    try:
        body = json.loads(raw)
    except RecursionError:
        raise HTTPException(400, "the body is not parseable JSON: nested too deeply") from None
    except ValueError:
        raise HTTPException(400, "the body is not parseable JSON") from None
    try:
        req = EnrollRequest.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    return req, [i.image_base64 for i in req.all_images()]


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses=_with_image_422(
        errors(400, *AUTH, 413, 422),
        "The request did not validate (ValidationErrorBody), or no image can be used (ImageRejected: every "
        "image's reasons and recommendations)",
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(EnrollRequest)},
                "multipart/form-data": {"schema": _MULTIPART},
            },
        },
        **body_limit(ENROLL_MAX_BODY_BYTES),
    },
)
async def enroll(request: Request, who: Enroller) -> EnrollResponse | JSONResponse:
    """Enrolls a candidate's face (replacing an earlier enrollment): each image is checked, the best 3 usable
    ones form the template. JSON (base64 images) or multipart (image files)."""
    req, blobs = await _enroll_request(request)
    pool = request.app.state.pool
    checked = [await pool.run(analyse, i, b) for i, b in enumerate(blobs)]
    checks = [c.check for c in checked]
    usable = [c for c in checked if c.face is not None]
    store = _store(request)
    if not usable:
        reasons = sorted({r.code for c in checks for r in c.reasons})
        await asyncio.to_thread(
            store.record, "enroll", req.candidate_id, who, {"stored": False, "images": len(blobs), "reasons": reasons}
        )
        return rejected("no usable image", checks)
    ranked = sorted(usable, key=lambda c: c.face.quality.score if c.face else 0.0, reverse=True)
    chosen = {id(c) for c in ranked[:SELECTED]}
    ins = []
    for c in usable:
        assert c.face is not None
        q = c.face.quality
        ins.append(
            EmbeddingIn(
                vector=c.face.embedding,
                quality_score=round(q.score, 4),
                face_bbox=_bbox(c.face),
                pose_angles=q.pose.to_dict() if q.pose else {},
                sharpness_score=round(q.sharpness, 1),
                selected=id(c) in chosen,
            )
        )
    enr = await asyncio.to_thread(
        store.replace_enrollment,
        req.candidate_id,
        req.exam_id,
        ins,
        who,
        metadata={**req.metadata, "images": len(blobs), "rejected": len(blobs) - len(usable)},
        model=faceembed.MODEL_NAME,
    )
    return EnrollResponse(
        status="enrolled" if len(usable) == len(blobs) else "partial",
        enrollment_id=enr.enrollment_id,
        candidate_id=enr.candidate_id,
        exam_id=enr.exam_id,
        replaced=enr.replaced_at is not None,
        embeddings=[
            EnrolledEmbedding(
                embedding_id=e.embedding_id,
                image_index=c.check.index,
                quality_score=e.quality_score,
                face_bbox=e.face_bbox,
                pose_angles=PoseAngles(**e.pose_angles) if e.pose_angles else None,
                sharpness_score=e.sharpness_score,
                selected=e.selected,
            )
            for e, c in zip(enr.embeddings, usable, strict=True)
        ],
        average_embedding_stored=enr.template is not None,
        images=checks,
        recommendations=recommendations(checks, len(usable)),
        model=enr.model,
    )


def _no_enrollment(candidate_id: str) -> HTTPException:
    return HTTPException(404, f"candidate {candidate_id} has no enrollment")


@router.get(
    "/enroll/{candidate_id}",
    response_model=EnrollmentInfo,
    responses=errors(*AUTH, 404, e404="The candidate has no enrollment"),
)
async def get_enrollment(candidate_id: str, request: Request, who: Enroller) -> EnrollmentInfo:
    """The candidate's enrollment as stored: quality figures and ids of its embeddings, never the vectors."""
    enr = await asyncio.to_thread(_store(request).get_enrollment, candidate_id, decrypt=False)
    if enr is None:
        raise _no_enrollment(candidate_id)
    return EnrollmentInfo(
        enrollment_id=enr.enrollment_id,
        candidate_id=enr.candidate_id,
        exam_id=enr.exam_id,
        created_at=enr.created_at.isoformat(),
        replaced_at=enr.replaced_at.isoformat() if enr.replaced_at else None,
        last_session_at=enr.last_session_at.isoformat() if enr.last_session_at else None,
        model=enr.model,
        metadata=enr.metadata,
        average_embedding_stored=bool(enr.selected),
        embeddings=[
            StoredEmbeddingInfo(**{k: v for k, v in e.summary().items() if k != "key_id"}) for e in enr.embeddings
        ],
    )


@router.delete(
    "/enroll/{candidate_id}",
    response_model=EnrollmentDeleted,
    responses=errors(*AUTH, 404, e404="The candidate has no enrollment"),
)
async def delete_enrollment(candidate_id: str, request: Request, who: Enroller) -> EnrollmentDeleted:
    """Deletes the candidate's enrollment (embeddings and template); the audit log keeps a "delete" record.
    Everything else about the candidate: POST /api/v1/privacy/delete."""
    got = await asyncio.to_thread(_store(request).delete_enrollment, candidate_id, who)
    if got is None:
        raise _no_enrollment(candidate_id)
    enrollment_id, n = got
    return EnrollmentDeleted(candidate_id=candidate_id, enrollment_id=enrollment_id, embeddings_deleted=n)


def _lighting(brightness: float) -> float:
    return round(max(0.0, 1.0 - max(0.0, 60.0 - brightness, brightness - 200.0) / 60.0), 3)


@router.post(
    "/verify",
    response_model=VerifyResponse,
    responses=_with_image_422(
        errors(400, *AUTH, 404, 413, 422, e404="The candidate has no enrollment"),
        "The request did not validate (ValidationErrorBody), or the image has no face, several faces or is not "
        "a usable image (ImageRejected)",
    ),
    openapi_extra=body_limit(VERIFY_MAX_BODY_BYTES),
)
async def verify(body: VerifyRequest, request: Request, who: Verifier) -> VerifyResponse | JSONResponse:
    """Compares one photo with the candidate's enrolled template (cosine similarity of FaceRes embeddings)."""
    store = _store(request)
    enr = await asyncio.to_thread(store.get_enrollment, body.candidate_id)
    if enr is None or enr.template is None:
        raise _no_enrollment(body.candidate_id)
    checked = await request.app.state.pool.run(analyse, 0, body.image_base64, False)
    return await verified(store, enr, body.candidate_id, checked, who)


async def verified(
    store: IdentityStore,
    enr: Enrollment,
    candidate_id: str,
    checked: Checked,
    who: Principal,
    audit: dict[str, Any] | None = None,
) -> VerifyResponse | JSONResponse:
    """Scores an analysed image against the enrollment and records the attempt in the identity audit log
    ("verify", with `audit` added): the answer of /verify and verify-frame, or their 422 without a usable face."""
    extra = audit or {}
    if checked.face is None:
        refused = sorted({r.code for r in checked.check.reasons})
        await asyncio.to_thread(store.record, "verify", candidate_id, who, {"refused": refused, **extra})
        return rejected("the image cannot be verified", [checked.check])
    face = checked.face
    q = face.quality
    problem = faceembed.verification_problem(face)
    if problem is not None:  # scored, such a face would be a coin toss (faceembed.VERIFY_MIN_DETECTOR_SCORE)
        check = checked.check.model_copy(update={"accepted": False, "reasons": [_reason(*problem)]})
        await asyncio.to_thread(store.record, "verify", candidate_id, who, {"refused": [problem[0]], **extra})
        return rejected("the face cannot be verified", [check])
    # faceembed.match_score: the mean similarity to each selected embedding, the score continuous verification
    # uses too. Against the (renormalised) mean template impostors score higher (shared photos: impostor max
    # 0.65 vs 0.59 with three enrolled images), so the template is only the fallback of an enrollment without
    # stored vectors.
    vectors = [e.vector for e in enr.selected if e.vector is not None]
    if not vectors and enr.template is not None:
        vectors = [enr.template]
    score = round(faceembed.match_score(vectors, face.embedding)[0], 4)
    threshold = faceembed.MATCH_THRESHOLD
    match = score >= threshold
    now = datetime.now(UTC)
    await asyncio.to_thread(
        store.record,
        "verify",
        candidate_id,
        who,
        {"match": match, "similarity": score, "threshold": threshold, "enrollment_id": enr.enrollment_id, **extra},
    )
    return VerifyResponse(
        candidate_id=candidate_id,
        match=match,
        similarity_score=score,
        threshold_used=threshold,
        embedding_source="selected_embeddings",
        embeddings_compared=len(vectors),
        enrollment_id=enr.enrollment_id,
        face_quality=FaceQualityOut(
            sharpness=round(q.sharpness, 1),
            pose_deviation=round(max(abs(q.pose.yaw), abs(q.pose.pitch)), 1) if q.pose else None,
            lighting_quality=_lighting(q.brightness),
            brightness=round(q.brightness, 1),
            face_px=round(q.face_px, 1),
        ),
        warnings=checked.check.reasons,
        timestamp=now.isoformat(),
    )


@router.post(
    "/session/{session_id}/verify-frame",
    response_model=VerifyFrameResponse,
    responses=_with_image_422(
        errors(
            400,
            *AUTH,
            404,
            409,
            413,
            422,
            e404="Unknown session, the frame is no longer (or not yet) in the session's recent frames, or the "
            "candidate has no enrollment",
            e409="The session has ended or expired",
        ),
        "The request did not validate (ValidationErrorBody), or the frame has no face or several faces (ImageRejected)",
    ),
)
async def verify_frame(
    session_id: str, body: VerifyFrameRequest, request: Request, who: Verifier
) -> VerifyFrameResponse | JSONResponse:
    """Verifies a recent frame of a live session (`frame_id`, or `latest: true`) against its candidate's
    enrollment, as /verify does a photo. The session keeps its last few seconds of received frames (JPEG,
    memory-bounded: docs/identity.md). The result is an identity audit record ("verify", with the trigger and
    frame id) and raises no alert."""
    try:
        live = await request.app.state.sessions.get_live(session_id)
    except SessionNotFound:
        raise HTTPException(404, f"unknown session {session_id}") from None
    except SessionClosed as e:
        raise HTTPException(409, f"session {session_id} is {e}") from None
    frame = live.recent.latest() if body.latest else live.recent.get(body.frame_id or 0)
    if frame is None:
        span = live.recent.span()
        held = f"frames {span[0]}-{span[1]} are held" if span else "no frame has been received lately"
        wanted = "no recent frame" if body.latest else f"frame {body.frame_id} is not among the recent frames"
        raise HTTPException(404, f"{wanted} of session {session_id} ({held})")
    store = _store(request)
    enr = await asyncio.to_thread(store.get_enrollment, live.candidate_id)
    if enr is None or enr.template is None:
        raise _no_enrollment(live.candidate_id)
    checked = await request.app.state.pool.run(analyse, 0, frame.jpeg, False)
    audit = {"exam_session_id": session_id, "frame_id": frame.seq, "trigger": body.trigger}
    out = await verified(store, enr, live.candidate_id, checked, who, audit)
    if isinstance(out, JSONResponse):
        return out
    return VerifyFrameResponse(
        **out.model_dump(),
        exam_session_id=session_id,
        frame_id=frame.seq,
        frame_ts=ts_to_iso(frame.ts),
        trigger=body.trigger,
    )
