"""Alert delivery: the outbox between analyzer and transports, and (later) the transports."""
