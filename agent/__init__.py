"""LiveKit agent worker: joins exam rooms and streams candidates' media to the analyzer.

Not built yet: see the agent issue. The streaming client it will use is the
protocol in proctor.contracts.wire (docs/protocol.md).
"""
