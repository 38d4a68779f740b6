"""Who is calling, from the request's credentials: a bearer token, or else a web session cookie."""

from __future__ import annotations

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
    # SMART tokens revoked by their app stop here (web.smart keeps the deny list fresh).
    caller = tokens.verify(request.app.state.platform.token_key, token.strip(), revoked=request.app.state.smart.revoked)
    client = request.client
    if client:
        from dataclasses import replace

        caller = replace(caller, address=client.host)
    request.scope["parcours.caller"] = caller
    return caller
