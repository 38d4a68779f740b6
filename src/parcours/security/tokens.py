"""Bearer tokens: signed JWTs (HS256) carrying the caller's identity and scopes."""

from __future__ import annotations

import time

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


def verify(key: str, token: str, *, now: float | None = None) -> Caller:
    claims = decode(key, token, now=now)
    return Caller(
        kind=str(claims.get("kind", "system")),
        user_id=str(claims["sub"]),
        fhir_user=claims.get("fhirUser"),
        scopes=frozenset(str(claims.get("scope", "")).split()),
        display=str(claims["sub"]),
    )
