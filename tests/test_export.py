"""Bulk Data $export: kick-off, polling, manifest, NDJSON files, cancel, access, and the job queue.

The tests run on a platform whose files hold at most 2 resources, so splitting is
exercised everywhere. Jobs are run by a worker started for each test (the ASGI
client does not run the app lifespan); the last test goes through a real server,
whose lifespan runs its own worker. Expected contents are computed from what each
test created, never from the server's answers; ``_since`` and unique data keep
tests apart in the shared database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import pytest_asyncio

from parcours.core.settings import Settings
from parcours.security import tokens
from parcours.services import export
from parcours.services.platform import Platform
from parcours.store import export_jobs
from tests.conftest import BASE, uniq

FILE_LINES = 2
JSON = {"Content-Type": "application/fhir+json"}
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}


@pytest_asyncio.fixture(scope="module")
async def xplatform(pg_uri: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    s = Settings(database_url=pg_uri, base_url=BASE, home=tmp_path_factory.mktemp("export-home"),
                 export_file_lines=FILE_LINES, export_worker=False)
    p = await Platform.start(s)
    yield p
    await p.close()


@pytest_asyncio.fixture(scope="module")
async def xc(xplatform: Platform, system_token: str) -> AsyncIterator[httpx.AsyncClient]:
    from parcours.web.app import create_app

    app = create_app(xplatform.settings, platform=xplatform)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {system_token}"}) as c:
        yield c


@pytest_asyncio.fixture
async def worker(xplatform: Platform) -> AsyncIterator[export.Worker]:
    w = export.Worker(xplatform, poll_interval=0.2)
    task = asyncio.create_task(w.run())
    yield w
    w.stop.set()
    await asyncio.wait_for(task, 10)


def token_for(platform: Platform, subject: str, scopes: list[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.issue(platform.token_key, subject=subject, kind='system', scopes=scopes)}"}


async def create(c: httpx.AsyncClient, body: dict) -> dict:
    r = await c.post(f"/fhir/{body['resourceType']}", json=body, headers=JSON)
    assert r.status_code == 201, r.text
    return r.json()


async def patient(c: httpx.AsyncClient, tag: str) -> dict:
    return await create(c, {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": tag}], "name": [{"family": tag}]})


async def observation(c: httpx.AsyncClient, subject: dict | None, tag: str) -> dict:
    body: dict = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "urn:test", "code": tag}]}}
    if subject is not None:
        body["subject"] = {"reference": f"Patient/{subject['id']}"}
    return await create(c, body)


async def kick_off(c: httpx.AsyncClient, path: str = "/fhir/$export", **params: str) -> str:
    r = await c.get(path, params=params, headers=ASYNC)
    assert r.status_code == 202, r.text
    return r.headers["content-location"]


async def wait_done(c: httpx.AsyncClient, status_url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await c.get(status_url)
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("application/json")
            return r.json()
        assert r.status_code == 202, r.text
        assert r.headers["x-progress"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"export {status_url} not done after {timeout} s")


async def download(c: httpx.AsyncClient, manifest: dict) -> dict[str, list[dict]]:
    """Resources by type, from every output file; checks each file's count."""
    out: dict[str, list[dict]] = {}
    for item in manifest["output"]:
        r = await c.get(item["url"])
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/fhir+ndjson")
        lines = [orjson.loads(line) for line in r.text.splitlines() if line]
        assert len(lines) == item["count"] and 0 < item["count"] <= FILE_LINES
        assert {x["resourceType"] for x in lines} == {item["type"]}
        out.setdefault(item["type"], []).extend(lines)
    return out


def ids(resources: list[dict]) -> set[str]:
    return {r["id"] for r in resources}


def since_now() -> str:
    return datetime.now(UTC).isoformat()


