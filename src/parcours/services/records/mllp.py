"""An MLLP listener for lab results, in the server process (started in the app lifespan
when ``mllp_port`` is set; ``parcours serve --mllp-port N``).

MLLP frames a message as ``0x0B`` + message + ``0x1C 0x0D``; each message gets its ACK in
the same framing, in order, on the same connection. A frame larger than
``MAX_MESSAGE_BYTES`` or bytes outside a frame close the connection (the sender resends:
nothing was acknowledged). The port is bound with ``SO_REUSEPORT``, so every worker
process of ``parcours serve --workers N`` listens and the kernel spreads connections.

MLLP has no authentication of its own: expose the port only to the labs' network (or
through a TLS tunnel); messages are written by a system caller named after the peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.services.records import labs

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
IDLE_SECONDS = 300


def mllp_caller(peer: str) -> Caller:
    return Caller(kind="system", user_id=f"mllp:{peer}", display=f"HL7 v2 over MLLP from {peer}", address=peer.rsplit(":", 1)[0],
                  scopes=frozenset({"system/DiagnosticReport.*", "system/Observation.*", "system/DocumentReference.*",
                                    "system/Patient.read"}))


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           handle: Callable[[bytes, str], Awaitable[str]]) -> None:
    peer_info = writer.get_extra_info("peername")
    peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else str(peer_info or "unknown")
    try:
        while True:
            try:
                first = await asyncio.wait_for(reader.readexactly(1), IDLE_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                return
            if first != START:
                log.warning("MLLP %s: bytes outside a frame; closing", peer)
                return
            try:
                body = await asyncio.wait_for(reader.readuntil(END), IDLE_SECONDS)
            except asyncio.LimitOverrunError:
                log.warning("MLLP %s: message larger than %s bytes; closing", peer, MAX_MESSAGE_BYTES)
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                return
            reply = await handle(body[: -len(END)], peer)
            writer.write(START + reply.encode("utf-8") + END)
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()


class MllpServer:
    def __init__(self, platform: Platform, host: str, port: int) -> None:
        self.platform = platform
        self.host = host
        self.port = port
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, data: bytes, peer: str) -> str:
        ack, outcome = await labs.receive(self.platform, mllp_caller(peer), data, source=f"mllp {peer}")
        if outcome is not None:
            log.info("MLLP %s: message %s %s", peer, outcome.status, outcome.patient or outcome.inbox_id)
        return ack

    async def start(self) -> "MllpServer":
        self.server = await asyncio.start_server(lambda r, w: serve_connection(r, w, self._handle), self.host, self.port,
                                                 reuse_port=True, limit=MAX_MESSAGE_BYTES)
        sockets = self.server.sockets or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("MLLP listener on %s:%s", self.host, self.port)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def send(host: str, port: int, message: bytes, *, timeout: float = 30.0) -> bytes:
    """Send one message over MLLP and return its ACK (a small client, for tests and tools)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(START + message + END)
        await writer.drain()
        first = await asyncio.wait_for(reader.readexactly(1), timeout)
        assert first == START
        body = await asyncio.wait_for(reader.readuntil(END), timeout)
        return body[: -len(END)]
    finally:
        writer.close()
