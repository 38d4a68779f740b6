"""The SMART on FHIR authorization server: App Launch 2.x (authorization code + PKCE, OpenID
Connect, refresh tokens) and Backend Services (client credentials with private_key_jwt),
with revocation (RFC 7009) and introspection (RFC 7662), on Authlib's server components.

* Authlib's server is synchronous; its storage hooks reach PostgreSQL through
  ``_Db``, which runs the store's coroutines on the event loop, inside the one
  transaction the web edge opened, while Authlib works in a worker thread. One
  Authlib server is built per request around that request's ``_Context``.
* Access tokens are the platform's bearer JWTs (``security.tokens``: sub, kind,
  scope, fhirUser) plus ``jti``, ``client_id`` and the ``patient`` launch
  context, so the FHIR API takes them like any other token. Revoking one puts
  its ``jti`` on a deny list; each process keeps a copy (``RevocationCache``)
  refreshed at most every ``oauth_revocation_cache_seconds``.
* What an app gets is requested ∩ its registration ∩ the user's role
  (``security.scopes.grant``), shown on the consent page before anything is issued.
* id_tokens are signed RS256 with a key pair kept in the database
  (``oauth_signing_key``), published at ``/oauth/jwks``.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx
from authlib.oauth2 import rfc6749
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from authlib.oidc.core import grants as oidc_grants
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from psycopg import AsyncConnection

from parcours.core.errors import BadRequest, Unauthorized
from parcours.core.ids import new_id
from parcours.security import scopes, tokens
from parcours.services.platform import Platform
from parcours.services.smart.consent import ConsentView, check_patient_choice, consent_view
from parcours.services.smart.discovery import ASSERTION_ALGORITHMS, AUTH_METHODS, Endpoints
from parcours.store import accounts as account_store
from parcours.store import oauth as store
from parcours.store.accounts import Account

T = TypeVar("T")

CODE_LIFETIME = timedelta(minutes=2)
ID_TOKEN_LIFETIME_S = 3600
ASSERTION_MAX_LIFETIME_S = 300  # SMART Backend Services: exp no more than five minutes ahead
CLOCK_SKEW_S = 10
JWKS_URL_CACHE_S = 300.0


# -- requests and responses, without a web framework ---------------------------------------------

@dataclass(frozen=True)
class HttpRequest:
    """What the OAuth endpoints need of an HTTP request (query and form fields together)."""

    method: str
    url: str  # public URL (the platform's base URL, the path and the query)
    headers: Mapping[str, str]  # case-insensitive (Starlette's Headers)
    params: Mapping[str, list[str]]


@dataclass(frozen=True)
class OAuthResponse:
    status: int
    body: dict[str, Any] | str
    headers: list[tuple[str, str]]

    @property
    def location(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "location"), None)


# -- per-process state ---------------------------------------------------------------------------------

class RevocationCache:
    """The ``jti`` of revoked access tokens, as this process last read them.

    ``tokens.verify`` checks it on every bearer request; ``refresh_if_stale`` reads
    the table again when the copy is older than ``ttl`` seconds, so a token revoked
    through another process stops working within ``ttl`` (at once in the process
    that revoked it).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._jtis: frozenset[str] = frozenset()
        self._loaded_at = float("-inf")
        self._lock: asyncio.Lock | None = None

    def __contains__(self, jti: object) -> bool:
        return jti in self._jtis

    def add(self, *jtis: str) -> None:
        self._jtis = self._jtis | set(jtis)

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self.ttl

    async def refresh_if_stale(self, platform: Platform) -> None:
        if not self.stale():
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self.stale():
                return
            async with platform.pool.connection() as conn:
                jtis = await store.revoked_jtis(conn, platform.clock.now())
            self._jtis = frozenset(jtis)
            self._loaded_at = time.monotonic()


@dataclass
class _KeyCache:
    key: store.SigningKey | None = None
    public: list[dict] = field(default_factory=list)


