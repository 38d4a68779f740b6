"""The audit trail: every interaction leaves an entry in its own transaction; the
trail is searchable as AuditEvents and tamper-evident."""

from __future__ import annotations

import psycopg
import pytest

from parcours.store import audit
from tests.conftest import uniq


async def _patient(client) -> str:
    r = await client.post("/fhir/Patient", json={"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": uniq()}]},
                          headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _entries(pg_uri: str, resource: str) -> list[tuple]:
    rtype, rid = resource.split("/")
    with psycopg.connect(pg_uri) as conn:
        return conn.execute(
            "SELECT action, outcome, agent_kind, resource_type, resource_id, patients FROM audit_log "
            "WHERE resource_type = %s AND resource_id = %s ORDER BY seq", (rtype, rid)).fetchall()


async def test_create_read_update_delete_are_audited(client, pg_uri) -> None:
    pid = await _patient(client)
    assert (await client.get(f"/fhir/Patient/{pid}")).status_code == 200
    body = (await client.get(f"/fhir/Patient/{pid}")).json()
    body["active"] = True
    assert (await client.put(f"/fhir/Patient/{pid}", json=body, headers={"Content-Type": "application/fhir+json"})).status_code == 200
    assert (await client.delete(f"/fhir/Patient/{pid}")).status_code in (200, 204)
    entries = _entries(pg_uri, f"Patient/{pid}")
    assert [e[0] for e in entries] == ["create", "read", "read", "update", "delete"]
    assert all(e[1] == audit.SUCCESS and e[2] == "system" for e in entries)
    assert all(e[5] == [f"Patient/{pid}"] for e in entries)


async def test_failed_interaction_is_audited_and_nothing_else_is_written(client, pg_uri) -> None:
    missing = uniq("nope")
    r = await client.get(f"/fhir/Patient/{missing}")
    assert r.status_code == 404
    entries = _entries(pg_uri, f"Patient/{missing}")
    assert entries == [("read", audit.MINOR_FAILURE, "system", "Patient", missing, [f"Patient/{missing}"])]


async def test_search_records_query_and_patients(client, pg_uri) -> None:
    pid = await _patient(client)
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}}
    assert (await client.post("/fhir/Observation", json=obs, headers={"Content-Type": "application/fhir+json"})).status_code == 201
    r = await client.get("/fhir/Observation", params={"subject": f"Patient/{pid}"})
    assert r.status_code == 200 and len(r.json()["entry"]) == 1
    with psycopg.connect(pg_uri) as conn:
        rows = conn.execute("SELECT query, patients FROM audit_log WHERE action = 'search' AND resource_type = 'Observation' "
                            "AND %s = ANY(patients)", (f"Patient/{pid}",)).fetchall()
    assert len(rows) == 1 and f"Patient%2F{pid}" in rows[0][0]


async def test_audit_events_are_searchable_by_patient(client) -> None:
    pid = await _patient(client)
    await client.get(f"/fhir/Patient/{pid}")
    r = await client.get("/fhir/AuditEvent", params={"patient": f"Patient/{pid}", "_count": "50"})
    assert r.status_code == 200, r.text
    events = [e["resource"] for e in r.json().get("entry", [])]
    actions = sorted(e["subtype"][0]["code"] for e in events)
    assert actions == ["create", "read"]
    for e in events:
        assert e["agent"][0]["requestor"] is True
        assert {"reference": f"Patient/{pid}"} in [x["what"] for x in e["entity"]]


async def test_audit_events_cannot_be_written_through_the_api(client) -> None:
    ev = {"resourceType": "AuditEvent", "type": {"code": "rest"}, "recorded": "2026-01-01T00:00:00Z",
          "agent": [{"requestor": True}], "source": {"observer": {"display": "x"}}}
    r = await client.post("/fhir/AuditEvent", json=ev, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 403
    assert "append-only" in r.text


@pytest.fixture()
def fresh_db(pg_uri: str):  # type: ignore[no-untyped-def]
    """A database of its own: this test damages the trail on purpose."""
    import uuid
    from urllib.parse import urlparse

    from parcours.store import migrate

    name = f"audit_tamper_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    uri = urlparse(pg_uri)._replace(path="/" + name).geturl()
    migrate.upgrade(uri)
    yield uri
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _seal(pg_uri: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_uri, autocommit=True) as conn:
        while await audit.seal(conn):
            pass


async def test_verify_detects_changed_deleted_and_inserted_entries(fresh_db) -> None:
    from datetime import UTC, datetime

    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        for i in range(5):
            await audit.record(conn, audit.AuditRecord(action="read", outcome=audit.SUCCESS, recorded=datetime.now(UTC),
                                                       agent="dr-who", agent_kind="practitioner", resource_type="Patient",
                                                       resource_id=f"p{i}", patients=(f"Patient/p{i}",)))
            await conn.commit()
    await _seal(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        report = audit.verify(conn)
        assert report.ok and report.checked == 5
        seqs = [r[0] for r in conn.execute("SELECT seq FROM audit_log ORDER BY seq").fetchall()]
        # A change: someone edits who did it.
        conn.execute("UPDATE audit_log SET agent = 'someone-else' WHERE seq = %s", (seqs[1],))
        report = audit.verify(conn)
        assert [p for p in report.problems if "changed" in p] and f"entry {seqs[1]} " in report.problems[0]
        conn.execute("UPDATE audit_log SET agent = 'dr-who' WHERE seq = %s", (seqs[1],))
        assert audit.verify(conn).ok
        # A deletion.
        saved = conn.execute("SELECT * FROM audit_log WHERE seq = %s", (seqs[2],)).fetchone()
        conn.execute("DELETE FROM audit_log WHERE seq = %s", (seqs[2],))
        report = audit.verify(conn)
        assert report.problems == [f"entry {seqs[2]} (position 3) was deleted from the audit log"]
        conn.execute(f"INSERT INTO audit_log VALUES ({', '.join('%s' for _ in saved)})", saved)
        assert audit.verify(conn).ok
        # An insertion into the past: an entry claiming an old transaction.
        old_xid = conn.execute("SELECT xid FROM audit_log WHERE seq = %s", (seqs[0],)).fetchone()[0]
        conn.execute("INSERT INTO audit_log (xid, recorded, action, outcome, agent) VALUES (%s, now(), 'read', '0', 'forger')", (old_xid,))
    await _seal(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        report = audit.verify(conn)
        # Never sealed (it sorts before sealed entries) or sealed out of order: either way reported.
        assert any("into the past" in p or "out of order" in p for p in report.problems), report.problems


def test_cli_verify(pg_uri, monkeypatch) -> None:
    from typer.testing import CliRunner

    from parcours.cli.main import app

    monkeypatch.setenv("DATABASE_URL", pg_uri)
    result = CliRunner().invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "intact" in result.output
