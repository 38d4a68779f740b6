"""Reading ``resource_log`` in commit order, without losing a change.

Every write appends a row to ``resource_log`` in its own transaction, so the log is
an outbox: a change is visible there exactly when it is committed. ``seq`` comes
from a sequence, though, and transactions commit in any order: a transaction may
hold seq 10 while seq 11 is already committed. A reader that only remembered "the
last seq seen" would skip 10 forever. A ``LogPosition`` therefore remembers the
*gaps* below its head, each with the snapshot horizon (``xmax``) at which it was
first seen missing. Once every transaction older than that horizon has finished
(the ``xmin`` of a later snapshot has passed it), a seq still missing belonged to
a transaction that rolled back, and the gap is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from sqlalchemy import func, or_, select

from parcours.store.schema import resource_log
from parcours.store.sql import compile_stmt

# The trigger of migration 0004 notifies this channel when a transaction that
# wrote to resource_log commits (one notification per transaction, no payload).
CHANGES_CHANNEL = "parcours_changes"
# Gap ranges looked up again in one read; older ones wait for the next read.
MAX_GAP_RANGES_PER_READ = 100


@dataclass(frozen=True)
class Change:
    """One committed change of one resource, as ``resource_log`` records it."""

    seq: int
    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    method: str  # POST, PUT, PATCH or DELETE

    @property
    def deleted(self) -> bool:
        return self.method == "DELETE"


@dataclass
class Gap:
    lo: int
    hi: int
    horizon: int  # xmax of the snapshot that first found [lo, hi] missing


@dataclass
class LogPosition:
    """How far a reader got: every seq up to ``head`` was seen, except ``gaps``."""

    head: int
    gaps: list[Gap] = field(default_factory=list)

    @property
    def floor(self) -> int:
        """Every seq up to this one is either seen or known never to come."""
        return min(g.lo for g in self.gaps) - 1 if self.gaps else self.head

    def to_json(self) -> list[list[int]]:
        return [[g.lo, g.hi, g.horizon] for g in self.gaps]

    @classmethod
    def from_json(cls, head: int, gaps: Any) -> "LogPosition":
        return cls(head, [Gap(int(lo), int(hi), int(h)) for lo, hi, h in (gaps or [])])

    def advance(self, seqs: list[int], xmin_before: int, xmax_after: int) -> list[int]:
        """Take in the seqs one read returned (sorted); return those not seen before.

        ``xmin_before`` is the oldest running transaction before the read,
        ``xmax_after`` the first unassigned transaction id after it.
        """
        fresh: list[int] = []
        gaps = self.gaps
        expected = self.head + 1
        new_gaps: list[Gap] = []
        for s in seqs:
            if s > self.head:
                if s > expected:
                    new_gaps.append(Gap(expected, s - 1, xmax_after))
                expected = s + 1
                fresh.append(s)
            else:
                split: list[Gap] = []
                hit = False
                for g in gaps:
                    if not hit and g.lo <= s <= g.hi:
                        hit = True
                        if g.lo < s:
                            split.append(Gap(g.lo, s - 1, g.horizon))
                        if s < g.hi:
                            split.append(Gap(s + 1, g.hi, g.horizon))
                    else:
                        split.append(g)
                if hit:
                    gaps = split
                    fresh.append(s)
        # A gap whose horizon every running transaction is past was re-read after
        # its writer finished: what is still missing was rolled back.
        gaps = [g for g in gaps if g.horizon > xmin_before]
        self.gaps = sorted(gaps + new_gaps, key=lambda g: g.lo)
        self.head = max(self.head, expected - 1)
        return sorted(fresh)


_COLS = (resource_log.c.seq, resource_log.c.resource_type, resource_log.c.id, resource_log.c.version_id,
         resource_log.c.last_updated, resource_log.c.method)


async def _horizons(conn: AsyncConnection) -> tuple[int, int]:
    cur = await conn.execute(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def read_changes(conn: AsyncConnection, position: LogPosition, limit: int) -> tuple[list[Change], bool]:
    """The changes committed since ``position`` (which moves on), oldest first, and
    whether there may be more. Runs in READ COMMITTED: each statement sees what is
    committed when it starts."""
    xmin_before, _ = await _horizons(conn)
    lg = resource_log
    cond = or_(lg.c.seq > position.head, *[lg.c.seq.between(g.lo, g.hi) for g in position.gaps[:MAX_GAP_RANGES_PER_READ]])
    sql, params = compile_stmt(select(*_COLS).where(cond).order_by(lg.c.seq).limit(limit))
    rows = await (await conn.execute(sql, params)).fetchall()
    _, xmax_after = await _horizons(conn)
    by_seq = {r[0]: r for r in rows}
    fresh = position.advance([r[0] for r in rows], xmin_before, xmax_after)
    return [Change(*by_seq[s]) for s in fresh], len(rows) >= limit


async def start_position(conn: AsyncConnection, window: int = 1000) -> LogPosition:
    """A position at the current end of the log. Seqs missing among the last
    ``window`` entries may belong to transactions still running: they start as gaps,
    so that those changes are not lost when they commit."""
    lg = resource_log
    sql, params = compile_stmt(select(func.coalesce(func.max(lg.c.seq), 0)))
    head = int((await (await conn.execute(sql, params)).fetchone())[0])  # type: ignore[index]
    position = LogPosition(max(0, head - window))
    xmin_before, _ = await _horizons(conn)
    sql, params = compile_stmt(select(lg.c.seq).where(lg.c.seq > position.head, lg.c.seq <= head).order_by(lg.c.seq))
    seqs = [r[0] for r in await (await conn.execute(sql, params)).fetchall()]
    _, xmax_after = await _horizons(conn)
    position.advance(seqs, xmin_before, xmax_after)
    position.head = max(position.head, head)
    return position
