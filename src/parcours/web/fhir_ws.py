"""The websocket channel of FHIR R4 Subscriptions: ``/fhir/$subscription-ws``.

Protocol (R4 Subscription, websocket channel):

* the client connects and authenticates with its bearer token: the
  ``Authorization`` header, the ``access_token`` query parameter (browsers cannot
  set headers on a websocket), or a first message ``bearer <token>``;
* it sends ``bind <subscription id>`` for a Subscription whose channel type is
  ``websocket`` and that it may read; the server answers ``bound <id>``;
* the server sends ``ping <id>`` each time a resource matching the criteria is
  created or updated, if the token is still valid and the caller may read that
  resource (checked again before each ping);
* extensions: ``unbind <id>`` answers ``unbound <id>``; a refused command answers
  ``error <id> <reason>``. An expired token closes the socket (code 1008); a
  Subscription turned off, put in error or deleted gets no more pings.

The socket is served by the process that accepted it (``events.websocket``), so
several workers and nodes need no sticky sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Container
from dataclasses import replace

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from parcours.core.errors import ParcoursError
from parcours.security import tokens
from parcours.security.caller import Caller

PATH = "/fhir/$subscription-ws"
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
FIRST_MESSAGE_TIMEOUT = 10.0


class SocketBinding:
    """One socket: its token is verified again each time the hub asks for the caller."""

    def __init__(self, ws: WebSocket, key: str, token: str, revoked: Container[str] | None = None) -> None:
        self.ws = ws
        self.key = key
        self.token = token
        self.revoked = revoked  # revoked SMART tokens (this process's copy of the deny list)
        self._lock = asyncio.Lock()

    def caller(self) -> Caller:
        caller = tokens.verify(self.key, self.token, revoked=self.revoked)
        return replace(caller, address=self.ws.client.host) if self.ws.client else caller

    async def send(self, text: str) -> None:
        async with self._lock:
            await self.ws.send_text(text)

    async def close(self, reason: str) -> None:
        async with self._lock:
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                await self.ws.close(POLICY_VIOLATION, reason)


def _offered_token(ws: WebSocket) -> str | None:
    scheme, _, value = ws.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ws.query_params.get("access_token") or None


async def subscription_ws(ws: WebSocket) -> None:
    platform = ws.app.state.platform
    events = getattr(ws.app.state, "events", None)
    token = _offered_token(ws)
    revoked = ws.app.state.smart.revoked
    if token is not None:
        try:
            tokens.verify(platform.token_key, token, revoked=revoked)
        except ParcoursError:
            await ws.close(POLICY_VIOLATION, "The bearer token is not valid")  # before accept: HTTP 403
            return
    await ws.accept()
    if events is None:
        await ws.close(TRY_AGAIN_LATER, "Subscriptions are not running in this server process")
        return
    if token is None:
        try:
            async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
                first = await ws.receive_text()
        except (TimeoutError, WebSocketDisconnect):
            with contextlib.suppress(Exception):
                await ws.close(POLICY_VIOLATION, "Authenticate first: send 'bearer <token>'")
            return
        scheme, _, value = first.strip().partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
        try:
            if not token:
                raise ParcoursError("Authenticate first: send 'bearer <token>'")
            tokens.verify(platform.token_key, token, revoked=revoked)
        except ParcoursError as e:
            await ws.close(POLICY_VIOLATION, e.message[:120])
            return
    binding = SocketBinding(ws, platform.token_key, token, revoked)
    try:
        while True:
            command, _, arg = (await ws.receive_text()).strip().partition(" ")
            arg = arg.strip()
            if command == "bind" and arg:
                try:
                    await events.hub.bind(arg, binding)
                except ParcoursError as e:
                    if e.status == 401:
                        await binding.close(e.message[:120])
                        return
                    await binding.send(f"error {arg} {e.message}")
            elif command == "unbind" and arg:
                events.hub.unbind(binding, arg)
                await binding.send(f"unbound {arg}")
            else:
                await binding.send(f"error {arg or '-'} Unknown command {command!r}: send 'bind <subscription id>'")
    except WebSocketDisconnect:
        pass
    finally:
        events.hub.unbind(binding)


route = WebSocketRoute(PATH, subscription_ws)
