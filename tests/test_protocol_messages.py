"""Server messages of the v1 protocol: every message the analyzer sends parses with the models of
proctor/contracts/wire.py (the union ServerMessage) and loses nothing to them; docs/protocol.md's table and
examples match the models; the shared client and the agent skip what they do not know.

The recorded session runs against the real server. The agent test uses a STAND-IN analyzer (a small
websockets server on loopback): the real one never sends an unknown type or a malformed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, get_args

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from livekit_proctor.agent.analyzer_client import SessionStream
from livekit_proctor.client import AnalyzerClient, StreamConnection
from livekit_proctor.client import stream_url as stream_url_of
from livekit_proctor.contracts import wire
from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType, IncidentState, RoomRouting, room_keys
from tests.conftest import REPO, LiveServer, StreamClient, black_jpeg, stream_url

TYPES = {m.model_fields["type"].default: m for m in wire.SERVER_MESSAGES}


def test_the_union_and_the_list_of_server_messages_agree() -> None:
    assert set(get_args(wire.ServerMessage)) == set(wire.SERVER_MESSAGES)
    assert len(TYPES) == len(wire.SERVER_MESSAGES)  # one model per type


async def test_every_message_of_a_session_parses_with_the_models(server: LiveServer) -> None:
    """A session that raises an incident, gets feedback, errors, pongs and heartbeats, then ends. StreamClient
    fails the test for any message the models reject or would change (conftest.StreamClient)."""
    sid = "proto-msgs"
    cfg = server.start_session(sid, rules={"FACE_NOT_FOUND": {"trigger_after_s": 1.0}})
    base = time.time() - 20
    async with StreamClient.connect(stream_url(cfg)) as c:
        for i in range(12):  # 2.4 s of capture time without a face, each frame analysed
            await c.video(black_jpeg(), base + i * 0.2)
            await c.sync()
        seq = await c.video(b"not a jpeg", base + 3)
        await c.ws.send("not json")
        await c.sync()
        await c.wait_for(lambda m: m["type"] == "heartbeat")
        stats = server.app.state.sessions.live[sid].stats()
        with server.http() as h:
            assert h.post(f"/api/v1/session/{sid}/end").status_code == 200
        await c.wait_for(lambda m: m["type"] == "session_ended")
    seen = {m["type"] for m in c.messages}
    assert seen >= {"hello", "alert", "feedback", "heartbeat", "error", "pong", "session_ended"}, seen
    # Heartbeat stats: every counter the session reports is a field of the model (none is dropped on the way).
    assert set(stats) == set(wire.HeartbeatStats.model_fields)
    errors = [m for m in c.typed if isinstance(m, wire.ErrorMessage)]
    assert [(e.code, e.seq) for e in errors] == [("not_jpeg", seq), ("malformed", None)]
    assert "seq" not in c.of_type("error")[1]  # left out, not null
    alerts = [m.alert for m in c.typed if isinstance(m, wire.AlertMessage)]
    assert {(a.event_type, a.incident_state) for a in alerts} >= {
        ("FACE_NOT_FOUND", "started"),
        ("FACE_NOT_FOUND", "ended"),
    }


def _flow(fill: float) -> wire.FlowMessage:
    return wire.FlowMessage(audio="slow_down", audio_queue_fill=fill)


def _alert() -> Alert:
    routing = RoomRouting(livekit_room="room-1", candidate_identity="alice", proctor_identities=["p1"])
    return Alert(
        exam_session_id="s1",
        candidate_id="c1",
        event_type=EventType.FACE_NOT_FOUND,
        severity_score=0.5,
        ai_model_source="test",
        metadata=AlertMetadata(node_id="n", worker_id="w", **room_keys(routing.as_metadata())),
        incident_id="i1",
        incident_state=IncidentState.STARTED,
    )


EXAMPLES: list[wire.ServerMessage] = [
    wire.HelloMessage(
        session_id="s1", video_fps=5, max_frame_bytes=1, max_frame_pixels=1, max_clock_skew_s=600, heartbeat_s=10
    ),
    wire.AlertMessage(alert=_alert()),
    wire.FeedbackMessage(code="FACE_NOT_FOUND", message="Please look at the camera.", incident_id=None, ts=1.5),
    wire.HeartbeatMessage(
        ts=1.0,
        session_id="s1",
        stats=wire.HeartbeatStats(
            frames_processed=1,
            frames_received=2,
            frames_dropped=0,
            alerts_triggered=0,
            incidents_suppressed=0,
            worker_errors=0,
            audio_seconds=0.5,
            audio_queue_fill=0.0,
            last_face_verification=None,
            risk_score=0.0,
            risk_band="low",
        ),
    ),
    _flow(0.8),
    wire.FlowMessage(audio="resume", audio_queue_fill=0.2),
    wire.ErrorMessage(code=wire.ErrorCode.ANALYSIS_ERROR, reason="internal"),
    wire.ErrorMessage(code="not_jpeg", reason="x", seq=4),
    wire.PongMessage(ts=2.0),
    wire.PongMessage(ts=2.0, id="sync-1"),
    wire.SessionEndedMessage(reason="expired"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.type)
def test_encode_then_parse_is_the_same_message(msg: wire.ServerMessage) -> None:
    text = wire.encode_server_message(msg)
    assert wire.parse_server_message(text) == msg
    d = json.loads(text)
    for key in type(msg)._omit_when_none:
        assert (key in d) == (getattr(msg, key) is not None)


def test_parse_is_lenient_where_clients_must_be() -> None:
    # Unknown fields, in the message and in the alert, are dropped; an unknown type is its own error.
    alert = {**json.loads(_alert().to_json()), "field_of_a_newer_server": 1}
    msg = wire.parse_server_message({"type": "alert", "alert": alert, "extra": True})
    assert isinstance(msg, wire.AlertMessage) and msg.alert.metadata.routing.livekit_room == "room-1"
    with pytest.raises(wire.UnknownServerMessage) as e:
        wire.parse_server_message('{"type": "newer_thing", "x": 1}')
    assert e.value.type == "newer_thing"
    for bad in ("[1]", "{", '{"no": "type"}', '{"type": "flow", "audio": "louder", "audio_queue_fill": 1}'):
        with pytest.raises(wire.ProtocolError) as e2:
            wire.parse_server_message(bad)
        assert not isinstance(e2.value, wire.UnknownServerMessage) and e2.value.code == "malformed"


def test_routing_hints_travel_from_agent_to_room_transport() -> None:
    """What the agent writes at session start is what the room transport reads from the alert."""
    routing = RoomRouting(livekit_room="room-1", candidate_identity="alice", proctor_identities=["p1", "p2"])
    meta = routing.as_metadata()
    assert meta == {"livekit_room": "room-1", "candidate_identity": "alice", "proctor_identities": ["p1", "p2"]}
    alert = json.loads(
        _alert().model_copy(update={"metadata": AlertMetadata(node_id="n", worker_id="w", **meta)}).to_json()
    )
    assert RoomRouting.of_alert(alert) == routing
    assert RoomRouting.of_alert({"metadata": {"livekit_room": 5}}) == RoomRouting()  # wrong type: left out
    assert RoomRouting().as_metadata() == {}


# ---- docs/protocol.md against the models


def _section(doc: str, title: str) -> str:
    start = doc.index(f"## {title}")
    return doc[start : doc.index("\n## ", start + 1)]


def test_docs_table_and_examples_match_the_models() -> None:
    doc = _section((REPO / "docs" / "protocol.md").read_text(), "Server messages")
    rows = [r for r in re.findall(r"^\| `(\w+)` \| (.+?) \| .+ \|$", doc, re.M) if r[0] != "type"]
    assert {t for t, _ in rows} == set(TYPES)
    for t, fields in rows:
        names = re.findall(r"`(\w+)`(\?)?", fields)
        model = TYPES[t]
        assert {n for n, _ in names} == set(model.model_fields) - {"type"}, t
        assert {n for n, opt in names if opt} == set(model._omit_when_none), t
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", doc, re.S)]
    assert {e["type"] for e in examples} == set(TYPES)
    for e in examples:
        parsed = wire.parse_server_message(e)
        assert json.loads(wire.encode_server_message(parsed)) == e, e["type"]  # no field unknown to the model


# ---- clients: unknown types are skipped and counted, the rest goes on


_STANDIN_SCRIPT: list[str] = [
    wire.encode_server_message(EXAMPLES[0]),  # hello
    '{"type": "newer_thing", "x": 1}',
    '{"type": "flow", "audio": "louder"}',
    "not json",
    wire.encode_server_message(EXAMPLES[1]),  # alert
    wire.encode_server_message(EXAMPLES[2]),  # feedback
    wire.encode_server_message(EXAMPLES[3]),  # heartbeat
    wire.encode_server_message(_flow(0.9)),
    wire.encode_server_message(wire.SessionEndedMessage(reason="ended_by_api")),
]


@contextlib.asynccontextmanager
async def standin_analyzer() -> AsyncIterator[tuple[str, list[str]]]:
    """A STAND-IN analyzer stream endpoint: sends _STANDIN_SCRIPT, answers pings, then closes with 4408."""
    received: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        for text in _STANDIN_SCRIPT[:-1]:
            await ws.send(text)
        with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                async for m in ws:
                    if isinstance(m, str):
                        received.append(m)
                        if json.loads(m).get("type") == "ping":
                            await ws.send(wire.PongMessage(ts=time.time(), id=json.loads(m)["id"]).model_dump_json())
                            break
        await ws.send(_STANDIN_SCRIPT[-1])
        await ws.close(4408, "session ended")

    async with serve(handler, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", received


async def test_shared_client_skips_unknown_types_and_keeps_reading() -> None:
    async with standin_analyzer() as (base, _):
        url = base.replace("http", "ws") + "/api/v1/session/s1/stream"
        async with StreamConnection.connect(url, "tok") as conn:
            got: list[Any] = [await conn.recv()]
            pong = asyncio.create_task(conn.sync(30))
            got += [m async for m in conn]
            assert (await pong).id == "sync-1"
    assert [m.type for m in got] == ["hello", "alert", "feedback", "heartbeat", "flow", "pong", "session_ended"]
    assert conn.skipped == {"unknown_type": 1, "malformed": 2} and conn.close_code == 4408


async def test_agent_ignores_unknown_types_gracefully() -> None:
    alerts: list[wire.AlertMessage] = []
    feedback: list[wire.FeedbackMessage] = []
    ended = asyncio.Event()
    async with standin_analyzer() as (base, received):
        client = AnalyzerClient(base, None)
        st = SessionStream(
            client, "s1", on_alert=alerts.append, on_feedback=feedback.append, on_ended=lambda _r: ended.set()
        )
        st.begin({"stream_token": "tok", "stream_token_expires_at": "2999-01-01T00:00:00+00:00"})
        st.send_control("track_muted", "camera", time.time())
        # The stand-in answers a ping with a pong and then ends the session: send one the agent's way.
        await st.wait_connected(30)
        assert st._ws is not None
        await st._ws.ping("sync-1")
        await asyncio.wait_for(ended.wait(), 30)
        await st.close()
        await client.aclose()
    assert st.ended == "ended_by_api"
    assert [a.alert.event_type for a in alerts] == ["FACE_NOT_FOUND"] and feedback[0].code == "FACE_NOT_FOUND"
    assert isinstance(st.last_heartbeat, wire.HeartbeatMessage) and st.flow_paused
    assert st.counters.skipped_messages == {"unknown_type": 1, "malformed": 2}
    assert st.counters.alerts == 1 and st.counters.feedback == 1 and st.video_fps == 5.0
    control = json.loads(next(m for m in received if json.loads(m)["type"] == "control"))
    assert control["event"] == "track_muted" and control["track"] == "camera"


def test_client_and_agent_stay_off_the_analyzer_and_the_transports() -> None:
    """The protocol client imports contracts only; the agent no longer reaches into dispatcher.transports."""
    code = (
        "import sys, livekit_proctor.client, livekit_proctor.agent.candidate; "
        "print(' '.join(m for m in sys.modules if m.startswith(('livekit_proctor.analyzer', "
        "'livekit_proctor.dispatcher'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == []
    assert stream_url_of("https://a.example:8443/", "s") == "wss://a.example:8443/api/v1/session/s/stream"
