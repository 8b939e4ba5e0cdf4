"""Delivery transports: each pushes outbox envelopes to one kind of peer (see base.py)."""
