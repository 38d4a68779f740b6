"""The bulk ``$export`` job queue, durable in PostgreSQL.

Several workers (one in each server process, plus any ``parcours worker``, on
any node) share the queue: a worker claims the oldest waiting job with
``SELECT ... FOR UPDATE SKIP LOCKED`` in a short transaction and then holds a
*lease* it renews with heartbeats. A job whose lease has lapsed (its worker
died) is claimed again by another worker. Workers are woken by
``NOTIFY parcours_export`` when a job is queued, and poll as a fallback.

Every function runs in the transaction the caller opened on ``conn``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from sqlalchemy import Column, DateTime, Index, Integer, MetaData, Table, Text, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from parcours.store.sql import compile_stmt

CHANNEL = "parcours_export"

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"

# Not the resource schema's metadata: migration 0003 writes this table out, so
# that it keeps meaning the same thing when this module changes (a test checks both agree).
_metadata = MetaData()

export_job = Table(
    "export_job",
    _metadata,
    Column("id", Text, primary_key=True),
    Column("status", Text, nullable=False),
    Column("level", Text, nullable=False),  # system | patient | group
    Column("group_id", Text),
    Column("types", ARRAY(Text)),  # None: every type the level allows
    Column("since", DateTime(timezone=True)),
    Column("output_format", Text, nullable=False),
    Column("request", Text, nullable=False),
    Column("owner", Text, nullable=False),
    Column("caller", JSONB, nullable=False),
    Column("file_lines", Integer, nullable=False),
    Column("transaction_time", DateTime(timezone=True), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("started", DateTime(timezone=True)),
    Column("finished", DateTime(timezone=True)),
    Column("heartbeat", DateTime(timezone=True)),
    Column("worker", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("progress", Text),
    Column("directory", Text),
    Column("output", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("error", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("issues", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("expires", DateTime(timezone=True)),
)
# Workers only look at live jobs; the purge only at finished ones.
Index("export_job_live", export_job.c.created, postgresql_where=export_job.c.status.in_([QUEUED, RUNNING]))
Index("export_job_expires", export_job.c.expires, postgresql_where=export_job.c.expires.isnot(None))

_JSONB = ("caller", "output", "error", "issues")


def _params(values: dict[str, Any]) -> dict[str, Any]:
    return {k: Jsonb(v) if k in _JSONB else v for k, v in values.items()}


async def _one(conn: AsyncConnection, stmt: Any) -> dict[str, Any] | None:
    sql, params = compile_stmt(stmt)
    cur = await conn.execute(sql, params)
    row = await cur.fetchone()
    if row is None:
        return None
    return {d.name: v for d, v in zip(cur.description or [], row)}


async def insert_job(conn: AsyncConnection, values: dict[str, Any]) -> None:
    """Queue a job and wake the workers (the notification leaves at commit)."""
    sql, params = compile_stmt(insert(export_job).values(**_params({**values, "status": QUEUED})))
    await conn.execute(sql, params)
    sql, params = compile_stmt(select(func.pg_notify(CHANNEL, values["id"])))
    await conn.execute(sql, params)


async def get_job(conn: AsyncConnection, job_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    stmt = select(export_job).where(export_job.c.id == job_id)
    return await _one(conn, stmt.with_for_update() if lock else stmt)


async def claim(conn: AsyncConnection, worker: str, now: datetime, stale_before: datetime, root: str) -> dict[str, Any] | None:
    """Take the oldest waiting job (or one whose worker stopped beating), skipping rows other
    workers hold; its files go to ``root/<job id>`` on this worker's storage."""
    j = export_job.c
    candidate = (
        select(j.id)
        .where(or_(j.status == QUEUED, (j.status == RUNNING) & (j.heartbeat < stale_before)))
        .order_by(j.created)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    stmt = (
        update(export_job)
        .where(j.id == candidate)
        .values(status=RUNNING, worker=worker, started=func.coalesce(j.started, now), heartbeat=now,
                attempts=j.attempts + 1, directory=func.concat(root.rstrip("/") + "/", j.id))
        .returning(*export_job.c)
    )
    return await _one(conn, stmt)


async def beat(conn: AsyncConnection, job_id: str, worker: str, now: datetime, progress: str) -> bool:
    """Renew the lease; False when the job was cancelled, deleted or taken over meanwhile."""
    j = export_job.c
    stmt = (
        update(export_job)
        .where(j.id == job_id, j.worker == worker, j.status == RUNNING)
        .values(heartbeat=now, progress=progress)
        .returning(j.id)
    )
    return await _one(conn, stmt) is not None


async def finish(conn: AsyncConnection, job_id: str, worker: str, values: dict[str, Any]) -> bool:
    """Record the outcome of a run (status done or failed) if this worker still holds the job."""
    j = export_job.c
    stmt = (
        update(export_job)
        .where(j.id == job_id, j.worker == worker, j.status == RUNNING)
        .values(**_params(values))
        .returning(j.id)
    )
    return await _one(conn, stmt) is not None


async def release(conn: AsyncConnection, job_id: str, worker: str) -> bool:
    """Put a job this worker holds back in the queue (the worker is stopping)."""
    j = export_job.c
    stmt = (
        update(export_job)
        .where(j.id == job_id, j.worker == worker, j.status == RUNNING)
        .values(status=QUEUED, worker=None, heartbeat=None, progress="queued", attempts=j.attempts - 1)
        .returning(j.id)
    )
    return await _one(conn, stmt) is not None


async def set_status(conn: AsyncConnection, job_id: str, status: str, expires: datetime) -> None:
    sql, params = compile_stmt(update(export_job).where(export_job.c.id == job_id).values(status=status, expires=expires))
    await conn.execute(sql, params)


async def delete_job(conn: AsyncConnection, job_id: str) -> None:
    sql, params = compile_stmt(delete(export_job).where(export_job.c.id == job_id))
    await conn.execute(sql, params)


async def expired(conn: AsyncConnection, now: datetime, limit: int = 100) -> list[tuple[str, str | None]]:
    """Remove finished jobs past their expiry; returns (id, output directory) of each, to delete the files."""
    j = export_job.c
    doomed = (
        select(j.id)
        .where(j.expires < now, j.status.in_([DONE, FAILED, CANCELLED]))
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    sql, params = compile_stmt(delete(export_job).where(j.id.in_(doomed)).returning(j.id, j.directory))
    cur = await conn.execute(sql, params)
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def listen(conn: AsyncConnection) -> None:
    """Subscribe ``conn`` (in autocommit mode) to new-job notifications."""
    await conn.execute(f"LISTEN {CHANNEL}")
