"""Standard Webhooks signing and verification (https://www.standardwebhooks.com/).

A delivery carries three headers:

- `webhook-id`: the message id, identical on every retry (we use the alert's event_id);
- `webhook-timestamp`: Unix seconds (integer) of this attempt;
- `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries, one per active secret, each over
  `{id}.{timestamp}.{body}` with the key = base64-decoded part of the secret after `whsec_`.

Several secrets at once allow rotation: the sender signs with old and new, a receiver accepts a delivery if
any entry matches any secret it knows. Implemented here in a few lines instead of depending on the
`standardwebhooks` package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Iterable, Mapping

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300


class WebhookSecretError(ValueError):
    """A secret that is not `whsec_` + base64."""


class WebhookVerificationError(Exception):
    """A delivery that must be rejected. `code` is machine-readable, str(e) says why in words.

    Codes: missing_headers, bad_timestamp, timestamp_too_old, timestamp_too_new, bad_signature_header,
    no_matching_signature.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret; raises WebhookSecretError with the reason if it is malformed."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise WebhookSecretError(f"webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise WebhookSecretError(f"webhook secret after {SECRET_PREFIX!r} is not valid base64: {e}") from None
    if not key:
        raise WebhookSecretError("webhook secret is empty after the prefix")
    return key


def validate_secrets(secrets: Iterable[str]) -> list[bytes]:
    """All keys, in order; at least one secret is required (an unsigned webhook is not a webhook here)."""
    keys = [secret_key(s) for s in secrets]
    if not keys:
        raise WebhookSecretError("at least one webhook secret (whsec_...) is required")
    return keys


def generate_secret() -> str:
    """A new secret: whsec_ + base64 of 24 random bytes (the spec asks for 24 to 64 bytes)."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode("ascii")


def _sign_key(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature entry, `v1,<base64>`."""
    return f"{SIGNATURE_VERSION},{_sign_key(secret_key(secret), msg_id, int(timestamp), body)}"


def signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,...` entry per secret, space-separated."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def webhook_headers(secrets: Iterable[str], msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt (timestamp defaults to now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header(secrets, msg_id, ts, body),
    }


def verify(
    secrets: list[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Returns if the delivery is authentic and fresh; raises WebhookVerificationError otherwise.

    `headers` may be any mapping (header names are matched case-insensitively). The timestamp must lie
    within `tolerance_s` of `now` in both directions: an old one could be a replay, a future one a forged
    or badly skewed clock.
    """
    keys = validate_secrets(secrets)
    h = {k.lower(): v for k, v in headers.items()}
    missing = [n for n in ("webhook-id", "webhook-timestamp", "webhook-signature") if not h.get(n)]
    if missing:
        raise WebhookVerificationError("missing_headers", f"missing header(s): {', '.join(missing)}")
    msg_id, ts_raw, sig_raw = h["webhook-id"], h["webhook-timestamp"].strip(), h["webhook-signature"]
    if not ts_raw.isascii() or not ts_raw.isdigit():
        raise WebhookVerificationError("bad_timestamp", f"webhook-timestamp is not integer Unix seconds: {ts_raw!r}")
    ts = int(ts_raw)
    now_s = time.time() if now is None else now
    if ts < now_s - tolerance_s:
        raise WebhookVerificationError(
            "timestamp_too_old", f"webhook-timestamp {ts} is {now_s - ts:.0f}s old (tolerance {tolerance_s:g}s)"
        )
    if ts > now_s + tolerance_s:
        raise WebhookVerificationError(
            "timestamp_too_new",
            f"webhook-timestamp {ts} is {ts - now_s:.0f}s in the future (tolerance {tolerance_s:g}s)",
        )
    # Only v1 entries count; unknown versions (e.g. v1a asymmetric) are skipped, as the spec asks.
    candidates = []
    for entry in sig_raw.split():
        version, _, value = entry.partition(",")
        if version == SIGNATURE_VERSION and value:
            candidates.append(value.encode("ascii", "replace"))
    if not candidates:
        raise WebhookVerificationError("bad_signature_header", "webhook-signature has no v1,<base64> entry")
    expected = [_sign_key(k, msg_id, ts, body).encode("ascii") for k in keys]
    # Compare every pair without early exit, so timing does not reveal which secret or entry matched.
    matched = False
    for exp in expected:
        for cand in candidates:
            matched |= hmac.compare_digest(exp, cand)
    if not matched:
        raise WebhookVerificationError("no_matching_signature", "no webhook-signature entry matches a known secret")
