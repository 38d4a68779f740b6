"""Server-side web sessions: one row per signed-in browser, found by the hash of its cookie.

Only the SHA-256 of the cookie value is stored, so a copy of the table does not
let anyone sign in. Functions run in the caller's transaction and never commit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from sqlalchemy import delete, insert, select, update

from parcours.store.accounts import ACCOUNT_COLUMNS, Account, account, row_of, rows_of, web_session

FULL, TOTP, ENROL = "full", "totp", "enrol"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    id: str
    account_id: str
    stage: str
    csrf_token: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class ActiveSession:
    """A session that passed every check, with its account as of this request."""

    session: Session
    account: Account


_SESSION_COLUMNS = [web_session.c[f] for f in Session.__dataclass_fields__]


async def insert_session(conn: AsyncConnection, *, id: str, token: str, account_id: str, stage: str, csrf_token: str,
                         now: datetime, expires_at: datetime, ip: str | None, user_agent: str | None,
                         data: dict[str, Any] | None = None) -> Session:
    row = await row_of(conn, insert(web_session).values(
        id=id, token_hash=token_hash(token), account_id=account_id, stage=stage, csrf_token=csrf_token,
        created_at=now, last_seen_at=now, expires_at=expires_at, ip=ip, user_agent=(user_agent or "")[:300],
        data=Jsonb(data or {}),
    ).returning(*_SESSION_COLUMNS))
    assert row is not None
    return Session(**row)


async def touch(conn: AsyncConnection, token: str, now: datetime, idle: timedelta) -> ActiveSession | None:
    """The live session of ``token`` with its active account, its idle clock reset; None when
    unknown, expired (absolute or idle) or its account is disabled. One statement."""
    ws = web_session
    stmt = (
        update(ws)
        .where(ws.c.token_hash == token_hash(token), ws.c.expires_at > now, ws.c.last_seen_at > now - idle,
               ws.c.account_id == account.c.id, account.c.status == "active")
        .values(last_seen_at=now)
        .returning(*_SESSION_COLUMNS, *[c.label(f"a_{c.name}") for c in ACCOUNT_COLUMNS])
    )
    row = await row_of(conn, stmt)
    if row is None:
        return None
    sess = Session(**{f: row[f] for f in Session.__dataclass_fields__})
    acct = Account(**{f: row[f"a_{f}"] for f in Account.__dataclass_fields__})
    return ActiveSession(sess, acct)


async def set_data(conn: AsyncConnection, session_id: str, data: dict[str, Any]) -> None:
    await rows_of(conn, update(web_session).where(web_session.c.id == session_id)
                .values(data=Jsonb(data)))


async def delete_session(conn: AsyncConnection, session_id: str, *, account_id: str | None = None) -> str | None:
    """Delete one session; returns the account it belonged to (None: there was no such session)."""
    stmt = delete(web_session).where(web_session.c.id == session_id)
    if account_id is not None:
        stmt = stmt.where(web_session.c.account_id == account_id)
    row = await row_of(conn, stmt.returning(web_session.c.account_id))
    return str(row["account_id"]) if row is not None else None


async def delete_account_sessions(conn: AsyncConnection, account_id: str, *, keep: str | None = None) -> int:
    stmt = delete(web_session).where(web_session.c.account_id == account_id)
    if keep is not None:
        stmt = stmt.where(web_session.c.id != keep)
    return len(await rows_of(conn, stmt.returning(web_session.c.id)))


async def list_sessions(conn: AsyncConnection, account_id: str, now: datetime, idle: timedelta) -> list[Session]:
    rows = await rows_of(conn, select(*_SESSION_COLUMNS)
                       .where(web_session.c.account_id == account_id, web_session.c.expires_at > now,
                              web_session.c.last_seen_at > now - idle)
                       .order_by(web_session.c.last_seen_at.desc()))
    return [Session(**r) for r in rows]


async def purge_expired(conn: AsyncConnection, account_id: str, now: datetime, idle: timedelta) -> int:
    """Drop an account's dead sessions (done at each sign-in, so the table stays small)."""
    ws = web_session
    rows = await rows_of(conn, delete(ws).where(ws.c.account_id == account_id)
                       .where((ws.c.expires_at <= now) | (ws.c.last_seen_at <= now - idle)).returning(ws.c.id))
    return len(rows)
