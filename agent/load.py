"""Worker load for LiveKit's job assignment: how much more this worker (and its analyzer) can take.

load = max(active candidate sessions / agent_max_sessions, local CPU), and 1.0 while the analyzer's
readiness check (GET /.well-known/ready) fails or says not ready: a worker whose analyzer cannot take
sessions must not get rooms. livekit-agents calls the load function every 0.5 s in an executor thread;
CPU and readiness are sampled by a background thread so the call itself never waits.

Sessions are counted in this process: the worker runs jobs as threads (agent.worker), so every room's
candidates are seen here.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx

log = logging.getLogger(__name__)


class SessionCount:
    """Active candidate sessions in this process (jobs run in threads, each with its own event loop)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self._n = max(0, self._n + delta)

    @property
    def value(self) -> int:
        with self._lock:
            return self._n


ACTIVE_SESSIONS = SessionCount()


def compute_load(active: int, max_sessions: int, cpu: float, analyzer_ready: bool) -> float:
    if not analyzer_ready:
        return 1.0
    return min(1.0, max(active / max(1, max_sessions), cpu))


def analyzer_ready(base_url: str, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/.well-known/ready", timeout=timeout, trust_env=False)
        return r.status_code == 200 and bool(r.json().get("ready"))
    except (httpx.HTTPError, ValueError):
        return False


class AnalyzerLoad:
    """The load function handed to AgentServer(load_fnc=...): a zero-argument callable."""

    def __init__(
        self,
        analyzer_url: str,
        max_sessions: int,
        *,
        sessions: SessionCount = ACTIVE_SESSIONS,
        ready_interval_s: float = 5.0,
        cpu_interval_s: float = 1.0,
    ) -> None:
        self.analyzer_url = analyzer_url
        self.max_sessions = max_sessions
        self.sessions = sessions
        self.ready_interval_s = ready_interval_s
        self.cpu_interval_s = cpu_interval_s
        self.ready = False  # until the first probe says otherwise
        self.cpu = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._sample, name="proctor-load", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        from livekit.agents.utils.hw import get_cpu_monitor

        monitor = get_cpu_monitor()
        next_probe = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_probe:
                ready = analyzer_ready(self.analyzer_url)
                if ready != self.ready:
                    log.info("analyzer %s is %s", self.analyzer_url, "ready" if ready else "NOT ready")
                self.ready = ready
                next_probe = time.monotonic() + self.ready_interval_s
            try:
                self.cpu = float(monitor.cpu_percent(interval=self.cpu_interval_s))  # blocks for the interval
            except Exception:
                self.cpu = 0.0
                self._stop.wait(self.cpu_interval_s)

    def __call__(self) -> float:
        self.start()
        return compute_load(self.sessions.value, self.max_sessions, self.cpu, self.ready)
