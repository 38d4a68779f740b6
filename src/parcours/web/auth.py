"""Who is calling, from the request's credentials: a bearer token, or else a web session cookie."""

from __future__ import annotations

import base64
import time
from collections.abc import Container
from dataclasses import replace

import orjson
from starlette.requests import Request

from parcours.core.errors import Unauthorized
from parcours.security import tokens
from parcours.security.caller import Caller
from parcours.web.session import session_caller


def caller_of(request: Request) -> Caller:
    cached = request.scope.get("parcours.caller")
    if cached is not None:
        return cached
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        from_session = session_caller(request)
        if from_session is not None:
            request.scope["parcours.caller"] = from_session
            return from_session
        raise Unauthorized(
            "Authentication is required: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="parcours"'},
        )
    caller = _verified(request.app.state.platform.token_key, token.strip(), request.app.state.smart.revoked)
    client = request.client
    if client:
        caller = replace(caller, address=client.host)
    request.scope["parcours.caller"] = caller
    return caller


# Tokens already verified by this process: (signing key, token) -> (caller, exp, jti). A client
# sends the same token for many requests; checking its signature and claims again each time
# cost ~40 µs. Bounded (oldest out first); an entry serves until the token's own ``exp``.
_VERIFIED: dict[tuple[str, str], tuple[Caller, int, str | None]] = {}
_VERIFIED_MAX = 10_000


def _verified(key: str, token: str, revoked: Container[str]) -> Caller:
    hit = _VERIFIED.get((key, token))
    if hit is not None:
        caller, exp, jti = hit
        if exp > int(time.time()):  # joserfc's rule: valid while exp is after now
            # SMART tokens revoked by their app stop here, cached or not (web.smart keeps the list fresh).
            if jti is not None and jti in revoked:
                raise Unauthorized("The bearer token was revoked", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            return caller
        del _VERIFIED[(key, token)]
    caller = tokens.verify(key, token, revoked=revoked)  # signature, issuer, exp/nbf, revocation
    claims = _claims(token)
    exp, jti = claims.get("exp"), claims.get("jti")
    if isinstance(exp, int) and not isinstance(exp, bool):
        if len(_VERIFIED) >= _VERIFIED_MAX:
            del _VERIFIED[next(iter(_VERIFIED))]
        _VERIFIED[(key, token)] = (caller, exp, jti if isinstance(jti, str) else None)
    return caller


def _claims(token: str) -> dict:
    """The claims of a token whose signature was just checked."""
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
