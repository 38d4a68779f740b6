"""The signaling websocket of the consultation rooms: ``/telehealth/rooms/{id}/ws``.

Authentication: the session cookie of a signed-in page (the Origin must be this
site, so another site cannot ride the cookie) or a bearer token (``access_token``
query parameter or ``Authorization`` header). The caller must be a participant of
the room's Appointment, checked through its Repository (``services.telehealth.rooms``).

Messages are JSON objects: ``{"type": "hello"|"offer"|"answer"|"ice"|"chat"|"knock"|
"admit"|"bye", "to": <peer id>?, "data": ...}``; the server adds ``room``, ``from``
and ``who`` and fans them out across processes (``services.telehealth.signaling``).
A patient waits (only ``knock`` goes out) until a host admits them.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from urllib.parse import urlsplit

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from parcours.core.errors import ParcoursError
from parcours.security import tokens
from parcours.security.caller import Caller
from parcours.services import signin
from parcours.services.telehealth import rooms
from parcours.services.telehealth.signaling import Peer
from parcours.web.session import cookie_name

POLICY_VIOLATION = 1008
PATH = "/telehealth/rooms/{room_id}/ws"
WAITING_MAY_SEND = frozenset({"knock", "bye"})
TYPES = frozenset({"hello", "offer", "answer", "ice", "chat", "knock", "admit", "bye"})


def _same_origin(ws: WebSocket) -> bool:
    origin = ws.headers.get("origin")
    if not origin:
        return False
    host = ws.headers.get("host", "")
    return urlsplit(origin).netloc == host


async def _caller(ws: WebSocket) -> Caller | None:
    platform = ws.app.state.platform
    scheme, _, value = ws.headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else ws.query_params.get("access_token")
    if token:
        return tokens.verify(platform.token_key, token, revoked=ws.app.state.smart.revoked)
    cookie = ws.cookies.get(cookie_name(platform.settings))
    if not cookie or not _same_origin(ws):
        return None
    async with platform.pool.connection() as conn, conn.transaction():
        active = await signin.resolve(platform, conn, cookie)
    if active is None or active.session.stage != "full":
        return None
    return signin.session_caller(active, ws.client.host if ws.client else None)


async def room_ws(ws: WebSocket) -> None:
    platform = ws.app.state.platform
    hub = getattr(ws.app.state, "telehealth", None)
    room_id = ws.path_params["room_id"]
    try:
        caller = await _caller(ws)
        if caller is None:
            await ws.close(POLICY_VIOLATION, "Sign in first")
            return
        if ws.client:
            caller = replace(caller, address=ws.client.host)
        async with platform.pool.connection() as conn, conn.transaction():
            room = await rooms.access_room(platform.repository(conn, caller), room_id)
    except ParcoursError as e:
        await ws.close(POLICY_VIOLATION, e.message[:120])
        return
    if hub is None:
        await ws.close(1013, "Teleconsultation is not running in this server process")
        return
    await ws.accept()
    peer_id = ws.query_params.get("peer") or secrets.token_hex(8)
    peer_id = peer_id[:40]

    async def send(message: dict) -> None:
        await ws.send_text(orjson.dumps(message).decode())

    peer = Peer(room_id, peer_id, room.me, room.host, send, admitted=room.host)
    hub.join(peer)
    base = {"room": room_id, "from": peer_id, "who": room.me, "host": room.host}
    try:
        await send({"type": "welcome", "peer": peer_id, "host": room.host, "admitted": peer.admitted,
                    "ice_servers": platform.settings.telehealth_ice_servers})
        if not room.host:
            await hub.publish({**base, "type": "knock"})
        while True:
            try:
                message = orjson.loads(await ws.receive_text())
            except orjson.JSONDecodeError:
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind not in TYPES:
                continue
            if not peer.admitted and kind not in WAITING_MAY_SEND:
                continue
            if kind == "admit" and not room.host:
                continue
            out = {**base, "type": kind}
            if isinstance(message.get("to"), str):
                out["to"] = message["to"][:40]
            if "data" in message:
                out["data"] = message["data"]
            if kind == "chat":
                out["data"] = str(message.get("data", ""))[:2000]
            try:
                await hub.publish(out)
            except ValueError:
                continue
    except WebSocketDisconnect:
        pass
    finally:
        hub.leave(peer)
        try:
            await hub.publish({**base, "type": "bye"})
        except Exception:
            pass


route = WebSocketRoute(PATH, room_ws)
