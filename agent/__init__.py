"""LiveKit agent worker: joins exam rooms and streams candidates' media to the analyzer.

Modules: worker (entry point, `proctor agent start|dev`), room (the job: one per room), participants
(who is a candidate or a proctor), candidate (one candidate's session and media), media (frames to JPEG,
audio to PCM chunks), analyzer_client (REST + the reconnecting WebSocket, protocol v1 of docs/protocol.md),
publisher (alerts and feedback into the room), load (worker load from analyzer capacity), config.
"""
