"""The change feed of one process: PostgreSQL LISTEN/NOTIFY, then the log.

Each process (server worker, on any node) runs one ``ChangeFeed``. A dedicated
connection LISTENs on ``parcours_changes``, which the trigger on ``resource_log``
notifies when a writing transaction commits: NOTIFY is delivered at commit only,
so events never leave before their transaction. The notification carries nothing;
it only wakes the reader, which reads the log from its ``LogPosition`` (so
coalesced notifications, a reconnection or a slow consumer lose nothing) and hands
each batch of changes, oldest first, to every in-process consumer.

Other channels (delivery queue wake-ups...) share the listening connection:
``on_notify`` registers a callback for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from parcours.events.log import CHANGES_CHANNEL, Change, LogPosition, read_changes, start_position

log = logging.getLogger(__name__)


class FeedOverrun(Exception):
    """A consumer fell so far behind that changes were dropped for it."""


class ChangeStream:
    """The batches of changes one consumer receives, in log order.

    ``async with feed.stream() as changes: async for batch in changes: ...``
    """

    def __init__(self, feed: "ChangeFeed", maxsize: int) -> None:
        self._feed = feed
        self._queue: asyncio.Queue[list[Change] | None] = asyncio.Queue(maxsize)
        self.overrun = False

    def _put(self, batch: list[Change]) -> None:
        if self.overrun:
            return
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            self.overrun = True
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.get_nowait()
                self._queue.put_nowait(None)

    def _end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def __aiter__(self) -> "ChangeStream":
        return self

    async def __anext__(self) -> list[Change]:
        batch = await self._queue.get()
        if batch is None:
            if self.overrun:
                raise FeedOverrun("This consumer fell behind the change feed; changes were dropped")
            raise StopAsyncIteration
        return batch

    async def __aenter__(self) -> "ChangeStream":
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._feed._streams.discard(self)


class ChangeFeed:
    def __init__(self, uri: str, pool: AsyncConnectionPool, *, batch: int = 1000, heartbeat: float = 5.0,
                 gap_recheck: float = 0.25, max_backoff: float = 5.0) -> None:
        self.uri = uri
        self.pool = pool
        self.batch = batch
        self.heartbeat = heartbeat
        self.gap_recheck = gap_recheck
        self.max_backoff = max_backoff
        self._callbacks: dict[str, list[Callable[[], None]]] = {CHANGES_CHANNEL: []}
        self._streams: set[ChangeStream] = set()
        self._position: LogPosition | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.backend_pid: int | None = None  # of the listening connection (tests, diagnostics)
        self.reconnects = 0

    # -- public surface ---------------------------------------------------------------
    def on_notify(self, channel: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (cheap, synchronous) on each notification of ``channel``,
        and after each (re)connection, when notifications may have been missed.
        Register before ``start``."""
        if self._tasks:
            raise RuntimeError("Register notification callbacks before starting the feed")
        self._callbacks.setdefault(channel, []).append(callback)

    def stream(self, maxsize: int = 10_000) -> ChangeStream:
        s = ChangeStream(self, maxsize)
        self._streams.add(s)
        return s

    @property
    def position(self) -> int:
        """Every change up to this seq has been handed to the consumers."""
        return self._position.floor if self._position else 0

    async def wait_for(self, seq: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            async with self._progress:
                await self._progress.wait_for(lambda: self.position >= seq)

    async def start(self, timeout: float = 30.0) -> None:
        async with self.pool.connection() as conn:
            self._position = await start_position(conn, self.batch)
        self._tasks = [asyncio.create_task(self._listen(), name="parcours-feed-listen"),
                       asyncio.create_task(self._read_loop(), name="parcours-feed-read")]
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for s in list(self._streams):
            s._end()

    # -- listening ----------------------------------------------------------------------
    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with await AsyncConnection.connect(self.uri, autocommit=True) as conn:
                    for channel in list(self._callbacks):
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.backend_pid = conn.info.backend_pid
                    self._connected.set()
                    # Whatever was committed while not listening is read now.
                    self._wake.set()
                    for callbacks in self._callbacks.values():
                        for cb in callbacks:
                            cb()
                    backoff = 0.1
                    async for n in conn.notifies():
                        if n.channel == CHANGES_CHANNEL:
                            self._wake.set()
                        for cb in self._callbacks.get(n.channel, ()):
                            cb()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                log.warning("Change feed: listening connection lost (%s); reconnecting in %.1fs", e, backoff)
            except Exception:
                log.exception("Change feed: unexpected error while listening; reconnecting in %.1fs", backoff)
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    # -- reading ------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            assert self._position is not None
            wait = self.gap_recheck if self._position.gaps else self.heartbeat
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            try:
                more = True
                while more:
                    async with self.pool.connection() as conn:
                        changes, more = await read_changes(conn, self._position, self.batch)
                    if changes:
                        for s in list(self._streams):
                            s._put(changes)
                    async with self._progress:
                        self._progress.notify_all()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Change feed: reading the log failed; retrying")
                self._wake.set()
                await asyncio.sleep(1.0)

