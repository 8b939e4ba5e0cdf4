"""The job: one per exam ROOM, handling every candidate in it.

Why a room job (explicit dispatch by agent name) and not a publisher job per candidate:

- one LiveKit connection per room: a publisher job per candidate would open one agent participant, one
  peer connection and one data channel per candidate, multiplying connections and joins;
- one place to publish proctor messages: alerts of every candidate go to the proctors of the room through
  the same local participant, and the list of proctors present is known in one place;
- candidates join, leave and come back within the room: a room job sees a candidate who reconnects (or
  rejoins under a new identity for the same exam_session_id) and keeps their analyzer session, where a
  publisher job would end with the participant;
- every candidate still gets an analyzer session of their own (agent.candidate), so candidates in one room
  are independent, and load is counted in candidate sessions (agent.load), not in jobs.

Participants are told apart by their attributes (agent.participants): `role=candidate` (with
exam_session_id, candidate_id, exam_id) are proctored; `role=proctor` receive alerts; agents and everyone
else are ignored. Only candidates' cameras and microphones are subscribed to.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from livekit_proctor.agent.candidate import STREAMED, CandidateSession, source_name
from livekit_proctor.agent.config import AgentSettings
from livekit_proctor.agent.load import ACTIVE_SESSIONS, SessionCount
from livekit_proctor.agent.media import MediaStreams, SdkStreams
from livekit_proctor.agent.participants import Role, candidate_info, role_of
from livekit_proctor.agent.publisher import RoomPublisher
from livekit_proctor.client import AnalyzerClient
from livekit_proctor.contracts.wire import ControlEvent

log = logging.getLogger(__name__)

# Endings after which a returning candidate must not get the session again: the analyzer (or the exam
# backend through it) ended it, another connection owns it, or the analyzer refused it.
_FINAL = frozenset({"session_ended", "ended_by_api", "expired", "unknown_session", "superseded", "start_refused"})


class RoomProctor:
    def __init__(
        self,
        room: Any,
        settings: AgentSettings,
        *,
        client: AnalyzerClient | None = None,
        streams: MediaStreams | None = None,
        sessions: SessionCount = ACTIVE_SESSIONS,
    ) -> None:
        self.room = room
        self.settings = settings
        self._own_client = client is None
        self.client = client or AnalyzerClient(settings.analyzer_url, settings.analyzer_api_key)
        self.streams = streams or SdkStreams()
        self.sessions = sessions
        self.publisher = RoomPublisher(room.local_participant, self.proctor_identities)
        self.candidates: dict[str, CandidateSession] = {}  # by exam_session_id
        self.finished: set[str] = set()
        self._by_identity: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._closed = asyncio.Event()

    @property
    def room_name(self) -> str:
        return str(getattr(self.room, "name", "") or "")

    def proctor_identities(self) -> list[str]:
        return sorted(p.identity for p in list(self.room.remote_participants.values()) if role_of(p) is Role.PROCTOR)

    def candidate_for(self, participant: Any) -> CandidateSession | None:
        sid = self._by_identity.get(participant.identity)
        return self.candidates.get(sid) if sid else None

    # ---- lifecycle

    async def start(self) -> None:
        self.publisher.start()
        on = self.room.on
        on("participant_connected", self._on_participant)
        on("participant_attributes_changed", lambda _changed, p: self._on_participant(p))
        on("participant_metadata_changed", lambda p, _old, _new: self._on_participant(p))
        on("participant_disconnected", self._on_participant_disconnected)
        on("track_published", self._on_track_published)
        on("track_subscribed", self._on_track_subscribed)
        on("track_unsubscribed", self._on_track_unsubscribed)
        on("track_unpublished", self._on_track_unpublished)
        on("track_muted", lambda p, pub: self._on_mute(p, pub, ControlEvent.TRACK_MUTED))
        on("track_unmuted", lambda p, pub: self._on_mute(p, pub, ControlEvent.TRACK_UNMUTED))
        on("disconnected", self._on_disconnected)
        for p in list(self.room.remote_participants.values()):
            self._on_participant(p)
        log.info("proctoring room %s", self.room_name)

    async def aclose(self, reason: str = "room_closed") -> None:
        """Ends every candidate's session (the room is closing or the job shuts down)."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        await asyncio.gather(*(c.end(reason) for c in list(self.candidates.values())), return_exceptions=True)
        await self.publisher.aclose()
        if self._own_client:
            await self.client.aclose()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- participants

    def _on_participant(self, p: Any) -> None:
        if self._closing:
            return
        info = candidate_info(p)
        if info is None:
            return
        sid = info.exam_session_id
        if sid in self.finished:
            return
        c = self.candidates.get(sid)
        if c is not None:
            if c.identity == p.identity and not c.away:
                return  # attributes changed, nothing new
            if c.identity != p.identity and not c.away:
                log.warning("%s claims session %s that %s streams; ignored", p.identity, sid, c.identity)
                return
            self._by_identity.pop(c.identity, None)
            self._by_identity[p.identity] = sid
            c.rejoined(p.identity)
            self._subscribe(p, c)
            return
        c = CandidateSession(
            info,
            room_name=self.room_name,
            client=self.client,
            settings=self.settings,
            streams=self.streams,
            publisher=self.publisher,
            proctors=self.proctor_identities,
            on_closed=self._on_candidate_closed,
            sessions=self.sessions,
        )
        self.candidates[sid] = c
        self._by_identity[p.identity] = sid
        self._subscribe(p, c)  # audio that arrives before the session is up is buffered
        self._spawn(c.start())

    def _subscribe(self, p: Any, c: CandidateSession) -> None:
        for pub in list(p.track_publications.values()):
            if source_name(pub) not in STREAMED:
                continue
            if getattr(pub, "track", None) is not None and getattr(pub, "subscribed", False):
                c.attach_track(pub.track, pub)
            else:
                pub.set_subscribed(True)

    def _on_participant_disconnected(self, p: Any) -> None:
        c = self.candidate_for(p)
        if c is not None and c.identity == p.identity:
            c.participant_left()

    def _on_candidate_closed(self, c: CandidateSession, reason: str) -> None:
        if self.candidates.get(c.session_id) is c:
            del self.candidates[c.session_id]
        if self._by_identity.get(c.identity) == c.session_id:
            del self._by_identity[c.identity]
        if reason in _FINAL:
            self.finished.add(c.session_id)

    # ---- tracks

    def _on_track_published(self, pub: Any, p: Any) -> None:
        if self.candidate_for(p) is not None and source_name(pub) in STREAMED:
            pub.set_subscribed(True)

    def _on_track_subscribed(self, track: Any, pub: Any, p: Any) -> None:
        c = self.candidate_for(p)
        if c is not None:
            c.attach_track(track, pub)

    def _on_track_unsubscribed(self, _track: Any, pub: Any, p: Any) -> None:
        c = self.candidate_for(p)
        if c is not None:
            c.detach_track(pub)

    def _on_track_unpublished(self, pub: Any, p: Any) -> None:
        c = self.candidate_for(p)
        if c is None:
            return
        c.detach_track(pub)
        name = source_name(pub)
        if name is not None and not c.away:
            c.track_ended(name)

    def _on_mute(self, p: Any, pub: Any, event: str) -> None:
        c = self.candidate_for(p)
        name = source_name(pub)
        if c is not None and name is not None:
            c.control(event, name)

    def _on_disconnected(self, *_: Any) -> None:
        self._spawn(self.aclose("room_closed"))
