"""Webhook transport: one signed HTTP POST per alert, per the Standard Webhooks spec.

Each envelope is POSTed to `url` with Content-Type application/json, the body = Envelope.payload exactly
(the canonical alert JSON bytes; the signature covers these bytes, so they are never re-serialized) and
the headers `webhook-id` (= event_id, the same on every retry, so receivers deduplicate on it),
`webhook-timestamp` (this attempt) and `webhook-signature` (one `v1,...` per secret; see
dispatcher/webhook_signing.py).

Acknowledgement = a 2xx answer within `timeout_s` (the whole request, connect to last byte). Everything
else is a failed attempt:

- 3xx: redirects are not followed (a redirect would re-send a signed alert to a host the operator did not
  configure); retryable, since a 307 during a migration can be transient; the reason names the Location.
- 5xx, 408, 409, 425, 429, timeouts, connection errors: retryable. On 429 and 503, `Retry-After`
  (delay-seconds or HTTP-date) becomes DeliveryError.retry_after, capped at MAX_RETRY_AFTER_S so a
  misconfigured peer cannot park the lane for a day (the next attempt may be told to wait again).
- any other 4xx: permanent (DeliveryError.permanent=True, the dispatcher dead-letters at once). The
  receiver has looked at this exact payload and refused it (400 malformed / stale, 401/403 signature,
  404 wrong URL, 413 too large, 422 schema); sending the same bytes again will get the same answer. A
  misconfigured secret or URL therefore fills the dead-letter queue quickly rather than stalling the
  outbox; fix the config and replay the DLQ. 408 (timeout), 409 (conflict), 425 (too early) and 429
  (throttled) are about timing, not the payload, so they are retried.

Ordering: with concurrency=1 (the default) envelopes go strictly one after another in batch order, so the
receiver sees every session's alerts in outbox order (and all alerts in outbox order). With concurrency>1
up to that many POSTs are in flight at once, but only across sessions: each exam_session_id's envelopes
still go one after another in order (a per-session lane), so per-session order holds; the order between
sessions does not. A failure stops lanes from starting envelopes after the failed one; `delivered` counts
the acknowledged prefix of the batch only, so envelopes that another lane delivered past the failure are
sent again on the retry (at least once; receivers deduplicate on webhook-id).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections import defaultdict, deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy, TransportStats
from livekit_proctor.dispatcher.webhook_signing import validate_secrets, webhook_headers

# 4xx that are about timing, not about the payload: retried (see module docstring).
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER_S = 600.0
_RESERVED_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"})
_USER_AGENT = "livekit-proctor-webhook/1"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP-date; None if absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, secs) if math.isfinite(secs) else None
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None or dt.tzinfo is None:  # HTTP-dates are always GMT; a naive one is not one
        return None
    return max(0.0, dt.timestamp() - (time.time() if now is None else now))


def _redact(url: str) -> str:
    # For state()/logs: no credentials in userinfo, no tokens in the query string.
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


class WebhookTransport:
    name = "webhook"

    def __init__(
        self,
        url: str,
        secrets: list[str],
        *,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        max_batch: int = 50,
        concurrency: int = 1,
        headers: dict[str, str] | None = None,
        verify_tls: bool = True,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"webhook url must be http(s)://...: {_redact(url)!r}")
        if timeout_s <= 0 or max_batch < 1 or concurrency < 1:
            raise ValueError("timeout_s must be > 0, max_batch and concurrency >= 1")
        validate_secrets(secrets)  # a bad secret is a config error: fail at start-up, not per delivery
        extra = dict(headers or {})
        clash = sorted(k for k in extra if k.lower() in _RESERVED_HEADERS)
        if clash:
            raise ValueError(f"headers may not override {clash}: the transport sets them")
        self.url = url
        self.secrets = list(secrets)
        self.timeout_s = timeout_s
        self.retry = retry or DISPATCH
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.verify_tls = verify_tls
        self._headers = extra
        self._client: httpx.AsyncClient | None = None
        self.stats = TransportStats()
        self._last_status: int | None = None
        self._last_ok_at: float | None = None
        self._consecutive_failures = 0
        self._permanent = 0
        self.latencies_s: deque[float] = deque(maxlen=4096)  # recent acknowledged POSTs, for state()/bench

    def set_secrets(self, secrets: list[str]) -> None:
        """Rotation without a restart: sign with old+new, then new only once receivers have it."""
        validate_secrets(secrets)
        self.secrets = list(secrets)

    async def start(self) -> None:
        # Creating the client opens no connection, so an unreachable peer cannot make this raise.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                verify=self.verify_tls,
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                headers={"user-agent": _USER_AGENT, **self._headers},
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        await self.start()
        if self.concurrency == 1:
            for i, env in enumerate(batch):
                err = await self._post(env)
                if err is not None:
                    err.delivered = i
                    raise err
            return
        await self._send_lanes(batch)

    async def _send_lanes(self, batch: list[Envelope]) -> None:
        lanes: dict[str, list[int]] = defaultdict(list)
        for i, env in enumerate(batch):
            lanes[env.exam_session_id].append(i)
        ok = [False] * len(batch)
        errors: dict[int, DeliveryError] = {}
        stop_at = len(batch)  # lowest failed index so far; later envelopes would be resent anyway
        sem = asyncio.Semaphore(self.concurrency)

        async def lane(idxs: list[int]) -> None:
            nonlocal stop_at
            for i in idxs:
                if i > stop_at:
                    return
                async with sem:
                    err = await self._post(batch[i])
                if err is not None:
                    errors[i] = err
                    stop_at = min(stop_at, i)
                    return  # the rest of this session must wait: per-session order
                ok[i] = True

        await asyncio.gather(*(lane(idxs) for idxs in lanes.values()))
        delivered = next((i for i, o in enumerate(ok) if not o), len(batch))
        if delivered < len(batch):
            err = errors.get(delivered) or DeliveryError(f"envelope {delivered} not attempted")
            err.delivered = delivered
            raise err

    async def _post(self, env: Envelope) -> DeliveryError | None:
        """One attempt for one envelope; None when acknowledged (2xx), else the failure (delivered unset)."""
        assert self._client is not None
        t0 = time.perf_counter()
        body = env.payload
        # A fresh timestamp (and thus signature) per attempt: the receiver's tolerance window applies to
        # the attempt, not to when the alert was raised; webhook-id stays the event_id.
        headers = {"content-type": "application/json", **webhook_headers(self.secrets, env.event_id, body)}
        try:
            # httpx's timeout is per phase (connect, each read...); this bounds the whole request.
            async with asyncio.timeout(self.timeout_s):
                resp = await self._client.post(self.url, content=body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            return self._failed(DeliveryError(f"webhook timeout after {self.timeout_s:g}s"), None)
        except httpx.HTTPError as e:
            return self._failed(DeliveryError(f"webhook request failed: {type(e).__name__}: {e}"), None)
        status = resp.status_code
        if 200 <= status < 300:
            self.latencies_s.append(time.perf_counter() - t0)
            self.stats.delivered += 1
            self._last_status = status
            self._last_ok_at = time.time()
            self._consecutive_failures = 0
            return None
        detail = resp.text[:200].strip()
        if 300 <= status < 400:
            reason = f"webhook answered {status} redirect to {resp.headers.get('location', '?')!r} (not followed)"
        else:
            reason = f"webhook answered {status}" + (f": {detail}" if detail else "")
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            retry_after = min(retry_after, MAX_RETRY_AFTER_S) if retry_after is not None else None
        permanent = 400 <= status < 500 and status not in RETRYABLE_4XX
        return self._failed(DeliveryError(reason, retry_after=retry_after, permanent=permanent), status)

    def _failed(self, err: DeliveryError, status: int | None) -> DeliveryError:
        self.stats.failed_attempts += 1
        self.stats.last_error = err.reason
        self._last_status = status
        self._consecutive_failures += 1
        if err.permanent:
            self._permanent += 1
        return err

    def state(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "name": self.name,
            "url": _redact(self.url),
            "started": self._client is not None,
            # No persistent connection to speak of: "connected" = the last attempt was acknowledged.
            "connected": self._client is not None and self._consecutive_failures == 0,
            "delivered": self.stats.delivered,
            "failed_attempts": self.stats.failed_attempts,
            "permanent_failures": self._permanent,
            "consecutive_failures": self._consecutive_failures,
            "last_error": self.stats.last_error,
            "last_status": self._last_status,
            "last_success_at": self._last_ok_at,
            "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "latency_p95_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000, 2) if lat else None,
            "concurrency": self.concurrency,
            "secrets": len(self.secrets),
        }
