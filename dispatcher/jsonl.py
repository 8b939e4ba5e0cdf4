"""alerts.jsonl: the append-only JSONL copy of every alert, shared by its writers and its pruner.

Writers (the outbox, from threads; possibly several processes) append whole lines while holding an
exclusive flock on the file. The pruner copies the lines it keeps to a temporary file, then, holding the
same lock, copies what was appended meanwhile and renames the copy over the path. A writer that waited
for the lock on the replaced file sees that the path now names another file and reopens it, so no line
goes to a file that is no longer the path. The file is created 0600 (alerts carry face thumbnails).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

_ATTEMPTS = 5  # the pruner starts over when another pruner replaced the file under it


def _is_current(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _open_locked(path: Path) -> int:
    """A descriptor of the file now at path, open for appending and exclusively locked."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_current(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # replaced (or removed) while we waited for the lock: take the new one


def append(path: Path, lines: list[str]) -> None:
    """Appends lines (without their newline) as one locked write."""
    data = memoryview("".join(line + "\n" for line in lines).encode())
    fd = _open_locked(path)
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)  # releases the lock


def line_time(line: bytes) -> float | None:
    """The alert's timestamp (epoch seconds) of one JSONL line; None when the line has none."""
    try:
        dt = datetime.fromisoformat(json.loads(line)["timestamp"])
    except (ValueError, KeyError, TypeError):
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _due(line: bytes, cutoff: float) -> bool:
    t = line_time(line)
    return t is not None and t < cutoff  # a line without a timestamp is kept: never drop what cannot be dated


def _first_dated_is_due(src: BinaryIO, cutoff: float) -> bool:
    for line in iter(src.readline, b""):
        if line.endswith(b"\n") and (t := line_time(line)) is not None:
            return t < cutoff
    return False


def _copy(src: BinaryIO, out: BinaryIO | None, due: Callable[[bytes], bool], *, whole_lines_only: bool) -> int:
    """Copies the lines of src from its position that are not due into out; returns how many were due."""
    removed = 0
    while True:
        start = src.tell()
        line = src.readline()
        if not line:
            return removed
        if whole_lines_only and not line.endswith(b"\n"):  # a writer is in the middle of it
            src.seek(start)
            return removed
        if due(line):
            removed += 1
        elif out is not None:
            out.write(line)


def prune(path: Path, cutoff: float, *, dry_run: bool = False) -> int:
    """Removes the lines whose alert timestamp is before cutoff (epoch s); returns how many (would be) removed.

    Cheap when nothing is due: only the first dated line is read. Safe while writers append.
    """
    return _rewrite(path, lambda line: _due(line, cutoff), lambda src: _first_dated_is_due(src, cutoff), dry_run)


def remove(path: Path, match: Callable[[bytes], bool], *, dry_run: bool = False) -> int:
    """Removes the lines `match` selects (a privacy deletion); returns how many (would be) removed. Safe while
    writers append; the file is read once without rewriting when nothing matches."""
    return _rewrite(path, match, lambda src: any(match(line) for line in iter(src.readline, b"")), dry_run)


def matching(path: Path, match: Callable[[bytes], bool]) -> list[bytes]:
    """The lines `match` selects (without their newline)."""
    try:
        with path.open("rb") as src:
            return [line.rstrip(b"\n") for line in iter(src.readline, b"") if match(line)]
    except FileNotFoundError:
        return []


def _rewrite(path: Path, due: Callable[[bytes], bool], anything_due: Callable[[BinaryIO], bool], dry_run: bool) -> int:
    for _ in range(_ATTEMPTS):
        try:
            src = path.open("rb")
        except FileNotFoundError:
            return 0
        with src:
            if not anything_due(src):
                return 0
            src.seek(0)
            if dry_run:
                return _copy(src, None, due, whole_lines_only=False)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    # The bulk without the lock, so writers do not wait on it ...
                    removed = _copy(src, out, due, whole_lines_only=True)
                    fcntl.flock(src.fileno(), fcntl.LOCK_EX)  # released when src closes
                    if not _is_current(src.fileno(), path):
                        continue  # another pruner replaced it meanwhile: start over on the new file
                    # ... then what was appended meanwhile, under the lock (complete lines now).
                    removed += _copy(src, out, due, whole_lines_only=False)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
                return removed
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    raise RuntimeError(f"{path}: replaced by another process {_ATTEMPTS} times while pruning")
