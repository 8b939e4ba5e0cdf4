"""Where the dispatcher reads alerts: the durable outbox, per delivery lane.

A lane is one transport in fan-out mode (or the whole fallback chain). Each lane reads the outbox in
order from its own position and acknowledges what its transport delivered:

- SqlSource (embedded, SQLite or PostgreSQL): a cursor per lane (the last delivered seq), and a lease so
  one dispatcher works a lane at a time. After a crash the lane resumes after its cursor: at least once.
- RedisSource (production): a Redis Stream with one consumer group per lane. Several dispatcher processes
  share a lane's work; entries a dead consumer left pending are claimed by another after claim_idle_s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from livekit_proctor.db import CursorRow, LeaseRow, OutboxRow
from livekit_proctor.dispatcher.transports.base import Envelope

# A seq gap younger than this may be a transaction that has not committed yet (PostgreSQL sequences
# are handed out before commit): wait for it rather than skip it.
GAP_WAIT_S = 2.0
LEASE_S = 15.0


class OutboxSource(Protocol):
    async def read(self, lane: str, limit: int, block_s: float) -> list[Envelope]:
        """The next undelivered envelopes of this lane, in order ([] after block_s with nothing new)."""

    async def ack(self, lane: str, envelopes: list[Envelope]) -> None:
        """These were delivered (or dead-lettered): never read again for this lane."""

    async def held(self, lane: str, envelopes: list[Envelope]) -> list[Envelope]:
        """Those of these envelopes (read, not yet acknowledged) the outbox still holds: a lane retrying a batch
        drops what a privacy deletion removed meanwhile (AlertSink.delete_sessions) instead of sending it."""

    async def depth(self, lanes: list[str]) -> tuple[int, float]:
        """(envelopes not yet delivered by the slowest lane, age in seconds of the oldest of them)."""

    async def close(self) -> None: ...


def _env(row: OutboxRow) -> Envelope:
    return Envelope(row.seq, row.event_id, row.exam_session_id, row.event_type, row.payload.encode(), row.created_at)


class SqlSource:
    def __init__(self, sm: sessionmaker, owner: str) -> None:
        self.sm = sm
        self.owner = owner
        self._next: dict[str, int] = {}  # lane -> seq after the last one handed out (not yet acked)
        self._gap_since: dict[str, float] = {}
        self._lease_until: dict[str, float] = {}

    # -- sync helpers (run in threads)

    def _take_lease(self, lane: str) -> bool:
        now = time.time()
        with self.sm.begin() as db:
            lease = db.get(LeaseRow, lane, with_for_update=True)
            if lease is None:
                db.add(LeaseRow(lane=lane, owner=self.owner, expires_at=now + LEASE_S))
            elif lease.owner == self.owner or lease.expires_at < now:
                lease.owner, lease.expires_at = self.owner, now + LEASE_S
            else:
                return False
        self._lease_until[lane] = now + LEASE_S / 3
        return True

    def _cursor(self, lane: str) -> int:
        with self.sm() as db:
            row = db.get(CursorRow, lane)
            return row.last_seq if row else 0

    def _rows(self, after: int, limit: int) -> list[OutboxRow]:
        with self.sm() as db:
            return list(
                db.scalars(select(OutboxRow).where(OutboxRow.seq > after).order_by(OutboxRow.seq).limit(limit)).all()
            )

    def _set_cursor(self, lane: str, seq: int) -> None:
        with self.sm.begin() as db:
            row = db.get(CursorRow, lane)
            if row is None:
                db.add(CursorRow(lane=lane, last_seq=seq, updated_at=time.time()))
            elif seq > row.last_seq:
                row.last_seq, row.updated_at = seq, time.time()

    # -- interface

    async def read(self, lane: str, limit: int, block_s: float) -> list[Envelope]:
        deadline = time.monotonic() + block_s
        while True:
            if time.time() >= self._lease_until.get(lane, 0) and not await asyncio.to_thread(self._take_lease, lane):
                self._next.pop(lane, None)  # another dispatcher works this lane; start over if we get it
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())) or 0.05)
                if time.monotonic() >= deadline:
                    return []
                continue
            if lane not in self._next:
                self._next[lane] = await asyncio.to_thread(self._cursor, lane) + 1
            start = self._next[lane]
            rows = await asyncio.to_thread(self._rows, start - 1, limit)
            if rows and rows[0].seq != start:
                # A gap: wait a little for a late commit, then move on (a rolled-back insert leaves one).
                first_seen = self._gap_since.setdefault(lane, time.monotonic())
                if time.monotonic() - first_seen < GAP_WAIT_S:
                    rows = []
                else:
                    self._gap_since.pop(lane, None)
            else:
                self._gap_since.pop(lane, None)
            # Stop at the first gap inside the batch, for the same reason.
            out: list[Envelope] = []
            expect = rows[0].seq if rows else start
            for r in rows:
                if r.seq != expect:
                    break
                out.append(_env(r))
                expect += 1
            if out:
                self._next[lane] = out[-1].seq + 1
                return out
            if time.monotonic() >= deadline:
                return []
            await asyncio.sleep(0.05)

    async def ack(self, lane: str, envelopes: list[Envelope]) -> None:
        if envelopes:
            await asyncio.to_thread(self._set_cursor, lane, max(e.seq for e in envelopes))

    def rewind(self, lane: str) -> None:
        """Forget envelopes handed out but not acked: the next read starts after the cursor again."""
        self._next.pop(lane, None)

    async def held(self, lane: str, envelopes: list[Envelope]) -> list[Envelope]:
        def q() -> set[tuple[int, str]]:
            with self.sm() as db:
                stmt = select(OutboxRow.seq, OutboxRow.exam_session_id).where(
                    OutboxRow.seq.in_([e.seq for e in envelopes])
                )
                return {(seq, sid) for seq, sid in db.execute(stmt)}  # a redacted row has another session id

        there = await asyncio.to_thread(q) if envelopes else set()
        return [e for e in envelopes if (e.seq, e.exam_session_id) in there]

    async def depth(self, lanes: list[str]) -> tuple[int, float]:
        def q() -> tuple[int, float]:
            with self.sm() as db:
                cursors = [db.get(CursorRow, lane) for lane in lanes]
                low = min((c.last_seq if c else 0) for c in cursors) if lanes else 0
                rows = db.execute(
                    select(OutboxRow.seq, OutboxRow.created_at).where(OutboxRow.seq > low).order_by(OutboxRow.seq)
                ).all()
            if not rows:
                return 0, 0.0
            return len(rows), max(0.0, time.time() - rows[0][1])

        return await asyncio.to_thread(q)

    async def close(self) -> None:
        def release() -> None:
            with self.sm.begin() as db:
                for lease in db.scalars(select(LeaseRow).where(LeaseRow.owner == self.owner)).all():
                    lease.expires_at = 0.0

        await asyncio.to_thread(release)


STREAM = "proctor:alerts"
GROUP_PREFIX = "proctor-dispatch:"  # + lane: the consumer group of a lane


def redis_seq(entry_id: str) -> int:
    """A Redis stream id "ms-n" as one increasing integer (fits uint64 for gRPC sequences)."""
    ms, _, n = entry_id.partition("-")
    return int(ms) * 1_000_000 + int(n or 0)


class RedisSource:
    """A Redis Stream, one consumer group per lane; claim_idle_s reclaims a dead consumer's entries."""

    def __init__(self, client: Any, consumer: str, stream: str = STREAM, claim_idle_s: float = 30.0) -> None:
        self.r = client
        self.consumer = consumer
        self.stream = stream
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._groups: set[str] = set()
        self._ids: dict[tuple[str, int], str] = {}  # (lane, seq) -> stream id, for XACK
        self._own_pending_done: set[str] = set()

    def group(self, lane: str) -> str:
        return f"{GROUP_PREFIX}{lane}"

    async def _ensure_group(self, lane: str) -> None:
        if lane in self._groups:
            return
        try:
            await self.r.xgroup_create(self.stream, self.group(lane), id="0", mkstream=True)
        except Exception as e:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(lane)

    def _envs(self, lane: str, entries: list[Any]) -> list[Envelope]:
        out = []
        for entry_id, fields in entries:
            if fields is None:  # deleted meanwhile
                continue
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
            seq = redis_seq(eid)
            self._ids[(lane, seq)] = eid
            payload = f["payload"] if isinstance(f["payload"], bytes) else f["payload"].encode()
            out.append(
                Envelope(
                    seq,
                    _s(f["event_id"]),
                    _s(f["exam_session_id"]),
                    _s(f["event_type"]),
                    payload,
                    float(_s(f["created_at"])),
                )
            )
        return out

    async def read(self, lane: str, limit: int, block_s: float) -> list[Envelope]:
        await self._ensure_group(lane)
        group = self.group(lane)
        if lane not in self._own_pending_done:
            # After a restart with the same consumer name: our own unacked entries first.
            res = await self.r.xreadgroup(group, self.consumer, {self.stream: "0"}, count=limit)
            entries = res[0][1] if res else []
            if entries:
                return self._envs(lane, entries)
            self._own_pending_done.add(lane)
        # Entries a dead consumer left behind.
        claimed = await self.r.xautoclaim(self.stream, group, self.consumer, self.claim_idle_ms, "0-0", count=limit)
        entries = claimed[1] if claimed else []
        if entries:
            return self._envs(lane, entries)
        res = await self.r.xreadgroup(
            group, self.consumer, {self.stream: ">"}, count=limit, block=max(1, int(block_s * 1000))
        )
        return self._envs(lane, res[0][1]) if res else []

    async def ack(self, lane: str, envelopes: list[Envelope]) -> None:
        ids = [self._ids.pop((lane, e.seq)) for e in envelopes if (lane, e.seq) in self._ids]
        if ids:
            await self.r.xack(self.stream, self.group(lane), *ids)

    def rewind(self, lane: str) -> None:
        self._own_pending_done.discard(lane)  # re-read our pending entries

    async def held(self, lane: str, envelopes: list[Envelope]) -> list[Envelope]:
        known = [(e, self._ids.get((lane, e.seq))) for e in envelopes]
        if not envelopes:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for _, eid in known:
                if eid is not None:
                    pipe.xrange(self.stream, min=eid, max=eid, count=1)
            found = iter(await pipe.execute())
        out = []
        for e, eid in known:
            if eid is None or next(found):
                out.append(e)
            else:  # deleted (and acknowledged) by delete_sessions
                self._ids.pop((lane, e.seq), None)
        return out

    async def depth(self, lanes: list[str]) -> tuple[int, float]:
        worst, oldest_ms = 0, None
        for lane in lanes:
            try:
                groups = await self.r.xinfo_groups(self.stream)
            except Exception:
                return 0, 0.0
            for g in groups:
                name = _s(g["name"])
                if name != self.group(lane):
                    continue
                lag = int(g.get("lag") or 0) + int(g.get("pending") or 0)
                worst = max(worst, lag)
                last = _s(g.get("last-delivered-id") or "0-0")
                nxt = await self.r.xrange(self.stream, min=f"({last}" if last != "0-0" else "-", count=1)
                pend = await self.r.xpending(self.stream, self.group(lane))
                cand = [redis_seq(_s(pend["min"])) // 1_000_000] if pend and pend.get("min") else []
                if nxt:
                    cand.append(redis_seq(_s(nxt[0][0])) // 1_000_000)
                if cand:
                    oldest_ms = min(cand + ([oldest_ms] if oldest_ms else []))
        age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms else 0.0
        return worst, age

    async def close(self) -> None:
        await self.r.aclose()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
