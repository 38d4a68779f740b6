"""Booking's own tables (revision 0008_booking): slot claims, the notification queue and
the private agenda feeds. Every function runs in the transaction the caller opened.

* ``booking_claim``: one row per taken slot. Written by the booking write rule in the
  transaction that books, after it locked the Slot row; its primary key makes a
  second claim of the same slot impossible even for a path that forgot the lock.
* ``booking_job``: due notifications (confirmation, reminders, cancellation, offers
  to the waiting list). Workers claim due rows with ``FOR UPDATE SKIP LOCKED``, so
  any number of server processes share the queue and each job runs once.
* ``booking_feed``: the hash of each account's secret iCalendar feed token.
* ``booking_free_slot`` (revision 0014_booking_search): one narrow row per free Slot,
  ``(schedule_id, start)``-indexed, kept by a row trigger on ``"Slot"`` in the transaction of
  every write: the next free slots of an agenda are one index range scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Identity, Index, Integer, MetaData, Table, Text, delete, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from parcours.store.sql import compile_stmt

PENDING, DONE, FAILED, CANCELLED = "pending", "done", "failed", "cancelled"

# Not the resource schema's metadata: migration 0008_booking writes these tables out.
_metadata = MetaData()
Table("account", _metadata, Column("id", Text, primary_key=True))  # for the foreign key only

booking_claim = Table(
    "booking_claim",
    _metadata,
    Column("slot_id", Text, primary_key=True),
    Column("appointment_id", Text, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)
Index("booking_claim_appointment", booking_claim.c.appointment_id)

booking_job = Table(
    "booking_job",
    _metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("appointment_id", Text),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("done_at", DateTime(timezone=True)),
)
Index("booking_job_due", booking_job.c.due_at, postgresql_where=text("status = 'pending'"))
Index("booking_job_appointment", booking_job.c.appointment_id)

booking_feed = Table(
    "booking_feed",
    _metadata,
    Column("token_hash", Text, primary_key=True),
    Column("account_id", Text, ForeignKey("account.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

booking_free_slot = Table(
    "booking_free_slot",
    _metadata,
    Column("slot_id", Text, primary_key=True),
    Column("schedule_id", Text, nullable=False),
    Column("start", DateTime(timezone=True), nullable=False),
)
Index("booking_free_slot_next", booking_free_slot.c.schedule_id, booking_free_slot.c.start)

TABLES = (booking_claim, booking_job, booking_feed)

# The next ``per`` free slots of each schedule: one range scan of booking_free_slot_next per
# schedule (LATERAL ... ORDER BY start LIMIT), then the Slot rows by primary key.
_NEXT_FREE = """
SELECT f.schedule_id, f.slot_id
FROM unnest(%(schedules)s::text[]) AS x(schedule_id)
CROSS JOIN LATERAL (
    SELECT b.slot_id, b.schedule_id, b.start FROM booking_free_slot b
    WHERE b.schedule_id = x.schedule_id AND b.start >= %(after)s
    ORDER BY b.start LIMIT %(per)s
) f
ORDER BY f.start, f.slot_id
"""


async def next_free_slots(conn: AsyncConnection, schedule_ids: list[str], after: datetime, per: int) -> list[tuple[str, str]]:
    """(schedule id, slot id) of the next ``per`` free slots of each schedule that start at
    ``after`` or later, soonest first. Ids only, no policy: the caller reads the Slots
    through its Repository."""
    if not schedule_ids:
        return []
    cur = await conn.execute(_NEXT_FREE, {"schedules": sorted(set(schedule_ids)), "after": after, "per": per})
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def _run(conn: AsyncConnection, stmt: Any) -> Any:
    sql, params = compile_stmt(stmt)
    return await conn.execute(sql, params)


# -- claims ---------------------------------------------------------------------------------

async def claim(conn: AsyncConnection, slot_id: str, appointment_id: str, now: datetime) -> bool:
    """Record that ``appointment_id`` holds ``slot_id``; False when another appointment does."""
    c = booking_claim
    stmt = pg_insert(c).values(slot_id=slot_id, appointment_id=appointment_id, claimed_at=now)
    stmt = stmt.on_conflict_do_nothing(index_elements=[c.c.slot_id]).returning(c.c.slot_id)
    if await (await _run(conn, stmt)).fetchone() is not None:
        return True
    return await holder(conn, slot_id) == appointment_id


async def holder(conn: AsyncConnection, slot_id: str) -> str | None:
    row = await (await _run(conn, select(booking_claim.c.appointment_id).where(booking_claim.c.slot_id == slot_id))).fetchone()
    return row[0] if row else None


async def release(conn: AsyncConnection, slot_id: str, appointment_id: str) -> bool:
    c = booking_claim
    cur = await _run(conn, delete(c).where(c.c.slot_id == slot_id, c.c.appointment_id == appointment_id))
    return bool(cur.rowcount)


# -- notification queue ---------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    appointment_id: str | None
    due_at: datetime
    payload: dict
    attempts: int


async def enqueue(conn: AsyncConnection, kind: str, due_at: datetime, now: datetime, *,
                  appointment_id: str | None = None, payload: dict | None = None) -> int:
    stmt = booking_job.insert().values(kind=kind, appointment_id=appointment_id, due_at=due_at, payload=Jsonb(payload or {}),
                                       status=PENDING, created_at=now).returning(booking_job.c.id)
    row = await (await _run(conn, stmt)).fetchone()
    return int(row[0])


async def cancel_jobs(conn: AsyncConnection, appointment_id: str, kinds: tuple[str, ...], now: datetime) -> int:
    """Pending jobs of an appointment that no longer make sense (its reminders once cancelled)."""
    j = booking_job
    cur = await _run(conn, update(j).where(j.c.appointment_id == appointment_id, j.c.status == PENDING,
                                           j.c.kind.in_(kinds)).values(status=CANCELLED, done_at=now))
    return cur.rowcount


async def claim_due(conn: AsyncConnection, now: datetime, limit: int = 1) -> list[Job]:
    """Due jobs, locked for this transaction; rows other workers hold are skipped."""
    j = booking_job
    stmt = (select(j.c.id, j.c.kind, j.c.appointment_id, j.c.due_at, j.c.payload, j.c.attempts)
            .where(j.c.status == PENDING, j.c.due_at <= now).order_by(j.c.due_at, j.c.id).limit(limit)
            .with_for_update(skip_locked=True))
    rows = await (await _run(conn, stmt)).fetchall()
    return [Job(r[0], r[1], r[2], r[3], r[4] or {}, r[5]) for r in rows]


async def finish(conn: AsyncConnection, job_id: int, now: datetime, status: str = DONE, error: str | None = None) -> None:
    j = booking_job
    await _run(conn, update(j).where(j.c.id == job_id).values(status=status, done_at=now, last_error=error,
                                                              attempts=j.c.attempts + 1))


async def retry(conn: AsyncConnection, job_id: int, due_at: datetime, error: str) -> None:
    j = booking_job
    await _run(conn, update(j).where(j.c.id == job_id).values(due_at=due_at, last_error=error[:1000], attempts=j.c.attempts + 1))


async def jobs_of(conn: AsyncConnection, appointment_id: str) -> list[dict]:
    j = booking_job
    rows = await (await _run(conn, select(j.c.id, j.c.kind, j.c.due_at, j.c.status, j.c.payload)
                             .where(j.c.appointment_id == appointment_id).order_by(j.c.due_at, j.c.id))).fetchall()
    return [{"id": r[0], "kind": r[1], "due_at": r[2], "status": r[3], "payload": r[4]} for r in rows]


# -- private feeds --------------------------------------------------------------------------

async def set_feed(conn: AsyncConnection, account_id: str, token_hash: str, now: datetime) -> None:
    """The account's feed token (a new one replaces the old: the old URL stops working)."""
    f = booking_feed
    stmt = pg_insert(f).values(token_hash=token_hash, account_id=account_id, created_at=now)
    stmt = stmt.on_conflict_do_update(index_elements=[f.c.account_id],
                                      set_={"token_hash": stmt.excluded.token_hash, "created_at": stmt.excluded.created_at})
    await _run(conn, stmt)


async def feed_account(conn: AsyncConnection, token_hash: str) -> str | None:
    row = await (await _run(conn, select(booking_feed.c.account_id).where(booking_feed.c.token_hash == token_hash))).fetchone()
    return row[0] if row else None


async def has_feed(conn: AsyncConnection, account_id: str) -> bool:
    row = await (await _run(conn, select(booking_feed.c.created_at).where(booking_feed.c.account_id == account_id))).fetchone()
    return row is not None


__all__ = ["Job", "TABLES", "booking_claim", "booking_feed", "booking_job", "claim", "claim_due", "enqueue", "finish",
           "holder", "release", "retry", "set_feed", "feed_account"]
