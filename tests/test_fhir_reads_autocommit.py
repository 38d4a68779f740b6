"""Reads and searches run without a transaction block (``Platform.reading``): each one still
leaves its audit entry, refusals and failures too, and the connection goes back to the pool
as it came."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import pq

from parcours.core.errors import NotFound
from parcours.security.caller import Caller
from tests.conftest import uniq


def _entries(pg_uri: str, rid: str) -> list[tuple]:
    with psycopg.connect(pg_uri) as conn:
        return conn.execute("SELECT action, outcome FROM audit_log WHERE resource_id = %s ORDER BY seq", (rid,)).fetchall()


async def test_a_read_outside_a_transaction_block_is_audited(platform, client, pg_uri) -> None:
    r = await client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": uniq("F")}]},
                          headers={"Content-Type": "application/fhir+json"})
    pid = r.json()["id"]
    caller = Caller(kind="system", user_id=uniq("sys"), scopes=frozenset({"system/*.*"}), display="test")
    async with platform.reading(caller) as repo:
        assert repo.conn.autocommit
        stored = await repo.read("Patient", pid)
        assert repo.conn.info.transaction_status == pq.TransactionStatus.IDLE  # nothing left open
        found = await repo.search(repo.parse_search("Patient", [("_id", pid)]))
    assert stored.id == pid and [m.id for m in found.matches] == [pid]
    assert not repo.conn.autocommit
    assert _entries(pg_uri, pid) == [("create", "0"), ("read", "0")]
    with psycopg.connect(pg_uri) as conn:
        rows = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'search' AND %s = ANY(patients)",
                            (f"Patient/{pid}",)).fetchone()
    assert rows[0] == 1


async def test_a_failed_read_outside_a_transaction_block_is_audited(platform, pg_uri) -> None:
    missing = uniq("missing")
    caller = Caller(kind="system", user_id=uniq("sys"), scopes=frozenset({"system/*.*"}), display="test")
    with pytest.raises(NotFound):
        async with platform.reading(caller) as repo:
            await repo.read("Patient", missing)
    assert not repo.conn.autocommit and repo.conn.info.transaction_status == pq.TransactionStatus.IDLE
    assert _entries(pg_uri, missing) == [("read", "4")]


async def test_reads_and_searches_over_the_api_are_audited(client, pg_uri) -> None:
    r = await client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": uniq("G")}]},
                          headers={"Content-Type": "application/fhir+json"})
    pid = r.json()["id"]
    assert (await client.get(f"/fhir/Patient/{pid}")).status_code == 200
    assert (await client.get(f"/fhir/Patient/{pid}/_history/1")).status_code == 200
    assert (await client.get(f"/fhir/Patient/{uniq('nope')}")).status_code == 404
    assert (await client.get("/fhir/Patient", params={"_id": pid})).status_code == 200
    assert [a for a, _ in _entries(pg_uri, pid)] == ["create", "read", "vread"]
