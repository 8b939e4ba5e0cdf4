"""`proctor` command line: serve, inspect, analyze, keys, config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _observe(fmt: str, level: str, service: str) -> int:
    """Logs in the configured format and, when the OTEL_* variables ask for it, traces; 2 on a bad setting."""
    from livekit_proctor import observability

    observability.configure_logging(fmt, level)
    try:
        observability.configure_tracing(service)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from livekit_proctor.settings import Settings
    from livekit_proctor.wiring import analyzer_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    if rc := _observe(settings.log_format, settings.log_level, "proctor-analyzer"):
        return rc
    # The transport-level cap sits above the application's own limits, so an oversize
    # frame gets a clear error reply; only absurd messages are cut at this level.
    ws_max = 4 * max(settings.max_frame_bytes, settings.max_audio_chunk_bytes) + 64
    uvicorn.run(
        analyzer_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=ws_max,
        log_config=None,  # uvicorn's records go to the root handler, in the same format as ours
        log_level=settings.log_level.lower(),
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )
    return 0


def _load_models():
    from livekit_proctor.analyzer.pipeline import ModelSet
    from livekit_proctor.settings import Settings

    s = Settings()
    return ModelSet.from_settings(s)


def _inspect(args: argparse.Namespace) -> int:
    from livekit_proctor.analyzer.offline import inspect_image

    models = _load_models()
    results = []
    rc = 0
    for p in args.images:
        try:
            results.append(inspect_image(models, Path(p)))
        except ValueError as e:
            results.append({"image": p, "error": str(e)})
            rc = 1
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=None))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: ERROR {r['error']}")
            else:
                scores = ", ".join(f"{f['score']:.2f}" for f in r["faces"])
                print(f"{r['image']}: {r['face_count']} face(s) [{scores}]")
    return rc


def _analyze(args: argparse.Namespace) -> int:
    from livekit_proctor.analyzer.offline import analyze_video

    models = _load_models()
    try:
        from livekit_proctor.analyzer.rules.limits import IncidentLimiter
        from livekit_proctor.settings import Settings

        s = Settings()
        alerts, summary = analyze_video(
            models,
            Path(args.video),
            fps=args.fps or s.video_fps,
            sensitivity=args.sensitivity,
            calibration_s=args.calibration,
            limiter=IncidentLimiter(s.incident_burst, s.incident_refill_s),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for offset, a in alerts:
        if args.json:
            d = a.model_dump(mode="json")
            d["offset_s"] = offset
            print(json.dumps(d))
        else:
            ev = a.evidence
            print(
                f"{offset:8.2f}s  {a.event_type:<16} {a.incident_state:<8} severity={a.severity_score:.2f} "
                f"duration={ev.get('duration_s')}s"
            )
    if not args.json:
        print(
            f"-- {summary['video']}: {summary['duration_s']}s, {summary['frames_analysed']} frames analysed, "
            f"{summary['incidents']} incident(s)"
        )
    return 0


def _keys(args: argparse.Namespace) -> int:
    from livekit_proctor.analyzer.auth import KeyStore
    from livekit_proctor.datadir import prepare_data_dir
    from livekit_proctor.db import make_engine, make_sessionmaker
    from livekit_proctor.settings import Settings

    s = Settings()
    prepare_data_dir(s)
    store = KeyStore(make_sessionmaker(make_engine(s.resolved_database_url())))
    print(store.create(args.role, args.label))
    return 0


def _dispatcher(_: argparse.Namespace) -> int:
    import asyncio

    from livekit_proctor.dispatcher.service import run_standalone
    from livekit_proctor.settings import Settings

    s = Settings()
    if rc := _observe(s.log_format, s.log_level, "proctor-dispatcher"):
        return rc
    asyncio.run(run_standalone(s))
    return 0


def _dlq(args: argparse.Namespace) -> int:
    import time

    from sqlalchemy import select

    from livekit_proctor.db import DeadLetterRow, make_engine, make_sessionmaker
    from livekit_proctor.settings import Settings

    s = Settings()
    sm = make_sessionmaker(make_engine(s.resolved_database_url()))
    with sm.begin() as db:
        q = select(DeadLetterRow).where(DeadLetterRow.replayed_at.is_(None)).order_by(DeadLetterRow.id)
        if args.lane:
            q = q.where(DeadLetterRow.lane == args.lane)
        if getattr(args, "ids", None):
            q = q.where(DeadLetterRow.id.in_(args.ids))
        rows = list(db.scalars(q).all())
        if args.dlq_cmd == "list":
            for r in rows:
                d = {"id": r.id, "lane": r.lane, "event_id": r.event_id, "event_type": r.event_type,
                     "exam_session_id": r.exam_session_id, "attempts": r.attempts, "error": r.error,
                     "dead_at": r.dead_at, "replay_requested": r.replay_requested_at is not None}  # fmt: skip
                print(json.dumps(d) if args.json else f"{r.id:>6} {r.lane:<8} {r.event_type:<22} {r.event_id} "
                      f"attempts={r.attempts} {r.error[:80]}")  # fmt: skip
            if not args.json:
                print(f"-- {len(rows)} dead letter(s) not replayed")
            return 0
        if not rows:
            print("nothing to replay")
            return 0
        now = time.time()
        for r in rows:
            r.replay_requested_at = now
    print(f"{len(rows)} dead letter(s) queued for replay; the running dispatcher sends them on their lane")
    return 0


def _purge(args: argparse.Namespace) -> int:
    """Applies the retention settings once (cron): one line of what it removed; exit 1 with one line on failure."""
    from livekit_proctor.db import make_engine, make_sessionmaker, sqlite_path
    from livekit_proctor.dispatcher.retention import purge
    from livekit_proctor.settings import Settings

    try:
        s = Settings()
        db = sqlite_path(s.resolved_database_url())
        if db is not None and not db.exists():  # e.g. cron's working directory is not the server's
            raise FileNotFoundError(f"no database at {db} (set PROCTOR_DATA_DIR or PROCTOR_DATABASE_URL)")
        engine = make_engine(s.resolved_database_url())
        try:
            report = purge(s, make_sessionmaker(engine), dry_run=args.dry_run)
        finally:
            engine.dispose()
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        print(f"error: purge failed: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(report.line())
    return 0


def _consume(args: argparse.Namespace) -> int:
    import importlib

    name = {"grpc": "grpc_server", "kafka": "kafka", "webhook": "webhook"}[args.kind]
    module = f"livekit_proctor.dispatcher.consumers.{name}"
    return int(importlib.import_module(module).main(args.rest) or 0)


def _token(args: argparse.Namespace) -> int:
    """A LiveKit room token with the attributes the proctoring agent reads (docs/livekit.md)."""
    from livekit import api

    from livekit_proctor.settings import Settings

    s = Settings()
    key, secret = args.api_key or s.livekit_api_key, args.api_secret or s.livekit_api_secret
    if not key or not secret:
        print("error: set PROCTOR_LIVEKIT_API_KEY and PROCTOR_LIVEKIT_API_SECRET (or --api-key/--api-secret)",
              file=sys.stderr)  # fmt: skip
        return 2
    attrs = {"role": args.role}
    if args.role == "candidate":
        attrs.update(
            {
                "exam_session_id": args.exam_session_id or f"{args.room}-{args.identity}",
                "candidate_id": args.candidate_id or args.identity,
                "exam_id": args.exam_id or args.room,
            }
        )
    grants = api.VideoGrants(room_join=True, room=args.room, can_publish=args.role == "candidate",
                             can_subscribe=True, can_publish_data=True)  # fmt: skip
    tok = (
        api.AccessToken(key, secret)
        .with_identity(args.identity)
        .with_name(args.name or args.identity)
        .with_attributes(attrs)
        .with_grants(grants)
    )
    if args.dispatch:
        tok = tok.with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=s.agent_name)]))
    print(tok.to_jwt())
    return 0


def _agent(args: argparse.Namespace) -> int:
    from livekit_proctor.agent.worker import main as agent_main

    return int(agent_main(args.rest) or 0)


def _config(_: argparse.Namespace) -> int:
    from livekit_proctor.settings import Settings, redact_url

    s = Settings()
    d = s.redacted()  # secrets masked (settings marked SECRET, secret-looking names, passwords in URLs)
    d["database_url"] = redact_url(s.resolved_database_url())
    print(json.dumps(d, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proctor", description="Real-time AI proctoring for LiveKit")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="run the analyzer (embedded defaults: SQLite, in-process outbox)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(fn=_serve)

    p = sub.add_parser("inspect", help="detect faces in images")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true", help="one JSON object per image (a list for several)")
    p.set_defaults(fn=_inspect)

    p = sub.add_parser("analyze", help="run a recording through the session pipeline and print its alerts")
    p.add_argument("video")
    p.add_argument("--json", action="store_true", help="one canonical alert per line, with offset_s")
    p.add_argument("--fps", type=float, default=None, help="analysis rate (default PROCTOR_VIDEO_FPS, 5)")
    p.add_argument("--sensitivity", choices=["low", "medium", "high"], default="medium")
    p.add_argument(
        "--calibration", type=float, default=None, help="calibration period, s (default 30; head/gaze rules wait)"
    )
    p.set_defaults(fn=_analyze)

    p = sub.add_parser("keys", help="manage API keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    k = ksub.add_parser("create", help="create a key and print it (shown once)")
    k.add_argument("--role", choices=["system", "proctor", "admin"], required=True)
    k.add_argument("--label", default="")
    k.set_defaults(fn=_keys)

    p = sub.add_parser("dispatcher", help="run the alert dispatcher (outbox -> gRPC, Kafka, webhooks, ...)")
    p.set_defaults(fn=_dispatcher)

    p = sub.add_parser("dlq", help="dead-lettered alerts")
    dsub = p.add_subparsers(dest="dlq_cmd", required=True)
    d = dsub.add_parser("list", help="dead letters not replayed")
    d.add_argument("--lane")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_dlq)
    d = dsub.add_parser("replay", help="ask the dispatcher to send dead letters again on their lane")
    d.add_argument("ids", nargs="*", type=int, help="dead letter ids (default: all)")
    d.add_argument("--lane")
    d.set_defaults(fn=_dlq)

    p = sub.add_parser("purge", help="delete data past its retention (outbox, dead letters, audit, alerts.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    p.set_defaults(fn=_purge)

    p = sub.add_parser("consume", help="reference consumers: receive, verify, deduplicate, print alerts")
    p.add_argument("kind", choices=["grpc", "kafka", "webhook"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the consumer (--help for them)")
    p.set_defaults(fn=_consume)

    p = sub.add_parser("token", help="mint a LiveKit room token with the proctoring attributes")
    p.add_argument("--room", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--role", choices=["candidate", "proctor"], required=True)
    p.add_argument("--name")
    p.add_argument("--exam-session-id")
    p.add_argument("--candidate-id")
    p.add_argument("--exam-id")
    p.add_argument("--dispatch", action="store_true", help="ask LiveKit to dispatch the proctoring agent")
    p.add_argument("--api-key")
    p.add_argument("--api-secret")
    p.set_defaults(fn=_token)

    p = sub.add_parser("agent", help="run the LiveKit agent worker (args go to the worker: start, dev, ...)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_agent)

    p = sub.add_parser("config", help="print the effective settings")
    p.set_defaults(fn=_config)

    args = ap.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
