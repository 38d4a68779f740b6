"""The subscription matcher wakes on the changes of its process's feed only when they may
match: at once when a subscription is live or a Subscription changed, otherwise at its
heartbeat, which still moves the shared cursor past everything."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from parcours.events.log import Change
from parcours.events.subscriptions import SubscriptionMatcher
from parcours.fhir.search import SearchParser


def _change(rtype: str, seq: int = 1) -> Change:
    return Change(seq, rtype, "x", 1, datetime.now(UTC), "POST")


async def test_the_matcher_sleeps_through_changes_nothing_can_match(platform) -> None:
    m = SubscriptionMatcher(platform.pool, platform.repository, SearchParser(platform.registry), platform.settings.fhir_base,
                            platform.clock)
    m.notice([_change("Patient")])
    assert m._wake.is_set()  # nothing loaded yet: it looks
    m._wake.clear()
    m._generation = 1  # loaded: no live subscription
    m.notice([_change("Patient"), _change("Observation", 2)])
    assert not m._wake.is_set()
    m.notice([_change("Patient"), _change("Subscription", 2)])
    assert m._wake.is_set()
    m._wake.clear()
    m._live = {"s1": object()}  # type: ignore[dict-item]
    m.notice([_change("Observation")])
    assert m._wake.is_set()


async def test_a_heartbeat_step_moves_the_cursor_past_unwatched_changes(platform, client) -> None:
    """With the matcher asleep, the cursor still reaches the log's head at the next step."""
    matcher = SubscriptionMatcher(platform.pool, platform.repository, SearchParser(platform.registry),
                                  platform.settings.fhir_base, platform.clock)
    for _ in range(3):
        r = await client.post("/fhir/Basic", json={"resourceType": "Basic", "code": {"text": "x"}},
                              headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201
    async with platform.pool.connection() as conn:
        head = (await (await conn.execute("SELECT max(seq) FROM resource_log")).fetchone())[0]
    for _ in range(200):
        if await matcher.step() == SubscriptionMatcher.IDLE:
            async with platform.pool.connection() as conn:
                row = await (await conn.execute("SELECT head FROM event_cursor WHERE name = 'subscriptions'")).fetchone()
            if row and row[0] >= head:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the matcher's cursor never reached the log's head")
