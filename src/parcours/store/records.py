"""SQL of the shared record beside the FHIR tables: the lab results reconciliation queue
and the patients' notices of new documents and results (revision 0009_record).

Both are written in the caller's transaction; nothing here commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from sqlalchemy import BigInteger, Column, DateTime, Identity, Integer, MetaData, Table, Text, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from parcours.core.errors import Conflict, NotFound
from parcours.store.sql import compile_stmt

_local = MetaData()
ts = DateTime(timezone=True)

lab_inbox = Table(
    "record_lab_inbox",
    _local,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("received_at", ts, nullable=False),
    Column("source", Text, nullable=False),  # "mllp 10.0.0.5" or "http <client>"
    Column("control_id", Text),  # MSH-10
    Column("sender", Text),  # MSH-3 / MSH-4
    Column("patient_name", Text),
    Column("birth_date", Text),
    Column("sex", Text),
    Column("identifiers", ARRAY(Text), nullable=False),
    Column("reason", Text, nullable=False),
    Column("summary", Text),  # what the message holds, without values: "3 results, 1 document"
    Column("blob_id", Text, nullable=False),  # the message itself, encrypted in the blob store
    Column("status", Text, nullable=False),  # pending | assigned | rejected
    Column("assigned_patient", Text),
    Column("assigned_by", Text),
    Column("assigned_at", ts),
    Column("outcome", JSONB),
)

notice = Table(
    "record_notice",
    _local,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("patient", Text, nullable=False),  # "Patient/123"
    Column("kind", Text, nullable=False),  # document | result
    Column("ref", Text, nullable=False),  # the new resource
    Column("created_at", ts, nullable=False),
    Column("seen_at", ts),
    Column("status", Text, nullable=False),  # pending | sent | skipped | failed
    Column("attempts", Integer, nullable=False),
    Column("sent_at", ts),
)


@dataclass(frozen=True)
class InboxItem:
    id: int
    received_at: datetime
    source: str
    control_id: str | None
    sender: str | None
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    identifiers: list[str]
    reason: str
    summary: str | None
    blob_id: str
    status: str
    assigned_patient: str | None
    assigned_at: datetime | None


_INBOX = (lab_inbox.c.id, lab_inbox.c.received_at, lab_inbox.c.source, lab_inbox.c.control_id, lab_inbox.c.sender,
          lab_inbox.c.patient_name, lab_inbox.c.birth_date, lab_inbox.c.sex, lab_inbox.c.identifiers, lab_inbox.c.reason,
          lab_inbox.c.summary, lab_inbox.c.blob_id, lab_inbox.c.status, lab_inbox.c.assigned_patient, lab_inbox.c.assigned_at)


async def inbox_add(conn: AsyncConnection, *, received_at: datetime, source: str, control_id: str | None, sender: str | None,
                    patient_name: str | None, birth_date: str | None, sex: str | None, identifiers: list[str], reason: str,
                    summary: str | None, blob_id: str) -> int:
    stmt = insert(lab_inbox).values(
        received_at=received_at, source=source, control_id=control_id, sender=sender, patient_name=patient_name,
        birth_date=birth_date, sex=sex, identifiers=identifiers, reason=reason, summary=summary, blob_id=blob_id,
        status="pending").returning(lab_inbox.c.id)
    sql, params = compile_stmt(stmt)
    return int((await (await conn.execute(sql, params)).fetchone())[0])  # type: ignore[index]


async def inbox_list(conn: AsyncConnection, *, status: str = "pending", limit: int = 100) -> list[InboxItem]:
    sql, params = compile_stmt(select(*_INBOX).where(lab_inbox.c.status == status)
                               .order_by(lab_inbox.c.received_at.desc()).limit(limit))
    return [InboxItem(*r) for r in await (await conn.execute(sql, params)).fetchall()]


async def inbox_count(conn: AsyncConnection) -> int:
    sql, params = compile_stmt(select(func.count()).select_from(lab_inbox).where(lab_inbox.c.status == "pending"))
    return int((await (await conn.execute(sql, params)).fetchone())[0])  # type: ignore[index]


async def inbox_lock(conn: AsyncConnection, item_id: int) -> InboxItem:
    """One pending item, locked until the transaction ends (two operators never assign it twice)."""
    sql, params = compile_stmt(select(*_INBOX).where(lab_inbox.c.id == item_id).with_for_update())
    row = await (await conn.execute(sql, params)).fetchone()
    if row is None:
        raise NotFound(f"No lab message {item_id} in the reconciliation queue")
    item = InboxItem(*row)
    if item.status != "pending":
        raise Conflict(f"Lab message {item_id} was already handled ({item.status})")
    return item


async def inbox_close(conn: AsyncConnection, item_id: int, *, status: str, patient: str | None, by: str, at: datetime,
                      outcome: dict[str, Any]) -> None:
    stmt = update(lab_inbox).where(lab_inbox.c.id == item_id).values(
        status=status, assigned_patient=patient, assigned_by=by, assigned_at=at)
    sql, params = compile_stmt(stmt)
    await conn.execute(sql, params)
    await conn.execute(f"UPDATE {lab_inbox.name} SET outcome = %s WHERE id = %s", (Jsonb(orjson.loads(orjson.dumps(outcome))), item_id))


@dataclass(frozen=True)
class Notice:
    id: int
    patient: str
    kind: str
    ref: str
    created_at: datetime
    seen_at: datetime | None
    status: str


_NOTICE = (notice.c.id, notice.c.patient, notice.c.kind, notice.c.ref, notice.c.created_at, notice.c.seen_at, notice.c.status)


async def notice_add(conn: AsyncConnection, patient: str, kind: str, ref: str, now: datetime) -> None:
    sql, params = compile_stmt(insert(notice).values(patient=patient, kind=kind, ref=ref, created_at=now, status="pending",
                                                     attempts=0))
    await conn.execute(sql, params)


async def notices_of(conn: AsyncConnection, patient: str, *, unseen_only: bool = False, limit: int = 50) -> list[Notice]:
    stmt = select(*_NOTICE).where(notice.c.patient == patient)
    if unseen_only:
        stmt = stmt.where(notice.c.seen_at.is_(None))
    sql, params = compile_stmt(stmt.order_by(notice.c.created_at.desc()).limit(limit))
    return [Notice(*r) for r in await (await conn.execute(sql, params)).fetchall()]


async def notices_seen(conn: AsyncConnection, patient: str, now: datetime) -> None:
    sql, params = compile_stmt(update(notice).where(notice.c.patient == patient, notice.c.seen_at.is_(None)).values(seen_at=now))
    await conn.execute(sql, params)


async def notices_due(conn: AsyncConnection, limit: int = 100) -> list[Notice]:
    """Pending notices to send, locked ``SKIP LOCKED`` (each is sent by one process)."""
    sql, params = compile_stmt(select(*_NOTICE).where(notice.c.status == "pending").order_by(notice.c.id).limit(limit)
                               .with_for_update(skip_locked=True))
    return [Notice(*r) for r in await (await conn.execute(sql, params)).fetchall()]


async def notice_done(conn: AsyncConnection, notice_id: int, status: str, now: datetime) -> None:
    sql, params = compile_stmt(update(notice).where(notice.c.id == notice_id).values(
        status=status, sent_at=now if status == "sent" else None, attempts=notice.c.attempts + 1))
    await conn.execute(sql, params)


__all__ = ["InboxItem", "Notice", "inbox_add", "inbox_list", "inbox_lock", "inbox_close", "inbox_count", "notice_add",
           "notices_of", "notices_seen", "notices_due", "notice_done", "lab_inbox", "notice"]
