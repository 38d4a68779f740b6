"""The messaging websocket: ``/messages/ws``.

Authentication: the session cookie of a signed-in page (the ``Origin`` must be this
site, so that another site cannot ride the cookie) or a bearer token (the
``access_token`` query parameter or the ``Authorization`` header). The socket then
receives every message of every conversation of its caller, from this server
process's hub (``services.messaging.hub``), which reads each one through the caller's
Repository first.

Protocol: JSON objects, one per frame.

* client → ``{"type": "hello", "cursors": {"<conversation id>": <n>}, "html": true}``: catch
  up with every message numbered after ``n`` in each conversation (``n`` = the highest
  number up to which the client has everything), then live messages; ``html`` asks for
  each message rendered as the page shows it (``html`` field). The server answers the
  catch-up, read marks, then ``{"type": "ready"}``. Send it again after a ``resync``.
* server → ``message`` (``conversation``, ``seq``, ``id``, ``sender``, ``sender_name``, ``sent``,
  ``texts``, ``attachments``, ``in_reply_to``, ``mine``, ``html``?), ``gap`` (a number the
  caller may not read: step over it), ``read`` (``participant`` read up to ``seq``),
  ``conversation`` (a new conversation), ``resync`` (catch up again), ``error``.
  Delivery is at least once: drop what you have by ``id``.
* client → ``{"type": "read", "conversation": id, "seq": n}`` (read receipt), ``{"type": "ping"}``.

Each socket has a bounded queue of outgoing frames: a client that does not read them is
disconnected (it reconnects and catches up) rather than slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from parcours.core.errors import ParcoursError, Unauthorized
from parcours.security import roles, tokens
from parcours.security.caller import Caller
from parcours.services import signin
from parcours.services.messaging import model, service
from parcours.services.messaging.hub import socket_key
from parcours.services.messaging.service import MessageView
from parcours.web import i18n, navigation
from parcours.web.session import cookie_name

log = logging.getLogger(__name__)

PATH = "/messages/ws"
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
QUEUE = 2000  # frames waiting for a slow client before it is disconnected


def _same_origin(ws: WebSocket) -> bool:
    origin = ws.headers.get("origin")
    return bool(origin) and urlsplit(origin).netloc == ws.headers.get("host", "")


class SocketClient:
    """One open socket, as the messaging hub sees it."""

    def __init__(self, ws: WebSocket, *, key: str, account_id: str | None, caller: Caller, token: str | None,
                 session_id: str | None, lang: str, expires: float | None = None, jti: str | None = None) -> None:
        self.ws = ws
        self.key = key
        self.account_id = account_id
        self._caller = caller
        self._token = token
        self._expires = expires  # a token's expiry (its signature was checked when the socket opened)
        self._jti = jti
        self._session_id = session_id
        self.lang = lang
        self.html = False
        self.me: list[str] = [caller.fhir_user or ""]  # whose messages are theirs ("mine")
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE)
        self._writer = asyncio.create_task(self._write(), name="parcours-messaging-socket")
        self.closed = False

    def caller(self) -> Caller:
        """The socket's caller, its token still unexpired and not revoked (checked at each delivery)."""
        if self._token is not None:
            if self._expires is not None and time.time() >= self._expires:
                raise Unauthorized("The bearer token has expired")
            if self._jti is not None and self._jti in self.ws.app.state.smart.revoked:
                raise Unauthorized("The bearer token was revoked")
        return self._caller

    async def still_valid(self) -> bool:
        if self._session_id is None:
            return True
        platform = self.ws.app.state.platform
        async with platform.pool.connection() as conn:
            live = await signin.sessions_of(platform, conn, self.account_id or "")
        return any(s.id == self._session_id for s in live)

    async def deliver(self, event: dict[str, Any], view: MessageView | None = None) -> None:
        if self.closed:
            raise ConnectionError("closed")
        if self.html and view is not None:
            event = {**event, "html": self._render(view)}
        try:
            self._queue.put_nowait(orjson.dumps(event).decode())
        except asyncio.QueueFull:
            self.closed = True
            asyncio.get_running_loop().create_task(self._close(TRY_AGAIN_LATER, "Too slow: reconnect and catch up"))
            raise ConnectionError("slow client") from None

    def _render(self, view: MessageView) -> str:
        from parcours.web.messaging_pages import PREFIX, message_context

        pages = self.ws.app.state.pages
        t = i18n.Translator(self.lang, pages.catalogs)
        space = navigation.WORKSPACE if self._caller.kind == "practitioner" else navigation.PORTAL
        can_file = self._caller.kind == "practitioner" and bool(model.subject(view.resource))
        ctx = message_context(view, me=self.me, prefix=PREFIX[space], lang=self.lang, can_file=can_file)
        return pages.env.get_template("_message.html").render(t=t, lang=self.lang, csrf="", **ctx)

    async def _write(self) -> None:
        while True:
            text = await self._queue.get()
            if text is None:
                return
            try:
                await self.ws.send_text(text)
            except Exception:  # noqa: BLE001 - the peer went away
                self.closed = True
                return

    async def _close(self, code: int, reason: str) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                await self.ws.close(code, reason)

    async def close(self, reason: str) -> None:
        await self._close(POLICY_VIOLATION, reason)

    async def stop(self) -> None:
        self.closed = True
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer


