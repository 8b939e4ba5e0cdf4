"""The composition root of `proctor serve`: the analyzer app with the outbox, the embedded dispatcher and the
data retention that the settings ask for.

The analyzer knows the outbox only as an AlertSink (proctor/contracts/outbox.py); this module picks the
implementation and runs the dispatcher's parts beside it. Only the CLI and tests import it
(tests/test_layers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from sqlalchemy.orm import sessionmaker

from livekit_proctor.analyzer.app import Host, LifespanHook, create_app
from livekit_proctor.analyzer.pipeline import ModelSet
from livekit_proctor.contracts.outbox import AlertSink
from livekit_proctor.dispatcher import jsonl, retention
from livekit_proctor.dispatcher.outbox import RedisOutbox, SqlOutbox
from livekit_proctor.dispatcher.service import build_dispatcher, redis_client
from livekit_proctor.settings import Settings

log = logging.getLogger("proctor")


def outbox_for(settings: Settings, sm: sessionmaker) -> AlertSink:
    """PROCTOR_OUTBOX: the SQL table (embedded) or a Redis Stream that dispatchers share."""
    if settings.outbox == "redis":
        return RedisOutbox(redis_client(settings), settings.outbox_stream, settings.resolved_outbox_jsonl(), sm)
    return SqlOutbox(sm, settings.resolved_outbox_jsonl())


@contextlib.asynccontextmanager
async def embedded_dispatcher(host: Host) -> AsyncIterator[None]:
    """PROCTOR_DISPATCHER_EMBEDDED: delivers from the outbox inside `proctor serve`; its lanes show in
    readiness ("delivery") and its metrics in the analyzer's /metrics."""
    dispatcher = build_dispatcher(host.settings, host.sm)
    await dispatcher.start()
    host.delivery = dispatcher.state
    host.registries.append(dispatcher.metrics.registry)
    try:
        yield
    finally:
        await dispatcher.stop()


@contextlib.asynccontextmanager
async def data_retention(host: Host) -> AsyncIterator[None]:
    """Purges outbox rows, dead letters, audit rows and alerts.jsonl past their retention (dispatcher/
    retention.py): checked every expiry_sweep_s, run at most every purge_interval_s."""

    async def run() -> None:
        while True:
            await asyncio.sleep(host.settings.expiry_sweep_s)
            try:
                await retention.purge_due(host.settings, host.sm)
            except Exception:
                log.exception("retention failed")

    task = asyncio.create_task(run(), name="retention")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class AlertsJsonl:
    """The candidate's lines in alerts.jsonl, for the privacy routes (contracts.identity.CandidateData)."""

    path: Path
    name: str = "alerts_jsonl"

    @staticmethod
    def _match(candidate_id: str, session_ids: Sequence[str]) -> Callable[[bytes], bool]:
        sids = set(session_ids)

        def match(line: bytes) -> bool:
            try:
                a = json.loads(line)
            except ValueError:
                return False
            return isinstance(a, dict) and (a.get("candidate_id") == candidate_id or a.get("exam_session_id") in sids)

        return match

    def export(self, candidate_id: str, session_ids: Sequence[str]) -> list[Any]:
        return [json.loads(line) for line in jsonl.matching(self.path, self._match(candidate_id, session_ids))]

    def erase(self, candidate_id: str, session_ids: Sequence[str]) -> int:
        return jsonl.remove(self.path, self._match(candidate_id, session_ids))


@contextlib.asynccontextmanager
async def alerts_jsonl_privacy(host: Host) -> AsyncIterator[None]:
    """Lets the privacy export / delete routes reach the candidate's lines in alerts.jsonl."""
    host.candidate_data.append(AlertsJsonl(host.settings.resolved_outbox_jsonl()))
    yield


def analyzer_app(settings: Settings | None = None, models: ModelSet | None = None) -> FastAPI:
    """The app `proctor serve` runs (and the tests' live server)."""
    settings = settings or Settings()
    hooks: list[LifespanHook] = [data_retention, alerts_jsonl_privacy]
    if settings.dispatcher_embedded:
        hooks.insert(0, embedded_dispatcher)
    return create_app(settings, models, outbox=outbox_for, hooks=hooks)
