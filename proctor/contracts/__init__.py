"""Contracts shared by the analyzer, the dispatcher, the agent and clients.

alerts.py   canonical alert schema (pydantic; JSON Schema in docs/, protobuf in proto/)
wire.py     the binary WebSocket streaming protocol (docs/protocol.md)
api.py      REST request / response bodies
outbox.py   the outbox interface (AlertSink) and the envelope a dispatcher reads
"""
