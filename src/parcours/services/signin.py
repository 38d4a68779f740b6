"""Local sign-in: password, second factor, throttling, and server-side web sessions.

A sign-in is two steps for accounts with TOTP (always for professionals, staff
and administrators): the password opens a *pending* session (stage ``totp``, or
``enrol`` when the account must first enrol an authenticator) that can do
nothing but finish the second step; success replaces it with a ``full`` session
under a new cookie value. Failures are counted per e-mail and per client network
in the database, so every worker sees the same counters; too many lock the key
for a while. All times come from the platform clock.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg import AsyncConnection

from parcours.core.ids import new_id
from parcours.security import passwords, roles
from parcours.security import totp as totp_codes
from parcours.security.caller import Caller
from parcours.services import accounts
from parcours.services.platform import Platform
from parcours.store import accounts as store
from parcours.store import audit
from parcours.store import sessions as session_store
from parcours.store.accounts import Account
from parcours.store.sessions import ENROL, FULL, TOTP, ActiveSession, Session

PENDING_LIFETIME = timedelta(minutes=10)  # time to type a code or scan a QR code after the password

OK, INVALID, LOCKED = "ok", "invalid", "locked"


@dataclass(frozen=True)
class Attempt:
    outcome: str  # ok | invalid | locked
    account: Account | None = None
    next_stage: str | None = None  # for a password step that succeeded: full | totp | enrol
    retry_at: datetime | None = None  # locked: when to try again
    used_recovery_code: bool = False


def network_key(ip: str | None) -> str:
    """Throttling key of a client: its IPv4 address, or its IPv6 /64 (one subscriber's network)."""
    if not ip:
        return "unknown"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and not addr.ipv4_mapped:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr.ipv4_mapped or addr) if addr.version == 6 else str(addr)


def _keys(email: str, ip: str | None) -> list[tuple[str, str]]:
    return [("account", store.normalize_email(email)), ("ip", network_key(ip))]


async def _fail(platform: Platform, conn: AsyncConnection, email: str, ip: str | None) -> Attempt:
    s = platform.settings
    now = platform.clock.now()
    window, lockout = timedelta(minutes=s.signin_window_minutes), timedelta(minutes=s.signin_lockout_minutes)
    await store.purge_stale_throttles(conn, now, window)
    until = None
    for (kind, key), limit in zip(_keys(email, ip), (s.signin_max_failures_account, s.signin_max_failures_ip)):
        state = await store.register_failure(conn, kind, key, now, window=window, limit=limit, lockout=lockout)
        if state.locked_until is not None:
            until = max(until, state.locked_until) if until else state.locked_until
    await audit.record(conn, audit.AuditRecord(
        action="login", outcome=audit.MINOR_FAILURE, recorded=now, agent=store.normalize_email(email), agent_kind="unknown",
        address=ip, detail={"locked_until": until.isoformat() if until else None}))
    return Attempt(LOCKED if until else INVALID, retry_at=until)


def stage_after_password(account: Account) -> str:
    if account.totp_enabled:
        return TOTP
    if roles.role(account.role).second_factor_required:
        return ENROL
    return FULL


async def check_password(platform: Platform, conn: AsyncConnection, email: str, password: str, ip: str | None) -> Attempt:
    """First step. Commit the transaction whatever the outcome: failures must be counted."""
    now = platform.clock.now()
    until = await store.locked_until(conn, _keys(email, ip), now)
    if until is not None:
        return Attempt(LOCKED, retry_at=until)
    account = await store.by_email(conn, email)
    ok = await asyncio.to_thread(passwords.verify_password, account.password_hash if account else None, password)
    if not ok or account is None or not account.active:
        return await _fail(platform, conn, email, ip)
    await store.clear_failures(conn, "account", store.normalize_email(email))
    if passwords.needs_rehash(account.password_hash):
        await store.update_fields(conn, account.id, now, password_hash=await asyncio.to_thread(passwords.hash_password, password))
    return Attempt(OK, account=account, next_stage=stage_after_password(account))


