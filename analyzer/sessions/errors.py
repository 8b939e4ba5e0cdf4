"""What session lifecycle calls raise (the REST and stream handlers map them to status codes)."""

from __future__ import annotations


class SessionConflict(Exception):
    """The session id is active for another candidate."""


class SessionNotFound(Exception):
    pass


class SessionClosed(Exception):
    """The session ended or expired (the message says which)."""
