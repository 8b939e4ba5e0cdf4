"""The data directory and its files are private to the service's user: directory 0700, files 0600.

Alerts (database outbox, alerts.jsonl) carry thumbnails of candidates' faces; the database holds key
hashes; the stream secret signs stream tokens. New files are created with these modes, and what an
older install left group- or world-readable is tightened at startup (bits are only ever removed).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from livekit_proctor.db import sqlite_path
from livekit_proctor.settings import Settings

DIR_MODE = 0o700
FILE_MODE = 0o600

log = logging.getLogger("proctor")


def tighten(path: Path, mode: int) -> None:
    """Removes the permission bits of path that mode does not allow (no-op when it is missing)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & ~mode:
            os.chmod(path, current & mode)
    except FileNotFoundError:
        return
    except PermissionError as e:  # not ours: say so rather than refuse to start
        log.warning("cannot restrict %s to %o: %s", path, mode, e)


def private_dir(path: Path, *, tighten_existing: bool = True) -> None:
    """Creates path (and missing parents) with mode 0700; tightens it when it already exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if tighten_existing:
        tighten(path, DIR_MODE)


def prepare_data_dir(s: Settings) -> None:
    """Creates the data dir 0700 and tightens the files the service keeps there (and the SQLite files)."""
    private_dir(s.data_dir)
    files = [s.data_dir / "stream-secret", s.data_dir / "bootstrap-admin.key", s.data_dir / "embedding-keys",
             s.resolved_outbox_jsonl()]  # fmt: skip
    db = sqlite_path(s.resolved_database_url())
    if db is not None:
        # A database outside the data dir: create its directory private, but leave an existing one alone.
        private_dir(db.parent, tighten_existing=db.parent.resolve() == s.data_dir.resolve())
        files += [db, *(db.with_name(db.name + x) for x in ("-wal", "-shm", "-journal"))]
    jsonl_dir = s.resolved_outbox_jsonl().parent
    private_dir(jsonl_dir, tighten_existing=jsonl_dir.resolve() == s.data_dir.resolve())
    for f in files:
        tighten(f, FILE_MODE)
