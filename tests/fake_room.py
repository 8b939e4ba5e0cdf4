"""A FAKE LiveKit room, the only fake of the agent tests (no LiveKit server exists here).

It stands at the SDK boundary: FakeRoom emits the events rtc.Room emits (same names, same arguments:
participant_connected, participant_disconnected, track_published, track_subscribed, track_unsubscribed,
track_unpublished, track_muted, track_unmuted, participant_attributes_changed, disconnected), its
participants and publications have the attributes the agent reads, and FakeLocalParticipant records
publish_data calls (refusing reliable packets over 15 KiB, as LiveKit does). FakeTrack yields REAL
rtc.VideoFrameEvent / rtc.AudioFrameEvent objects that the test pushes; FakeStreams hands them to the agent
where production code opens rtc.VideoStream / rtc.AudioStream on a real track.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc

MAX_RELIABLE_PACKET = 15 * 1024
_ids = itertools.count(1)


class FakeTrack:
    def __init__(self, kind: int) -> None:
        self.kind = kind
        self.sid = f"TR_fake{next(_ids)}"
        self._events: asyncio.Queue[rtc.VideoFrameEvent | rtc.AudioFrameEvent | None] = asyncio.Queue()

    def push_video(self, frame: rtc.VideoFrame, timestamp_us: int = 0) -> None:
        # livekit annotates VideoFrameEvent.rotation as the enum class; it holds the enum's int value.
        rotation = rtc.VideoRotation.VIDEO_ROTATION_0
        self._events.put_nowait(rtc.VideoFrameEvent(frame, timestamp_us, rotation))  # type: ignore[arg-type]

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        self._events.put_nowait(rtc.AudioFrameEvent(frame))

    def end(self) -> None:
        self._events.put_nowait(None)

    @property
    def backlog(self) -> int:
        return self._events.qsize()


class _FakeStream:
    def __init__(self, track: FakeTrack) -> None:
        self.track = track

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        ev = await self.track._events.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def aclose(self) -> None:
        pass


class FakeStreams:
    """agent.media.MediaStreams over fake tracks."""

    def video(self, track: FakeTrack) -> _FakeStream:
        return _FakeStream(track)

    def audio(self, track: FakeTrack) -> _FakeStream:
        return _FakeStream(track)


class FakePublication:
    def __init__(
        self,
        room: FakeRoom,
        participant: FakeParticipant,
        track: FakeTrack,
        source: rtc.TrackSource.ValueType,
        muted: bool,
    ):
        self.room = room
        self.participant = participant
        self.sid = f"TR_pub{next(_ids)}"
        self.kind = track.kind
        self.source = source
        self.muted = muted
        self.name = rtc.TrackSource.Name(source).lower()
        self.subscribed = False
        self.track: FakeTrack | None = None  # like RemoteTrackPublication: set once subscribed
        self._track = track

    def set_subscribed(self, subscribed: bool) -> None:
        if subscribed and not self.subscribed:
            # The SDK answers a subscription with a track_subscribed event later, not in the call.
            asyncio.get_running_loop().call_soon(self.room._subscribed, self)


class FakeParticipant:
    def __init__(self, identity: str, attributes: dict[str, str], metadata: str, kind: int) -> None:
        self.identity = identity
        self.sid = f"PA_fake{next(_ids)}"
        self.name = identity
        self.attributes = dict(attributes)
        self.metadata = metadata
        self.kind = kind
        self.track_publications: dict[str, FakePublication] = {}
        self.disconnect_reason = 0


@dataclass
class Published:
    payload: bytes
    reliable: bool
    destination_identities: list[str]
    topic: str


@dataclass
class FakeLocalParticipant:
    identity: str = "agent-fake"
    published: list[Published] = field(default_factory=list)

    async def publish_data(
        self,
        payload: bytes | str,
        *,
        reliable: bool = True,
        destination_identities: list[str] | None = None,
        topic: str = "",
    ) -> None:
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if reliable and len(data) > MAX_RELIABLE_PACKET:
            raise RuntimeError(f"reliable packet of {len(data)} bytes exceeds {MAX_RELIABLE_PACKET}")
        self.published.append(Published(data, reliable, list(destination_identities or []), topic))


class FakeRoom(rtc.EventEmitter[str]):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.remote_participants: dict[str, FakeParticipant] = {}
        self.local_participant = FakeLocalParticipant()

    def isconnected(self) -> bool:
        return True

    # ---- what other participants do

    def join(
        self,
        identity: str,
        attributes: dict[str, str] | None = None,
        metadata: str = "",
        kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
    ) -> FakeParticipant:
        p = FakeParticipant(identity, attributes or {}, metadata, kind)
        self.remote_participants[identity] = p
        self.emit("participant_connected", p)
        return p

    def leave(self, p: FakeParticipant) -> None:
        for pub in list(p.track_publications.values()):
            self.unpublish(pub)
        self.remote_participants.pop(p.identity, None)
        self.emit("participant_disconnected", p)

    def set_attributes(self, p: FakeParticipant, attributes: dict[str, str]) -> None:
        p.attributes.update(attributes)
        self.emit("participant_attributes_changed", dict(attributes), p)

    def publish(
        self, p: FakeParticipant, source: rtc.TrackSource.ValueType, muted: bool = False
    ) -> tuple[FakePublication, FakeTrack]:
        audio = source in (rtc.TrackSource.SOURCE_MICROPHONE, rtc.TrackSource.SOURCE_SCREENSHARE_AUDIO)
        track = FakeTrack(rtc.TrackKind.KIND_AUDIO if audio else rtc.TrackKind.KIND_VIDEO)
        pub = FakePublication(self, p, track, source, muted)
        p.track_publications[pub.sid] = pub
        self.emit("track_published", pub, p)
        return pub, track

    def mute(self, pub: FakePublication) -> None:
        pub.muted = True
        self.emit("track_muted", pub.participant, pub)

    def unmute(self, pub: FakePublication) -> None:
        pub.muted = False
        self.emit("track_unmuted", pub.participant, pub)

    def unpublish(self, pub: FakePublication) -> None:
        p = pub.participant
        if pub.subscribed:
            pub.subscribed = False
            self.emit("track_unsubscribed", pub._track, pub, p)
        pub._track.end()
        pub.track = None
        p.track_publications.pop(pub.sid, None)
        self.emit("track_unpublished", pub, p)

    def close(self) -> None:
        self.emit("disconnected", rtc.DisconnectReason.ROOM_DELETED)

    def _subscribed(self, pub: FakePublication) -> None:
        if pub.sid not in pub.participant.track_publications or pub.subscribed:
            return
        pub.subscribed = True
        pub.track = pub._track
        self.emit("track_subscribed", pub._track, pub, pub.participant)

    # ---- what the agent sent

    def sent(self, topic: str) -> list[Published]:
        return [m for m in self.local_participant.published if m.topic == topic]