class Smart:
    """The SMART authorization server of one process (held by the web app)."""

    def __init__(self, revocation_ttl: float) -> None:
        self.revoked = RevocationCache(revocation_ttl)
        self._keys = _KeyCache()
        self._jwks_urls: dict[str, tuple[float, dict]] = {}

    # -- keys ------------------------------------------------------------------------------------
    async def signing_key(self, platform: Platform) -> store.SigningKey:
        """The key that signs id_tokens, created the first time (in a transaction of its own:
        a key must never sign before it is published)."""
        if self._keys.key is None:
            async with platform.pool.connection() as conn, conn.transaction():
                keys = await store.signing_keys(conn)
                if not keys:
                    await store.lock_signing_keys(conn)
                    keys = await store.signing_keys(conn)
                    if not keys:
                        keys = [new_signing_key(platform.clock.now())]
                        await store.insert_signing_key(conn, keys[0])
            self._keys = _KeyCache(keys[0], [k.public_jwk for k in keys])
        return self._keys.key  # type: ignore[return-value]

    async def jwks(self, platform: Platform) -> dict[str, Any]:
        await self.signing_key(platform)
        return {"keys": list(self._keys.public)}

    def client_jwks(self, client: store.Client) -> KeySet:
        """The public keys a client signs its assertions with (registered, or fetched from its URL)."""
        if client.jwks:
            return KeySet.import_key_set(client.jwks)
        if not client.jwks_url:
            raise InvalidClientError(description="The client has no registered keys")
        cached = self._jwks_urls.get(client.jwks_url)
        if cached is None or time.monotonic() - cached[0] > JWKS_URL_CACHE_S:
            try:
                r = httpx.get(client.jwks_url, timeout=5.0)
                r.raise_for_status()
                cached = (time.monotonic(), r.json())
            except (httpx.HTTPError, ValueError):
                raise InvalidClientError(description="The client's JWKS URL could not be read") from None
            self._jwks_urls[client.jwks_url] = cached
        return KeySet.import_key_set(cached[1])

    # -- the endpoints -----------------------------------------------------------------------------
    async def token(self, platform: Platform, conn: AsyncConnection, http: HttpRequest) -> OAuthResponse:
        await self.signing_key(platform)  # id_tokens (the web edge loads it before its transaction)
        ctx = await self._context(platform, conn)
        response = await ctx.run(lambda server: server.create_token_response(_Request(http)))
        self.revoked.add(*ctx.revoked_jtis)  # a replayed code or refresh token revoked its grant
        return response

    async def revoke(self, platform: Platform, conn: AsyncConnection, http: HttpRequest) -> OAuthResponse:
        ctx = await self._context(platform, conn)
        response = await ctx.run(lambda server: server.create_endpoint_response("revocation", _Request(http)))
        self.revoked.add(*ctx.revoked_jtis)
        return response

    async def introspect(self, platform: Platform, conn: AsyncConnection, http: HttpRequest) -> OAuthResponse:
        ctx = await self._context(platform, conn)
        return await ctx.run(lambda server: server.create_endpoint_response("introspection", _Request(http)))

    async def authorization_request(self, platform: Platform, conn: AsyncConnection, http: HttpRequest,
                                    account: Account | None) -> "ConsentView | OAuthResponse | None":
        """Validate an authorization request. Returns an error redirect for the client, None when
        the user must sign in first, else what the consent page shows. Raises ``BadRequest`` for
        requests that cannot be answered with a redirect (unknown client, unregistered redirect URI)."""
        ctx = await self._context(platform, conn)
        try:
            grant = await ctx.run_raw(lambda server: server.get_consent_grant(_Request(http), end_user=None))
        except OAuth2Error as err:
            return _error_response(err)
        if account is None:
            return None
        return await consent_view(platform, conn, grant.client.row, account, _params(http))

    async def authorization_decision(self, platform: Platform, conn: AsyncConnection, http: HttpRequest,
                                     account: Account, auth_time: datetime, *, approve: bool,
                                     patient: str | None) -> "ConsentView | OAuthResponse":
        """The user's answer on the consent page: a redirect to the app (code or access_denied), or
        the consent page again when a patient must still be chosen."""
        ctx = await self._context(platform, conn)
        try:
            grant = await ctx.run_raw(lambda server: server.get_consent_grant(_Request(http), end_user=account))
        except OAuth2Error as err:
            return _error_response(err)
        client: store.Client = grant.client.row
        view = await consent_view(platform, conn, client, account, _params(http))
        user: GrantedUser | None = None
        if approve:
            chosen = await check_patient_choice(platform, conn, account, view, patient)
            if view.needs_patient and chosen is None:
                return view.with_error("smart.consent.choose_patient")
            user = GrantedUser(account, view.granted, chosen, new_id(), auth_time)
        return await ctx.run(lambda server: server.create_authorization_response(grant.request, grant_user=user, grant=grant))

    async def _context(self, platform: Platform, conn: AsyncConnection) -> "_Context":
        return _Context(self, platform, _Db(asyncio.get_running_loop(), conn), platform.clock.now(), self._keys.key)


