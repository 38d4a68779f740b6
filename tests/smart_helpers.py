"""Shared helpers of the SMART on FHIR and external sign-in tests: clients, PKCE, a browser-like
httpx client that signs in and answers the consent page, client assertions."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from parcours.services import smart
from parcours.services.platform import Platform
from tests.accounts_helpers import PASSWORD, random_ip

HIDDEN_RE = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
CALLBACK = "http://127.0.0.1:9/callback"  # never reached: the tests read the redirect


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


async def register(platform: Platform, *, client_type: str = "public", scope: str = "openid fhirUser launch/patient offline_access patient/*.cruds user/*.cruds",
                   redirect_uris: list[str] | None = None, jwks: dict | None = None, name: str = "Appli de test") -> tuple[str, str | None]:
    new = smart.NewClient(name=name, client_type=client_type, scope=scope,
                          redirect_uris=[] if client_type == "backend" else (redirect_uris or [CALLBACK]), jwks=jwks)
    async with platform.pool.connection() as conn, conn.transaction():
        client, secret = await smart.register_client(platform, conn, new, created_by="test")
    return client.client_id, secret


def hidden_fields(page: str) -> dict[str, str]:
    return {html.unescape(k): html.unescape(v) for k, v in HIDDEN_RE.findall(page)}


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def authorize_params(client_id: str, fhir_base: str, *, scope: str, challenge: str | None, redirect_uri: str = CALLBACK,
                     state: str | None = None, **extra: str) -> dict[str, str]:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
              "state": state or uuid.uuid4().hex, "aud": fhir_base}
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    params.update(extra)
    return params


class Browser:
    """A user agent: follows our redirects, signs in with a password, answers the consent page."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.c = client

    async def sign_in(self, email: str, password: str = PASSWORD, next_: str = "") -> httpx.Response:
        page = await self.c.get("/signin")
        csrf = CSRF_RE.search(page.text)
        assert csrf, page.text[:500]
        return await self.c.post("/signin", data={"email": email, "password": password, "csrf_token": csrf.group(1),
                                                  "next": next_})

    async def consent_page(self, params: dict[str, str], email: str | None = None) -> httpx.Response:
        """The authorization request as the app sends it; signs in first when asked to."""
        r = await self.c.get("/oauth/authorize?" + urlencode(params))
        if r.status_code == 303 and r.headers["location"].startswith("/signin") and email:
            nxt = query_of(r.headers["location"])["next"]
            signed = await self.sign_in(email, next_=nxt)
            assert signed.status_code == 303, signed.text[:500]
            assert signed.headers["location"] == nxt
            r = await self.c.get(nxt)
        return r

    async def answer(self, consent: httpx.Response, *, approve: bool = True, **fields: str) -> httpx.Response:
        data = hidden_fields(consent.text)
        data.update(decision="approve" if approve else "deny", **fields)
        return await self.c.post("/oauth/authorize/decision", data=data)

    async def authorize(self, params: dict[str, str], email: str | None = None, *, approve: bool = True, **fields: str) -> str:
        """The redirect the app receives (its redirect_uri with code or error)."""
        consent = await self.consent_page(params, email)
        assert consent.status_code == 200, consent.text[:800]
        r = await self.answer(consent, approve=approve, **fields)
        assert r.status_code == 302, r.text[:800]
        return r.headers["location"]


def browser_client(app: Any, base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(random_ip(), 40000)), base_url=base_url)


async def exchange(c: httpx.AsyncClient, client_id: str, code: str, verifier: str | None, *, redirect_uri: str = CALLBACK,
                   auth: tuple[str, str] | None = None) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    if auth is None:
        data["client_id"] = client_id
    return await c.post("/oauth/token", data=data, auth=auth)


def rsa_key(kid: str | None = None) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid or uuid.uuid4().hex, "alg": "RS384", "use": "sig"}, private=True)


def ec_key(kid: str | None = None) -> ECKey:
    return ECKey.generate_key("P-384", parameters={"kid": kid or uuid.uuid4().hex, "alg": "ES384", "use": "sig"}, private=True)


def public_jwks(*keys: RSAKey | ECKey) -> dict:
    return {"keys": [k.as_dict(private=False) for k in keys]}


def client_assertion(key: RSAKey | ECKey, client_id: str, token_url: str, *, alg: str = "RS384", jti: str | None = None,
                     lifetime: int = 240, now: float | None = None, **claims: Any) -> str:
    t = int(now if now is not None else time.time())
    body = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": t + lifetime, "jti": jti or uuid.uuid4().hex,
            **claims}
    if key.get("alg") not in (None, alg):  # sign with another algorithm than the key announces
        key = type(key).import_key({k: v for k, v in key.as_dict(private=True).items() if k != "alg"})
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, body, key, algorithms=[alg])


def backend_form(assertion: str, scope: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
