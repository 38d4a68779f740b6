"""FHIR R4 Subscriptions: durable matching and rest-hook delivery.

Two cooperating loops run in every server process, on any node; PostgreSQL alone
coordinates them, so each change is matched once and each notification is sent
until it succeeds or the subscription is given up:

* the **matcher** reads ``resource_log`` from a cursor kept in ``event_cursor``
  (row-locked with ``FOR UPDATE SKIP LOCKED``: one process at a time moves it).
  In the same transaction it settles Subscriptions that were written (``requested``
  -> ``active``, or ``error`` with the reason), matches the other changes against
  the live rest-hook subscriptions (``events.matching``), queues one row per
  notification in ``subscription_delivery`` and moves the cursor. A crash anywhere
  rolls all of it back and the next process starts from the same place.
* the **deliverer** claims due rows with ``FOR UPDATE SKIP LOCKED``, leasing them
  (their next attempt moves past the HTTP timeout, so that the row of a worker
  that dies is claimed again), sends the notification, then deletes the row or
  schedules the next attempt with exponential backoff. After the last attempt the
  Subscription gets status ``error`` with the reason, and its queue is dropped.

Websocket subscriptions are settled by the matcher too, but their notifications
are in-process (``events.websocket``): a socket lives in one process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import httpx
import orjson
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, Interval, MetaData, Table, Text, bindparam, delete, extract, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import JSONB

from parcours.core.clock import Clock
from parcours.core.errors import Gone, NotFound, ParcoursError
from parcours.events.criteria import REST_HOOK, InvalidSubscription, SubscriptionSpec, check_subscription
from parcours.events.log import Change, LogPosition, read_changes
from parcours.events.matching import match
from parcours.fhir.search import SearchParser
from parcours.security.caller import SYSTEM, Caller
from parcours.store.repository import Repository
from parcours.store.schema import tables
from parcours.store.search import Compiler
from parcours.store.sql import compile_stmt

log = logging.getLogger(__name__)

DELIVERY_CHANNEL = "parcours_deliveries"
CURSOR = "subscriptions"

# These tables are created by migration 0004 alone, so they live outside the
# store's generated metadata (whose create_all builds revision 0001).
metadata = MetaData()

event_cursor = Table(
    "event_cursor",
    metadata,
    Column("name", Text, primary_key=True),
    Column("head", BigInteger, nullable=False),
    Column("gaps", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    # Bumped whenever the cursor passes a Subscription change: a process whose
    # cached subscriptions are of an older generation reloads them.
    Column("generation", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

subscription_delivery = Table(
    "subscription_delivery",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("subscription_id", Text, nullable=False),
    Column("resource_type", Text, nullable=False),
    Column("resource_id", Text, nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
Index("subscription_delivery_due", subscription_delivery.c.next_attempt_at)
Index("subscription_delivery_subscription", subscription_delivery.c.subscription_id)


class Repositories(Protocol):
    def __call__(self, conn: AsyncConnection, caller: Caller) -> Repository: ...


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    retry_seconds: float = 5.0  # first retry; doubles after each failure
    max_retry_seconds: float = 3600.0
    timeout_seconds: float = 10.0
    concurrency: int = 8  # notifications in flight per process

    def delay(self, attempts: int) -> float:
        base = min(self.max_retry_seconds, self.retry_seconds * 2 ** max(0, attempts - 1))
        return base * (1 + random.random() / 5)  # jitter: receivers coming back are not stampeded

    @property
    def lease_seconds(self) -> float:
        return self.timeout_seconds + 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> "DeliveryPolicy":
        return cls(
            max_attempts=settings.subscription_max_attempts,
            retry_seconds=settings.subscription_retry_seconds,
            timeout_seconds=settings.subscription_timeout_seconds,
        )


async def _run_forever(name: str, step: Callable[[], Any], wake: asyncio.Event, idle: Callable[[], float]) -> None:
    """Run ``step`` each time ``wake`` is set or ``idle()`` seconds have passed."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(idle()):
                await wake.wait()
        wake.clear()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: step failed; retrying", name)
            await asyncio.sleep(1.0)
            wake.set()


