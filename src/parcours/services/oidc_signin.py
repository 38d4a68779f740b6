"""Sign-in through external OpenID Connect identity providers (Pro Santé Connect for
professionals, FranceConnect for patients), configured in ``Settings.oidc_providers``.

The authorization code flow with ``state`` (bound to the browser by a cookie),
``nonce`` and PKCE (S256). The id_token is verified against the provider's
published keys (issuer, audience, expiry, nonce); the identity is then linked to
an existing account: first by an earlier link (provider + ``sub``), else by the
provider's ``link_by`` rule (RPPS found on the account's Practitioner, or
e-mail). Unknown identities are refused, unless the provider creates accounts
for professionals found in the directory. A provider that is itself strong
authentication (``second_factor``) stands for the TOTP step.

Network calls to the provider happen outside any database transaction: the web
edge takes the pending sign-in in one transaction, calls ``verify_callback``,
then opens the session in another.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from psycopg import AsyncConnection

from parcours.core.errors import ParcoursError
from parcours.core.settings import OidcProvider
from parcours.fhir import fr_core
from parcours.security import roles
from parcours.services import accounts, signin
from parcours.services.platform import Platform
from parcours.store import accounts as account_store
from parcours.store import oauth as store
from parcours.store.accounts import Account
from parcours.store.sessions import FULL

PENDING_LIFETIME = timedelta(minutes=10)
DISCOVERY_CACHE_S = 3600.0
HTTP_TIMEOUT_S = 10.0
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
CLOCK_SKEW_S = 60
IDNPS_SYSTEM = fr_core.RPPS_SYSTEM  # national identifier of health professionals ("8" + RPPS)
RPPS_NUMBER_SYSTEM = "https://rpps.esante.gouv.fr"


class ExternalSigninRefused(ParcoursError):
    """An external sign-in that cannot go on; ``reason`` is a message key suffix for the page."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message, [], status, "PRC-1432", "security", {})
        self.reason = reason


@dataclass(frozen=True)
class Start:
    url: str  # where to send the browser
    browser: str  # the value of the cookie that binds the callback to this browser


@dataclass(frozen=True)
class Identity:
    """What the provider vouched for, verified."""

    provider: str
    issuer: str
    subject: str
    claims: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    account: Account
    stage: str  # full | totp | enrol
    next: str


def provider_named(platform: Platform, name: str) -> OidcProvider | None:
    return next((p for p in platform.settings.oidc_providers if p.name == name), None)


def callback_url(platform: Platform, provider: OidcProvider) -> str:
    return f"{platform.settings.base_url.rstrip('/')}/signin/oidc/{provider.name}/callback"


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


