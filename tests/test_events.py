"""The change feed: events leave at commit, reach every process, and none is lost.

Real PostgreSQL; each wait is for a condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
import pytest_asyncio

from parcours.events.bus import ChangeFeed, ChangeStream
from parcours.events.log import CHANGES_CHANNEL, Change, Gap, LogPosition
from parcours.security.caller import SYSTEM
from parcours.services.platform import Platform
from tests.conftest import uniq

TIMEOUT = 15.0


def patient(tag: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:parcours:test", "value": tag}]}


async def collect_until(stream: ChangeStream, done: Callable[[list[Change]], bool], timeout: float = TIMEOUT) -> list[Change]:
    """Every change the stream hands over until ``done(seen)`` holds."""
    seen: list[Change] = []
    async with asyncio.timeout(timeout):
        async for batch in stream:
            seen += batch
            if done(seen):
                return seen
    raise AssertionError("the change feed ended")


def has(*ids: str) -> Callable[[list[Change]], bool]:
    return lambda seen: set(ids) <= {c.id for c in seen}


@pytest_asyncio.fixture
async def feed(platform: Platform) -> AsyncIterator[ChangeFeed]:
    f = ChangeFeed(platform.uri, platform.pool)
    await f.start()
    yield f
    await f.close()


# -- the log position, pure ----------------------------------------------------------------
def test_position_remembers_gaps_until_their_writers_are_gone() -> None:
    p = LogPosition(10)
    assert p.advance([11, 14, 15], xmin_before=100, xmax_after=105) == [11, 14, 15]
    assert (p.head, p.gaps, p.floor) == (15, [Gap(12, 13, 105)], 11)
    # 13 commits later; 12's writer may still be running (xmin has not passed 105).
    assert p.advance([13, 16], xmin_before=104, xmax_after=110) == [13, 16]
    assert (p.head, p.gaps, p.floor) == (16, [Gap(12, 12, 105)], 11)
    # Seen twice is handed over once.
    assert p.advance([16], xmin_before=104, xmax_after=110) == []
    # Every transaction older than 105 has ended and 12 is still missing: rolled back.
    assert p.advance([], xmin_before=105, xmax_after=110) == []
    assert (p.gaps, p.floor) == ([], 16)
    q = LogPosition.from_json(20, [[18, 19, 7]])
    assert (q.floor, q.to_json()) == (17, [[18, 19, 7]])


# -- the trigger ---------------------------------------------------------------------------
async def test_one_notification_per_committed_transaction(platform: Platform) -> None:
    marker = f"parcours_test_{uniq('m').replace('-', '_')}"
    async with await psycopg.AsyncConnection.connect(platform.uri, autocommit=True) as listener:
        await listener.execute(f"LISTEN {CHANGES_CHANNEL}")
        await listener.execute(f"LISTEN {marker}")
        before = (await (await listener.execute("SELECT coalesce(max(seq), 0) FROM resource_log")).fetchone())[0]
        async with platform.transaction(SYSTEM) as repo:
            for _ in range(3):
                await repo.create("Patient", patient(uniq()))
        async with platform.pool.connection() as conn:
            await conn.execute(f"NOTIFY {marker}")  # committed after the writes: arrives after their notification
            # Other writers of this database (background jobs) may commit meanwhile: each adds at most one.
            others = (await (await conn.execute("SELECT count(*) FROM resource_log WHERE seq > %s", (before,))).fetchone())[0] - 3
        channels: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            async for n in listener.notifies():
                channels.append(n.channel)
                if n.channel == marker:
                    break
        assert channels[-1] == marker and CHANGES_CHANNEL in channels
        assert channels.count(CHANGES_CHANNEL) <= 1 + others, (channels, others)


# -- the feed ------------------------------------------------------------------------------
async def test_a_change_leaves_at_commit_even_behind_a_later_one(platform: Platform, feed: ChangeFeed) -> None:
    async with feed.stream() as stream:
        async with platform.pool.connection() as conn_a:
            async with conn_a.transaction():
                a = (await platform.repository(conn_a, SYSTEM).create("Patient", patient(uniq()))).stored
                # b takes a later seq and commits while a's transaction is still open.
                async with platform.transaction(SYSTEM) as repo:
                    b = (await repo.create("Patient", patient(uniq()))).stored
                seen = await collect_until(stream, has(b.id))
                assert a.id not in {c.id for c in seen}
            # a commits now, with a seq below the feed's head: it still arrives.
        seen = await collect_until(stream, has(a.id))
        change = next(c for c in seen if c.id == a.id)
        assert (change.resource_type, change.version_id, change.method) == ("Patient", 1, "POST")
        await feed.wait_for(change.seq, TIMEOUT)


async def test_a_rolled_back_write_produces_nothing(platform: Platform, feed: ChangeFeed) -> None:
    async with feed.stream() as stream:
        with pytest.raises(RuntimeError):
            async with platform.transaction(SYSTEM) as repo:
                lost = (await repo.create("Patient", patient(uniq()))).stored
                raise RuntimeError("abandon the transaction")
        async with platform.transaction(SYSTEM) as repo:
            kept = (await repo.create("Patient", patient(uniq()))).stored
        seen = await collect_until(stream, has(kept.id))
        assert lost.id not in {c.id for c in seen}
        # The seq the rolled-back write took is a gap for a moment, then known lost:
        # the feed's position passes it.
        await feed.wait_for(next(c.seq for c in seen if c.id == kept.id), TIMEOUT)


async def test_updates_and_deletes_are_changes_too(platform: Platform, feed: ChangeFeed) -> None:
    async with feed.stream() as stream:
        async with platform.transaction(SYSTEM) as repo:
            s = (await repo.create("Patient", patient(uniq()))).stored
            await repo.update("Patient", s.id, {**patient(uniq()), "id": s.id})
            await repo.delete("Patient", s.id)
        seen = await collect_until(stream, lambda seen: sum(c.id == s.id for c in seen) == 3)
        assert [(c.version_id, c.method) for c in seen if c.id == s.id] == [(1, "POST"), (2, "PUT"), (3, "DELETE")]


async def test_two_processes_both_receive_each_change(platform: Platform, feed: ChangeFeed) -> None:
    # A second platform on the same database stands for another worker process or node.
    other = await Platform.start(platform.settings, run_migrations=False)
    other_feed = ChangeFeed(other.uri, other.pool)
    await other_feed.start()
    try:
        async with feed.stream() as one, other_feed.stream() as two:
            async with other.transaction(SYSTEM) as repo:
                s = (await repo.create("Patient", patient(uniq()))).stored
            await asyncio.gather(collect_until(one, has(s.id)), collect_until(two, has(s.id)))
    finally:
        await other_feed.close()
        await other.close()


async def test_the_feed_reconnects_and_catches_up(platform: Platform, feed: ChangeFeed) -> None:
    async with feed.stream() as stream:
        pid = feed.backend_pid
        async with platform.pool.connection() as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # Committed while the feed is not listening.
        async with platform.transaction(SYSTEM) as repo:
            s = (await repo.create("Patient", patient(uniq()))).stored
        await collect_until(stream, has(s.id))
        async with asyncio.timeout(TIMEOUT):
            while feed.backend_pid == pid:
                await asyncio.sleep(0.02)
        assert feed.reconnects >= 1
        async with platform.transaction(SYSTEM) as repo:
            t = (await repo.create("Patient", patient(uniq()))).stored
        await collect_until(stream, has(t.id))