class SubscriptionMatcher:
    BUSY, IDLE, MORE = "busy", "idle", "more"

    def __init__(self, pool: AsyncConnectionPool, repositories: Repositories, parser: SearchParser, base_url: str,
                 clock: Clock, *, on_enqueued: Callable[[], None] = lambda: None, batch: int = 500,
                 heartbeat: float = 5.0, busy_retry: float = 0.1) -> None:
        self.pool = pool
        self.repositories = repositories
        self.parser = parser
        self.base_url = base_url
        self.clock = clock
        self.on_enqueued = on_enqueued
        self.batch = batch
        self.heartbeat = heartbeat
        self.busy_retry = busy_retry
        self._live: dict[str, SubscriptionSpec] = {}
        self._generation: int | None = None
        self._wake = asyncio.Event()
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def notice(self, changes: list[Change]) -> None:
        """This process's change feed read ``changes``. With no live subscription here, only a
        change of a Subscription needs matching at once; the rest is passed over by the
        heartbeat step, which moves the shared cursor past them in batches (waking on every
        commit cost 8-12 % of a worker's CPU during writes with no subscription at all)."""
        if self._live or self._generation is None or any(c.resource_type == "Subscription" for c in changes):
            self.wake()

    async def start(self) -> None:
        self._wake.set()
        self._task = asyncio.create_task(
            _run_forever("Subscription matcher", self._steps, self._wake, lambda: self.busy_retry if self._busy else self.heartbeat),
            name="parcours-subscription-matcher")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _steps(self) -> None:
        outcome = self.MORE
        while outcome == self.MORE:
            outcome = await self.step()
        # Another process holds the cursor: it may have read before our change was
        # committed, so look again shortly.
        self._busy = outcome == self.BUSY

    async def step(self) -> str:
        """Match the next batch of changes; BUSY when another process is at it."""
        enqueued = 0
        try:
            async with self.pool.connection() as conn, conn.transaction():
                c = event_cursor.c
                sql, params = compile_stmt(select(c.head, c.gaps, c.generation).where(c.name == CURSOR).with_for_update(skip_locked=True))
                row = await (await conn.execute(sql, params)).fetchone()
                if row is None:
                    return self.BUSY
                position = LogPosition.from_json(row[0], row[1])
                before = (position.head, position.to_json(), int(row[2]))
                generation = int(row[2])
                if generation != self._generation:
                    await self._reload(conn)
                changes, more = await read_changes(conn, position, self.batch)
                rows: list[dict[str, Any]] = []
                segment: list[Change] = []
                for change in changes:
                    segment.append(change)
                    if change.resource_type == "Subscription":
                        # Later changes are matched against the subscription as it now is.
                        rows += await self._match(conn, segment)
                        segment = []
                        await self._subscription_changed(conn, change)
                        generation += 1
                rows += await self._match(conn, segment)
                for i in range(0, len(rows), 1000):
                    sql, params = compile_stmt(insert(subscription_delivery).values(rows[i : i + 1000]))
                    await conn.execute(sql, params)
                if rows:
                    await conn.execute("SELECT pg_notify(%s, '')", (DELIVERY_CHANNEL,))
                if (position.head, position.to_json(), generation) != before:
                    sql, params = compile_stmt(update(event_cursor).where(c.name == CURSOR).values(
                        head=position.head, gaps=bindparam("gaps", type_=JSONB), generation=generation, updated_at=func.now()))
                    params["gaps"] = Jsonb(position.to_json())
                    await conn.execute(sql, params)
                enqueued = len(rows)
            self._generation = generation
        except BaseException:
            self._generation = None  # the cache may be ahead of what was rolled back
            raise
        if enqueued:
            self.on_enqueued()
        return self.MORE if more else self.IDLE

    # -- subscriptions ----------------------------------------------------------------
    async def _reload(self, conn: AsyncConnection) -> None:
        self._live = {}
        req = self.parser.parse("Subscription", [("status", "requested,active")])
        t = tables("Subscription").main
        sql, params = compile_stmt(select(t.c.id, t.c.version_id, t.c.content).where(Compiler(self.base_url).where("Subscription", req.filters)))
        for rid, version, content in await (await conn.execute(sql, params)).fetchall():
            await self._settle(conn, rid, version, orjson.loads(content))

    async def _subscription_changed(self, conn: AsyncConnection, change: Change) -> None:
        t = tables("Subscription").main
        sql, params = compile_stmt(select(t.c.version_id, t.c.deleted, t.c.content).where(t.c.id == change.id))
        row = await (await conn.execute(sql, params)).fetchone()
        if row is None or row[1] or change.deleted:
            self._live.pop(change.id, None)
        elif row[0] == change.version_id:
            await self._settle(conn, change.id, row[0], orjson.loads(row[2]))
        # else: a later change of this Subscription is on its way.

    async def _settle(self, conn: AsyncConnection, rid: str, version: int, resource: dict) -> None:
        """Keep a requested or active subscription live if it can be served (and say
        so in its status), or put it in error with the reason."""
        status = resource.get("status")
        if status not in ("requested", "active"):
            self._live.pop(rid, None)
            return
        try:
            spec = check_subscription(rid, version, resource, self.parser, self.base_url)
        except InvalidSubscription as e:
            self._live.pop(rid, None)
            await self._set_status(conn, rid, version, resource, "error", str(e))
            return
        if status == "requested" or resource.get("error"):
            await self._set_status(conn, rid, version, resource, "active", None)
        self._live[rid] = spec

    async def _set_status(self, conn: AsyncConnection, rid: str, version: int, resource: dict, status: str, error: str | None) -> None:
        ops: list[dict[str, Any]] = [{"op": "replace", "path": "/status", "value": status}]
        if error:
            ops.append({"op": "add", "path": "/error", "value": error[:2000]})
        elif "error" in resource:
            ops.append({"op": "remove", "path": "/error"})
        try:
            async with conn.transaction():
                await self.repositories(conn, SYSTEM).patch("Subscription", rid, ops, if_match=f'W/"{version}"')
        except ParcoursError as e:
            # Changed meanwhile: the newer version is settled when the cursor reaches it.
            log.info("Subscription/%s not set to %s: %s", rid, status, e)

    async def _match(self, conn: AsyncConnection, changes: list[Change]) -> list[dict[str, Any]]:
        if not changes or not self._live:
            return []
        now = self.clock.now()
        by_type: dict[str, list[SubscriptionSpec]] = {}
        for spec in self._live.values():
            if spec.channel == REST_HOOK and spec.live(now):
                by_type.setdefault(spec.criteria.resource_type, []).append(spec)
        rows: list[dict[str, Any]] = []
        for rtype in sorted({c.resource_type for c in changes} & set(by_type)):
            candidates = [(s.id, s.criteria.request) for s in by_type[rtype]]
            for sid, change in await match(conn, self.base_url, now, rtype, candidates, changes):
                rows.append({"subscription_id": sid, "resource_type": change.resource_type, "resource_id": change.id,
                             "version_id": change.version_id, "seq": change.seq})
        return rows


