"""A session's workers under supervision: every exception is reported and the worker restarted; nothing
in a session's work fails silently (docs/architecture.md, "No silent dead task")."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from livekit_proctor.retry import WORKER_RESTART

OnFailure = Callable[[str, BaseException], None]  # (worker name, exception): log, count, tell the client


class Supervisor:
    def __init__(self, label: str, on_failure: OnFailure, context: Callable[[], contextvars.Context]) -> None:
        self.label = label  # task names: "<worker>:<label>"
        self._on_failure = on_failure
        self._context = context  # each worker gets its own copy (a span current in one stays there)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._bg: set[asyncio.Task[Any]] = set()

    def start(self, name: str, worker: Callable[[], Awaitable[None]]) -> None:
        """Runs a worker until it returns or is cancelled; an exception is reported and the worker restarted."""
        self.tasks[name] = asyncio.create_task(
            self._supervise(name, worker), name=f"{name}:{self.label}", context=self._context()
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "emit") -> None:
        """Background work started from a synchronous callback; its failure is reported under `name`."""
        task = asyncio.create_task(coro)
        self._bg.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and (e := t.exception()) is not None:
                self._on_failure(name, e)

        task.add_done_callback(done)

    def background(self) -> list[asyncio.Task[Any]]:
        return list(self._bg)

    def cancel(self) -> None:
        for t in self.tasks.values():
            t.cancel()

    async def stop(self) -> None:
        self.cancel()
        for t in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _supervise(self, name: str, worker: Callable[[], Awaitable[None]]) -> None:
        backoff = WORKER_RESTART.backoff()
        while True:
            try:
                await worker()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._on_failure(name, e)
                # Back off when it keeps failing, so a poisoned session cannot spin a core.
                await backoff.sleep()
