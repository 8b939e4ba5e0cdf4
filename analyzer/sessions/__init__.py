"""Sessions: their durable rows, their live runtime and the manager.

errors.py      what lifecycle calls raise
store.py       SessionRow reads and writes (start, end, save, expiry, pruning), in threads
counters.py    the counters a session keeps and saves
live.py        LiveSession: ingest, supervised workers, rule state that survives a restart
media.py       video latest-wins slot, lossless bounded audio queue, the ping barrier
supervisor.py  workers restarted after an exception, never a silent dead task
emitter.py     alerts out: rate limit, build (analyzer/alerting.py), outbox with the state, fan-out
fanout.py      bounded per-WebSocket queues of outgoing messages
frames.py      the last seconds of received frames (JPEG), for verify-frame
manager.py     SessionManager: lifecycle, restore after a restart, housekeeping, views
"""

from livekit_proctor.analyzer.sessions.errors import SessionClosed, SessionConflict, SessionNotFound
from livekit_proctor.analyzer.sessions.fanout import Subscriber
from livekit_proctor.analyzer.sessions.live import LiveSession
from livekit_proctor.analyzer.sessions.manager import SessionManager

__all__ = ["LiveSession", "SessionClosed", "SessionConflict", "SessionManager", "SessionNotFound", "Subscriber"]
