"""The audit trail: append-only, written in the transaction of what it records, tamper-evident.

Every interaction appends one compact row to ``audit_log`` inside the caller's
transaction (one more statement in the same pipeline, so it costs no round
trip). Rows are never updated or deleted by the platform.

Tamper evidence: a sealer chains the rows with SHA-256 in a stable order. The
order is ``(xid, seq)`` and a row is sealed only once every transaction with a
smaller id has ended (``xid < pg_snapshot_xmin``), so no row can later appear
before a sealed one without breaking the chain. ``verify`` recomputes every row
hash and the chain and names the first entry that was changed, deleted or
inserted.

A materializer turns rows into FHIR AuditEvent resources (searchable, and shown
to patients as their access history) shortly after commit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from psycopg import AsyncConnection, Connection
from sqlalchemy import BigInteger, Column, DateTime, Index, LargeBinary, MetaData, Table, Text, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

# Their own MetaData: revision 0006 creates them; the generated resource schema of
# revision 0001 must not change when this module is imported.
metadata = MetaData()

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=True),
    Column("xid", Text, nullable=False, server_default=text("pg_current_xact_id()::text")),
    Column("recorded", DateTime(timezone=True), nullable=False),
    Column("action", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("agent", Text),
    Column("agent_kind", Text),
    Column("fhir_user", Text),
    Column("address", Text),
    Column("resource_type", Text),
    Column("resource_id", Text),
    Column("version_id", BigInteger),
    Column("patients", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("query", Text),
    Column("purpose", Text),
    Column("detail", JSONB),
)
Index("audit_log_patients", audit_log.c.patients, postgresql_using="gin")
Index("audit_log_recorded", audit_log.c.recorded)

audit_seal = Table(
    "audit_seal",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("xid", Text, nullable=False),
    Column("position", BigInteger, nullable=False, unique=True),
    Column("row_hash", LargeBinary, nullable=False),
    Column("chain", LargeBinary, nullable=False),
)

# Emergency access ("break the glass"): a professional reaches a patient's record
# without a care relationship, for a limited time, with a stated reason.
emergency_access = Table(
    "emergency_access",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("agent", Text, nullable=False),  # the professional's FHIR reference
    Column("patient", Text, nullable=False),  # Patient/<id>
    Column("reason", Text, nullable=False),
    Column("granted", DateTime(timezone=True), nullable=False),
    Column("until", DateTime(timezone=True), nullable=False),
)
Index("emergency_access_agent", emergency_access.c.agent, emergency_access.c.until)

# How far audit entries were turned into AuditEvent resources.
audit_cursor = Table(
    "audit_cursor",
    metadata,
    Column("name", Text, primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

INSERT_SQL = (
    "INSERT INTO audit_log (recorded, action, outcome, agent, agent_kind, fhir_user, address, resource_type, "
    "resource_id, version_id, patients, query, purpose, detail) VALUES (%(recorded)s, %(action)s, %(outcome)s, "
    "%(agent)s, %(agent_kind)s, %(fhir_user)s, %(address)s, %(resource_type)s, %(resource_id)s, %(version_id)s, "
    "%(patients)s, %(query)s, %(purpose)s, %(detail)s)"
)

_FIELDS = ("seq", "xid", "recorded", "action", "outcome", "agent", "agent_kind", "fhir_user", "address",
           "resource_type", "resource_id", "version_id", "patients", "query", "purpose", "detail")
_SELECT = "SELECT " + ", ".join(_FIELDS) + " FROM audit_log"

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
_GENESIS = b"\x00" * 32
_SEAL_LOCK = 0x61756474


@dataclass
class AuditRecord:
    action: str
    outcome: str
    recorded: datetime
    agent: str | None = None
    agent_kind: str | None = None
    fhir_user: str | None = None
    address: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: int | None = None
    patients: tuple[str, ...] = ()
    query: str | None = None
    purpose: str | None = None
    detail: dict | None = None

    def params(self) -> dict[str, Any]:
        from psycopg.types.json import Jsonb

        return {
            "recorded": self.recorded, "action": self.action, "outcome": self.outcome, "agent": self.agent,
            "agent_kind": self.agent_kind, "fhir_user": self.fhir_user, "address": self.address,
            "resource_type": self.resource_type, "resource_id": self.resource_id, "version_id": self.version_id,
            "patients": list(self.patients), "query": self.query, "purpose": self.purpose,
            "detail": Jsonb(self.detail) if self.detail is not None else None,
        }


async def record(conn: AsyncConnection, rec: AuditRecord) -> None:
    """Append one entry in the caller's transaction."""
    await conn.execute(INSERT_SQL, rec.params())