@dataclass(frozen=True)
class Claimed:
    id: int
    subscription_id: str
    resource_type: str
    resource_id: str
    version_id: int
    attempts: int


class RestHookDeliverer:
    def __init__(self, pool: AsyncConnectionPool, repositories: Repositories, policy: DeliveryPolicy, *,
                 http: httpx.AsyncClient | None = None, poll: float = 5.0) -> None:
        self.pool = pool
        self.repositories = repositories
        self.policy = policy
        self.poll = poll
        self._http = http
        self._own_http = http is None
        self._wake = asyncio.Event()
        self._idle = poll
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.policy.timeout_seconds, follow_redirects=False,
                                           headers={"User-Agent": "Parcours-Subscriptions"})
        self._wake.set()
        self._task = asyncio.create_task(_run_forever("Rest-hook deliverer", self._step, self._wake, lambda: self._idle),
                                         name="parcours-rest-hook-deliverer")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._inflight) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._own_http and self._http is not None:
            await self._http.aclose()

    async def _step(self) -> None:
        free = self.policy.concurrency - len(self._inflight)
        claimed = await self._claim(free) if free > 0 else []
        for d in claimed:
            task = asyncio.create_task(self._deliver(d))
            self._inflight.add(task)
            task.add_done_callback(self._done)
        if len(claimed) == free:
            self._idle = self.poll  # full: a finishing delivery wakes the loop
            if free > 0:
                self._wake.set()
            return
        async with self.pool.connection() as conn:
            d = subscription_delivery.c
            sql, params = compile_stmt(select(extract("epoch", func.min(d.next_attempt_at) - func.now())))
            due = (await (await conn.execute(sql, params)).fetchone())[0]  # type: ignore[index]
        self._idle = self.poll if due is None else min(self.poll, max(0.01, float(due)))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _claim(self, n: int) -> list[Claimed]:
        d = subscription_delivery.c
        due = (select(d.id).where(d.next_attempt_at <= func.now()).order_by(d.next_attempt_at, d.id)
               .limit(n).with_for_update(skip_locked=True))
        lease = bindparam("lease", timedelta(seconds=self.policy.lease_seconds), type_=Interval)
        stmt = (update(subscription_delivery).where(d.id.in_(due))
                .values(attempts=d.attempts + 1, next_attempt_at=func.now() + lease)
                .returning(d.id, d.subscription_id, d.resource_type, d.resource_id, d.version_id, d.attempts))
        sql, params = compile_stmt(stmt)
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [Claimed(*r) for r in rows]

    async def _deliver(self, d: Claimed) -> None:
        try:
            prepared = await self._prepare(d)
            if prepared is None:
                await self._forget(d)
                return
            spec, body = prepared
            error = await self._send(spec, d, body)
            if error is None:
                await self._forget(d)
            elif d.attempts >= self.policy.max_attempts:
                await self._give_up(spec, d, error)
            else:
                await self._retry_later(d, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out and the notification is tried again.
            log.exception("Rest-hook delivery %s failed unexpectedly", d.id)

    async def _prepare(self, d: Claimed) -> tuple[SubscriptionSpec, str | None] | None:
        """The subscription as it now is and the body to send; None when the
        notification is no longer wanted (subscription gone, off, changed channel)."""
        async with self.pool.connection() as conn:
            repo = self.repositories(conn, SYSTEM)
            try:
                stored = await repo.read("Subscription", d.subscription_id)
                resource = stored.resource()
                if resource.get("status") not in ("requested", "active"):
                    return None
                spec = check_subscription(stored.id, stored.version_id, resource, repo.parser, repo.base_url)
                if spec.channel != REST_HOOK:
                    return None
                body = None
                if spec.payload:
                    body = (await repo.vread(d.resource_type, d.resource_id, str(d.version_id))).content
            except (NotFound, Gone, InvalidSubscription):
                return None
        return spec, body

    async def _send(self, spec: SubscriptionSpec, d: Claimed, body: str | None) -> str | None:
        """Send one notification; the error, or None on success.

        R4: without payload, a POST with no body to the endpoint; with a payload,
        the endpoint is a FHIR base and the resource is PUT to [endpoint]/[type]/[id].
        """
        assert self._http is not None and spec.endpoint
        headers = list(spec.headers)
        if body is not None:
            url = f"{spec.endpoint.rstrip('/')}/{d.resource_type}/{d.resource_id}"
            method = "PUT"
            headers.append(("Content-Type", f"{spec.payload}; charset=utf-8" if ";" not in (spec.payload or "") else str(spec.payload)))
        else:
            url, method = spec.endpoint, "POST"
        try:
            r = await self._http.request(method, url, content=body.encode() if body is not None else b"", headers=headers,
                                         timeout=self.policy.timeout_seconds)
        except httpx.HTTPError as e:
            return f"{type(e).__name__} on {method} {url}: {e}".rstrip(": ")
        if 200 <= r.status_code < 300:
            return None
        return f"HTTP {r.status_code} on {method} {url}"

    async def _forget(self, d: Claimed) -> None:
        sql, params = compile_stmt(delete(subscription_delivery).where(subscription_delivery.c.id == d.id))
        async with self.pool.connection() as conn:
            await conn.execute(sql, params)

    async def _retry_later(self, d: Claimed, error: str) -> None:
        c = subscription_delivery.c
        wait = bindparam("wait", timedelta(seconds=self.policy.delay(d.attempts)), type_=Interval)
        sql, params = compile_stmt(update(subscription_delivery).where(c.id == d.id).values(next_attempt_at=func.now() + wait, last_error=error))
        async with self.pool.connection() as conn:
            await conn.execute(sql, params)

    async def _give_up(self, spec: SubscriptionSpec, d: Claimed, error: str) -> None:
        message = f"Notification to {spec.endpoint} failed {d.attempts} times; last error: {error}"
        ops = [{"op": "test", "path": "/status", "value": "active"},
               {"op": "replace", "path": "/status", "value": "error"},
               {"op": "add", "path": "/error", "value": message[:2000]}]
        async with self.pool.connection() as conn, conn.transaction():
            try:
                async with conn.transaction():
                    await self.repositories(conn, SYSTEM).patch("Subscription", spec.id, ops)
            except ParcoursError as e:
                log.info("Subscription/%s not put in error: %s", spec.id, e)
            sql, params = compile_stmt(delete(subscription_delivery).where(subscription_delivery.c.subscription_id == spec.id))
            await conn.execute(sql, params)
        log.warning("Subscription/%s put in error: %s", spec.id, message)
