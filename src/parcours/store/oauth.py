"""SMART on FHIR authorization server and external sign-in: clients, codes, refresh tokens,
revoked access tokens, signing keys, pending external sign-ins and linked identities.

Revision 0007 creates the tables (their own ``MetaData``). Secrets are stored as
SHA-256 hashes (client secrets, authorization codes, refresh tokens, OIDC
states): they are long random values, so there is nothing to stretch, and a copy
of the tables grants nothing. Functions run in the caller's transaction and
never commit; times come from the caller's clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    PrimaryKeyConstraint,
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
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from parcours.store.accounts import account, row_of, rows_of

metadata = MetaData()
TS = DateTime(timezone=True)

CLIENT_TYPES = ("public", "confidential", "backend")

oauth_client = Table(
    "oauth_client",
    metadata,
    Column("client_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("client_type", Text, nullable=False),
    Column("secret_hash", Text),  # confidential clients
    Column("redirect_uris", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("scope", Text, nullable=False),  # the most this client may be granted
    Column("jwks", JSONB),  # public keys for private_key_jwt
    Column("jwks_url", Text),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    Column("created_by", Text),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    CheckConstraint("client_type IN ('public', 'confidential', 'backend')", name="oauth_client_type"),
    CheckConstraint("status IN ('active', 'disabled')", name="oauth_client_status"),
)

authorization_code = Table(
    "oauth_authorization_code",
    metadata,
    Column("code_hash", Text, primary_key=True),
    Column("client_id", Text, ForeignKey("oauth_client.client_id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Text, ForeignKey(account.c.id, ondelete="CASCADE"), nullable=False),
    Column("grant_id", Text, nullable=False),  # the refresh-token family this code starts
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),  # granted
    Column("patient", Text),  # launch context: Patient id
    Column("nonce", Text),
    Column("code_challenge", Text),
    Column("code_challenge_method", Text),
    Column("auth_time", TS, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
    Column("used_at", TS),
)
Index("oauth_code_nonce", authorization_code.c.client_id, authorization_code.c.nonce,
      postgresql_where=authorization_code.c.nonce.isnot(None))
Index("oauth_code_expires", authorization_code.c.expires_at)

# One row per refresh token; a grant (one user's consent to one app) is a family of
# rows, each used once: presenting a used one again revokes the family.
refresh_token = Table(
    "oauth_refresh_token",
    metadata,
    Column("token_hash", Text, primary_key=True),
    Column("grant_id", Text, nullable=False),
    Column("client_id", Text, ForeignKey("oauth_client.client_id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Text, ForeignKey(account.c.id, ondelete="CASCADE"), nullable=False),
    Column("scope", Text, nullable=False),
    Column("patient", Text),
    Column("auth_time", TS, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
    Column("used_at", TS),
    Column("revoked_at", TS),
)
Index("oauth_refresh_grant", refresh_token.c.grant_id)
Index("oauth_refresh_expires", refresh_token.c.expires_at)

# Access tokens are JWTs checked without the database; revoking one puts its jti here
# until it would have expired anyway.
revoked_token = Table(
    "oauth_revoked_token",
    metadata,
    Column("jti", Text, primary_key=True),
    Column("expires_at", TS, nullable=False),
    Column("revoked_at", TS, nullable=False),
)
Index("oauth_revoked_expires", revoked_token.c.expires_at)

# Access tokens issued under a grant, until they expire: revoking the grant (or replaying its
# code) denies them.
issued_access = Table(
    "oauth_issued_access",
    metadata,
    Column("jti", Text, primary_key=True),
    Column("grant_id", Text, nullable=False),
    Column("expires_at", TS, nullable=False),
)
Index("oauth_issued_access_grant", issued_access.c.grant_id)
Index("oauth_issued_access_expires", issued_access.c.expires_at)

# jti of the client assertions (private_key_jwt) already used, until they expire.
client_assertion = Table(
    "oauth_client_assertion",
    metadata,
    Column("client_id", Text, nullable=False),
    Column("jti", Text, nullable=False),
    Column("expires_at", TS, nullable=False),
    PrimaryKeyConstraint("client_id", "jti"),
)
Index("oauth_assertion_expires", client_assertion.c.expires_at)

# Keys that sign id_tokens (RS256); the newest unretired one signs, all unretired are published.
signing_key = Table(
    "oauth_signing_key",
    metadata,
    Column("kid", Text, primary_key=True),
    Column("alg", Text, nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("public_jwk", JSONB, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("retired_at", TS),
)

# A sign-in started with an external identity provider, until its callback.
oidc_signin = Table(
    "oidc_signin",
    metadata,
    Column("state_hash", Text, primary_key=True),
    Column("provider", Text, nullable=False),
    Column("nonce", Text, nullable=False),
    Column("code_verifier", Text, nullable=False),
    Column("next", Text, nullable=False, server_default=text("''")),
    Column("browser_hash", Text, nullable=False),  # hash of a cookie: the callback must come from the same browser
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
)
Index("oidc_signin_expires", oidc_signin.c.expires_at)

external_identity = Table(
    "account_external_identity",
    metadata,
    Column("provider", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("issuer", Text, nullable=False),
    Column("account_id", Text, ForeignKey(account.c.id, ondelete="CASCADE"), nullable=False),
    Column("linked_at", TS, nullable=False),
    Column("last_used_at", TS, nullable=False),
    PrimaryKeyConstraint("provider", "subject"),
)
Index("account_external_identity_account", external_identity.c.account_id)


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- clients ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    client_type: str
    secret_hash: str | None
    redirect_uris: list[str]
    scope: str
    jwks: dict | None
    jwks_url: str | None
    status: str
    created_by: str | None
    created_at: datetime
    updated_at: datetime


_CLIENT_COLUMNS = [oauth_client.c[f] for f in Client.__dataclass_fields__]


async def insert_client(conn: AsyncConnection, *, client_id: str, name: str, client_type: str, secret: str | None,
                        redirect_uris: list[str], scope: str, jwks: dict | None, jwks_url: str | None,
                        created_by: str | None, now: datetime) -> Client:
    row = await row_of(conn, insert(oauth_client).values(
        client_id=client_id, name=name, client_type=client_type, secret_hash=secret_hash(secret) if secret else None,
        redirect_uris=redirect_uris, scope=scope, jwks=Jsonb(jwks) if jwks is not None else None, jwks_url=jwks_url, status="active",
        created_by=created_by, created_at=now, updated_at=now,
    ).returning(*_CLIENT_COLUMNS))
    assert row is not None
    return Client(**row)


async def get_client(conn: AsyncConnection, client_id: str) -> Client | None:
    row = await row_of(conn, select(*_CLIENT_COLUMNS).where(oauth_client.c.client_id == client_id))
    return Client(**row) if row else None


async def list_clients(conn: AsyncConnection, limit: int = 500) -> list[Client]:
    rows = await rows_of(conn, select(*_CLIENT_COLUMNS).order_by(oauth_client.c.created_at.desc()).limit(limit))
    return [Client(**r) for r in rows]


async def set_client_status(conn: AsyncConnection, client_id: str, status: str, now: datetime) -> bool:
    row = await row_of(conn, update(oauth_client).where(oauth_client.c.client_id == client_id)
                       .values(status=status, updated_at=now).returning(oauth_client.c.client_id))
    return row is not None


# -- authorization codes ---------------------------------------------------------------------

@dataclass(frozen=True)
class AuthorizationCode:
    client_id: str
    account_id: str
    grant_id: str
    redirect_uri: str
    scope: str
    patient: str | None
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: datetime
    expires_at: datetime
    used_at: datetime | None


_CODE_COLUMNS = [authorization_code.c[f] for f in AuthorizationCode.__dataclass_fields__]


async def insert_code(conn: AsyncConnection, code: str, *, client_id: str, account_id: str, grant_id: str,
                      redirect_uri: str, scope: str, patient: str | None, nonce: str | None,
                      code_challenge: str | None, code_challenge_method: str | None, auth_time: datetime,
                      now: datetime, expires_at: datetime) -> None:
    await rows_of(conn, insert(authorization_code).values(
        code_hash=secret_hash(code), client_id=client_id, account_id=account_id, grant_id=grant_id,
        redirect_uri=redirect_uri, scope=scope, patient=patient, nonce=nonce, code_challenge=code_challenge,
        code_challenge_method=code_challenge_method, auth_time=auth_time, created_at=now, expires_at=expires_at))


async def claim_code(conn: AsyncConnection, code: str, client_id: str, now: datetime) -> tuple[AuthorizationCode | None, str | None]:
    """Spend a code: (the code, None) the first time; (None, grant_id) when it was spent
    already (a replay: the caller revokes what it gave); (None, None) when unknown or expired."""
    c = authorization_code
    row = await row_of(conn, update(c)
                       .where(c.c.code_hash == secret_hash(code), c.c.client_id == client_id, c.c.used_at.is_(None),
                              c.c.expires_at > now)
                       .values(used_at=now).returning(*_CODE_COLUMNS))
    if row is not None:
        return AuthorizationCode(**row), None
    spent = await row_of(conn, select(c.c.grant_id).where(c.c.code_hash == secret_hash(code), c.c.client_id == client_id,
                                                          c.c.used_at.isnot(None)))
    return None, (spent["grant_id"] if spent else None)


async def nonce_used(conn: AsyncConnection, client_id: str, nonce: str) -> bool:
    c = authorization_code
    return await row_of(conn, select(c.c.code_hash).where(c.c.client_id == client_id, c.c.nonce == nonce).limit(1)) is not None


# -- refresh tokens ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RefreshToken:
    grant_id: str
    client_id: str
    account_id: str
    scope: str
    patient: str | None
    auth_time: datetime
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    revoked_at: datetime | None


_REFRESH_COLUMNS = [refresh_token.c[f] for f in RefreshToken.__dataclass_fields__]


async def insert_refresh_token(conn: AsyncConnection, token: str, *, grant_id: str, client_id: str, account_id: str,
                               scope: str, patient: str | None, auth_time: datetime, now: datetime,
                               expires_at: datetime) -> None:
    await rows_of(conn, insert(refresh_token).values(
        token_hash=secret_hash(token), grant_id=grant_id, client_id=client_id, account_id=account_id, scope=scope,
        patient=patient, auth_time=auth_time,
        created_at=now, expires_at=expires_at))


async def record_issued_access(conn: AsyncConnection, grant_id: str, jti: str, expires_at: datetime) -> None:
    await rows_of(conn, insert(issued_access).values(jti=jti, grant_id=grant_id, expires_at=expires_at))


async def find_refresh_token(conn: AsyncConnection, token: str, *, lock: bool = False) -> RefreshToken | None:
    stmt = select(*_REFRESH_COLUMNS).where(refresh_token.c.token_hash == secret_hash(token))
    if lock:
        stmt = stmt.with_for_update()
    row = await row_of(conn, stmt)
    return RefreshToken(**row) if row else None


async def mark_refresh_used(conn: AsyncConnection, token: str, now: datetime) -> bool:
    r = refresh_token
    row = await row_of(conn, update(r).where(r.c.token_hash == secret_hash(token), r.c.used_at.is_(None))
                       .values(used_at=now).returning(r.c.grant_id))
    return row is not None


async def revoke_grant(conn: AsyncConnection, grant_id: str, now: datetime) -> list[str]:
    """Revoke every refresh token of a grant and deny its access tokens still alive; returns
    the ``jti`` of those access tokens."""
    r = refresh_token
    await rows_of(conn, update(r).where(r.c.grant_id == grant_id, r.c.revoked_at.is_(None)).values(revoked_at=now))
    a = issued_access
    alive = await rows_of(conn, select(a.c.jti, a.c.expires_at).where(a.c.grant_id == grant_id, a.c.expires_at > now))
    for row in alive:
        await revoke_jti(conn, row["jti"], row["expires_at"], now)
    return [row["jti"] for row in alive]


# -- revoked access tokens ----------------------------------------------------------------------

async def revoke_jti(conn: AsyncConnection, jti: str, expires_at: datetime, now: datetime) -> None:
    await rows_of(conn, pg_insert(revoked_token).values(jti=jti, expires_at=expires_at, revoked_at=now)
                  .on_conflict_do_nothing())


async def jti_revoked(conn: AsyncConnection, jti: str) -> bool:
    return await row_of(conn, select(revoked_token.c.jti).where(revoked_token.c.jti == jti)) is not None


async def revoked_jtis(conn: AsyncConnection, now: datetime) -> set[str]:
    """Every revoked access token not yet expired: as many as were revoked within one token lifetime."""
    rows = await rows_of(conn, select(revoked_token.c.jti).where(revoked_token.c.expires_at > now))
    return {r["jti"] for r in rows}


# -- client assertions (private_key_jwt) ----------------------------------------------------------

async def claim_assertion(conn: AsyncConnection, client_id: str, jti: str, expires_at: datetime) -> bool:
    """Record an assertion's jti; False when it was used already (a replay)."""
    row = await row_of(conn, pg_insert(client_assertion).values(client_id=client_id, jti=jti, expires_at=expires_at)
                       .on_conflict_do_nothing().returning(client_assertion.c.jti))
    return row is not None


