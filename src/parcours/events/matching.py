"""Which subscriptions a batch of changes matches, decided by the search engine.

For the changed resources of one type and the subscriptions on that type, one
statement asks, subscription by subscription (``UNION ALL``), which of those
resources the compiled criteria return, restricted to their ids. Matching is the
search itself, so it is exact for every parameter, chain and ``_has`` the server
can search.

A search sees the current state: a change whose resource has moved on since (a
newer version, a deletion) is left to the later change, so a resource matches
once per state it is found in, with the version it has then.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from datetime import datetime
from typing import TypeVar

from psycopg import AsyncConnection
from sqlalchemy import Integer, Text, any_, literal, select, union_all
from sqlalchemy.dialects.postgresql import ARRAY

from parcours.events.log import Change
from parcours.fhir.search import SearchRequest
from parcours.store.schema import tables
from parcours.store.search import Compiler
from parcours.store.sql import compile_stmt

K = TypeVar("K", bound=Hashable)
# Subscriptions per statement: bounds the size of one statement.
CHUNK = 50


async def match(conn: AsyncConnection, base_url: str, now: datetime, rtype: str,
                candidates: Sequence[tuple[K, SearchRequest]], changes: Sequence[Change]) -> list[tuple[K, Change]]:
    """The (subscription key, change) pairs where the change's resource, in the
    version the change wrote, is found by the subscription's search."""
    latest = {c.id: c for c in changes if c.resource_type == rtype and not c.deleted}
    if not latest or not candidates:
        return []
    t = tables(rtype).main
    compiler = Compiler(base_url, now)
    ids = literal(sorted(latest), ARRAY(Text))
    found: list[tuple[K, Change]] = []
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start : start + CHUNK]
        parts = [
            select(literal(i, Integer).label("k"), t.c.id, t.c.version_id).where(t.c.id == any_(ids), compiler.where(rtype, req.filters))
            for i, (_, req) in enumerate(chunk)
        ]
        stmt = union_all(*parts) if len(parts) > 1 else parts[0]
        sql, params = compile_stmt(stmt)
        for k, rid, version in await (await conn.execute(sql, params)).fetchall():
            change = latest[rid]
            if version == change.version_id:
                found.append((chunk[k][0], change))
    found.sort(key=lambda kc: kc[1].seq)
    return found