async def _authenticate(ws: WebSocket) -> SocketClient | None:
    platform = ws.app.state.platform
    scheme, _, value = ws.headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else ws.query_params.get("access_token")
    lang = i18n.negotiate(account_locale=None, cookie=ws.cookies.get(i18n.LANG_COOKIE),
                          accept_language=ws.headers.get("accept-language"))
    if token:
        caller = tokens.verify(platform.token_key, token, revoked=ws.app.state.smart.revoked)
        claims = tokens.decode(platform.token_key, token)
        if ws.client:
            caller = replace(caller, address=ws.client.host)
        if ws.query_params.get("lang") in i18n.SUPPORTED:
            lang = ws.query_params["lang"]
        exp, jti = claims.get("exp"), claims.get("jti")
        return SocketClient(ws, key=socket_key("token", token), account_id=caller.user_id, caller=caller, token=token,
                            session_id=None, lang=lang, expires=float(exp) if isinstance(exp, (int, float)) else None,
                            jti=jti if isinstance(jti, str) else None)
    cookie = ws.cookies.get(cookie_name(platform.settings))
    if not cookie or not _same_origin(ws):
        return None
    async with platform.pool.connection() as conn, conn.transaction():
        active = await signin.resolve(platform, conn, cookie)
    if active is None or active.session.stage != "full":
        return None
    if not roles.is_role(active.account.role):
        return None
    caller = signin.session_caller(active, ws.client.host if ws.client else None)
    lang = i18n.negotiate(account_locale=active.account.locale, cookie=ws.cookies.get(i18n.LANG_COOKIE),
                          accept_language=ws.headers.get("accept-language"))
    return SocketClient(ws, key=socket_key("session", active.session.id), account_id=active.account.id, caller=caller,
                        token=None, session_id=active.session.id, lang=lang)


async def messaging_ws(ws: WebSocket) -> None:
    platform = ws.app.state.platform
    hub = getattr(ws.app.state, "messaging", None)
    try:
        sock = await _authenticate(ws)
    except ParcoursError as e:
        await ws.close(POLICY_VIOLATION, e.message[:120])  # before accept: HTTP 403
        return
    if sock is None:
        await ws.close(POLICY_VIOLATION, "Sign in first")
        return
    await ws.accept()
    if hub is None:
        await sock.stop()
        await ws.close(TRY_AGAIN_LATER, "Messaging is not running in this server process")
        return
    try:
        participant = await hub.attach(sock)
        await sock.deliver({"type": "welcome", "me": participant})
        while True:
            try:
                msg = orjson.loads(await ws.receive_text())
            except orjson.JSONDecodeError:
                continue
            if not isinstance(msg, dict):
                continue
            kind = msg.get("type")
            if kind == "hello":
                sock.html = bool(msg.get("html"))
                raw = msg.get("cursors") or {}
                cursors = {str(k): int(v) for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)} \
                    if isinstance(raw, dict) else {}
                await hub.catch_up(sock, cursors)
            elif kind == "read" and isinstance(msg.get("conversation"), str) and isinstance(msg.get("seq"), int):
                try:
                    async with platform.transaction(sock.caller()) as repo:
                        await service.mark_read(repo, msg["conversation"], msg["seq"])
                except ParcoursError as e:
                    if isinstance(e, Unauthorized) or e.status == 401:
                        await sock.close(e.message[:120])
                        return
                    await sock.deliver({"type": "error", "conversation": msg["conversation"], "status": e.status,
                                        "message": e.message})
            elif kind == "ping":
                await sock.deliver({"type": "pong"})
    except (WebSocketDisconnect, ConnectionError):
        pass
    except ParcoursError as e:
        await sock.close(e.message[:120])
    finally:
        hub.detach(sock)
        await sock.stop()


route = WebSocketRoute(PATH, messaging_ws)
