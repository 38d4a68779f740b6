"""Real-time delivery of messages to the sockets of one server process.

Every server process (on any node) runs one ``Hub``. It reads the platform's change
feed (``events.bus``: LISTEN/NOTIFY on ``resource_log``, read in commit order, after
commit): a new message (a Communication numbered in ``messaging_message``) is sent to
every socket this process holds for one of the conversation's participants: every tab
and device of each participant, whichever process each is connected to, since each
process delivers to its own sockets from the same database log. Nothing is kept in
process memory but the sockets themselves.

**Access is checked again before each delivery**: the message is read through the
recipient's own Repository (policy and audit), once per caller and batch; a refused
read delivers nothing. A socket's credentials are checked again too (a token's expiry
at each delivery, a web session every ``SESSION_RECHECK`` seconds).

**Nothing is lost**: messages of a conversation are numbered without gaps in commit
order (``store.messaging.next_seq``). A client remembers the highest number up to
which it has everything and sends it when it (re)connects (``hello``); the hub sends
every later message, read through the client's Repository, then live ones. A socket
is attached to the live feed before its catch-up is read, so a message is delivered
at least once, possibly twice: clients drop what they have by id. A worker that
restarts loses its sockets, not messages: clients reconnect (to any worker) and catch up.

Read receipts are announced with NOTIFY on ``store.messaging.CHANNEL`` (at commit) and
passed on to the participants' sockets; presence (who has a live socket, for the
e-mail notices) is refreshed in ``messaging_presence``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import socket as _socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parcours.core.errors import ParcoursError
from parcours.events.bus import ChangeFeed, FeedOverrun
from parcours.events.log import Change
from parcours.security.caller import Caller
from parcours.security.policy import CareContext
from parcours.services.messaging import service
from parcours.services.messaging.service import MessageView
from parcours.services.platform import Platform
from parcours.store import care, db
from parcours.store import messaging as store
from parcours.store.repository import Repository

log = logging.getLogger(__name__)

SESSION_RECHECK = 20.0  # seconds between two checks that a web session is still open
MAX_CURSORS = 50  # conversations one hello may catch up
BATCH = 16  # clients whose deliveries one transaction reads (each through its own Repository)
# Seconds a caller's care context serves deliveries when no change could have altered it; it
# bounds how late a relationship that ends with time alone (no write) is seen to end. Contexts
# with emergency access, which ends at a set time, are not kept.
CARE_TTL = 60.0
# What a care context is read from (``store.care.load``): a change to one of these, seen in the
# change feed before the messages committed after it, makes every cached context stale.
CARE_TYPES = frozenset({t for t, *_ in care.RELATIONSHIPS} | {"Consent", "PractitionerRole", "RelatedPerson"})


class Socket(Protocol):
    """One open socket (a tab, a device), as the hub sees it."""

    key: str  # sockets with the same key share a caller (one web session, one token)
    account_id: str | None

    def caller(self) -> Caller:
        """The caller now; raises a ParcoursError when its credentials are no longer valid."""
        ...

    async def still_valid(self) -> bool:
        """Whether its web session is still open (True for tokens: ``caller`` checks them)."""
        ...

    async def deliver(self, event: dict[str, Any], view: MessageView | None = None) -> None: ...

    async def close(self, reason: str) -> None: ...


def message_event(conversation_id: str, view: MessageView, me: list[str]) -> dict[str, Any]:
    """A message as sockets receive it; ``me``: the reader's own references (``mine``: they wrote it)."""
    return {"type": "message", "conversation": conversation_id, "seq": view.seq, "id": view.id, "sender": view.sender,
            "sender_name": view.sender_name, "sent": view.sent, "texts": view.texts,
            "attachments": [{"index": i, "title": a.get("title"), "contentType": a.get("contentType"), "size": a.get("size")}
                            for i, a in enumerate(view.attachments)],
            "in_reply_to": view.in_reply_to, "mine": view.sender in me or view.sender == ""}


@dataclass(eq=False)
class Client:
    """The sockets of one caller in this process."""

    key: str
    me: list[str]  # participant references
    sockets: set[Socket] = field(default_factory=set)
    checked_at: float = field(default_factory=time.monotonic)
    # Waiting to be delivered, in order: a delivery worker takes them all at once (one
    # Repository) when they come faster than they are delivered; one worker at a time per client.
    pending: list[store.MessageRow] = field(default_factory=list)
    pending_conversations: list[str] = field(default_factory=list)
    queued: bool = False  # in the hub's queue of clients with deliveries waiting
    busy: bool = False  # a worker is delivering to it

    def any_socket(self) -> Socket | None:
        return next(iter(self.sockets), None)


