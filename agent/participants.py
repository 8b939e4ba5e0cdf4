"""Who is who in an exam room.

The exam platform marks participants in their LiveKit token (`proctor token` writes these):
attributes `role` (`candidate` or `proctor`) and, for candidates, `exam_session_id`, `candidate_id`,
`exam_id` (optionally `frontend_instance_id`). Older frontends put the same keys in the participant's
JSON metadata: each key is read from the attributes first, then from the metadata. Agents (participant
kind AGENT, e.g. this worker or another one) are never candidates or proctors.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from livekit import rtc

log = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # the analyzer's exam_session_id pattern


class Role(StrEnum):
    CANDIDATE = "candidate"
    PROCTOR = "proctor"
    AGENT = "agent"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class CandidateInfo:
    identity: str
    exam_session_id: str
    candidate_id: str
    exam_id: str
    frontend_instance_id: str | None = None


def _fields(p: Any) -> dict[str, str]:
    """Attributes over metadata, string values only."""
    out: dict[str, str] = {}
    meta = getattr(p, "metadata", "") or ""
    if isinstance(meta, str) and meta.strip().startswith("{"):
        try:
            parsed = json.loads(meta)
        except ValueError:
            parsed = {}
        if isinstance(parsed, dict):
            out.update({k: str(v) for k, v in parsed.items() if isinstance(v, str | int) and not isinstance(v, bool)})
    attrs = getattr(p, "attributes", None)
    if isinstance(attrs, dict):  # a mapping on real participants; mocks may hold anything
        out.update({k: v for k, v in attrs.items() if isinstance(v, str) and v})
    return out


def role_of(p: Any) -> Role:
    if getattr(p, "kind", None) == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
        return Role.AGENT
    role = _fields(p).get("role", "").strip().lower()
    if role == Role.CANDIDATE:
        return Role.CANDIDATE
    if role == Role.PROCTOR:
        return Role.PROCTOR
    return Role.OTHER


def candidate_info(p: Any) -> CandidateInfo | None:
    """The candidate's session keys, or None when p is not a candidate or a key is missing or invalid."""
    if role_of(p) is not Role.CANDIDATE:
        return None
    f = _fields(p)
    sid, cid, eid = f.get("exam_session_id", ""), f.get("candidate_id", ""), f.get("exam_id", "")
    if not (sid and cid and eid):
        # Attributes may still come (participant_attributes_changed): not an error yet.
        log.info("candidate %s lacks exam_session_id / candidate_id / exam_id; waiting", p.identity)
        return None
    if not _SESSION_ID.match(sid) or len(cid) > 128 or len(eid) > 128:
        log.warning("candidate %s has an invalid exam_session_id %r; ignored", p.identity, sid)
        return None
    return CandidateInfo(
        identity=p.identity,
        exam_session_id=sid,
        candidate_id=cid,
        exam_id=eid,
        frontend_instance_id=f.get("frontend_instance_id") or None,
    )
