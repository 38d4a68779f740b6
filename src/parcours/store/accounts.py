"""User accounts, their second factor and recovery codes, and sign-in throttling.

The tables live outside the generated resource schema (their own ``MetaData``):
revision 0005 creates them, and the FHIR resources an account is linked to
(``fhir_user``) stay in the resource store, reached through the Repository.

Every function runs in the transaction its caller opened on ``conn`` and never
commits. Times come from the caller's clock, never from ``now()`` in SQL, so a
fake clock drives expiry in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import ClauseElement

from parcours.store.sql import compile_stmt

metadata = MetaData()

ROLES = ("patient", "practitioner", "staff", "admin", "proxy")
IDENTITY_STATUSES = ("provisional", "recovered", "validated", "qualified")

account = Table(
    "account",
    metadata,
    Column("id", Text, primary_key=True),
    Column("email", Text, nullable=False, unique=True),  # stored lower-cased
    Column("role", Text, nullable=False),
    Column("fhir_user", Text),  # "Patient/123", "Practitioner/9", "RelatedPerson/4"
    Column("display_name", Text, nullable=False, server_default=text("''")),
    Column("identity_status", Text),  # patients: provisional | recovered | validated | qualified
    Column("password_hash", Text, nullable=False),
    Column("totp_secret", Text),  # base32; NULL = no second factor enrolled
    Column("totp_last_step", BigInteger),  # last accepted TOTP time step (replay guard)
    Column("locale", Text),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("password_changed_at", DateTime(timezone=True), nullable=False),
    Column("last_signin_at", DateTime(timezone=True)),
    CheckConstraint("role IN ('patient', 'practitioner', 'staff', 'admin', 'proxy')", name="account_role"),
    CheckConstraint("status IN ('active', 'disabled')", name="account_status"),
    CheckConstraint(
        "identity_status IS NULL OR identity_status IN ('provisional', 'recovered', 'validated', 'qualified')",
        name="account_identity_status",
    ),
)
Index("account_fhir_user", account.c.fhir_user)

recovery_code = Table(
    "account_recovery_code",
    metadata,
    Column("account_id", Text, ForeignKey("account.id", ondelete="CASCADE"), primary_key=True),
    Column("code_hash", Text, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
)

# One row per (kind, key): kind "account" keys on the normalised e-mail (so unknown
# addresses throttle exactly like known ones), kind "ip" on the client network.
signin_throttle = Table(
    "signin_throttle",
    metadata,
    Column("kind", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("locked_until", DateTime(timezone=True)),
)

web_session = Table(
    "web_session",
    metadata,
    Column("id", Text, primary_key=True),  # public handle (listing, revoking one)
    Column("token_hash", Text, nullable=False, unique=True),  # SHA-256 of the cookie value
    Column("account_id", Text, ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
    Column("stage", Text, nullable=False),  # full | totp (password done) | enrol (must enrol TOTP)
    Column("csrf_token", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("ip", Text),
    Column("user_agent", Text),
    Column("data", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint("stage IN ('full', 'totp', 'enrol')", name="web_session_stage"),
)
Index("web_session_account", web_session.c.account_id)
Index("web_session_expires", web_session.c.expires_at)


@dataclass(frozen=True)
class Account:
    id: str
    email: str
    role: str
    fhir_user: str | None
    display_name: str
    identity_status: str | None
    password_hash: str
    totp_secret: str | None
    totp_last_step: int | None
    locale: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    password_changed_at: datetime
    last_signin_at: datetime | None

    @property
    def totp_enabled(self) -> bool:
        return self.totp_secret is not None

    @property
    def active(self) -> bool:
        return self.status == "active"


ACCOUNT_COLUMNS = [account.c[f] for f in Account.__dataclass_fields__]


def normalize_email(email: str) -> str:
    return email.strip().lower()


async def rows_of(conn: AsyncConnection, stmt: ClauseElement) -> list[dict[str, Any]]:
    sql, params = compile_stmt(stmt)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(sql, params)
    return await cur.fetchall() if cur.description else []


async def row_of(conn: AsyncConnection, stmt: ClauseElement) -> dict[str, Any] | None:
    rows = await rows_of(conn, stmt)
    return rows[0] if rows else None


# -- accounts -----------------------------------------------------------------------------

async def insert_account(conn: AsyncConnection, *, id: str, email: str, role: str, fhir_user: str | None,
                         display_name: str, identity_status: str | None, password_hash: str,
                         totp_secret: str | None, locale: str | None, now: datetime) -> Account:
    row = await row_of(conn, insert(account).values(
        id=id, email=normalize_email(email), role=role, fhir_user=fhir_user, display_name=display_name,
        identity_status=identity_status, password_hash=password_hash, totp_secret=totp_secret, locale=locale,
        status="active", created_at=now, updated_at=now, password_changed_at=now,
    ).returning(*ACCOUNT_COLUMNS))
    assert row is not None
    return Account(**row)


async def email_taken(conn: AsyncConnection, email: str) -> bool:
    return await row_of(conn, select(account.c.id).where(account.c.email == normalize_email(email))) is not None


async def get(conn: AsyncConnection, account_id: str) -> Account | None:
    row = await row_of(conn, select(*ACCOUNT_COLUMNS).where(account.c.id == account_id))
    return Account(**row) if row else None


async def by_email(conn: AsyncConnection, email: str) -> Account | None:
    row = await row_of(conn, select(*ACCOUNT_COLUMNS).where(account.c.email == normalize_email(email)))
    return Account(**row) if row else None


async def by_fhir_user(conn: AsyncConnection, reference: str) -> list[Account]:
    """Accounts linked to a FHIR resource ("Patient/123"): who to notify, who signs in as it."""
    rows = await rows_of(conn, select(*ACCOUNT_COLUMNS).where(account.c.fhir_user == reference).order_by(account.c.created_at))
    return [Account(**r) for r in rows]


async def update_fields(conn: AsyncConnection, account_id: str, now: datetime, **values: Any) -> None:
    allowed = {"display_name", "identity_status", "password_hash", "password_changed_at", "totp_secret",
               "totp_last_step", "locale", "status", "last_signin_at", "fhir_user"}
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"Not updatable: {sorted(unknown)}")
    await rows_of(conn, update(account).where(account.c.id == account_id).values(updated_at=now, **values))


async def claim_totp_step(conn: AsyncConnection, account_id: str, step: int, now: datetime) -> bool:
    """Record ``step`` as used; False when it (or a later one) was used already: a replay."""
    row = await row_of(conn, update(account)
                     .where(account.c.id == account_id)
                     .where((account.c.totp_last_step.is_(None)) | (account.c.totp_last_step < step))
                     .values(totp_last_step=step, updated_at=now)
                     .returning(account.c.id))
    return row is not None


# -- recovery codes -----------------------------------------------------------------------

async def replace_recovery_codes(conn: AsyncConnection, account_id: str, code_hashes: list[str], now: datetime) -> None:
    await rows_of(conn, delete(recovery_code).where(recovery_code.c.account_id == account_id))
    if code_hashes:
        await rows_of(conn, insert(recovery_code).values(
            [{"account_id": account_id, "code_hash": h, "created_at": now} for h in code_hashes]))


async def use_recovery_code(conn: AsyncConnection, account_id: str, code_hash: str, now: datetime) -> bool:
    """Spend one code; the row update makes a second use (even concurrent) fail."""
    row = await row_of(conn, update(recovery_code)
                     .where(recovery_code.c.account_id == account_id, recovery_code.c.code_hash == code_hash,
                            recovery_code.c.used_at.is_(None))
                     .values(used_at=now)
                     .returning(recovery_code.c.code_hash))
    return row is not None


async def recovery_codes_left(conn: AsyncConnection, account_id: str) -> int:
    row = await row_of(conn, select(func.count().label("n")).select_from(recovery_code)
                     .where(recovery_code.c.account_id == account_id, recovery_code.c.used_at.is_(None)))
    return int(row["n"]) if row else 0


# -- throttling ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ThrottleState:
    failures: int
    locked_until: datetime | None


async def locked_until(conn: AsyncConnection, keys: list[tuple[str, str]], now: datetime) -> datetime | None:
    """The latest lock still in force among ``keys`` ((kind, key) pairs), or None."""
    if not keys:
        return None
    cond = None
    for kind, key in keys:
        c = (signin_throttle.c.kind == kind) & (signin_throttle.c.key == key)
        cond = c if cond is None else (cond | c)
    row = await row_of(conn, select(func.max(signin_throttle.c.locked_until).label("until"))
                     .where(cond, signin_throttle.c.locked_until > now))
    return row["until"] if row else None


async def register_failure(conn: AsyncConnection, kind: str, key: str, now: datetime, *,
                           window: timedelta, limit: int, lockout: timedelta) -> ThrottleState:
    """Count one failure; lock the key for ``lockout`` when ``limit`` failures fall in ``window``.

    The row lock serialises concurrent attempts on one key, so parallel guesses
    from several workers are all counted.
    """
    await rows_of(conn, pg_insert(signin_throttle)
                .values(kind=kind, key=key, failures=0, window_start=now)
                .on_conflict_do_nothing())
    row = await row_of(conn, select(signin_throttle.c.failures, signin_throttle.c.window_start, signin_throttle.c.locked_until)
                     .where(signin_throttle.c.kind == kind, signin_throttle.c.key == key).with_for_update())
    assert row is not None
    failures, start, until = row["failures"], row["window_start"], row["locked_until"]
    if start + window <= now or start > now:
        failures, start = 0, now
    failures += 1
    if until is not None and until <= now:
        until = None
    if failures >= limit:
        until, failures, start = now + lockout, 0, now
    await rows_of(conn, update(signin_throttle)
                .where(signin_throttle.c.kind == kind, signin_throttle.c.key == key)
                .values(failures=failures, window_start=start, locked_until=until))
    return ThrottleState(failures, until)


async def clear_failures(conn: AsyncConnection, kind: str, key: str) -> None:
    await rows_of(conn, delete(signin_throttle).where(signin_throttle.c.kind == kind, signin_throttle.c.key == key))


async def purge_stale_throttles(conn: AsyncConnection, now: datetime, window: timedelta, limit: int = 100) -> None:
    """Drop up to ``limit`` counters that no longer matter (window over, no lock in force).

    Failures on made-up addresses create rows; purging a few at each failure keeps
    the table as small as the attacks of the last window.
    """
    t = signin_throttle
    stale = (select(t.c.kind, t.c.key)
             .where(t.c.window_start < now - window, (t.c.locked_until.is_(None)) | (t.c.locked_until <= now))
             .limit(limit).with_for_update(skip_locked=True))
    await rows_of(conn, delete(t).where(tuple_(t.c.kind, t.c.key).in_(stale)))
