"""The LiveKit agent worker: `proctor agent start` (production) or `proctor agent dev` (development).

main(argv) runs a livekit-agents 1.8 AgentServer that registers with the LiveKit server for explicit
dispatch under PROCTOR_AGENT_NAME ("proctor"): rooms get the agent through a dispatch in the participant
token (`proctor token --dispatch`) or the AgentDispatch API. Each job is one room (agent.room).

Jobs run as threads of the worker process, not as child processes: the work per room is I/O plus JPEG
encoding that releases the GIL, and the load function (agent.load) must see every room's candidate
sessions to report the analyzer capacity left.

Credentials: --url / --api-key / --api-secret, else PROCTOR_LIVEKIT_URL / _API_KEY / _API_SECRET, else
LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from livekit_proctor import observability
from livekit_proctor.agent.config import AgentSettings
from livekit_proctor.agent.load import AnalyzerLoad

log = logging.getLogger(__name__)


async def entrypoint(ctx: Any, settings: AgentSettings | None = None) -> None:
    """One job = one room: connect without auto-subscribing (only candidates' tracks are wanted)."""
    from livekit.agents import AutoSubscribe

    from livekit_proctor.agent.room import RoomProctor

    await ctx.connect(auto_subscribe=AutoSubscribe.SUBSCRIBE_NONE)
    proctor = RoomProctor(ctx.room, settings or AgentSettings())

    async def on_shutdown(reason: str) -> None:
        log.info("job for room %s shutting down: %s", proctor.room_name, reason)
        await proctor.aclose("room_closed")

    ctx.add_shutdown_callback(on_shutdown)
    await proctor.start()


def build_server(settings: AgentSettings | None = None) -> Any:
    from livekit.agents import AgentServer, JobExecutorType

    s = settings or AgentSettings()
    url, key, secret = s.resolved_livekit()
    server = AgentServer(
        job_executor_type=JobExecutorType.THREAD,
        load_fnc=AnalyzerLoad(s.analyzer_url, s.agent_max_sessions),
        # Full at max sessions, when the analyzer is not ready, or at 100 % CPU (load is capped at 1.0).
        load_threshold=1.0,
        ws_url=url or None,
        api_key=key or None,
        api_secret=secret or None,
    )

    async def room_job(ctx: Any) -> None:  # jobs are threads (above): the worker's settings go along
        await entrypoint(ctx, s)

    server.rtc_session(room_job, agent_name=s.agent_name)
    return server


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proctor agent", description="Run the LiveKit proctoring agent worker.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("start", "run in production mode"), ("dev", "run in development mode (verbose logs)")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--url", help="LiveKit server URL (default PROCTOR_LIVEKIT_URL or LIVEKIT_URL)")
        sp.add_argument("--api-key")
        sp.add_argument("--api-secret")
        sp.add_argument("--log-level", help="default PROCTOR_LOG_LEVEL, else " + ("DEBUG" if name == "dev" else "INFO"))
        sp.add_argument(
            "--log-format",
            choices=["json", "text", "colored"],  # colored: livekit-agents' name for text
            help="default PROCTOR_LOG_FORMAT, else " + ("text" if name == "dev" else "json"),
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """`main(["start"])` or `main(["dev"])`; returns the exit status."""
    args = _parser().parse_args(argv)
    settings = AgentSettings()
    url, key, secret = settings.resolved_livekit()
    url, key, secret = args.url or url, args.api_key or key, args.api_secret or secret
    if not (url and key and secret):
        print("error: set the LiveKit URL, API key and secret (PROCTOR_LIVEKIT_URL/_API_KEY/_API_SECRET, "
              "LIVEKIT_URL/_API_KEY/_API_SECRET or --url/--api-key/--api-secret)", file=sys.stderr)  # fmt: skip
        return 2
    if not settings.analyzer_api_key:
        print("error: set PROCTOR_ANALYZER_API_KEY (an analyzer API key with role system)", file=sys.stderr)
        return 2

    from livekit.agents.cli import cli as lk_cli
    from livekit.agents.cli import proto

    dev = args.command == "dev"
    log_level = (args.log_level or settings.log_level or ("DEBUG" if dev else "INFO")).upper()
    log_format = args.log_format or settings.log_format or ("text" if dev else "json")
    log_format = "text" if log_format == "colored" else log_format.lower()
    if log_format not in observability.LOG_FORMATS:
        print(f"error: log format must be json or text, not {log_format!r}", file=sys.stderr)
        return 2
    lk_setup_logging = lk_cli.setup_logging

    def setup_logging(log_level: str, *rest: Any, **kw: Any) -> None:  # livekit's first parameter, by name
        # livekit-agents' runner sets up logging itself: keep its logger levels, put our handler in place
        # of its own so the agent's records share the analyzer's format (proctor.observability).
        root = logging.getLogger()
        before = set(root.handlers)
        lk_setup_logging(log_level, *rest, **kw)
        added = [h for h in root.handlers if h not in before]
        for h in added:
            root.removeHandler(h)
        ours = observability.configure_logging(log_format, log_level)
        for f in (f for h in added for f in h.filters):
            ours.addFilter(f)  # livekit's global fields (e.g. region)

    lk_cli.setup_logging = setup_logging
    server = build_server(settings)
    # livekit-agents' own runner: signal handling, graceful drain on SIGTERM, logging setup.
    lk_cli._run_worker(
        server,
        proto.CliArgs(
            log_level=log_level,
            url=url,
            api_key=key,
            api_secret=secret,
            log_format="colored" if log_format == "text" else "json",
            dev=dev,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