# -- signing keys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_pem: str
    public_jwk: dict
    created_at: datetime


_KEY_COLUMNS = [signing_key.c[f] for f in SigningKey.__dataclass_fields__]


async def signing_keys(conn: AsyncConnection) -> list[SigningKey]:
    """Unretired keys, newest first."""
    rows = await rows_of(conn, select(*_KEY_COLUMNS).where(signing_key.c.retired_at.is_(None))
                         .order_by(signing_key.c.created_at.desc()))
    return [SigningKey(**r) for r in rows]


async def lock_signing_keys(conn: AsyncConnection) -> None:
    """Serialise key creation across processes (held until the transaction ends)."""
    await rows_of(conn, select(func.pg_advisory_xact_lock(func.hashtext("parcours-oauth-signing-key"))))


async def insert_signing_key(conn: AsyncConnection, key: SigningKey) -> None:
    await rows_of(conn, insert(signing_key).values(
        kid=key.kid, alg=key.alg, private_pem=key.private_pem, public_jwk=Jsonb(key.public_jwk), created_at=key.created_at))


# -- external sign-in ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PendingSignin:
    provider: str
    nonce: str
    code_verifier: str
    next: str
    browser_hash: str
    expires_at: datetime


_PENDING_COLUMNS = [oidc_signin.c[f] for f in PendingSignin.__dataclass_fields__]