async def test_system_export_roundtrip(xc, worker) -> None:
    t0 = since_now()
    tag = uniq("exp")
    pats = [await patient(xc, f"{tag}-{i}") for i in range(3)]
    obs = [await observation(xc, pats[i % 3], f"{tag}-o{i}") for i in range(5)]
    updated = {**pats[0], "gender": "female"}
    assert (await xc.put(f"/fhir/Patient/{updated['id']}", json=updated, headers=JSON)).status_code == 200
    gone = await patient(xc, f"{tag}-gone")
    assert (await xc.delete(f"/fhir/Patient/{gone['id']}")).status_code in (200, 204)

    status_url = await kick_off(xc, _type="Patient,Observation", _since=t0)
    assert status_url.startswith(f"{BASE}/fhir/$export-status/")
    manifest = await wait_done(xc, status_url)

    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"].startswith(f"{BASE}/fhir/$export?") and "_type=Patient%2CObservation" in manifest["request"]
    assert datetime.fromisoformat(manifest["transactionTime"]) >= datetime.fromisoformat(t0)
    assert manifest["error"] == []
    assert all(set(o) == {"type", "url", "count"} for o in manifest["output"])
    # At most FILE_LINES resources a file: 3 patients make two Patient files.
    assert sorted(o["count"] for o in manifest["output"] if o["type"] == "Patient") == [1, 2]
    got = await download(xc, manifest)
    assert set(got) == {"Patient", "Observation"}
    assert ids(got["Patient"]) == ids(pats) and len(got["Patient"]) == 3
    assert ids(got["Observation"]) == ids(obs) and len(got["Observation"]) == 5
    exported = {p["id"]: p for p in got["Patient"]}
    assert exported[updated["id"]]["gender"] == "female" and exported[updated["id"]]["meta"]["versionId"] == "2"
    assert sum(o["count"] for o in manifest["output"]) == 8


async def test_since_and_type(xc, worker) -> None:
    tag = uniq("since")
    before = await patient(xc, f"{tag}-a")
    await observation(xc, before, f"{tag}-oa")
    await asyncio.sleep(0.01)
    t1 = since_now()
    after = await patient(xc, f"{tag}-b")
    obs_after = await observation(xc, after, f"{tag}-ob")

    got = await download(xc, await wait_done(xc, await kick_off(xc, _since=t1, _type="Patient")))
    assert set(got) == {"Patient"} and ids(got["Patient"]) == {after["id"]}
    got = await download(xc, await wait_done(xc, await kick_off(xc, _since=t1, _type="Observation")))
    assert set(got) == {"Observation"} and ids(got["Observation"]) == {obs_after["id"]}


async def test_patient_export_keeps_to_the_compartment(xc, worker) -> None:
    t0 = since_now()
    tag = uniq("pexp")
    p = await patient(xc, tag)
    o = await observation(xc, p, f"{tag}-o")
    await observation(xc, None, f"{tag}-nobody")  # in no compartment
    await create(xc, {"resourceType": "Practitioner", "name": [{"family": tag}]})
    await create(xc, {"resourceType": "Organization", "name": tag})

    manifest = await wait_done(xc, await kick_off(xc, "/fhir/Patient/$export", _since=t0))
    assert manifest["request"].startswith(f"{BASE}/fhir/Patient/$export")
    got = await download(xc, manifest)
    # AuditEvents are in the Patient compartment too: those about patients' data (this test's or
    # another's) appear once the audit trail has materialized them (in the background, since t0).
    audit = got.pop("AuditEvent", [])
    assert all(any(e.get("what", {}).get("reference", "").startswith("Patient/") for e in a.get("entity", [])) for a in audit)
    assert set(got) == {"Patient", "Observation"}
    assert ids(got["Patient"]) == {p["id"]} and ids(got["Observation"]) == {o["id"]}


