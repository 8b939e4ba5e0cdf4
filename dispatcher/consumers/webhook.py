"""Reference webhook receiver: verifies Standard Webhooks signatures, deduplicates, prints alerts.

    proctor consume webhook --secret whsec_... [--secret whsec_OLD...] \\
        [--host 127.0.0.1] [--port 9000] [--record seen.txt] [--quiet]

POST to any path. Answers:

- 204 to a valid delivery, new or duplicate (a duplicate must be acknowledged too, or the sender retries
  it forever);
- 400 {"error", "reason"} for missing/bad headers, a timestamp more than 5 minutes off, or a body that is
  not an alert object whose event_id equals webhook-id; 401 for a signature that matches no secret.

Deduplication is by webhook-id (= the alert's event_id). New alerts are printed to stdout, one JSON line
each; with --record FILE every new id is appended to FILE (one per line, flushed per line) and the ids
already in FILE are loaded at start, so a restart does not re-print what was already processed.
GET /stats returns {"received", "unique", "duplicates", "rejected"}; the same counts go to stderr at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from livekit_proctor.dispatcher.consumers.record import load_record
from livekit_proctor.dispatcher.webhook_signing import (
    WebhookSecretError,
    WebhookVerificationError,
    validate_secrets,
    verify,
)

SECRETS_ENV = "PROCTOR_WEBHOOK_SECRETS"  # comma-separated, as for the dispatcher; keeps secrets out of `ps`


class ReceiverState:
    def __init__(self, record: Path | None, print_alerts: bool, fail_first: int) -> None:
        self.received = 0
        self.unique = 0
        self.duplicates = 0
        self.rejected = 0
        self.fail_remaining = fail_first  # for tests: answer 500 to the first N valid deliveries
        self.print_alerts = print_alerts
        self.record = record
        self.seen: set[str] = load_record(record) if record is not None else set()
        self._record_f: IO[str] | None = None

    def stats(self) -> dict[str, int]:
        return {
            "received": self.received,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }

    def accept(self, msg_id: str, alert: dict[str, Any]) -> bool:
        """Records a verified alert; False if it is a duplicate. No await inside, so it is atomic."""
        if msg_id in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(msg_id)
        self.unique += 1
        if self.record is not None:
            if self._record_f is None:
                self.record.parent.mkdir(parents=True, exist_ok=True)
                self._record_f = self.record.open("a", encoding="utf-8")
            self._record_f.write(msg_id + "\n")
            self._record_f.flush()  # a crash loses at most the line being written
        if self.print_alerts:
            sys.stdout.write(json.dumps(alert, separators=(",", ":"), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        return True

    def close(self) -> None:
        if self._record_f is not None:
            self._record_f.close()
            self._record_f = None


def _reject(state: ReceiverState, status: int, code: str, reason: str) -> JSONResponse:
    state.rejected += 1
    return JSONResponse({"error": code, "reason": reason}, status_code=status)


def build_app(
    secrets: list[str],
    *,
    record: Path | None = None,
    print_alerts: bool = True,
    fail_first: int = 0,
) -> FastAPI:
    secrets = list(secrets)
    validate_secrets(secrets)  # raises WebhookSecretError with the reason
    state = ReceiverState(Path(record) if record is not None else None, print_alerts, fail_first)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="proctor webhook receiver", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.receiver = state

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return state.stats()

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/{path:path}")
    async def receive(request: Request) -> Response:
        body = await request.body()  # the raw bytes: the signature covers them, not a re-serialization
        state.received += 1
        try:
            verify(secrets, request.headers, body)
        except WebhookVerificationError as e:
            status = 401 if e.code == "no_matching_signature" else 400
            return _reject(state, status, e.code, e.reason)
        msg_id = request.headers["webhook-id"]
        try:
            alert = json.loads(body)
        except ValueError as e:
            return _reject(state, 400, "bad_body", f"body is not JSON: {e}")
        if not isinstance(alert, dict):
            return _reject(state, 400, "bad_body", "body is not a JSON object")
        if alert.get("event_id", msg_id) != msg_id:
            # The id is the dedup key: a mismatch would let a resend slip past deduplication.
            return _reject(state, 400, "id_mismatch", "webhook-id does not equal the body's event_id")
        if state.fail_remaining > 0:
            state.fail_remaining -= 1
            return JSONResponse({"error": "injected_failure", "reason": "fail_first"}, status_code=500)
        state.accept(msg_id, alert)
        return Response(status_code=204)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(
        prog="proctor consume webhook",
        description="Reference receiver for the webhook transport (Standard Webhooks signatures).",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument(
        "--secret",
        action="append",
        default=[],
        help=f"whsec_... secret; repeat for rotation (default: ${SECRETS_ENV}, comma-separated)",
    )
    ap.add_argument("--record", type=Path, default=None, help="file of processed ids: loaded at start, appended")
    ap.add_argument("--quiet", action="store_true", help="do not print alerts")
    args = ap.parse_args(argv)
    secrets = args.secret or os.environ.get(SECRETS_ENV, "").replace(",", " ").split()
    try:
        app = build_app(secrets, record=args.record, print_alerts=not args.quiet)
    except WebhookSecretError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the previous handler:
    # make SIGTERM an exception too, so the counts below are printed on either.
    signal.signal(signal.SIGTERM, _term)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    s = app.state.receiver.stats()
    print(
        f"webhook receiver: received={s['received']} unique={s['unique']} "
        f"duplicates={s['duplicates']} rejected={s['rejected']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