async def insert_pending_signin(conn: AsyncConnection, state: str, *, provider: str, nonce: str, code_verifier: str,
                                next: str, browser: str, now: datetime, expires_at: datetime) -> None:
    await rows_of(conn, insert(oidc_signin).values(
        state_hash=secret_hash(state), provider=provider, nonce=nonce, code_verifier=code_verifier, next=next,
        browser_hash=secret_hash(browser), created_at=now, expires_at=expires_at))


async def take_pending_signin(conn: AsyncConnection, state: str, now: datetime) -> PendingSignin | None:
    """The pending sign-in of ``state``, removed (a state works once), or None if unknown or expired."""
    row = await row_of(conn, delete(oidc_signin).where(oidc_signin.c.state_hash == secret_hash(state))
                       .returning(*_PENDING_COLUMNS))
    if row is None or row["expires_at"] <= now:
        return None
    return PendingSignin(**row)


async def linked_account(conn: AsyncConnection, provider: str, subject: str) -> str | None:
    e = external_identity
    row = await row_of(conn, select(e.c.account_id).where(e.c.provider == provider, e.c.subject == subject))
    return row["account_id"] if row else None


async def link_identity(conn: AsyncConnection, *, provider: str, subject: str, issuer: str, account_id: str,
                        now: datetime) -> None:
    e = external_identity
    stmt = pg_insert(e).values(provider=provider, subject=subject, issuer=issuer, account_id=account_id, linked_at=now,
                               last_used_at=now)
    await rows_of(conn, stmt.on_conflict_do_update(index_elements=[e.c.provider, e.c.subject],
                                                   set_={"last_used_at": now}))


# -- housekeeping ------------------------------------------------------------------------------------

async def purge_expired(conn: AsyncConnection, now: datetime, limit: int = 200) -> None:
    """Drop up to ``limit`` dead rows of each short-lived table (done as tokens are issued, so
    the tables stay as small as the traffic of one lifetime)."""
    for table, pk in ((authorization_code, [authorization_code.c.code_hash]),
                      (client_assertion, [client_assertion.c.client_id, client_assertion.c.jti]),
                      (revoked_token, [revoked_token.c.jti]),
                      (issued_access, [issued_access.c.jti]),
                      (oidc_signin, [oidc_signin.c.state_hash]),
                      (refresh_token, [refresh_token.c.token_hash])):
        dead = select(*pk).where(table.c.expires_at <= now).limit(limit).with_for_update(skip_locked=True)
        await rows_of(conn, delete(table).where(tuple_(*pk).in_(dead)))