async def test_group_export(xc, worker) -> None:
    tag = uniq("gexp")
    p1, p2, p3 = [await patient(xc, f"{tag}-{i}") for i in range(3)]
    o1, o2, _o3 = [await observation(xc, p, f"{tag}-o") for p in (p1, p2, p3)]
    enc = await create(xc, {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                            "subject": {"reference": f"Patient/{p2['id']}"}})
    group = await create(xc, {"resourceType": "Group", "type": "person", "actual": True, "member": [
        {"entity": {"reference": f"Patient/{p1['id']}"}}, {"entity": {"reference": f"Patient/{p2['id']}"}},
        {"entity": {"reference": f"Patient/{p3['id']}"}, "inactive": True}]})

    got = await download(xc, await wait_done(xc, await kick_off(xc, f"/fhir/Group/{group['id']}/$export")))
    assert ids(got["Patient"]) == {p1["id"], p2["id"]}
    assert ids(got["Observation"]) == {o1["id"], o2["id"]}
    assert ids(got["Encounter"]) == {enc["id"]}
    assert ids(got["Group"]) == {group["id"]}  # a Group is in its members' compartments
    # The audit trail of these patients belongs to their compartment too (AuditEvent.patient).
    audit_events = got.pop("AuditEvent", [])
    for ev in audit_events:
        assert {e["what"]["reference"] for e in ev["entity"] if e.get("role", {}).get("code") == "1"} <= {f"Patient/{p1['id']}", f"Patient/{p2['id']}"}
    assert set(got) == {"Patient", "Observation", "Encounter", "Group"}

    got = await download(xc, await wait_done(xc, await kick_off(xc, f"/fhir/Group/{group['id']}/$export", _type="Observation")))
    assert set(got) == {"Observation"} and ids(got["Observation"]) == {o1["id"], o2["id"]}


