"""The reference consumers' --record file: the event ids already processed, so a restarted consumer does not
print (or count) a redelivered alert again."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def load_record(path: Path) -> set[str]:
    """Ids already processed: one per line (a line that is a JSON object contributes its event_id)."""
    seen: set[str] = set()
    if not path.exists():
        return seen
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):  # a cut or foreign line: skipped
                eid = json.loads(line).get("event_id")
                if isinstance(eid, str):
                    seen.add(eid)
        elif line:
            seen.add(line)
    return seen
