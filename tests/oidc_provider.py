"""A small OpenID Connect identity provider for the tests, served over real HTTP.

Discovery, authorize (no page: it vouches at once for ``identity``, the person the
test says is at the keyboard), token (client secret, redirect URI and PKCE S256
checked), JWKS and userinfo. ``tamper`` makes the next id_token wrong in one way:
``signature`` (signed with a key it does not publish), ``nonce``, ``audience`` or
``expired``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from parcours.core.settings import OidcProvider


class IdentityProvider:
    def __init__(self, port: int) -> None:
        self.issuer = f"http://127.0.0.1:{port}"
        self.port = port
        self.key = RSAKey.generate_key(2048, parameters={"kid": "idp-key-1", "alg": "RS256", "use": "sig"}, private=True)
        self.rogue = RSAKey.generate_key(2048, parameters={"kid": "idp-key-1", "alg": "RS256", "use": "sig"}, private=True)
        self.clients: dict[str, str] = {}  # client_id -> secret
        self.identity: dict[str, Any] = {}
        self.userinfo_extra: dict[str, Any] = {}
        self.tamper: str | None = None
        self.codes: dict[str, dict[str, Any]] = {}
        self.access: dict[str, dict[str, Any]] = {}
        self.seen: list[dict[str, Any]] = []  # authorization requests, for the tests to inspect
        self.app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self.discovery),
            Route("/authorize", self.authorize),
            Route("/token", self.token, methods=["POST"]),
            Route("/jwks", self.jwks),
            Route("/userinfo", self.userinfo),
        ])

    async def discovery(self, request: Request) -> Response:
        return JSONResponse({
            "issuer": self.issuer, "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token", "jwks_uri": f"{self.issuer}/jwks",
            "userinfo_endpoint": f"{self.issuer}/userinfo", "response_types_supported": ["code"],
            "id_token_signing_alg_values_supported": ["RS256"], "code_challenge_methods_supported": ["S256"],
        })

    async def jwks(self, request: Request) -> Response:
        return JSONResponse({"keys": [self.key.as_dict(private=False)]})

    async def authorize(self, request: Request) -> Response:
        q = dict(request.query_params)
        self.seen.append(q)
        if q.get("client_id") not in self.clients or q.get("response_type") != "code":
            return JSONResponse({"error": "unauthorized_client"}, 400)
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return JSONResponse({"error": "invalid_request", "error_description": "PKCE S256 required"}, 400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {**q, "identity": dict(self.identity)}
        return RedirectResponse(q["redirect_uri"] + "?" + urlencode({"code": code, "state": q.get("state", "")}), 302)

    async def token(self, request: Request) -> Response:
        form = dict(await request.form())
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if client_id not in self.clients or self.clients[client_id] != secret:
            return JSONResponse({"error": "invalid_client"}, 401)
        grant = self.codes.pop(str(form.get("code")), None)
        if grant is None or grant["client_id"] != client_id or grant["redirect_uri"] != form.get("redirect_uri"):
            return JSONResponse({"error": "invalid_grant"}, 400)
        verifier = str(form.get("code_verifier") or "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if challenge != grant["code_challenge"]:
            return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, 400)
        identity = grant["identity"]
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": client_id, "sub": identity["sub"], "nonce": grant.get("nonce"),
                  "iat": now, "exp": now + 300, "auth_time": now, "acr": "eidas1",
                  **{k: v for k, v in identity.items() if k != "sub"}}
        key = self.key
        tamper, self.tamper = self.tamper, None
        if tamper == "signature":
            key = self.rogue
        elif tamper == "nonce":
            claims["nonce"] = "not-the-nonce"
        elif tamper == "audience":
            claims["aud"] = "someone-else"
        elif tamper == "expired":
            claims["iat"], claims["exp"] = now - 900, now - 600
        access = secrets.token_urlsafe(16)
        self.access[access] = {"sub": identity["sub"], **self.userinfo_extra}
        id_token = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)
        return JSONResponse({"access_token": access, "token_type": "Bearer", "expires_in": 300, "id_token": id_token})

    async def userinfo(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token not in self.access:
            return JSONResponse({"error": "invalid_token"}, 401)
        return JSONResponse(self.access[token])


@contextmanager
def serve(app: Any, port: int) -> Iterator[None]:
    """Serve an ASGI app over HTTP in a thread (uvicorn) while the block runs."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


PSC_CLIENT, FC_CLIENT, ETAB_CLIENT = "parcours-psc", "parcours-fc", "parcours-etab"


def providers_for(idp: IdentityProvider) -> list[OidcProvider]:
    return [
        # Pro Santé Connect: RPPS from the userinfo endpoint, strong authentication, accounts for
        # professionals of the directory.
        OidcProvider(name="psc", label="Pro Santé Connect", issuer=idp.issuer, client_id=PSC_CLIENT,
                     client_secret=idp.clients[PSC_CLIENT], scopes=["openid", "scope_all"], acr_values="eidas1",
                     roles=["practitioner"], link_by="rpps", link_claim="SubjectNameID", userinfo=True,
                     second_factor=True, create_accounts=True),
        # FranceConnect: patients by e-mail, client_secret_post.
        OidcProvider(name="fc", label="FranceConnect", issuer=idp.issuer, client_id=FC_CLIENT,
                     client_secret=idp.clients[FC_CLIENT], token_auth_method="client_secret_post",
                     scopes=["openid", "email", "given_name", "family_name"], roles=["patient", "proxy"],
                     link_by="email", link_claim="email"),
        # An organisation's own provider, not strong enough to stand for the TOTP step.
        OidcProvider(name="etab", label="Annuaire de l'établissement", issuer=idp.issuer, client_id=ETAB_CLIENT,
                     client_secret=idp.clients[ETAB_CLIENT], roles=["practitioner"], link_by="email", link_claim="email"),
    ]