def new_signing_key(now: datetime) -> store.SigningKey:
    key = RSAKey.generate_key(2048, private=True)
    kid = key.thumbprint()
    public = {**key.as_dict(private=False), "kid": kid, "use": "sig", "alg": "RS256"}
    return store.SigningKey(kid, "RS256", key.as_pem(private=True).decode(), public, now)


def _error_response(err: OAuth2Error) -> OAuthResponse:
    if err.redirect_uri:
        status, body, headers = err()
        return OAuthResponse(status, body, list(headers))
    raise BadRequest(f"The authorization request is not valid: {err.error}"
                     + (f" ({err.description})" if err.description else ""))


def _params(http: HttpRequest) -> dict[str, str]:
    return {k: v[0] for k, v in http.params.items() if v}


# -- the bridge between Authlib's thread and the event loop ---------------------------------------

class _Db:
    """Runs the store's coroutines on the event loop (in the edge's transaction) for code
    running in a worker thread, which waits for each result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: AsyncConnection) -> None:
        self.loop, self.conn = loop, conn

    def __call__(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
        return asyncio.run_coroutine_threadsafe(fn(self.conn, *args, **kw), self.loop).result()


@dataclass
class GrantedUser:
    """The "user" of Authlib's grants: who consented, to what, for which patient."""

    account: Account
    scope: list[str]
    patient: str | None  # Patient id of the launch context
    grant_id: str
    auth_time: datetime


class _Context:
    """One request to the authorization server."""

    def __init__(self, smart: Smart, platform: Platform, db: _Db, now: datetime, key: store.SigningKey | None) -> None:
        self.smart, self.platform, self.db, self.now, self.key = smart, platform, db, now, key
        self.endpoints = Endpoints.of(platform)
        self.issued: tuple[str, datetime] | None = None  # (jti, expiry) of the access token just made
        self.revoked_jtis: list[str] = []

    async def run_raw(self, fn: Callable[["_Server"], T]) -> T:
        return await asyncio.to_thread(lambda: fn(_Server(self)))

    async def run(self, fn: Callable[["_Server"], OAuthResponse]) -> OAuthResponse:
        try:
            return await self.run_raw(fn)
        except OAuth2Error as err:  # raised before Authlib could answer (insecure transport)
            status, body, headers = err()
            return OAuthResponse(status, body, list(headers))


class _Payload(rfc6749.OAuth2Payload):
    def __init__(self, params: Mapping[str, list[str]]) -> None:
        self._datalist = defaultdict(list, {k: list(v) for k, v in params.items()})
        self._data = {k: v[0] for k, v in params.items() if v}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list]:
        return self._datalist


class _Request(rfc6749.OAuth2Request):
    def __init__(self, http: HttpRequest) -> None:
        super().__init__(http.method, http.url, headers=http.headers)
        self.payload = _Payload(http.params)

    @property
    def args(self) -> dict[str, str]:
        return self.payload.data

    @property
    def form(self) -> dict[str, str]:
        return self.payload.data


# -- Authlib models -------------------------------------------------------------------------------------

