"""The websocket channel of R4 Subscriptions, in one process.

A socket is bound to subscriptions in the process that accepted it, so each
process matches the changes of its own change feed against the subscriptions
its sockets are bound to, and pings those sockets. Before each ping the caller
behind the socket is checked again: its credentials must still be valid and it
must be allowed to read the changed resource, asked through its own Repository,
so whatever the access policy decides for a read is decided here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from psycopg_pool import AsyncConnectionPool

from parcours.core.clock import Clock
from parcours.core.errors import BadRequest, ParcoursError
from parcours.events.bus import ChangeFeed, FeedOverrun
from parcours.events.criteria import WEBSOCKET, InvalidSubscription, SubscriptionSpec, check_subscription
from parcours.events.log import Change
from parcours.events.matching import match
from parcours.events.subscriptions import Repositories
from parcours.fhir.search import SearchParser
from parcours.security.caller import SYSTEM, Caller

log = logging.getLogger(__name__)


class Binding(Protocol):
    """One socket, as the hub sees it."""

    def caller(self) -> Caller:
        """The caller now; raises a ParcoursError when its credentials are no longer valid."""
        ...

    async def send(self, text: str) -> None: ...

    async def close(self, reason: str) -> None: ...


class WebSocketHub:
    def __init__(self, pool: AsyncConnectionPool, repositories: Repositories, parser: SearchParser, base_url: str,
                 clock: Clock, feed: ChangeFeed) -> None:
        self.pool = pool
        self.repositories = repositories
        self.parser = parser
        self.base_url = base_url
        self.clock = clock
        self.feed = feed
        self._specs: dict[str, SubscriptionSpec] = {}
        self._bindings: dict[str, set[Binding]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parcours-websocket-hub")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- binding ----------------------------------------------------------------------
    async def bind(self, subscription_id: str, binding: Binding) -> None:
        """Bind a socket to a websocket Subscription the caller may read; sends
        ``bound <id>`` before any ping. Raises a ParcoursError otherwise."""
        caller = binding.caller()
        async with self.pool.connection() as conn:
            stored = await self.repositories(conn, caller).read("Subscription", subscription_id)
        spec = self._check(stored.id, stored.version_id, stored.resource())
        await binding.send(f"bound {subscription_id}")
        self._specs[subscription_id] = spec
        self._bindings.setdefault(subscription_id, set()).add(binding)

    def unbind(self, binding: Binding, subscription_id: str | None = None) -> None:
        ids = [subscription_id] if subscription_id is not None else list(self._bindings)
        for sid in ids:
            bound = self._bindings.get(sid)
            if bound is None:
                continue
            bound.discard(binding)
            if not bound:
                del self._bindings[sid]
                self._specs.pop(sid, None)

    def bound(self, subscription_id: str) -> int:
        return len(self._bindings.get(subscription_id, ()))

    def _check(self, rid: str, version: int, resource: dict) -> SubscriptionSpec:
        try:
            spec = check_subscription(rid, version, resource, self.parser, self.base_url)
        except InvalidSubscription as e:
            raise BadRequest(str(e)) from None
        if spec.channel != WEBSOCKET:
            raise BadRequest(f"Subscription/{rid} uses the {spec.channel} channel, not websocket")
        if not spec.live(self.clock.now()):
            raise BadRequest(f"Subscription/{rid} is {spec.status}, not active")
        return spec

    # -- dispatch ---------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                async with self.feed.stream() as changes:
                    async for batch in changes:
                        try:
                            await self.dispatch(batch)
                        except Exception:
                            log.exception("Websocket hub: dispatching %d changes failed", len(batch))
                return
            except FeedOverrun:
                log.warning("Websocket hub fell behind the change feed; some pings were dropped")

    async def dispatch(self, batch: list[Change]) -> None:
        if not self._bindings:
            return
        await self._refresh([c for c in batch if c.resource_type == "Subscription" and c.id in self._specs])
        now = self.clock.now()
        by_type: dict[str, list[SubscriptionSpec]] = {}
        for sid, spec in self._specs.items():
            if spec.live(now):
                by_type.setdefault(spec.criteria.resource_type, []).append(spec)
        types = {c.resource_type for c in batch} & set(by_type)
        if not types:
            return
        pings: list[tuple[Binding, str]] = []
        expired: list[Binding] = []
        async with self.pool.connection() as conn:
            pairs: list[tuple[str, Change]] = []
            for rtype in sorted(types):
                pairs += await match(conn, self.base_url, now, rtype, [(s.id, s.criteria.request) for s in by_type[rtype]], batch)
            pairs.sort(key=lambda p: p[1].seq)
            for sid, change in pairs:
                for binding in list(self._bindings.get(sid, ())):
                    try:
                        caller = binding.caller()
                    except ParcoursError:
                        expired.append(binding)
                        continue
                    try:
                        await self.repositories(conn, caller).read(change.resource_type, change.id)
                    except ParcoursError:
                        continue  # not (or no longer) allowed to see it: no ping
                    pings.append((binding, f"ping {sid}"))
        for binding in expired:
            self.unbind(binding)
            with contextlib.suppress(Exception):
                await binding.close("The access token has expired")
        for binding, text in pings:
            try:
                await binding.send(text)
            except Exception:
                self.unbind(binding)

    async def _refresh(self, changes: list[Change]) -> None:
        """Bound subscriptions that changed: keep them if still servable, else drop
        them (their sockets get no more pings)."""
        if not changes:
            return
        async with self.pool.connection() as conn:
            repo = self.repositories(conn, SYSTEM)
            for sid in {c.id for c in changes}:
                try:
                    stored = await repo.read("Subscription", sid)
                    self._specs[sid] = self._check(stored.id, stored.version_id, stored.resource())
                except ParcoursError:
                    self._specs.pop(sid, None)
                    self._bindings.pop(sid, None)
