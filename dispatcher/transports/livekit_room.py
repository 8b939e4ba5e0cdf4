"""Proctor alerts and candidate feedback into the LiveKit room's data channel, through the server API
(RoomService.SendData), for deployments where no proctoring agent sits in the room.

Ownership (docs/livekit.md): by default the agent publishes room messages; enable this transport only
when no agent is used, so a message never reaches the room twice.

Topic `proctoring.alert`, sent only to proctor identities: the session's metadata `proctor_identities`
(copied into the alert's metadata) or the configured list. Reliable data packets are at most 15 KiB:
when the alert would not fit, the evidence thumbnail is dropped (`thumbnail_omitted`: true) and, if still
too large, the evidence is reduced to its scalar values.
"""

from __future__ import annotations

import json
from typing import Any

from livekit_proctor.dispatcher.transports.base import DeliveryError, Envelope, RetryPolicy

MAX_RELIABLE_PACKET = 15 * 1024
ALERT_TOPIC = "proctoring.alert"
FEEDBACK_TOPIC = "proctoring.feedback"


def fit_packet(alert: dict[str, Any], limit: int = MAX_RELIABLE_PACKET) -> bytes:
    """The alert as JSON within the reliable-packet limit."""
    data = json.dumps(alert, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    a = dict(alert)
    ev = dict(a.get("evidence") or {})
    if ev.pop("thumbnail_jpeg_b64", None) is not None:
        ev["thumbnail_omitted"] = True
    a["evidence"] = ev
    data = json.dumps(a, separators=(",", ":")).encode()
    if len(data) <= limit:
        return data
    a["evidence"] = {k: v for k, v in ev.items() if isinstance(v, str | int | float | bool) or v is None}
    a["evidence"]["evidence_truncated"] = True
    return json.dumps(a, separators=(",", ":")).encode()[:limit]


class LiveKitRoomTransport:
    name = "livekit"

    def __init__(self, url: str, api_key: str, api_secret: str, *, proctor_identities: list[str] | None = None,
                 retry: RetryPolicy | None = None, max_batch: int = 20) -> None:  # fmt: skip
        self.url, self.api_key, self.api_secret = url, api_key, api_secret
        self.proctor_identities = proctor_identities or []
        self.retry = retry or RetryPolicy()
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
            meta = alert.get("metadata") or {}
            room_name = meta.get("livekit_room")
            if not room_name:
                self.skipped_no_room += 1  # not a LiveKit session: nothing to deliver here
                continue
            identities = meta.get("proctor_identities") or self.proctor_identities
            req = room.SendDataRequest(
                room=room_name,
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