class Hub:
    def __init__(self, platform: Platform, feed: ChangeFeed, *, node: str | None = None, concurrency: int | None = None) -> None:
        self.platform = platform
        self.feed = feed
        self.node = node or f"{_socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._clients: dict[str, Client] = {}
        self._by_ref: dict[str, set[Client]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._listening = asyncio.Event()
        self._presence_wake = asyncio.Event()
        self._gate = asyncio.Semaphore(concurrency or max(2, platform.settings.db_pool_size - 2))
        self._ready: collections.deque[Client] = collections.deque()  # clients with deliveries waiting
        self._workers = 0
        # The hub's own connections for live deliveries: they never queue behind requests for the
        # pool, and as many delivery workers read at once as half the requests can write.
        self._connections = max(3, platform.settings.db_pool_size // 2)
        self._pool: AsyncConnectionPool | None = None
        # Care contexts of the callers delivered to: (generation, when read, context). The
        # generation changes with every feed batch that touches what they are read from.
        self._care: dict[tuple[str, str], tuple[int, float, CareContext]] = {}
        self._care_generation = 0
        self.delivered = 0  # messages handed to sockets (diagnostics, benchmark)

    @classmethod
    async def start(cls, platform: Platform, feed: ChangeFeed, **kw: Any) -> "Hub":
        hub = cls(platform, feed, **kw)
        hub._pool = await db.open_pool(platform.uri, hub._connections)
        hub._tasks = [asyncio.create_task(hub._run(), name="parcours-messaging-feed"),
                      asyncio.create_task(hub._listen(), name="parcours-messaging-receipts"),
                      asyncio.create_task(hub._presence_loop(), name="parcours-messaging-presence")]
        async with asyncio.timeout(30):
            await hub._listening.wait()
        return hub

    async def close(self) -> None:
        for t in [*self._tasks, *self._inflight]:
            t.cancel()
        for t in [*self._tasks, *self._inflight]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        with contextlib.suppress(Exception):
            async with self.platform.pool.connection() as conn, conn.transaction():
                await store.clear_presence(conn, self.node)
        if self._pool is not None:
            await self._pool.close()

    # -- sockets -----------------------------------------------------------------------------------
    @property
    def sockets(self) -> int:
        return sum(len(c.sockets) for c in self._clients.values())

    async def attach(self, sock: Socket) -> list[str]:
        """Deliver the caller's messages to ``sock`` from now on; returns who they are in
        conversations (participant references)."""
        client = self._clients.get(sock.key)
        if client is None:
            caller = sock.caller()
            async with self.platform.transaction(caller) as repo:
                me = await service.me(repo)
            client = self._clients.get(sock.key)  # another socket of the same caller may have come meanwhile
            if client is None:
                client = self._clients[sock.key] = Client(sock.key, me)
                for ref in me:
                    self._by_ref.setdefault(ref, set()).add(client)
        if sock.account_id and not any(s.account_id == sock.account_id for s in client.sockets):
            self._presence_wake.set()  # someone new is online here
        client.sockets.add(sock)
        return client.me

    def detach(self, sock: Socket) -> None:
        client = self._clients.get(sock.key)
        if client is None:
            return
        client.sockets.discard(sock)
        if not client.sockets:
            del self._clients[sock.key]
            client.pending, client.pending_conversations = [], []
            for ref in client.me:
                group = self._by_ref.get(ref)
                if group is not None:
                    group.discard(client)
                    if not group:
                        del self._by_ref[ref]
            self._presence_wake.set()

    async def _drop(self, client: Client, reason: str) -> None:
        for s in list(client.sockets):
            self.detach(s)
            with contextlib.suppress(Exception):
                await s.close(reason)

    async def _caller_of(self, client: Client) -> Caller | None:
        """The client's caller if its credentials still hold (else its sockets are closed)."""
        sock = client.any_socket()
        if sock is None:
            return None
        try:
            caller = sock.caller()
            if time.monotonic() - client.checked_at > SESSION_RECHECK:
                if not await sock.still_valid():
                    raise ParcoursError("The session has ended", status=401)
                client.checked_at = time.monotonic()
        except ParcoursError as e:
            await self._drop(client, e.message[:120])
            return None
        return caller

    # -- catch-up ------------------------------------------------------------------------------------
    async def catch_up(self, sock: Socket, cursors: dict[str, int]) -> None:
        """Everything after each cursor ({conversation id: highest number the client has
        everything up to}), read through the socket's caller's Repository; then the read marks."""
        caller = sock.caller()
        items = list(cursors.items())[:MAX_CURSORS]
        async with self._gate, self.platform.pool.connection() as conn:
            repo = self.platform.repository(conn, caller)
            for cid, after in items:
                async with conn.transaction():
                    try:
                        found, more = await service.messages_after(repo, cid, int(after))
                    except ParcoursError as e:
                        await sock.deliver({"type": "error", "conversation": cid, "status": e.status, "message": e.message})
                        continue
                    marks = await store.read_marks(conn, cid)
                for row, view in found:
                    if view is None:
                        await sock.deliver({"type": "gap", "conversation": cid, "seq": row.seq})
                    else:
                        await sock.deliver(message_event(cid, view, [caller.fhir_user or ""]), view)
                if more:
                    await sock.deliver({"type": "resync", "conversation": cid})
                for who, seq in marks.items():
                    await sock.deliver({"type": "read", "conversation": cid, "participant": who, "seq": seq})
        await sock.deliver({"type": "ready"})

    # -- live delivery -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                async with self.feed.stream() as changes:
                    async for batch in changes:
                        try:
                            await self.dispatch(batch)
                        except Exception:
                            log.exception("Messaging hub: dispatching %d changes failed; clients resynchronise", len(batch))
                            await self._resync_all()
                return
            except FeedOverrun:
                log.warning("Messaging hub fell behind the change feed; clients resynchronise")
                await self._resync_all()

    async def _resync_all(self) -> None:
        """Messages may have been missed here: every client catches up from its own cursor."""
        for client in list(self._clients.values()):
            for s in list(client.sockets):
                with contextlib.suppress(Exception):
                    await s.deliver({"type": "resync"})

    async def dispatch(self, batch: list[Change]) -> None:
        if any(c.resource_type in CARE_TYPES for c in batch):
            self._care_generation += 1  # before any message committed after these changes is read
            self._care.clear()
        ids = list(dict.fromkeys(c.id for c in batch if c.resource_type == "Communication" and not c.deleted))
        if not ids or not self._clients:
            return
        async with self.platform.pool.connection() as conn:
            rows, headers, parts = await store.changed(conn, ids)
        work: dict[str, tuple[Client, list[store.MessageRow], list[str]]] = {}
        for r in sorted(rows, key=lambda r: (r.conversation_id, r.seq)):
            for ref in parts.get(r.conversation_id, ()):
                for client in self._by_ref.get(ref, ()):
                    entry = work.setdefault(client.key, (client, [], []))
                    if not entry[1] or entry[1][-1] is not r:
                        entry[1].append(r)
        for cid in headers:
            for ref in parts.get(cid, ()):
                for client in self._by_ref.get(ref, ()):
                    entry = work.setdefault(client.key, (client, [], []))
                    if cid not in entry[2]:
                        entry[2].append(cid)
        # The next batch need not wait for these deliveries: each client has its own queue.
        for client, msgs, convs in work.values():
            client.pending += msgs
            client.pending_conversations += convs
            self._enqueue(client)
        self._start_workers()

    def _enqueue(self, client: Client) -> None:
        if not client.queued and not client.busy and (client.pending or client.pending_conversations):
            client.queued = True
            self._ready.append(client)

    def _start_workers(self) -> None:
        while self._ready and self._workers < self._connections:
            self._workers += 1
            task = asyncio.create_task(self._work(), name="parcours-messaging-deliver")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _work(self) -> None:
        """Deliver to the clients waiting, a batch of them per transaction, until none wait."""
        try:
            while self._ready:
                batch: list[tuple[Client, list[store.MessageRow], list[str]]] = []
                while self._ready and len(batch) < BATCH:
                    client = self._ready.popleft()
                    client.queued = False
                    if client.sockets:
                        client.busy = True
                        batch.append((client, client.pending, client.pending_conversations))
                        client.pending, client.pending_conversations = [], []
                if not batch:
                    continue
                try:
                    await self._deliver_batch(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a database hiccup: the clients catch up from their cursors
                    log.exception("Messaging hub: delivering to %d clients failed; they resynchronise", len(batch))
                    for client, _, _ in batch:
                        for sock in list(client.sockets):
                            with contextlib.suppress(Exception):
                                await sock.deliver({"type": "resync"})
                finally:
                    for client, _, _ in batch:
                        client.busy = False
                        self._enqueue(client)
        finally:
            self._workers -= 1
            if self._ready:
                self._start_workers()

    async def _deliver_batch(self, batch: list[tuple[Client, list[store.MessageRow], list[str]]]) -> None:
        """One transaction reads the messages of many clients, each through its own caller's
        Repository (access policy, audit); the frames go out once it has committed."""
        callers = [(client, rows, convs, caller) for client, rows, convs in batch
                   if (caller := await self._caller_of(client)) is not None]
        if not callers:
            return
        out: list[tuple[Client, list[tuple[dict, MessageView | None]]]] = []
        async with (self._pool or self.platform.pool).connection() as conn, conn.transaction():
            for client, rows, convs, caller in callers:
                repo = await self._repository(conn, caller)
                out.append((client, await self._read(repo, rows, convs)))
        for client, events in out:
            for sock in list(client.sockets):
                try:
                    for event, view in events:
                        await sock.deliver(event, view)
                except Exception:  # noqa: BLE001 - a socket that went away
                    self.detach(sock)
            self.delivered += sum(1 for e, _ in events if e["type"] == "message")

    async def _repository(self, conn: AsyncConnection, caller: Caller) -> Repository:
        """The caller's Repository, with the care context it had at its last delivery when no
        change that could alter it has been seen since (else read anew, and kept)."""
        repo = self.platform.repository(conn, caller)
        key = (caller.kind, caller.fhir_user or "")
        generation, now = self._care_generation, time.monotonic()
        cached = self._care.get(key)
        if cached is not None and cached[0] == generation and now - cached[1] < CARE_TTL:
            repo.use_care(cached[2])  # the context Repository.care() would read again
        elif caller.fhir_user:
            ctx = await repo.care()
            if generation == self._care_generation and not ctx.emergency:
                self._care[key] = (generation, now, ctx)
        return repo

    @staticmethod
    async def _read(repo: Repository, rows: list[store.MessageRow], conversations: list[str]
                    ) -> list[tuple[dict, MessageView | None]]:
        me = [repo.caller.fhir_user or ""]
        events: list[tuple[dict, MessageView | None]] = []
        for r in rows:
            try:
                stored = await repo.read("Communication", r.message_id)
            except ParcoursError:
                continue  # not (or no longer) allowed to see it: not delivered
            view = service.view_of(r, stored.resource())
            events.append((message_event(r.conversation_id, view, me), view))
        for cid in conversations:
            try:
                await repo.read("Communication", cid)
            except ParcoursError:
                continue
            events.append(({"type": "conversation", "conversation": cid}, None))
        return events

    # -- read receipts ---------------------------------------------------------------------------------
    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with await AsyncConnection.connect(self.platform.uri, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {store.CHANNEL}")
                    self._listening.set()
                    backoff = 0.1
                    async for n in conn.notifies():
                        try:
                            await self._receipt(orjson.loads(n.payload))
                        except Exception:  # noqa: BLE001
                            log.exception("Messaging hub: a read receipt could not be passed on")
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.warning("Messaging hub: receipts connection lost (%s); reconnecting", e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _receipt(self, payload: dict) -> None:
        cid, who, seq = str(payload["c"]), str(payload["p"]), int(payload["s"])
        if not self._clients:
            return
        async with self.platform.pool.connection() as conn:
            parts = (await store.participants_of(conn, [cid])).get(cid, set())
        clients = {c for ref in parts for c in self._by_ref.get(ref, ())}
        event = {"type": "read", "conversation": cid, "participant": who, "seq": seq}
        for client in clients:
            for sock in list(client.sockets):
                try:
                    await sock.deliver(event)
                except Exception:  # noqa: BLE001
                    self.detach(sock)

    # -- presence --------------------------------------------------------------------------------------
    async def _presence_loop(self) -> None:
        every = self.platform.settings.messaging_presence_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._presence_wake.wait()
            self._presence_wake.clear()
            now = time.monotonic()
            for key in [k for k, (_, at, _) in self._care.items() if now - at >= CARE_TTL]:
                del self._care[key]
            counts: dict[str, int] = {}
            for client in self._clients.values():
                for s in client.sockets:
                    if s.account_id:
                        counts[s.account_id] = counts.get(s.account_id, 0) + 1
            try:
                async with self.platform.pool.connection() as conn, conn.transaction():
                    await store.set_presence(conn, self.node, counts, self.platform.clock.now())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - retried at the next beat
                log.exception("Messaging hub: presence not refreshed")
            await asyncio.sleep(1.0)  # a burst of connections: one refresh


def socket_key(kind: str, secret: str) -> str:
    """A socket's key from its credentials (never the credentials themselves)."""
    return kind + ":" + hashlib.sha256(secret.encode()).hexdigest()[:32]
