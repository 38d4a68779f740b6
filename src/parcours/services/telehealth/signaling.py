"""Signaling of the consultation rooms across server processes.

Every process LISTENs on its own channel ``parcours_telehealth``; a message from a
socket is published with ``pg_notify`` and each process hands it to the sockets of
that room it serves, so two browsers on different workers meet. Nothing is kept:
the media flow between the browsers and is never recorded. Payloads larger than
NOTIFY allows (SDP with many codecs) are compressed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

CHANNEL = "parcours_telehealth"
NOTIFY_LIMIT = 7900


@dataclass(eq=False)
class Peer:
    """One browser tab in one room, served by this process."""

    room: str
    peer_id: str
    who: str
    host: bool
    send: Callable[[dict], Awaitable[None]]
    admitted: bool = False
    extra: dict = field(default_factory=dict)


def encode(message: dict) -> str:
    raw = orjson.dumps(message)
    if len(raw) < NOTIFY_LIMIT:
        return raw.decode()
    packed = "z" + base64.b64encode(zlib.compress(raw, 9)).decode()
    if len(packed) >= NOTIFY_LIMIT:
        raise ValueError("signaling message too large")
    return packed


def decode(payload: str) -> dict:
    if payload.startswith("z"):
        return orjson.loads(zlib.decompress(base64.b64decode(payload[1:])))
    return orjson.loads(payload)


class Signaling:
    def __init__(self, uri: str, pool: AsyncConnectionPool) -> None:
        self.uri = uri
        self.pool = pool
        self.rooms: dict[str, dict[str, Peer]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @classmethod
    async def start(cls, uri: str, pool: AsyncConnectionPool, timeout: float = 30.0) -> "Signaling":
        s = cls(uri, pool)
        s._task = asyncio.create_task(s._listen(), name="parcours-telehealth-listen")
        async with asyncio.timeout(timeout):
            await s._connected.wait()
        return s

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def join(self, peer: Peer) -> None:
        self.rooms.setdefault(peer.room, {})[peer.peer_id] = peer

    def leave(self, peer: Peer) -> None:
        room = self.rooms.get(peer.room, {})
        if room.get(peer.peer_id) is peer:
            del room[peer.peer_id]
        if not room:
            self.rooms.pop(peer.room, None)

    async def publish(self, message: dict) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, encode(message)))

    async def _deliver(self, message: dict) -> None:
        room = self.rooms.get(str(message.get("room")), {})
        target = message.get("to")
        for peer in list(room.values()):
            if peer.peer_id == message.get("from") or (target and peer.peer_id != target):
                continue
            if message.get("type") == "admit":
                peer.admitted = True
            # Media negotiation only reaches the admitted; the hosts see who knocks.
            if not peer.admitted and message.get("type") not in ("admit", "ended"):
                continue
            try:
                await peer.send(message)
            except Exception:  # a closing socket: its handler cleans up
                log.debug("telehealth: could not deliver to %s", peer.peer_id)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with await AsyncConnection.connect(self.uri, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._connected.set()
                    backoff = 0.1
                    async for n in conn.notifies():
                        try:
                            await self._deliver(decode(n.payload))
                        except Exception:
                            log.exception("telehealth: bad signaling message")
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.warning("telehealth signaling: connection lost (%s); reconnecting", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