class _Client(rfc6749.ClientMixin):
    def __init__(self, row: store.Client) -> None:
        self.row = row
        self.client_id = row.client_id

    def get_client_id(self) -> str:
        return self.row.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.row.redirect_uris[0] if len(self.row.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        # The real intersection needs the user (their role): see consent_view.
        return scope if scope and scope.strip() else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.row.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.row.secret_hash) and hmac.compare_digest(store.secret_hash(client_secret), self.row.secret_hash or "")

    def auth_methods(self) -> set[str]:
        if self.row.client_type == "public":
            return {"none"}
        if self.row.client_type == "backend":
            return {"private_key_jwt"}
        methods = {"client_secret_basic", "client_secret_post"}
        if self.row.jwks or self.row.jwks_url:
            methods.add("private_key_jwt")
        return methods

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in self.auth_methods()

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and self.row.client_type != "backend"

    def check_grant_type(self, grant_type: str) -> bool:
        if self.row.client_type == "backend":
            return grant_type == "client_credentials"
        return grant_type in ("authorization_code", "refresh_token")


class _Code:
    """An authorization code as Authlib's grants and its OpenID extension read it."""

    def __init__(self, row: store.AuthorizationCode) -> None:
        self.row = row
        self.code_challenge = row.code_challenge
        self.code_challenge_method = row.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return self.row.scope

    def get_nonce(self) -> str | None:
        return self.row.nonce

    def get_auth_time(self) -> int:
        return int(self.row.auth_time.timestamp())

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class _RefreshToken:
    def __init__(self, value: str, row: store.RefreshToken, now: datetime) -> None:
        self.value, self.row, self.now = value, row, now

    def check_client(self, client: _Client) -> bool:
        return client.client_id == self.row.client_id

    def get_scope(self) -> str:
        return self.row.scope

    def is_expired(self) -> bool:
        return self.row.expires_at <= self.now

    def is_revoked(self) -> bool:
        return self.row.revoked_at is not None or self.row.used_at is not None


class _AccessToken:
    def __init__(self, claims: dict[str, Any], revoked: bool) -> None:
        self.claims, self.revoked = claims, revoked

    def check_client(self, client: _Client) -> bool:
        return self.claims.get("client_id") == client.client_id

    def is_expired(self) -> bool:
        return False  # tokens.decode refused expired ones

    def is_revoked(self) -> bool:
        return self.revoked


# -- Authlib server, grants and endpoints -------------------------------------------------------------

