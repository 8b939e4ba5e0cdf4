"""The reference docs name every field the server accepts and reports (docs drift is a bug a user meets)."""

from __future__ import annotations

import re
from pathlib import Path

from livekit_proctor.contracts.api import SessionCounters, SessionStartRequest

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    nxt = re.search(r"^#{2,3} ", doc[start + len(heading) :], flags=re.M)
    return doc[start : start + len(heading) + (nxt.start() if nxt else len(doc))]


def test_session_start_table_lists_every_accepted_field() -> None:
    table = _section(PROTOCOL, "### Session start")
    rows = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert rows == set(SessionStartRequest.model_fields)


def test_session_state_lists_every_counter() -> None:
    state = _section(PROTOCOL, "### End and state")
    named = set(re.findall(r"`(\w+)`", state))
    missing = set(SessionCounters.model_fields) - named
    assert not missing, f"docs/protocol.md 'End and state' does not name counters {sorted(missing)}"