async def test_kick_off_errors(xc) -> None:
    r = await xc.get("/fhir/$export", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 400 and "respond-async" in r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    for params, needle in [({"_outputFormat": "application/fhir+json"}, "_outputFormat"),
                           ({"_outputFormat": "text/csv"}, "_outputFormat"),
                           ({"_type": "Patient,NoSuchType"}, "NoSuchType"),
                           ({"_since": "last tuesday"}, "_since")]:
        r = await xc.get("/fhir/$export", params=params, headers=ASYNC)
        assert r.status_code == 400, (params, r.text)
        assert needle in r.text
    r = await xc.get("/fhir/Patient/$export", params={"_type": "Organization"}, headers=ASYNC)
    assert r.status_code == 400 and "compartment" in r.text
    r = await xc.get("/fhir/$export", params={"_typeFilter": "Patient?active=true"}, headers={**ASYNC, "Prefer": "respond-async, handling=strict"})
    assert r.status_code == 400 and "_typeFilter" in r.text
    r = await xc.get(f"/fhir/Group/{uniq('nogroup')}/$export", headers=ASYNC)
    assert r.status_code == 404


async def test_output_formats_and_ignored_parameters(xc, worker) -> None:
    t0 = since_now()
    p = await patient(xc, uniq("fmt"))
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        manifest = await wait_done(xc, await kick_off(xc, _type="Patient", _since=t0, _outputFormat=fmt))
        assert ids((await download(xc, manifest))["Patient"]) == {p["id"]}
    # Unsupported optional parameters are ignored, with a warning in the error files.
    manifest = await wait_done(xc, await kick_off(xc, _type="Patient", _since=t0, _elements="id"))
    assert [e["type"] for e in manifest["error"]] == ["OperationOutcome"]
    r = await xc.get(manifest["error"][0]["url"])
    assert r.status_code == 200 and "_elements" in r.text
    assert orjson.loads(r.text.splitlines()[0])["issue"][0]["severity"] == "warning"


async def test_scopes_limit_what_is_exported(xc, xplatform, worker) -> None:
    t0 = since_now()
    p = await patient(xc, uniq("scope"))
    await observation(xc, p, uniq("scope-o"))
    limited = token_for(xplatform, uniq("limited"), ["system/Patient.read"])
    r = await xc.get("/fhir/$export", params={"_type": "Patient,Observation", "_since": t0}, headers={**ASYNC, **limited})
    assert r.status_code == 202
    status_url = r.headers["content-location"]
    deadline = time.monotonic() + 20
    while (r := await xc.get(status_url, headers=limited)).status_code == 202 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert r.status_code == 200, r.text
    manifest = r.json()
    assert [o["type"] for o in manifest["output"]] == ["Patient"]
    r = await xc.get(manifest["error"][0]["url"], headers=limited)
    assert r.status_code == 200 and "Observation" in r.text
    # The job and its files belong to the client that asked for them.
    assert (await xc.get(status_url)).status_code == 404
    assert (await xc.get(manifest["output"][0]["url"])).status_code == 404
    assert (await xc.get(manifest["output"][0]["url"], headers=limited)).status_code == 200


async def test_download_requires_a_token(xc, anon, worker) -> None:
    t0 = since_now()
    await patient(xc, uniq("auth"))
    status_url = await kick_off(xc, _type="Patient", _since=t0)
    manifest = await wait_done(xc, status_url)
    url = manifest["output"][0]["url"]
    assert (await anon.get(url)).status_code == 401
    assert (await anon.get(status_url)).status_code == 401
    assert (await anon.delete(status_url)).status_code == 401
    assert (await anon.get("/fhir/$export", headers=ASYNC)).status_code == 401
    assert (await xc.get(url)).status_code == 200


async def test_cancel(xc) -> None:
    status_url = await kick_off(xc, _type="Patient")
    r = await xc.get(status_url)
    assert r.status_code in (200, 202)  # waiting, running or done: DELETE ends it in every case
    assert (await xc.delete(status_url)).status_code == 202
    assert (await xc.get(status_url)).status_code == 404
    assert (await xc.delete(status_url)).status_code == 404


async def test_delete_after_completion_removes_the_files(xc, worker) -> None:
    t0 = since_now()
    await patient(xc, uniq("del"))
    status_url = await kick_off(xc, _type="Patient", _since=t0)
    manifest = await wait_done(xc, status_url)
    url = manifest["output"][0]["url"]
    assert (await xc.get(url)).status_code == 200
    assert (await xc.delete(status_url)).status_code == 202
    assert (await xc.get(status_url)).status_code == 404
    assert (await xc.get(url)).status_code == 404


async def held_job(p: Platform, system_token: str, holder: str, heartbeat: datetime, **params: str) -> dict:
    """A job held by the worker ``holder``: queued and claimed in one transaction, so that
    no other worker (a live server's, for one) ever sees it waiting."""
    caller = tokens.verify(p.token_key, system_token)
    req = export.check_request(p, "system", list(params.items()), request_url=f"{BASE}/fhir/$export",
                               respond_async=True, strict=False)
    job = export.new_job(p, caller, req)
    directory = p.settings.resolved_home() / "exports" / job["id"]
    directory.mkdir(parents=True)
    async with p.pool.connection() as conn:
        async with conn.transaction():
            await export_jobs.insert_job(conn, job)
            await conn.execute("UPDATE export_job SET status = 'running', worker = %s, heartbeat = %s, attempts = 1, "
                               "directory = %s WHERE id = %s", (holder, heartbeat, str(directory), job["id"]))
        return await export_jobs.get_job(conn, job["id"])


async def test_cancel_while_running_stops_the_worker(xc, xplatform, system_token) -> None:
    w = export.Worker(xplatform)
    job = await held_job(xplatform, system_token, w.name, datetime.now(UTC))
    status_url = f"{BASE}/fhir/$export-status/{job['id']}"
    assert (await xc.get(status_url)).status_code == 202
    assert (await xc.delete(status_url)).status_code == 202
    assert (await xc.get(status_url)).status_code == 404
    # The worker finds out at its next heartbeat, stops, and removes the job and its files.
    with pytest.raises(export.JobStopped):
        await w._beat(job, "1/2 types")
    await w._abandon(job)
    async with xplatform.pool.connection() as conn:
        assert await export_jobs.get_job(conn, job["id"]) is None
    assert not (xplatform.settings.resolved_home() / "exports" / job["id"]).exists()


async def test_a_job_whose_worker_died_is_taken_over(xc, xplatform, system_token) -> None:
    t0 = since_now()
    p = await patient(xc, uniq("lease"))
    # Its worker claimed it long ago and never beat again.
    job = await held_job(xplatform, system_token, "dead-worker", datetime(2000, 1, 1, tzinfo=UTC), _type="Patient", _since=t0)
    status_url = f"{BASE}/fhir/$export-status/{job['id']}"
    assert (await xc.get(status_url)).status_code == 202
    w = export.Worker(xplatform)
    deadline = time.monotonic() + 20
    while (await xc.get(status_url)).status_code == 202 and time.monotonic() < deadline:
        if not await w.run_once():
            await asyncio.sleep(0.05)
    manifest = await wait_done(xc, status_url)
    assert ids((await download(xc, manifest))["Patient"]) == {p["id"]}
    async with xplatform.pool.connection() as conn:
        assert (await export_jobs.get_job(conn, job["id"]))["attempts"] == 2


async def test_workers_share_the_queue_without_running_a_job_twice(xc, xplatform) -> None:
    t0 = since_now()
    await patient(xc, uniq("queue"))
    urls = [await kick_off(xc, _type="Patient", _since=t0) for _ in range(4)]
    workers = [export.Worker(xplatform) for _ in range(3)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await asyncio.gather(*(w.run_once() for w in workers))
        if [(await xc.get(u)).status_code for u in urls] == [200] * len(urls):
            break
    async with xplatform.pool.connection() as conn:
        rows = [await export_jobs.get_job(conn, u.rsplit("/", 1)[1]) for u in urls]
    assert all(r is not None and r["status"] == export_jobs.DONE and r["attempts"] == 1 for r in rows)


def test_server_runs_export_jobs_in_its_lifespan(live_server: str, live_token: str) -> None:
    auth = {"Authorization": f"Bearer {live_token}"}
    with httpx.Client(base_url=live_server, headers=auth, timeout=10) as c:
        t0 = since_now()
        r = c.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": uniq("live")}]}, headers=JSON)
        assert r.status_code == 201
        pid = r.json()["id"]
        r = c.get("/fhir/$export", params={"_type": "Patient", "_since": t0}, headers=ASYNC)
        assert r.status_code == 202
        status_url = r.headers["content-location"]
        assert status_url.startswith(f"{live_server}/fhir/$export-status/")
        deadline = time.monotonic() + 20
        while (r := c.get(status_url)).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        files = r.json()["output"]
        got = [orjson.loads(line) for f in files for line in c.get(f["url"]).text.splitlines() if line]
        assert {x["id"] for x in got} == {pid}
        assert httpx.get(files[0]["url"]).status_code == 401


async def test_a_failing_job_answers_500(xc, worker, monkeypatch) -> None:
    async def disk_full(self, batch) -> None:  # type: ignore[no-untyped-def]
        raise OSError("No space left on device")

    monkeypatch.setattr(export._TypeFiles, "write", disk_full)
    t0 = since_now()
    await patient(xc, uniq("fail"))
    status_url = await kick_off(xc, _type="Patient", _since=t0)
    deadline = time.monotonic() + 20
    while (r := await xc.get(status_url)).status_code == 202 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert r.status_code == 500
    assert r.json()["resourceType"] == "OperationOutcome" and "No space left" in r.text
    monkeypatch.undo()
    # The export's cursor was closed on its own connection: the pool still serves.
    assert (await xc.get("/fhir/Patient", params={"_count": "1"})).status_code == 200
    assert (await xc.delete(status_url)).status_code == 202


async def test_migration_matches_the_job_table(xplatform) -> None:
    async with xplatform.pool.connection() as conn:
        cur = await conn.execute("SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'export_job'")
        migrated = {name: nullable == "YES" for name, nullable in await cur.fetchall()}
    declared = {c.name: bool(c.nullable) for c in export_jobs.export_job.columns}
    assert migrated == declared