class _Server(rfc6749.AuthorizationServer):
    def __init__(self, ctx: _Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.register_token_generator("default", self._generate_token)
        self.register_client_auth_method("private_key_jwt", _PrivateKeyJwt(ctx))
        self.register_grant(_AuthorizationCodeGrant, [_Pkce(), _OpenIdCode(ctx)])
        self.register_grant(_RefreshTokenGrant)
        self.register_grant(_ClientCredentialsGrant)
        self.register_endpoint(_Revocation(self))
        self.register_endpoint(_Introspection(self))

    def query_client(self, client_id: str) -> _Client | None:
        row = self.ctx.db(store.get_client, client_id)
        return _Client(row) if row is not None and row.status == "active" else None

    def create_oauth2_request(self, request: Any) -> rfc6749.OAuth2Request:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> OAuthResponse:
        return OAuthResponse(status, body, list(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None

    def _generate_token(self, grant_type: str, client: _Client, user: GrantedUser | None = None, scope: str | None = None,
                        expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
        ctx = self.ctx
        granted = scopes.split(scope)
        lifetime = ctx.platform.settings.oauth_access_token_minutes * 60
        jti = new_id()
        extra: dict[str, Any] = {"jti": jti, "client_id": client.client_id}
        if user is None:
            subject, kind, fhir_user = client.client_id, "system", None
        else:
            subject, kind, fhir_user = user.account.id, user.account.role, user.account.fhir_user
            if user.patient:
                extra["patient"] = user.patient
        access = tokens.issue(ctx.platform.token_key, subject=subject, kind=kind, scopes=granted, fhir_user=fhir_user,
                              lifetime_s=lifetime, now=ctx.now.timestamp(), extra=extra)
        ctx.issued = (jti, ctx.now + timedelta(seconds=lifetime))
        token: dict[str, Any] = {"token_type": "Bearer", "access_token": access, "expires_in": lifetime,
                                 "scope": " ".join(granted)}
        if user is not None and user.patient:
            token["patient"] = user.patient
        if user is not None and include_refresh_token and scopes.OFFLINE in granted:
            token["refresh_token"] = secrets.token_urlsafe(32)
        return token

    def save_token(self, token: dict[str, Any], request: rfc6749.OAuth2Request) -> None:
        ctx = self.ctx
        user: GrantedUser | None = request.user
        ctx.db(store.purge_expired, ctx.now)
        if user is None or ctx.issued is None:
            return
        jti, expires_at = ctx.issued
        ctx.db(store.record_issued_access, user.grant_id, jti, expires_at)
        if "refresh_token" in token:
            ctx.db(store.insert_refresh_token, token["refresh_token"], grant_id=user.grant_id,
                   client_id=request.client.client_id, account_id=user.account.id, scope=token["scope"],
                   patient=user.patient, auth_time=user.auth_time, now=ctx.now,
                   expires_at=ctx.now + timedelta(days=ctx.platform.settings.oauth_refresh_token_days))

    # used by the token endpoints
    def find_token(self, value: str, hint: str | None) -> _AccessToken | _RefreshToken | None:
        ctx = self.ctx
        if value.count(".") == 2 and hint != "refresh_token":
            try:
                claims = tokens.decode(ctx.platform.token_key, value, now=ctx.now.timestamp())
            except Unauthorized:
                return None
            jti = claims.get("jti")
            if not isinstance(jti, str):
                return None  # not a SMART token: operator tokens are not revocable here
            return _AccessToken(claims, ctx.db(store.jti_revoked, jti))
        row = ctx.db(store.find_refresh_token, value)
        return _RefreshToken(value, row, ctx.now) if row is not None else None

    def user_of(self, account_id: str, scope: str, patient: str | None, grant_id: str, auth_time: datetime) -> GrantedUser:
        account = self.ctx.db(account_store.get, account_id)
        if account is None or not account.active:
            raise InvalidGrantError(description="The account of this grant is no longer active")
        return GrantedUser(account, scopes.split(scope), patient, grant_id, auth_time)

    def revoke_grant(self, grant_id: str) -> None:
        self.ctx.revoked_jtis += self.ctx.db(store.revoke_grant, grant_id, self.ctx.now)


class _AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    server: _Server

    def validate_authorization_request(self) -> str:
        redirect_uri = super().validate_authorization_request()
        data = self.request.payload.data
        aud = (data.get("aud") or "").rstrip("/")
        if aud != self.server.ctx.endpoints.issuer.rstrip("/"):
            raise InvalidRequestError(description="'aud' must be this server's FHIR base URL", redirect_uri=redirect_uri,
                                      state=self.request.payload.state)
        return redirect_uri

    def save_authorization_code(self, code: str, request: rfc6749.OAuth2Request) -> None:
        ctx = self.server.ctx
        user: GrantedUser = request.user
        data = request.payload.data
        ctx.db(store.insert_code, code, client_id=request.client.client_id, account_id=user.account.id,
               grant_id=user.grant_id, redirect_uri=data.get("redirect_uri") or request.client.get_default_redirect_uri(),
               scope=" ".join(user.scope), patient=user.patient, nonce=data.get("nonce"),
               code_challenge=data.get("code_challenge"), code_challenge_method=data.get("code_challenge_method"),
               auth_time=user.auth_time, now=ctx.now, expires_at=ctx.now + CODE_LIFETIME)

    def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
        ctx = self.server.ctx
        row, replayed_grant = ctx.db(store.claim_code, code, client.client_id, ctx.now)
        if replayed_grant is not None:
            # A code used twice may have leaked: what it gave stops working (RFC 6749 §4.1.2).
            self.server.revoke_grant(replayed_grant)
        return _Code(row) if row is not None else None

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        return None  # spent when claimed

    def authenticate_user(self, authorization_code: _Code) -> GrantedUser:
        r = authorization_code.row
        return self.server.user_of(r.account_id, r.scope, r.patient, r.grant_id, r.auth_time)


class _Pkce(CodeChallenge):
    """PKCE as SMART 2 wants it: S256 only, required of public clients, and any
    verifier problem at the token endpoint is ``invalid_grant``."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        state = grant.request.payload.state
        challenge, method = data.get("code_challenge"), data.get("code_challenge_method")
        if not challenge and grant.request.client.row.client_type == "public":
            raise InvalidRequestError(description="Public clients must use PKCE (code_challenge, S256)",
                                      redirect_uri=redirect_uri, state=state)
        if challenge and method != "S256":
            raise InvalidRequestError(description="code_challenge_method must be S256", redirect_uri=redirect_uri,
                                      state=state)
        try:
            super().validate_code_challenge(grant, redirect_uri)
        except InvalidRequestError as err:
            err.redirect_uri, err.state = redirect_uri, state
            raise

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        try:
            super().validate_code_verifier(grant, result)
        except InvalidRequestError as err:
            raise InvalidGrantError(description=err.description) from None


class _OpenIdCode(oidc_grants.OpenIDCode):
    def __init__(self, ctx: _Context) -> None:
        super().__init__(require_nonce=False)
        self.ctx = ctx

    @property
    def key(self) -> store.SigningKey:
        assert self.ctx.key is not None, "Smart.token loads the signing key first"
        return self.ctx.key

    def resolve_client_private_key(self, client: _Client) -> RSAKey:
        return RSAKey.import_key(self.key.private_pem, parameters={"kid": self.key.kid})

    def get_client_algorithm(self, client: _Client) -> str:
        return self.key.alg

    def get_encode_header(self, client: _Client) -> dict[str, str]:
        return {"alg": self.key.alg, "kid": self.key.kid, "typ": "JWT"}

    def get_client_claims(self, client: _Client) -> dict[str, Any]:
        now = int(self.ctx.now.timestamp())
        return {"iss": self.ctx.endpoints.issuer, "aud": [client.client_id], "iat": now, "exp": now + ID_TOKEN_LIFETIME_S}

    def exists_nonce(self, nonce: str, request: rfc6749.OAuth2Request) -> bool:
        return self.ctx.db(store.nonce_used, request.payload.client_id, nonce)

    def generate_user_info(self, user: GrantedUser, scope: str) -> dict[str, Any]:
        info: dict[str, Any] = {"sub": user.account.id}
        granted = scopes.split(scope)
        if user.account.fhir_user and (scopes.FHIR_USER in granted or scopes.PROFILE in granted):
            info["fhirUser"] = f"{self.ctx.endpoints.issuer}/{user.account.fhir_user}"
        if scopes.PROFILE in granted:
            info["name"] = user.account.display_name
        return info


class _RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation: each refresh token works once
    server: _Server

    def authenticate_refresh_token(self, refresh_token: str) -> _RefreshToken | None:
        ctx = self.server.ctx
        row = ctx.db(store.find_refresh_token, refresh_token, lock=True)
        if row is None or row.revoked_at is not None or row.expires_at <= ctx.now:
            return None
        if row.used_at is not None:
            # A rotated token presented again: one of the two holders is not the app.
            self.server.revoke_grant(row.grant_id)
            return None
        return _RefreshToken(refresh_token, row, ctx.now)

    def authenticate_user(self, refresh_token: _RefreshToken) -> GrantedUser:
        r = refresh_token.row
        scope = self.request.payload.scope or r.scope
        return self.server.user_of(r.account_id, scope, r.patient, r.grant_id, r.auth_time)

    def revoke_old_credential(self, refresh_token: _RefreshToken) -> None:
        self.server.ctx.db(store.mark_refresh_used, refresh_token.value, self.server.ctx.now)


class _ClientCredentialsGrant(grants.ClientCredentialsGrant):
    """SMART Backend Services: asymmetric client authentication only, ``system/`` scopes
    within the client's registration."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        granted = scopes.grant(self.request.payload.scope, client_allowed=scopes.split(self.client.row.scope), role_allowed=None)
        if not granted:
            raise InvalidScopeError(description="None of the requested scopes is allowed to this client")
        self.request.scope = " ".join(granted)

    def create_token_response(self) -> tuple[int, dict, list]:
        token = self.generate_token(scope=self.request.scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class _PrivateKeyJwt(JWTBearerClientAssertion):
    """``private_key_jwt`` client authentication (RFC 7523) as SMART Backend Services
    profile it: RS384 or ES384, iss = sub = client_id, aud = the token endpoint, exp
    at most five minutes ahead, each jti once."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, ctx: _Context) -> None:
        super().__init__(validate_jti=True, leeway=CLOCK_SKEW_S)
        self.ctx = ctx

    def get_audiences(self) -> list[str]:
        return [self.ctx.endpoints.token]

    def resolve_client_public_key(self, client: _Client) -> KeySet:
        return self.ctx.smart.client_jwks(client.row)

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> dict[str, Any]:
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=ASSERTION_ALGORITHMS)
        except (JoseError, ValueError) as e:
            raise InvalidClientError(description=f"The client assertion is not valid: {type(e).__name__}") from None
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims: Any) -> None:
        now = int(self.ctx.now.timestamp())
        registry = jwt.JWTClaimsRegistry(now=now, leeway=CLOCK_SKEW_S, iss={"essential": True}, sub={"essential": True},
                                         aud={"essential": True, "values": self.get_audiences()},
                                         exp={"essential": True}, jti={"essential": True})
        try:
            registry.validate(claims)
        except JoseError as e:
            raise InvalidClientError(description=f"The client assertion is not valid: {e.error}") from None
        if claims["sub"] != claims["iss"]:
            raise InvalidClientError(description="The client assertion's iss and sub must be the client_id")
        exp = claims["exp"]
        if not isinstance(exp, int) or exp - now > ASSERTION_MAX_LIFETIME_S + CLOCK_SKEW_S:
            raise InvalidClientError(description="The client assertion must expire within five minutes")
        if not self.ctx.db(store.claim_assertion, claims["sub"], str(claims["jti"]),
                           datetime.fromtimestamp(exp, self.ctx.now.tzinfo) + timedelta(seconds=CLOCK_SKEW_S)):
            raise InvalidClientError(description="The client assertion was used already (jti)")


class _Revocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = AUTH_METHODS
    server: _Server

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return self.server.find_token(token_string, token_type_hint)

    def revoke_token(self, token: Any, request: rfc6749.OAuth2Request) -> None:
        ctx = self.server.ctx
        if isinstance(token, _AccessToken):
            jti = token.claims["jti"]
            ctx.db(store.revoke_jti, jti, datetime.fromtimestamp(int(token.claims["exp"]), ctx.now.tzinfo), ctx.now)
            ctx.revoked_jtis.append(jti)
        else:
            self.server.revoke_grant(token.row.grant_id)


class _Introspection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = AUTH_METHODS
    server: _Server

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return self.server.find_token(token_string, token_type_hint)

    def check_permission(self, token: Any, client: _Client, request: rfc6749.OAuth2Request) -> bool:
        # A client learns about its own tokens only.
        return bool(token.check_client(client))

    def introspect_token(self, token: Any) -> dict[str, Any]:
        if isinstance(token, _AccessToken):
            c = token.claims
            out = {"active": True, "token_type": "Bearer", "scope": c.get("scope", ""), "client_id": c.get("client_id"),
                   "sub": c.get("sub"), "iss": c.get("iss"), "exp": c.get("exp"), "iat": c.get("iat")}
            for claim in ("patient", "fhirUser"):
                if c.get(claim):
                    out[claim] = c[claim]
            return out
        r = token.row
        return {"active": True, "token_type": "refresh_token", "scope": r.scope, "client_id": r.client_id,
                "sub": r.account_id, "exp": int(r.expires_at.timestamp()), "iat": int(r.created_at.timestamp()),
                **({"patient": r.patient} if r.patient else {})}