async def pending(conn: AsyncConnection, limit: int) -> list[tuple[int, tuple]]:
    """Sealed entries not yet turned into AuditEvents, in chain order, as
    (position, row). The seal order is final, so the cursor never skips an entry.
    Locks the cursor row for the caller's transaction."""
    await conn.execute("INSERT INTO audit_cursor (name, seq) VALUES ('materialized', 0) ON CONFLICT DO NOTHING")
    row = await (await conn.execute("SELECT seq FROM audit_cursor WHERE name = 'materialized' FOR UPDATE")).fetchone()
    start = int(row[0]) if row else 0
    cols = ", ".join(f"a.{f}" for f in _FIELDS)
    rows = await (await conn.execute(
        f"SELECT s.position, {cols} FROM audit_seal s JOIN audit_log a ON a.seq = s.seq "
        "WHERE s.position > %s ORDER BY s.position LIMIT %s", (start, limit))).fetchall()
    return [(int(r[0]), tuple(r[1:])) for r in rows]


async def advance(conn: AsyncConnection, position: int) -> None:
    await conn.execute("UPDATE audit_cursor SET seq = %s WHERE name = 'materialized' AND seq < %s", (position, position))


def row_hash(row: tuple) -> bytes:
    """SHA-256 of a row's canonical form (every field, in a fixed order)."""
    values = []
    for v in row:
        if isinstance(v, datetime):
            values.append(v.isoformat())
        else:
            values.append(v)
    return hashlib.sha256(orjson.dumps(values, option=orjson.OPT_SORT_KEYS)).digest()


async def seal(conn: AsyncConnection, batch: int = 5000) -> int:
    """Chain the entries that can no longer be preceded by others; returns how many."""
    async with conn.transaction():
        got = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_SEAL_LOCK,))).fetchone()
        if not got or not got[0]:
            return 0
        last = await (await conn.execute(
            "SELECT position, chain, xid, seq FROM audit_seal ORDER BY position DESC LIMIT 1")).fetchone()
        position, chain = (last[0], bytes(last[1])) if last else (0, _GENESIS)
        # The entries after the last seal in seal order (index audit_log_seal_order, revision
        # 0015): those of transactions that can no longer be preceded by another.
        after = "(a.xid::xid8, a.seq) > (%s::xid8, %s) AND " if last else ""
        rows = await (await conn.execute(
            _SELECT + f" a WHERE {after}a.xid::xid8 < pg_snapshot_xmin(pg_current_snapshot()) "
            "ORDER BY a.xid::xid8, a.seq LIMIT %s",
            ((last[2], last[3], batch) if last else (batch,)),
        )).fetchall()
        out = []
        for row in rows:
            h = row_hash(row)
            chain = hashlib.sha256(chain + h).digest()
            position += 1
            out.append((row[0], row[1], position, h, chain))
        if out:
            async with conn.cursor() as cur:
                await cur.executemany("INSERT INTO audit_seal (seq, xid, position, row_hash, chain) VALUES (%s, %s, %s, %s, %s)", out)
        return len(out)


@dataclass
class VerifyReport:
    checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(conn: Connection, *, max_problems: int = 20) -> VerifyReport:
    """Recompute the chain from the log and compare it with the seals."""
    problems: list[str] = []
    chain = _GENESIS
    checked = 0
    seals = conn.execute("SELECT seq, xid, position, row_hash, chain FROM audit_seal ORDER BY position").fetchall()
    by_seq = {r[0]: r for r in conn.execute(_SELECT).fetchall()}
    expected_pos = 0
    prev_order: tuple[int, int] | None = None
    for seq, xid, position, stored_hash, stored_chain in seals:
        expected_pos += 1
        if position != expected_pos:
            problems.append(f"seal position {expected_pos} is missing (chain broken before entry {seq})")
            expected_pos = position
        row = by_seq.pop(seq, None)
        if row is None:
            problems.append(f"entry {seq} (position {position}) was deleted from the audit log")
            chain = bytes(stored_chain)
            continue
        order = (int(row[1]), int(row[0]))
        if prev_order is not None and order < prev_order:
            problems.append(f"entry {seq} is out of order: it was inserted after later entries were sealed")
        prev_order = order
        h = row_hash(row)
        if h != bytes(stored_hash):
            problems.append(f"entry {seq} (position {position}, {row[3]} {row[9] or ''}/{row[10] or ''}) was changed after it was sealed")
        chain = hashlib.sha256(chain + bytes(stored_hash)).digest()
        if chain != bytes(stored_chain):
            problems.append(f"the chain does not match at entry {seq} (position {position}): seals were rewritten")
            chain = bytes(stored_chain)
        checked += 1
        if len(problems) >= max_problems:
            break
    if len(problems) < max_problems:
        xmin = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0]
        last_order = prev_order
        for seq, row in sorted(by_seq.items()):
            if int(row[1]) < int(xmin) and last_order is not None and (int(row[1]), seq) < last_order:
                problems.append(f"entry {seq} was inserted into the past: it sorts before entries already sealed")
    return VerifyReport(checked, problems)
