"""Bearer tokens: signed JWTs (HS256) carrying the caller's identity and scopes."""

from __future__ import annotations

import time
from collections.abc import Container

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from parcours.core.errors import Unauthorized
from parcours.security.caller import Caller

ISSUER = "parcours"
_INVALID = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def issue(key: str, *, subject: str, kind: str, scopes: list[str], fhir_user: str | None = None,
          lifetime_s: int = 3600, now: float | None = None, extra: dict | None = None) -> str:
    t = int(now if now is not None else time.time())
    claims = {"iss": ISSUER, "sub": subject, "kind": kind, "scope": " ".join(scopes), "iat": t, "exp": t + lifetime_s}
    if fhir_user:
        claims["fhirUser"] = fhir_user
    if extra:
        claims.update(extra)
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(key.encode()))


def decode(key: str, token: str, *, now: float | None = None) -> dict:
    try:
        tok = jwt.decode(token, OctKey.import_key(key.encode()), algorithms=["HS256"])
        jwt.JWTClaimsRegistry(now=int(now if now is not None else time.time()), leeway=0, iss={"essential": True, "value": ISSUER}).validate(tok.claims)
    except (JoseError, ValueError) as e:
        raise Unauthorized(f"The bearer token is not valid: {e}", headers=_INVALID) from None
    return dict(tok.claims)


def verify(key: str, token: str, *, now: float | None = None, revoked: Container[str] | None = None) -> Caller:
    """The Caller of a valid token. ``revoked`` holds the ``jti`` of revoked tokens
    (SMART access tokens carry one; the web edge passes an in-process cache)."""
    claims = decode(key, token, now=now)
    jti = claims.get("jti")
    if revoked is not None and isinstance(jti, str) and jti in revoked:
        raise Unauthorized("The bearer token was revoked", headers=_INVALID)
    patient = claims.get("patient")
    return Caller(
        kind=str(claims.get("kind", "system")),
        user_id=str(claims["sub"]),
        fhir_user=claims.get("fhirUser"),
        scopes=frozenset(str(claims.get("scope", "")).split()),
        display=str(claims["sub"]),
        patient_context=f"Patient/{patient}" if isinstance(patient, str) and patient else None,
        client_id=claims.get("client_id") if isinstance(claims.get("client_id"), str) else None,
    )