class ExternalSignin:
    """The external sign-in of one process: caches the providers' metadata and keys."""

    def __init__(self) -> None:
        self._meta: dict[str, tuple[float, dict[str, Any]]] = {}
        self._keys: dict[str, tuple[float, dict[str, Any]]] = {}

    async def metadata(self, provider: OidcProvider) -> dict[str, Any]:
        cached = self._meta.get(provider.name)
        if cached is None or time.monotonic() - cached[0] > DISCOVERY_CACHE_S:
            url = provider.discovery_url or provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = await _get_json(url)
            if doc.get("issuer") != provider.issuer:
                raise ExternalSigninRefused("provider_error", f"{provider.name}: discovery names issuer {doc.get('issuer')!r}", 502)
            cached = (time.monotonic(), doc)
            self._meta[provider.name] = cached
        return cached[1]

    async def key_set(self, provider: OidcProvider, *, refresh: bool = False) -> KeySet:
        cached = self._keys.get(provider.name)
        if refresh or cached is None or time.monotonic() - cached[0] > DISCOVERY_CACHE_S:
            cached = (time.monotonic(), await _get_json((await self.metadata(provider))["jwks_uri"]))
            self._keys[provider.name] = cached
        return KeySet.import_key_set(cached[1])

    # -- the flow ---------------------------------------------------------------------------------
    async def start(self, platform: Platform, conn: AsyncConnection, provider: OidcProvider, *, next: str,
                    browser: str | None) -> Start:
        meta = await self.metadata(provider)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        browser = browser if browser and len(browser) >= 32 else secrets.token_urlsafe(32)
        now = platform.clock.now()
        await store.insert_pending_signin(conn, state, provider=provider.name, nonce=nonce, code_verifier=verifier,
                                          next=next, browser=browser, now=now, expires_at=now + PENDING_LIFETIME)
        params = {"response_type": "code", "client_id": provider.client_id, "redirect_uri": callback_url(platform, provider),
                  "scope": " ".join(dict.fromkeys(["openid", *provider.scopes])), "state": state, "nonce": nonce,
                  "code_challenge": _s256(verifier), "code_challenge_method": "S256"}
        if provider.acr_values:
            params["acr_values"] = provider.acr_values
        sep = "&" if "?" in meta["authorization_endpoint"] else "?"
        return Start(meta["authorization_endpoint"] + sep + urlencode(params), browser)

    async def take_pending(self, platform: Platform, conn: AsyncConnection, provider: OidcProvider, state: str | None,
                           browser: str | None) -> store.PendingSignin:
        """The sign-in this callback finishes (spent whatever happens next)."""
        if not state:
            raise ExternalSigninRefused("expired", "The answer of the identity provider has no state", 400)
        pending = await store.take_pending_signin(conn, state, platform.clock.now())
        if pending is None or pending.provider != provider.name:
            raise ExternalSigninRefused("expired", "This sign-in is unknown or has expired: start again", 400)
        if not browser or store.secret_hash(browser) != pending.browser_hash:
            raise ExternalSigninRefused("expired", "This sign-in was started in another browser", 400)
        return pending

    async def verify_callback(self, platform: Platform, provider: OidcProvider, pending: store.PendingSignin,
                              params: dict[str, str]) -> Identity:
        """Exchange the code and verify what comes back (no database work)."""
        if params.get("error"):
            raise ExternalSigninRefused("provider_error", f"The identity provider answered {params['error']!r}", 400)
        code = params.get("code")
        if not code:
            raise ExternalSigninRefused("provider_error", "The identity provider sent no code", 400)
        meta = await self.metadata(provider)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": callback_url(platform, provider),
                "code_verifier": pending.code_verifier}
        auth = None
        if provider.client_secret and provider.token_auth_method == "client_secret_basic":
            auth = (provider.client_id, provider.client_secret)
        else:
            form["client_id"] = provider.client_id
            if provider.client_secret:
                form["client_secret"] = provider.client_secret
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
                r = await http.post(meta["token_endpoint"], data=form, auth=auth, headers={"Accept": "application/json"})
                if r.status_code != 200:
                    raise ExternalSigninRefused("provider_error", f"The token endpoint answered {r.status_code}", 502)
                tokens = r.json()
        except (httpx.HTTPError, ValueError):
            raise ExternalSigninRefused("provider_error", "The identity provider could not be reached", 502) from None
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise ExternalSigninRefused("provider_error", "The identity provider sent no id_token", 502)
        claims = await self.verify_id_token(platform, provider, id_token, nonce=pending.nonce)
        if provider.userinfo and meta.get("userinfo_endpoint") and tokens.get("access_token"):
            extra = await self._userinfo(provider, meta["userinfo_endpoint"], str(tokens["access_token"]))
            if extra.get("sub") != claims["sub"]:
                raise ExternalSigninRefused("invalid_token", "The userinfo answer is about someone else", 502)
            claims = {**extra, **claims}
        return Identity(provider.name, provider.issuer, str(claims["sub"]), claims)

    async def verify_id_token(self, platform: Platform, provider: OidcProvider, id_token: str, *, nonce: str) -> dict[str, Any]:
        keys = await self.key_set(provider)
        try:
            try:
                token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            except JoseError:
                # The provider may have rotated its keys since we read them: read them once more.
                token = jwt.decode(id_token, await self.key_set(provider, refresh=True), algorithms=ID_TOKEN_ALGORITHMS)
            now = int(platform.clock.now().timestamp())
            jwt.JWTClaimsRegistry(
                now=now, leeway=CLOCK_SKEW_S, iss={"essential": True, "value": provider.issuer},
                aud={"essential": True, "value": provider.client_id}, sub={"essential": True}, exp={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (JoseError, ValueError) as e:
            raise ExternalSigninRefused("invalid_token", f"The id_token is not valid: {e}", 400) from None
        claims = dict(token.claims)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != provider.client_id:
            raise ExternalSigninRefused("invalid_token", "The id_token was issued to another party (azp)", 400)
        return claims

    async def _userinfo(self, provider: OidcProvider, url: str, access_token: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
                r = await http.get(url, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"})
                r.raise_for_status()
                if r.headers.get("content-type", "").startswith("application/jwt"):
                    token = jwt.decode(r.text.strip(), await self.key_set(provider), algorithms=ID_TOKEN_ALGORITHMS)
                    return dict(token.claims)
                return dict(r.json())
        except (httpx.HTTPError, ValueError, JoseError):
            raise ExternalSigninRefused("provider_error", "The userinfo endpoint could not be read", 502) from None

    # -- the account -----------------------------------------------------------------------------
    async def sign_in(self, platform: Platform, conn: AsyncConnection, provider: OidcProvider, identity: Identity,
                      next: str) -> Outcome:
        account = await linked_account(platform, conn, provider, identity)
        if account is None:
            raise ExternalSigninRefused("unknown", f"No Parcours account is linked to this {provider.label} identity")
        if account.role not in provider.roles:
            raise ExternalSigninRefused("wrong_role", f"{provider.label} does not sign in {account.role} accounts")
        if not account.active:
            raise ExternalSigninRefused("disabled", "This account is disabled")
        now = platform.clock.now()
        await store.link_identity(conn, provider=provider.name, subject=identity.subject, issuer=identity.issuer,
                                  account_id=account.id, now=now)
        stage = FULL if provider.second_factor else signin.stage_after_password(account)
        return Outcome(account, stage, next)


async def _get_json(url: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
            r = await http.get(url, headers={"Accept": "application/json"})
            r.raise_for_status()
            doc = r.json()
    except (httpx.HTTPError, ValueError):
        raise ExternalSigninRefused("provider_error", f"Could not read {url}", 502) from None
    if not isinstance(doc, dict):
        raise ExternalSigninRefused("provider_error", f"{url} is not a JSON object", 502)
    return doc


def _rpps_identifiers(value: str) -> list[str]:
    """Search values for a professional's national identifier, in either of its forms."""
    value = value.strip()
    out = [f"{IDNPS_SYSTEM}|{value}"]
    if len(value) == 11 and value.isdigit():
        out += [f"{IDNPS_SYSTEM}|8{value}", f"{RPPS_NUMBER_SYSTEM}|{value}"]
    elif len(value) == 12 and value.startswith("8") and value.isdigit():
        out.append(f"{RPPS_NUMBER_SYSTEM}|{value[1:]}")
    return out


async def linked_account(platform: Platform, conn: AsyncConnection, provider: OidcProvider, identity: Identity) -> Account | None:
    account_id = await store.linked_account(conn, provider.name, identity.subject)
    if account_id is not None:
        return await account_store.get(conn, account_id)
    value = identity.claims.get(provider.link_claim)
    if provider.link_by == "subject" or not isinstance(value, str) or not value.strip():
        return None
    if provider.link_by == "email":
        if identity.claims.get("email_verified") is False:
            return None
        return await account_store.by_email(conn, value)
    # RPPS: the Practitioner with this identifier, then the account linked to it.
    repo = platform.repository(conn, accounts.IDENTITY)
    found = await repo.search(repo.parse_search("Practitioner", [("identifier", ",".join(_rpps_identifiers(value))),
                                                                 ("_count", "2")]))
    if len(found.matches) != 1:
        return None  # none, or ambiguous: never guess who someone is
    reference = f"Practitioner/{found.matches[0].id}"
    candidates = [a for a in await account_store.by_fhir_user(conn, reference) if a.role == roles.PRACTITIONER]
    if candidates:
        return candidates[0]
    if not provider.create_accounts or roles.PRACTITIONER not in provider.roles:
        return None
    return await _create_practitioner(platform, conn, reference, identity)


async def _create_practitioner(platform: Platform, conn: AsyncConnection, reference: str, identity: Identity) -> Account:
    """A professional of the directory signing in for the first time. The account's password is
    random and never shown: they sign in with the provider (an operator may set one later)."""
    email = identity.claims.get("email")
    if not isinstance(email, str) or "@" not in email or await account_store.email_taken(conn, email):
        email = f"{hashlib.sha256(identity.subject.encode()).hexdigest()[:16]}@{identity.provider}.invalid"
    new = accounts.NewAccount(email=email, password=secrets.token_urlsafe(32), role=roles.PRACTITIONER, fhir_user=reference)
    return await accounts.create_account(platform, conn, new)
