"""Short-lived stream tokens: JWTs (HS256, PyJWT) bound to one sitting of one session.

A session id can be reused for a later sitting (another candidate, another day); every sitting gets a new
random `sitting` id, and a token carries both, so a token from one sitting never opens another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

AUDIENCE = "proctor-stream"
_ALGORITHMS = ["HS256"]


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class StreamClaims:
    session_id: str
    sitting: str
    expires_at: float


def mint(secret: bytes, session_id: str, sitting: str, ttl_s: int, now: float | None = None) -> tuple[str, float]:
    """A token for this sitting of the session; returns (token, expiry as Unix seconds)."""
    iat = int(now if now is not None else time.time())
    exp = iat + int(ttl_s)
    claims = {"sid": session_id, "sit": sitting, "iat": iat, "exp": exp, "aud": AUDIENCE}
    return jwt.encode(claims, secret, algorithm="HS256"), float(exp)


def verify(secret: bytes, token: str) -> StreamClaims:
    """Checks signature, audience and expiry; returns the claims. Raises TokenError with a reason a client can
    act on (it is sent in the WebSocket close reason)."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=_ALGORITHMS, audience=AUDIENCE, options={"require": ["exp", "sid", "sit", "aud"]}
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("stream token expired; request a new one with POST /api/v1/session/{id}/token") from None
    except jwt.InvalidSignatureError:
        raise TokenError("invalid stream token signature") from None
    except jwt.PyJWTError:
        raise TokenError("malformed stream token") from None
    sid, sit = claims["sid"], claims["sit"]
    if not isinstance(sid, str) or not isinstance(sit, str):
        raise TokenError("malformed stream token")
    return StreamClaims(sid, sit, float(claims["exp"]))
