"""AuditEvents materialized from the audit log: indexed as the generic indexer would index
them, written with one statement per batch, searchable by every parameter they fill."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import orjson
import psycopg

from parcours.fhir.indexing import index_resource
from parcours.fhir.registry import registry
from parcours.security.caller import PLATFORM
from parcours.services import audit_trail
from parcours.store import audit
from parcours.store.bulk import write_new
from parcours.store.repository import render_version
from tests.conftest import uniq

BASE = "http://testserver/fhir"


def _key(iv):  # type: ignore[no-untyped-def]
    return (sorted(iv.tokens), len(iv.tokens), sorted(iv.refs), sorted(iv.rows, key=repr), len(iv.rows),
            sorted(iv.compartments), iv.narrative, iv.content)


def test_index_event_gives_what_the_generic_indexer_gives() -> None:
    reg = registry()
    stamps = [datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC), datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC),
              datetime(2026, 3, 1, 23, 30, 5, 5000, tzinfo=timezone(timedelta(hours=2)))]
    variants = itertools.product(
        ["create", "read", "search", "login", "emergency-access", "mask", "other"], ["0", "4", "8"], ["u1", None],
        ["system", "practitioner", None], ["Practitioner/p1", None, f"{BASE}/Patient/x1", "http://elsewhere/fhir/Patient/x2", "odd/ref"],
        ["10.0.0.1", None], ["Patient", "Observation", None], ["r1", None], [3, None],
        [(), ("Patient/a",), ("Patient/a", "Patient/b")], ["family=x", None], ["BTG", None],
        [None, {"message": "refused", "reason": "urgence vitale"}])
    checked = 0
    for n, (action, outcome, agent, kind, fhir_user, address, rtype, rid, version, patients, query, purpose, detail) in enumerate(variants):
        if n % 7:  # a spread sample keeps the test quick; every value of every field still occurs
            continue
        row = (n, "1", stamps[n % 3], action, outcome, agent, kind, fhir_user, address, rtype, rid, version, list(patients),
               query, purpose, detail)
        for event_id, event in audit_trail.audit_events(row):
            ordered, _ = render_version("AuditEvent", event_id, event, 1, stamps[0])
            assert _key(audit_trail.index_event(ordered, BASE)) == _key(index_resource(ordered, reg, BASE)), row
            checked += 1
    assert checked > 5000


async def test_materialized_rows_match_the_generic_write_path(platform, pg_uri) -> None:
    patients = [f"Patient/{uniq('ae')}" for _ in range(3)]
    now = platform.clock.now()
    async with platform.pool.connection() as conn, conn.transaction():
        for rec in (
            audit.AuditRecord(action="search", outcome="0", recorded=now, agent="u1", agent_kind="practitioner",
                              fhir_user="Practitioner/p1", address="10.1.2.3", resource_type="Patient", query="family=x",
                              patients=tuple(patients)),
            audit.AuditRecord(action="read", outcome="4", recorded=now, agent="u2", agent_kind="patient", fhir_user=patients[0],
                              resource_type="Observation", resource_id="o1", version_id=2, patients=(patients[0],),
                              detail={"message": "refused"}),
            audit.AuditRecord(action="emergency-access", outcome="0", recorded=now, agent="u1", agent_kind="practitioner",
                              fhir_user="Practitioner/p1", resource_type="Patient", resource_id=patients[1][8:],
                              patients=(patients[1],), purpose="BTG", detail={"reason": "urgence vitale"}),
        ):
            await audit.record(conn, rec)
    await audit_trail.materialize(platform)
    reg = registry()
    with psycopg.connect(pg_uri) as conn:
        found = conn.execute(
            'SELECT id, content, tokens, refs, compartments FROM "AuditEvent" WHERE compartments && %s', (patients,)).fetchall()
        assert len(found) == 5  # one per patient of the search, the read, the emergency access
        for rid, content, tokens, refs, compartments in found:
            expected = index_resource(orjson.loads(content), reg, platform.settings.fhir_base)
            assert sorted(tokens) == sorted(expected.tokens) and sorted(refs) == sorted(expected.refs)
            assert sorted(compartments) == sorted(expected.compartments)
            assert conn.execute('SELECT fts_content = to_tsvector(\'parcours_fr\', %s) AND fts_text = to_tsvector(\'parcours_fr\', \'\') '
                                'FROM "AuditEvent" WHERE id = %s', (expected.content, rid)).fetchone()[0]
            side = conn.execute('SELECT code, s, raw, lo, hi, nlo, nhi, sys, unit FROM "AuditEvent_idx" WHERE resource_id = %s',
                                (rid,)).fetchall()
            assert sorted(side, key=repr) == sorted(expected.rows, key=repr)
            assert conn.execute('SELECT count(*) FROM "AuditEvent_history" WHERE id = %s AND version_id = 1', (rid,)).fetchone()[0] == 1
            assert conn.execute("SELECT count(*) FROM resource_log WHERE resource_type = 'AuditEvent' AND id = %s",
                                (rid,)).fetchone()[0] == 1


async def test_audit_events_are_searchable_by_the_parameters_they_fill(client) -> None:
    r = await client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": uniq("Fam")}]},
                          headers={"Content-Type": "application/fhir+json"})
    pid = r.json()["id"]
    assert (await client.get("/fhir/Patient", params={"_id": pid})).status_code == 200
    day = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    for params, subtypes in (
        ({"patient": pid}, ["create", "search-type"]),
        ({"entity": f"Patient/{pid}", "action": "C"}, ["create"]),
        ({"patient": pid, "subtype": "http://hl7.org/fhir/restful-interaction|create"}, ["create"]),
        ({"patient": pid, "outcome": "0", "type": "rest", "site": "Parcours", "date": f"ge{day}"}, ["create", "search-type"]),
        ({"patient": pid, "agent-role:text": "system", "entity-role": "1"}, ["create", "search-type"]),
        ({"patient": pid, "entity-type": "Patient"}, ["search-type"]),
        ({"patient": pid, "date": "lt2000-01-01"}, []),
    ):
        r = await client.get("/fhir/AuditEvent", params={**params, "_count": "50"})
        assert r.status_code == 200, r.text
        # The AuditEvent searches of this test are searches in the patient's record too.
        got = sorted({e["resource"]["subtype"][0]["code"] for e in r.json().get("entry", [])})
        assert got == subtypes, (params, got)


async def test_write_new_leaves_an_existing_id_as_it_is(platform, pg_uri) -> None:
    rid = uniq("audit-test")
    now = platform.clock.now()
    event = audit_trail.to_audit_event((0, "1", now, "read", "0", "u", "system", None, None, "Patient", "x", 1, ["Patient/x"],
                                        None, None, None))
    ordered, content = render_version("AuditEvent", rid, event, 1, now)
    iv = audit_trail.index_event(ordered, platform.settings.fhir_base)
    for _ in range(2):
        async with platform.pool.connection() as conn, conn.transaction():
            await write_new(platform.repository(conn, PLATFORM), "AuditEvent", [(rid, content, iv)], now, method="PUT")
    with psycopg.connect(pg_uri) as conn:
        for table in ('"AuditEvent"', '"AuditEvent_history"', "resource_log"):
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE id = %s", (rid,)).fetchone()[0] == 1
        n_idx = conn.execute('SELECT count(*) FROM "AuditEvent_idx" WHERE resource_id = %s', (rid,)).fetchone()[0]
        assert n_idx == len(iv.rows)
