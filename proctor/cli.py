"""`proctor` command line (typer): serve, inspect, analyze, demo, token, keys, dlq, purge, consume, agent, config.

Errors a user can fix (a bad argument, a bad PROCTOR_* / LIVEKIT_* setting, a missing file) are one line on
stderr, `proctor: ...`, with exit status 2 (usage, settings) or 1 (the work failed); never a traceback.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from livekit_proctor.analyzer.pipeline import ModelSet
    from livekit_proctor.contracts.alerts import Alert
    from livekit_proctor.settings import Settings


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# click's UsageError (bad or missing argument, unknown command), which typer>=0.29 vendors without exporting it.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _settings(**overrides: Any) -> Settings:
    from livekit_proctor.settings import Settings, describe_settings_error

    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise CliError(describe_settings_error(e), 2) from None


app = typer.Typer(
    name="proctor",
    help="Real-time AI proctoring for LiveKit.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
keys_app = typer.Typer(help="Manage API keys.")
dlq_app = typer.Typer(help="Dead-lettered alerts.")
app.add_typer(keys_app, name="keys")
app.add_typer(dlq_app, name="dlq")


def _help_without_command(ctx: typer.Context) -> None:
    """`proctor` or `proctor keys` alone: the help, on stdout, exit status 2 (nothing was done)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


keys_app.callback(invoke_without_command=True)(_help_without_command)
dlq_app.callback(invoke_without_command=True)(_help_without_command)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from livekit_proctor import __version__

    try:
        return version("livekit-proctor")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"proctor {_version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Real-time AI proctoring for LiveKit."""
    _help_without_command(ctx)


def _observe(fmt: str, level: str, service: str) -> None:
    """Logs in the configured format and, when the OTEL_* variables ask for it, traces."""
    from livekit_proctor import observability

    observability.configure_logging(fmt, level)
    try:
        observability.configure_tracing(service)
    except ValueError as e:
        raise CliError(str(e), 2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default PROCTOR_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port (default PROCTOR_PORT, 8080).")] = None,
) -> None:
    """Run the analyzer in the foreground (embedded defaults: SQLite, in-process outbox); Ctrl-C stops it."""
    _serve(host, port)


def _serve(host: str | None, port: int | None) -> None:
    import uvicorn

    from livekit_proctor.wiring import analyzer_app

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = _settings(**overrides)
    _observe(settings.log_format, settings.log_level, "proctor-analyzer")
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


def _load_models(s: Settings) -> ModelSet:
    from livekit_proctor.analyzer.pipeline import ModelSet

    return ModelSet.from_settings(s)


@app.command()
def inspect(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image (a list for several).")] = False,
) -> None:
    """Detect faces, people, objects and pose in images."""
    from livekit_proctor.analyzer.offline import inspect_image

    models = _load_models(_settings())
    results = []
    failed = False
    for p in images:
        try:
            results.append(inspect_image(models, p))
        except ValueError as e:
            results.append({"image": str(p), "error": str(e)})
            failed = True
    if json_out:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=None))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['image']}: ERROR {r['error']}")
            else:
                scores = ", ".join(f"{f['score']:.2f}" for f in r["faces"])
                print(f"{r['image']}: {r['face_count']} face(s) [{scores}]")
    if failed:
        raise typer.Exit(1)


