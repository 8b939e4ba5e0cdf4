"""LiveKit room transport: the real livekit-api client against a FAKE RoomService (no LiveKit server
exists here). The fake stands at the SDK boundary: it takes the Twirp request livekit-api sends
(protobuf SendDataRequest, signed JWT) and records it."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.contracts.room import ALERT_TOPIC, MAX_RELIABLE_PACKET, fit_packet
from livekit_proctor.dispatcher.transports.base import Envelope
from livekit_proctor.dispatcher.transports.livekit_room import LiveKitRoomTransport
from tests.servers import free_port

KEY, SECRET = "devkey", "devsecret_devsecret_devsecret_32b"


class FakeRoomService:
    """Named as what it is: a stand-in for LiveKit's RoomService, verifying auth like the server does."""

    def __init__(self) -> None:
        from livekit import api
        from livekit.protocol import room

        self.requests: list[tuple[room.SendDataRequest, dict]] = []
        app = FastAPI()
        verifier = api.TokenVerifier(KEY, SECRET)

        @app.post("/twirp/livekit.RoomService/SendData")
        async def send_data(request: Request) -> Response:
            claims = verifier.verify(request.headers["authorization"].removeprefix("Bearer "))
            req = room.SendDataRequest.FromString(await request.body())
            assert claims.video is not None
            self.requests.append((req, {"room_admin": claims.video.room_admin, "room": claims.video.room}))
            return Response(room.SendDataResponse().SerializeToString(), media_type="application/protobuf")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeRoomService:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def fake_room() -> Iterator[FakeRoomService]:
    pytest.importorskip("livekit.api")
    with FakeRoomService() as f:
        yield f


def envelope(seq: int, evidence: dict, **meta: Any) -> Envelope:
    a = Alert(exam_session_id="s1", candidate_id="c1", event_type=EventType.PHONE_DETECTED, severity_score=0.8,
              ai_model_source="nanodet", evidence=evidence,
              metadata=AlertMetadata(node_id="n", worker_id="w", **meta))  # fmt: skip
    return Envelope(seq, a.event_id, "s1", "PHONE_DETECTED", a.to_json().encode(), time.time())


async def test_alerts_reach_proctors_only_within_the_packet_limit(fake_room: FakeRoomService) -> None:
    t = LiveKitRoomTransport(f"http://127.0.0.1:{fake_room.port}", KEY, SECRET)
    await t.start()
    big_thumb = base64.b64encode(bytes(range(256)) * 60).decode()  # ~20 KB of base64
    batch = [
        envelope(1, {"phone_score": 0.8}, livekit_room="exam-42", proctor_identities=["proctor-1", "proctor-2"]),
        envelope(
            2,
            {"phone_score": 0.9, "thumbnail_jpeg_b64": big_thumb},
            livekit_room="exam-42",
            proctor_identities=["proctor-1"],
        ),
        envelope(3, {"phone_score": 0.7}),  # not a LiveKit session: nothing to send
    ]
    await t.send(batch)
    await t.close()
    assert len(fake_room.requests) == 2 and t.state()["skipped_no_room"] == 1
    first, auth = fake_room.requests[0]
    assert first.room == "exam-42" and first.topic == ALERT_TOPIC
    assert list(first.destination_identities) == ["proctor-1", "proctor-2"]
    assert auth == {"room_admin": True, "room": "exam-42"}
    assert json.loads(first.data)["event_id"] == batch[0].event_id
    second = fake_room.requests[1][0]
    assert len(second.data) <= MAX_RELIABLE_PACKET
    ev = json.loads(second.data)["evidence"]
    assert ev["thumbnail_omitted"] is True and "thumbnail_jpeg_b64" not in ev and ev["phone_score"] == 0.9


async def test_unreachable_room_service_is_a_delivery_error() -> None:
    from livekit_proctor.dispatcher.transports.base import DeliveryError

    t = LiveKitRoomTransport(f"http://127.0.0.1:{free_port()}", KEY, SECRET)
    await t.start()
    with pytest.raises(DeliveryError) as e:
        await t.send([envelope(1, {}, livekit_room="r", proctor_identities=["p"])])
    assert e.value.delivered == 0
    await t.close()


def test_fit_packet_reduces_huge_evidence() -> None:
    alert = {"event_id": "x", "evidence": {"objects": ["y" * 100] * 400, "phone_score": 0.9}}
    data = fit_packet(alert)
    assert len(data) <= MAX_RELIABLE_PACKET
    assert json.loads(data)["evidence"] == {"phone_score": 0.9, "evidence_truncated": True}