async def check_second_factor(platform: Platform, conn: AsyncConnection, account: Account, code: str, ip: str | None) -> Attempt:
    """Second step: a TOTP code (never the same time step twice) or an unused recovery code."""
    now = platform.clock.now()
    until = await store.locked_until(conn, _keys(account.email, ip), now)
    if until is not None:
        return Attempt(LOCKED, account=account, retry_at=until)
    ok, recovery = False, False
    if account.totp_secret and totp_codes.looks_like_totp(code):
        step = totp_codes.matching_step(account.totp_secret, code, now)
        ok = step is not None and await store.claim_totp_step(conn, account.id, step, now)
    elif len(totp_codes.normalize_code(code)) == 12:
        ok = recovery = await store.use_recovery_code(conn, account.id, totp_codes.recovery_code_hash(account.id, code), now)
    if not ok:
        return await _fail(platform, conn, account.email, ip)
    await store.clear_failures(conn, "account", account.email)
    return Attempt(OK, account=account, next_stage=FULL, used_recovery_code=recovery)


# -- sessions -------------------------------------------------------------------------------

def _idle(platform: Platform) -> timedelta:
    return timedelta(minutes=platform.settings.session_idle_minutes)


async def open_session(platform: Platform, conn: AsyncConnection, account: Account, stage: str, *,
                       ip: str | None, user_agent: str | None, data: dict | None = None) -> tuple[str, Session]:
    """A new session and the cookie value for it (only its hash is stored)."""
    now = platform.clock.now()
    await session_store.purge_expired(conn, account.id, now, _idle(platform))
    lifetime = timedelta(minutes=platform.settings.session_absolute_minutes) if stage == FULL else PENDING_LIFETIME
    token = secrets.token_urlsafe(32)
    sess = await session_store.insert_session(
        conn, id=new_id(), token=token, account_id=account.id, stage=stage, csrf_token=secrets.token_urlsafe(32),
        now=now, expires_at=now + lifetime, ip=ip, user_agent=user_agent, data=data,
    )
    if stage == FULL:
        await store.update_fields(conn, account.id, now, last_signin_at=now)
        await audit.record(conn, audit.AuditRecord(
            action="login", outcome=audit.SUCCESS, recorded=now, agent=account.id, agent_kind=account.role,
            fhir_user=account.fhir_user, address=ip))
    return token, sess


async def promote(platform: Platform, conn: AsyncConnection, active: ActiveSession, *, ip: str | None,
                  user_agent: str | None) -> tuple[str, Session]:
    """Finish a sign-in: the pending session is replaced by a full one under a new cookie value."""
    await session_store.delete_session(conn, active.session.id)
    account = await store.get(conn, active.account.id)
    assert account is not None
    return await open_session(platform, conn, account, FULL, ip=ip, user_agent=user_agent)


async def resolve(platform: Platform, conn: AsyncConnection, token: str) -> ActiveSession | None:
    return await session_store.touch(conn, token, platform.clock.now(), _idle(platform))


async def sessions_of(platform: Platform, conn: AsyncConnection, account_id: str) -> list[Session]:
    return await session_store.list_sessions(conn, account_id, platform.clock.now(), _idle(platform))


async def sign_out(conn: AsyncConnection, session_id: str, *, account_id: str | None = None) -> bool:
    owner = await session_store.delete_session(conn, session_id, account_id=account_id)
    if owner is not None:
        # Whose session it was, also when the caller only knew the session (the sign-out button).
        await audit.record(conn, audit.AuditRecord(action="logout", outcome=audit.SUCCESS, recorded=datetime.now(UTC),
                                                   agent=owner, detail={"session": session_id}))
    return owner is not None


async def sign_out_everywhere(conn: AsyncConnection, account_id: str, *, keep: str | None = None) -> int:
    n = await session_store.delete_account_sessions(conn, account_id, keep=keep)
    await audit.record(conn, audit.AuditRecord(action="logout", outcome=audit.SUCCESS, recorded=datetime.now(UTC),
                                               agent=account_id, detail={"everywhere": True, "sessions": n}))
    return n


async def remember(conn: AsyncConnection, session: Session, **values: object) -> None:
    """Keep small values with a session (a pending TOTP secret...); None removes a value."""
    data = {**session.data, **{k: v for k, v in values.items() if v is not None}}
    for k in [k for k, v in values.items() if v is None]:
        data.pop(k, None)
    await session_store.set_data(conn, session.id, data)


def session_caller(active: ActiveSession, address: str | None) -> Caller:
    return accounts.caller_for(active.account, address=address)
