"""Proctor alerts and candidate feedback into the LiveKit room's data channel, through the server API
(RoomService.SendData), for deployments where no proctoring agent sits in the room.

Ownership (docs/livekit.md): by default the agent publishes room messages; enable this transport only
when no agent is used, so a message never reaches the room twice.

The room contract (topic, packet limit, fit_packet) is livekit_proctor.contracts.room; the routing hints
(room, proctor identities) are the alert's RoomRouting (livekit_proctor.contracts.alerts), written by the
agent at session start. Alerts go to the alert's `proctor_identities`, or the configured list.
"""

from __future__ import annotations

from typing import Any

from livekit_proctor.contracts.alerts import RoomRouting
from livekit_proctor.contracts.room import ALERT_TOPIC, fit_packet
from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy


class LiveKitRoomTransport:
    name = "livekit"

    def __init__(self, url: str, api_key: str, api_secret: str, *, proctor_identities: list[str] | None = None,
                 retry: RetryPolicy | None = None, max_batch: int = 20) -> None:  # fmt: skip
        self.url, self.api_key, self.api_secret = url, api_key, api_secret
        self.proctor_identities = proctor_identities or []
        self.retry = retry or DISPATCH
        self.max_batch = max_batch
        self._api: Any = None
        self.last_error: str | None = None
        self.skipped_no_room = 0

    async def start(self) -> None:
        from livekit import api

        self._api = api.LiveKitAPI(self.url, self.api_key, self.api_secret)

    async def send(self, batch: list[Envelope]) -> None:
        from livekit.protocol import models, room

        for i, e in enumerate(batch):
            alert = e.alert()
            to = RoomRouting.of_alert(alert)
            if not to.livekit_room:
                self.skipped_no_room += 1  # not a LiveKit session: nothing to deliver here
                continue
            identities = to.proctor_identities or self.proctor_identities
            req = room.SendDataRequest(
                room=to.livekit_room,
                data=fit_packet(alert),
                kind=models.DataPacket.Kind.RELIABLE,
                destination_identities=list(identities),
                topic=ALERT_TOPIC,
            )
            try:
                await self._api.room.send_data(req)
            except Exception as ex:
                self.last_error = f"{type(ex).__name__}: {ex}"
                raise DeliveryError(self.last_error, delivered=i) from None
        self.last_error = None

    async def close(self) -> None:
        if self._api is not None:
            await self._api.aclose()

    def state(self) -> dict[str, Any]:
        return {"url": self.url, "last_error": self.last_error, "skipped_no_room": self.skipped_no_room}
