"""Short-lived stream tokens: HMAC-SHA256 signed, bound to one session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time


class TokenError(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def mint(secret: bytes, session_id: str, ttl_s: int, now: float | None = None) -> tuple[str, float]:
    exp = (now or time.time()) + ttl_s
    body = _b64(json.dumps({"sid": session_id, "exp": int(exp), "scope": "stream"}, separators=(",", ":")).encode())
    sig = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}", float(int(exp))


def verify_signature(secret: bytes, token: str, now: float | None = None) -> dict:
    """Checks signature and expiry only; returns the claims. Raises TokenError."""
    try:
        body, sig = token.split(".")
        expected = _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(sig, expected):
            raise TokenError("invalid stream token signature")
        claims = json.loads(_unb64(body))
    except TokenError:
        raise
    except Exception:
        raise TokenError("malformed stream token") from None
    if (now or time.time()) > claims.get("exp", 0):
        raise TokenError("stream token expired; request a new one with POST /api/v1/session/{id}/token")
    return claims


def verify(secret: bytes, token: str, session_id: str, now: float | None = None) -> None:
    """Raises TokenError with a reason a client can act on."""
    claims = verify_signature(secret, token, now)
    if claims.get("scope") != "stream" or claims.get("sid") != session_id:
        raise TokenError("stream token is for another session")
