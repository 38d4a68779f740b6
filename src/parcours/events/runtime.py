"""The event machinery of one server process, started and stopped with it.

``Events.start(platform)`` opens the change feed (one LISTEN connection) and
runs the subscription matcher, the rest-hook deliverer and the websocket hub on
the platform's pool. In-process consumers (real-time pages...) read
``events.feed.stream()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parcours.core.clock import Clock
from parcours.fhir.registry import Registry
from parcours.fhir.search import SearchParser
from parcours.events.bus import ChangeFeed, ChangeStream, FeedOverrun
from parcours.events.subscriptions import DELIVERY_CHANNEL, DeliveryPolicy, RestHookDeliverer, SubscriptionMatcher
from parcours.events.websocket import WebSocketHub
from parcours.security.caller import Caller
from parcours.store.repository import Repository


class PlatformLike(Protocol):
    """What the events need of the running platform (services.platform.Platform)."""

    uri: str
    pool: AsyncConnectionPool
    clock: Clock
    registry: Registry

    @property
    def settings(self) -> Any: ...

    def repository(self, conn: AsyncConnection, caller: Caller) -> Repository: ...


@dataclass
class Events:
    feed: ChangeFeed
    matcher: SubscriptionMatcher
    deliverer: RestHookDeliverer
    hub: WebSocketHub
    _follow: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, platform: PlatformLike, *, policy: DeliveryPolicy | None = None) -> "Events":
        base_url = platform.settings.fhir_base
        parser = SearchParser(platform.registry)
        feed = ChangeFeed(platform.uri, platform.pool)
        deliverer = RestHookDeliverer(platform.pool, platform.repository, policy or DeliveryPolicy.from_settings(platform.settings))
        matcher = SubscriptionMatcher(platform.pool, platform.repository, parser, base_url, platform.clock, on_enqueued=deliverer.wake)
        hub = WebSocketHub(platform.pool, platform.repository, parser, base_url, platform.clock, feed)
        # The matcher learns of changes from this process's feed (which reads them anyway).
        changes = feed.stream()
        feed.on_notify(DELIVERY_CHANNEL, deliverer.wake)
        events = cls(feed, matcher, deliverer, hub)
        events._follow = asyncio.create_task(_follow(feed, changes, matcher), name="parcours-matcher-follow")
        await hub.start()
        await feed.start()
        await matcher.start()
        await deliverer.start()
        return events

    async def close(self) -> None:
        await self.deliverer.close()
        await self.matcher.close()
        await self.feed.close()
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        await self.hub.close()


async def _follow(feed: ChangeFeed, changes: ChangeStream, matcher: SubscriptionMatcher) -> None:
    while True:
        try:
            async with changes:
                async for batch in changes:
                    matcher.notice(batch)
            return  # the feed was closed
        except FeedOverrun:
            matcher.wake()  # whatever was dropped is in the log: the matcher reads it from there
            changes = feed.stream()
