"""Contracts shared by the analyzer, the dispatcher, the agent and clients.

alerts.py   canonical alert schema (pydantic; JSON Schema in docs/, protobuf in proto/) and the typed room
            routing hints (RoomRouting) every alert carries
wire.py     the v1 WebSocket streaming protocol (docs/protocol.md): binary media, client text messages and
            every server message (ServerMessage, parse_server_message)
room.py     the LiveKit room data channel: topics, packet limit, fit_packet, the feedback packet
api.py      REST request / response bodies
outbox.py   the outbox interface (AlertSink) and the envelope a dispatcher reads
"""