class Sensitivity(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"


def fmt_duration(s: float) -> str:
    """2m13s, 1h02m05s, 4.2s: how a person reads a length of video."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{sec:02d}s"


def incident_table(alerts: list[tuple[float, Alert]]) -> list[str]:
    """One line per incident (its alerts share an id): when the condition began, when the alert was raised
    (after the rule's threshold), when it ended, how long it lasted, its peak severity and its type."""
    rows: dict[str, dict[str, Any]] = {}
    for offset, a in alerts:
        ev = a.evidence or {}
        since = ev.get("condition_since")
        row = rows.setdefault(
            a.incident_id or a.event_id,
            {"since": since if isinstance(since, int | float) else offset, "alerted": offset, "end": None,
             "duration": None, "type": str(a.event_type), "peak": 0.0},
        )  # fmt: skip
        row["peak"] = max(row["peak"], a.severity_score)
        if a.incident_state == "ended":
            row["end"] = offset
            row["duration"] = ev.get("duration_s", offset - row["since"])

    def t(v: float | None) -> str:
        return "-" if v is None else fmt_duration(v)

    lines = [f"{'since':>8}  {'alerted':>8}  {'ended':>8}  {'lasted':>8}  {'severity':>8}  event"]
    for r in rows.values():
        lines.append(
            f"{t(r['since']):>8}  {t(r['alerted']):>8}  {t(r['end']):>8}  {t(r['duration']):>8}  {r['peak']:>8.2f}  "
            f"{r['type']}"
        )
    return lines


def _video_duration_s(path: Path) -> float | None:
    """The container's length, for the progress bar; None where it does not say."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        frames, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    return frames / fps if frames > 0 and fps > 0 else None


@app.command()
def analyze(
    video: Annotated[Path, typer.Argument(help="A recording (any format OpenCV reads).")],
    json_out: Annotated[bool, typer.Option("--json", help="One canonical alert per line, with offset_s.")] = False,
    fps: Annotated[
        float | None, typer.Option(min=0.1, max=30, help="Analysis rate (default PROCTOR_VIDEO_FPS, 5).")
    ] = None,
    sensitivity: Annotated[Sensitivity, typer.Option(help="Rule thresholds.")] = Sensitivity.medium,
    calibration: Annotated[
        float | None,
        typer.Option(min=0, max=600, help="Calibration period, s (default 30; head/gaze rules wait for it)."),
    ] = None,
) -> None:
    """Run a recording through the session pipeline and print its incidents."""
    from livekit_proctor.analyzer.offline import analyze_video
    from livekit_proctor.analyzer.rules.limits import IncidentLimiter

    s = _settings()
    if not video.is_file():
        raise CliError(f"{video}: cannot open video (no such file)")
    models = _load_models(s)
    with _ProgressBar(_video_duration_s(video)) as tick:
        try:
            alerts, summary = analyze_video(
                models,
                video,
                fps=fps or s.video_fps,
                sensitivity=sensitivity.value,
                calibration_s=calibration,
                limiter=IncidentLimiter(s.incident_burst, s.incident_refill_s),
                progress=tick,
            )
        except ValueError as e:
            raise CliError(str(e)) from None
    if json_out:
        for offset, a in alerts:
            d = a.model_dump(mode="json")
            d["offset_s"] = offset
            print(json.dumps(d))
        return
    length = fmt_duration(summary["duration_s"])
    if not alerts:
        print(f"no incidents in {length} of video ({summary['frames_analysed']} frames analysed)")
        return
    print("\n".join(incident_table(alerts)))
    print(f"-- {summary['incidents']} incident(s) in {length} of video ({summary['frames_analysed']} frames analysed)")


@app.command()
def audio(
    file: Annotated[Path, typer.Argument(help="An audio file: wav, flac, mp3 (any rate; resampled to 16 kHz mono).")],
    json_out: Annotated[
        bool,
        typer.Option("--json", help='One object: {"duration_s", "speech", "turns", "speakers", "alerts"}.'),
    ] = False,
    sensitivity: Annotated[Sensitivity, typer.Option(help="Rule thresholds.")] = Sensitivity.medium,
) -> None:
    """Voice activity of an audio file, and the audio alerts a session would raise on it."""
    from livekit_proctor.analyzer.offline import analyze_audio_file
    from livekit_proctor.analyzer.pipeline import ModelSet
    from livekit_proctor.analyzer.rules.limits import IncidentLimiter

    s = _settings()
    if not file.is_file():
        raise CliError(f"{file}: cannot open audio (no such file)")
    models = ModelSet.from_settings(s, media="audio")
    try:
        alerts, summary = analyze_audio_file(
            models, file, sensitivity=sensitivity.value, limiter=IncidentLimiter(s.incident_burst, s.incident_refill_s)
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    speech = summary["speech"]
    if json_out:
        out = {
            "duration_s": summary["duration_s"],
            "speech": speech,
            "turns": summary["turns"],  # [] and None while the speaker stage is off (PROCTOR_SPEAKER_EMBEDDING)
            "speakers": summary["speakers"],
            "alerts": [a.model_dump(mode="json") | {"offset_s": offset} for offset, a in alerts],
        }
        print(json.dumps(out))
        return
    length = fmt_duration(summary["duration_s"])
    if speech is None:
        print(f"{length} of audio; voice activity is off (PROCTOR_VAD=false)")
    else:
        voiced = sum(end - start for start, end in speech)
        print(f"{length} of audio, speech {voiced:.1f} s in {len(speech)} segment(s)")
        for start, end in speech:
            print(f"  {start:8.2f} - {end:8.2f} s")
    if summary["speakers"] is not None:
        print(f"{summary['speakers']} speaker(s) heard")
        for t in summary["turns"]:
            print(f"  {t['start_s']:8.2f} - {t['end_s']:8.2f} s  speaker {t['speaker']}")
    if alerts:
        print("\n".join(incident_table(alerts)))
    print(f"-- {summary['incidents']} incident(s)")


class _ProgressBar:
    """A progress bar on stderr while a recording is analysed, only when stderr is a terminal."""

    def __init__(self, total_s: float | None) -> None:
        self.total_s = total_s
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("analysing"),
            BarColumn(),
            TextColumn("{task.fields[at]} / {task.fields[of]}"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=True,  # the table replaces it
        )
        of = fmt_duration(self.total_s) if self.total_s else "?"  # unknown length: a pulsing bar
        task = self.bar.add_task("video", total=self.total_s, at="0s", of=of)
        self.bar.start()

        def tick(t: float) -> None:
            self.bar.update(task, completed=t, at=fmt_duration(t))

        return tick

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def demo(
    url: Annotated[str | None, typer.Option(help="A running analyzer (default: start one in this process).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="PROCTOR_DEMO_API_KEY", help="A system key of the analyzer at --url.")
    ] = None,
) -> None:
    """Stream a synthetic clip (an empty seat, drawn in code) to an analyzer and print the alerts it sends."""
    import asyncio

    import httpx

    from livekit_proctor import demo as demo_mod

    try:
        alerts = asyncio.run(demo_mod.run(url, api_key, _settings, lambda line: print(line, flush=True)))
    except ValueError as e:
        raise CliError(str(e), 2) from None
    except (OSError, RuntimeError, httpx.HTTPError) as e:
        raise CliError(f"demo failed: {type(e).__name__}: {e}") from None
    started = sum(1 for a in alerts if a.get("incident_state") == "started")
    print(f"-- {len(alerts)} alert(s), {started} incident(s)")


class Role(StrEnum):
    system = "system"
    proctor = "proctor"
    admin = "admin"


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="What the key may do.")],
    label: Annotated[str, typer.Option(help="A note kept with the key.")] = "",
) -> None:
    """Create a key and print it (shown once)."""
    from livekit_proctor.analyzer.auth import KeyStore
    from livekit_proctor.datadir import prepare_data_dir
    from livekit_proctor.db import make_engine, make_sessionmaker

    s = _settings()
    prepare_data_dir(s)
    store = KeyStore(make_sessionmaker(make_engine(s.resolved_database_url())))
    print(store.create(role.value, label))


@keys_app.command("rotate-embeddings")
def keys_rotate_embeddings(
    new_key: Annotated[
        bool,
        typer.Option(
            "--new-key",
            help="First add a new current key to <data_dir>/embedding-keys (when PROCTOR_EMBEDDING_KEY is unset); "
            "the older keys are dropped from the file once every row is re-encrypted.",
        ),
    ] = False,
) -> None:
    """Re-encrypt every stored face embedding with the current embedding key."""
    from livekit_proctor import crypto
    from livekit_proctor.datadir import prepare_data_dir
    from livekit_proctor.db import make_engine, make_sessionmaker
    from livekit_proctor.identity_store import rotate

    s = _settings()
    prepare_data_dir(s)
    try:
        path = crypto.key_file(s)
        if new_key:
            if s.embedding_key:
                raise CliError("--new-key manages the key file; with PROCTOR_EMBEDDING_KEY set, set a new key there "
                               "and move the old one to PROCTOR_EMBEDDING_OLD_KEYS")  # fmt: skip
            old = crypto.load_keyring(s)
            older = [old.keys[old.current], *(k for kid, k in old.keys.items() if kid != old.current)]
            crypto.write_key_file(path, [crypto.parse_key(crypto.new_key_text()), *older])
        ring = crypto.load_keyring(s)
        engine = make_engine(s.resolved_database_url())
        try:
            report = rotate(make_sessionmaker(engine), ring)
        finally:
            engine.dispose()
        if new_key:  # every row is under the new key now: the file keeps only it
            crypto.write_key_file(path, [ring.keys[ring.current]])
    except (ValueError, crypto.DecryptError) as e:
        raise CliError(f"rotate-embeddings failed: {e}") from None
    print(report.line())


@app.command()
def dispatcher() -> None:
    """Run the alert dispatcher (outbox -> gRPC, Kafka, webhooks, ...)."""
    import asyncio

    from livekit_proctor.dispatcher.service import run_standalone

    s = _settings()
    _observe(s.log_format, s.log_level, "proctor-dispatcher")
    asyncio.run(run_standalone(s))


def _dead_letters(lane: str | None, ids: list[int] | None, list_only: bool, json_out: bool = False) -> None:
    import time

    from sqlalchemy import select

    from livekit_proctor.db import DeadLetterRow, make_engine, make_sessionmaker

    s = _settings()
    sm = make_sessionmaker(make_engine(s.resolved_database_url()))
    with sm.begin() as db:
        q = select(DeadLetterRow).where(DeadLetterRow.replayed_at.is_(None)).order_by(DeadLetterRow.id)
        if lane:
            q = q.where(DeadLetterRow.lane == lane)
        if ids:
            q = q.where(DeadLetterRow.id.in_(ids))
        rows = list(db.scalars(q).all())
        if list_only:
            for r in rows:
                d = {"id": r.id, "lane": r.lane, "event_id": r.event_id, "event_type": r.event_type,
                     "exam_session_id": r.exam_session_id, "attempts": r.attempts, "error": r.error,
                     "dead_at": r.dead_at, "replay_requested": r.replay_requested_at is not None}  # fmt: skip
                print(json.dumps(d) if json_out else f"{r.id:>6} {r.lane:<8} {r.event_type:<22} {r.event_id} "
                      f"attempts={r.attempts} {r.error[:80]}")  # fmt: skip
            if not json_out:
                print(f"-- {len(rows)} dead letter(s) not replayed")
            return
        if not rows:
            print("nothing to replay")
            return
        now = time.time()
        for r in rows:
            r.replay_requested_at = now
    print(f"{len(rows)} dead letter(s) queued for replay; the running dispatcher sends them on their lane")


@dlq_app.command("list")
def dlq_list(
    lane: Annotated[str | None, typer.Option(help="Only this lane (grpc, kafka, webhook, ...).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per dead letter.")] = False,
) -> None:
    """Dead letters not replayed."""
    _dead_letters(lane, None, list_only=True, json_out=json_out)


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids (default: all).")] = None,
    lane: Annotated[str | None, typer.Option(help="Only this lane.")] = None,
) -> None:
    """Ask the dispatcher to send dead letters again on their lane."""
    _dead_letters(lane, ids, list_only=False)


@app.command()
def purge(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
) -> None:
    """Delete data past its retention (outbox, dead letters, audit, alerts.jsonl): cron it."""
    from livekit_proctor.db import make_engine, make_sessionmaker, sqlite_path
    from livekit_proctor.dispatcher.retention import purge as run_purge

    s = _settings()
    try:
        db = sqlite_path(s.resolved_database_url())
        if db is not None and not db.exists():  # e.g. cron's working directory is not the server's
            raise FileNotFoundError(f"no database at {db} (set PROCTOR_DATA_DIR or PROCTOR_DATABASE_URL)")
        engine = make_engine(s.resolved_database_url())
        try:
            report = run_purge(s, make_sessionmaker(engine), dry_run=dry_run)
        finally:
            engine.dispose()
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise CliError(f"purge failed: {type(e).__name__}: {msg}") from None
    print(report.line())


_CONSUMERS = {"grpc": "grpc_server", "kafka": "kafka", "webhook": "webhook"}  # kind -> module


# The options after the first argument belong to the program started (consumer, agent worker), --help too.
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS_THROUGH)
def consume(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Argument(help="grpc, kafka or webhook; its options follow (--help).")] = None,
) -> None:
    """Reference consumers: receive, verify, deduplicate, print alerts."""
    import importlib

    if kind in (None, "-h", "--help"):  # no help option of its own: `consume webhook --help` is the consumer's
        typer.echo(ctx.get_help())
        raise typer.Exit(2 if kind is None else 0)
    if kind not in _CONSUMERS:
        raise CliError(f"unknown consumer {kind!r}: choose from {', '.join(_CONSUMERS)}", 2)
    module = importlib.import_module(f"livekit_proctor.dispatcher.consumers.{_CONSUMERS[kind]}")
    raise typer.Exit(int(module.main(ctx.args) or 0))


@app.command(context_settings=_PASS_THROUGH)
def agent(ctx: typer.Context) -> None:
    """Run the LiveKit agent worker (its arguments follow: start, dev, --help, ...)."""
    from livekit_proctor.agent.worker import main as agent_main

    raise typer.Exit(int(agent_main(ctx.args) or 0))


class TokenRole(StrEnum):
    candidate = "candidate"
    proctor = "proctor"


@app.command()
def token(
    room: Annotated[str, typer.Option(help="LiveKit room name.")],
    identity: Annotated[str, typer.Option(help="Participant identity.")],
    role: Annotated[TokenRole, typer.Option(help="candidate (publishes media) or proctor (watches).")],
    name: Annotated[str | None, typer.Option(help="Display name (default the identity).")] = None,
    exam_session_id: Annotated[str | None, typer.Option(help="Default ROOM-IDENTITY.")] = None,
    candidate_id: Annotated[str | None, typer.Option(help="Default the identity.")] = None,
    exam_id: Annotated[str | None, typer.Option(help="Default the room.")] = None,
    dispatch: Annotated[bool, typer.Option("--dispatch", help="Ask LiveKit to dispatch the proctoring agent.")] = False,
    api_key: Annotated[str | None, typer.Option(help="Default LIVEKIT_API_KEY.")] = None,
    api_secret: Annotated[str | None, typer.Option(help="Default LIVEKIT_API_SECRET.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help='{"url": ..., "token": ...} on one line.')] = False,
) -> None:
    """Mint a LiveKit room token with the attributes the proctoring agent reads (docs/livekit.md).

    Prints the server URL (LIVEKIT_URL) and the token: `url: ...` and `token: ...` lines.
    """
    from livekit import api

    s = _settings()
    key, secret = api_key or s.livekit_api_key, api_secret or s.livekit_api_secret
    if not key or not secret:
        raise CliError("set LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or --api-key/--api-secret)", 2)
    attrs = {"role": role.value}
    if role is TokenRole.candidate:
        attrs.update(
            {
                "exam_session_id": exam_session_id or f"{room}-{identity}",
                "candidate_id": candidate_id or identity,
                "exam_id": exam_id or room,
            }
        )
    grants = api.VideoGrants(room_join=True, room=room, can_publish=role is TokenRole.candidate,
                             can_subscribe=True, can_publish_data=True)  # fmt: skip
    tok = (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_name(name or identity)
        .with_attributes(attrs)
        .with_grants(grants)
    )
    if dispatch:
        tok = tok.with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=s.agent_name)]))
    jwt = tok.to_jwt()
    if json_out:
        print(json.dumps({"url": s.livekit_url, "token": jwt}))
    else:
        print(f"url: {s.livekit_url or '(LIVEKIT_URL not set)'}")
        print(f"token: {jwt}")


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked)."""
    from livekit_proctor.settings import redact_url

    s = _settings()
    d = s.redacted()  # secrets masked (settings marked SECRET, secret-looking names, passwords in URLs)
    d["database_url"] = redact_url(s.resolved_database_url())
    print(json.dumps(d, indent=2))


def _usage_line(e: Exception) -> str:
    """click's message with where to look, on one line."""
    ctx = getattr(e, "ctx", None)
    cmd = ctx.command_path if ctx is not None else "proctor"
    msg = " ".join(getattr(e, "format_message", e.__str__)().split())
    return f"{msg} (see `{cmd} --help`)"


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="proctor", standalone_mode=False)
    except CliError as e:
        print(f"proctor: {e}", file=sys.stderr)
        return e.exit_code
    except _UsageError as e:
        print(f"proctor: {_usage_line(e)}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("proctor: aborted", file=sys.stderr)
        return 130
    except ValidationError as e:  # e.g. the agent's own settings (PROCTOR_AGENT_*), or a model built from arguments
        from livekit_proctor.settings import describe_settings_error

        if e.title.endswith("Settings"):
            line = describe_settings_error(e)
        else:
            first = e.errors(include_url=False, include_input=False)[0]
            line = f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
        print(f"proctor: {line}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
