"""Standard Webhooks signing and verification (https://www.standardwebhooks.com/), with the `standardwebhooks`
package (the spec authors' reference library) doing the HMAC, the header parsing and the timestamp check.

A delivery carries three headers:

- `webhook-id`: the message id, identical on every retry (we use the alert's event_id);
- `webhook-timestamp`: Unix seconds (integer) of this attempt;
- `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries, one per active secret, each over
  `{id}.{timestamp}.{body}` with the key = base64-decoded part of the secret after `whsec_`.

Several secrets at once allow rotation: the sender signs with old and new, a receiver accepts a delivery if
any entry matches any secret it knows. What this module adds to the library: several secrets, a strict check
of configured secrets (the library silently accepts malformed base64), and a machine-readable reason code.
A receiver accepts timestamps within the library's fixed 5 minutes of its own clock (TOLERANCE_S).
"""

from __future__ import annotations

import base64
import binascii
import secrets as _secrets
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache

import standardwebhooks

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 300  # the library's fixed window, both directions (old: a replay; new: a skewed or forged clock)

# The library's reasons (its exception carries only a message) -> our codes.
_CODES = {
    "Missing required headers": "missing_headers",
    "Invalid Signature Headers": "bad_timestamp",
    "Message timestamp too old": "timestamp_too_old",
    "Message timestamp too new": "timestamp_too_new",
    "No matching signature found": "no_matching_signature",
}


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


@lru_cache(maxsize=64)
def _webhook(secret: str) -> standardwebhooks.Webhook:
    return standardwebhooks.Webhook(secret_key(secret))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature entry, `v1,<base64>`. The body is the UTF-8 JSON the delivery carries."""
    return _webhook(secret).sign(msg_id, datetime.fromtimestamp(int(timestamp), UTC), body.decode("utf-8"))


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


def verify(secrets: list[str], headers: Mapping[str, str], body: bytes) -> None:
    """Returns if the delivery is authentic and fresh (see TOLERANCE_S); raises WebhookVerificationError otherwise.

    `headers` may be any mapping (header names are matched case-insensitively).
    """
    validate_secrets(secrets)  # raises WebhookSecretError, e.g. when none is configured
    hooks = [_webhook(s) for s in secrets]
    plain = {k.lower(): v for k, v in headers.items()}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookVerificationError("no_matching_signature", "body is not UTF-8, so no signature matches") from None
    # Checked here, not left to the library: standardwebhooks up to 1.1 raised on an entry without a comma, later
    # releases skip it silently, and a malformed header is the sender's bug worth naming.
    sig = plain.get("webhook-signature")
    if sig is not None and not all("," in entry and entry.split(",", 1)[0] for entry in sig.split()):
        raise WebhookVerificationError(
            "bad_signature_header", "webhook-signature is not space-separated version,base64 entries"
        )
    reason = ""
    for hook in hooks:
        try:
            hook.verify(text, plain, json_parse=False)
            return
        except standardwebhooks.WebhookVerificationError as e:
            reason = str(e)
            if _CODES.get(reason) != "no_matching_signature":
                break  # headers or timestamp: the same answer for every secret
        except (ValueError, binascii.Error):  # an entry that is not `version,base64`
            raise WebhookVerificationError(
                "bad_signature_header", "webhook-signature is not space-separated version,base64 entries"
            ) from None
    raise WebhookVerificationError(_CODES.get(reason, "rejected"), reason)
