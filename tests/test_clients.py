"""Real FHIR clients from PyPI against a real server over HTTP, and the command line.

* fhirpy (AsyncFHIRClient, aiohttp) and fhirclient (the SMART Python client,
  requests, strict R4 models) against the ``live_server`` fixture;
* ``parcours token`` and ``parcours serve`` in subprocesses on a fresh database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psycopg
import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

try:
    from tests.conftest import free_port, uniq
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest import free_port, uniq

SYS = "urn:oid:1.2.250.1.213.1.4.8"


# -- fhirpy ---------------------------------------------------------------------------------
async def test_fhirpy_async_client(live_server: str, live_token: str) -> None:
    client = AsyncFHIRClient(f"{live_server}/fhir", authorization=f"Bearer {live_token}")
    ident = uniq()
    # create
    p = client.resource("Patient", identifier=[{"system": SYS, "value": ident}], name=[{"family": "Moreau", "given": ["Léa"]}], gender="female")
    await p.save()
    assert p.id and p["meta"]["versionId"] == "1"
    # read
    got = await client.reference("Patient", p.id).to_resource()
    assert got["name"][0]["given"] == ["Léa"]
    # search
    found = await client.resources("Patient").search(identifier=f"{SYS}|{ident}").fetch_all()
    assert [r.id for r in found] == [p.id]
    assert await client.resources("Patient").search(identifier=f"{SYS}|{ident}").count() == 1
    # update
    p["birthDate"] = "1990-04-01"
    await p.save()
    assert p["meta"]["versionId"] == "2"
    assert (await client.reference("Patient", p.id).to_resource())["birthDate"] == "1990-04-01"
    # refresh sends If-None-Match with the version: 304 keeps the resource as it is
    await p.refresh()
    assert p["birthDate"] == "1990-04-01"
    # patch (fhirpy sends a partial resource: a merge patch)
    await p.patch(active=True)
    assert (await client.reference("Patient", p.id).to_resource())["active"] is True
    # $validate
    assert await p.is_valid()
    assert not await client.resource("Patient", gender="robot").is_valid()
    # conditional create and conditional update through the search set
    again, created = await client.resources("Patient").search(identifier=f"{SYS}|{ident}").get_or_create(
        client.resource("Patient", identifier=[{"system": SYS, "value": ident}]))
    assert not created and again.id == p.id
    other = uniq()
    made, created = await client.resources("Patient").search(identifier=f"{SYS}|{other}").update(
        client.resource("Patient", identifier=[{"system": SYS, "value": other}], gender="male"))
    assert created and made["gender"] == "male"
    # delete
    await p.delete()
    with pytest.raises(ResourceNotFound):
        await client.reference("Patient", p.id).to_resource()
    assert await client.resources("Patient").search(identifier=f"{SYS}|{ident}").fetch() == []


async def test_fhirpy_transaction_and_paging(live_server: str, live_token: str) -> None:
    client = AsyncFHIRClient(f"{live_server}/fhir", authorization=f"Bearer {live_token}")
    tag = uniq("page")
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "meta": {"tag": [{"system": "urn:test", "code": tag}]}, "name": [{"family": f"P{i}"}]}}
               for i in range(7)]
    out = await client.execute("", method="post", data={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert out["type"] == "transaction-response" and len(out["entry"]) == 7
    # fhirpy follows the next links of the searchset.
    names = [p["name"][0]["family"] async for p in client.resources("Patient").search(_tag=f"urn:test|{tag}").limit(3)]
    assert sorted(names) == [f"P{i}" for i in range(7)]


# -- fhirclient (SMART) ---------------------------------------------------------------------
def _smart(live_server: str, live_token: str):  # type: ignore[no-untyped-def]
    from fhirclient import client

    smart = client.FHIRClient(settings={"app_id": "parcours-tests", "api_base": f"{live_server}/fhir/"})
    smart.server.session.headers["Authorization"] = f"Bearer {live_token}"
    return smart


def _fhirclient_roundtrip(live_server: str, live_token: str) -> None:
    import requests
    from fhirclient.models.bundle import Bundle
    from fhirclient.models.capabilitystatement import CapabilityStatement
    from fhirclient.models.patient import Patient

    smart = _smart(live_server, live_token)
    # The CapabilityStatement parses with the client's strict R4 models.
    cs = CapabilityStatement.read_from("metadata", smart.server)
    assert cs.fhirVersion == "4.0.1"
    assert "Patient" in {r.type for r in cs.rest[0].resource}
    ident = uniq()
    # create
    p = Patient({"identifier": [{"system": SYS, "value": ident}], "name": [{"family": "Petit", "given": ["Jules"]}], "gender": "male"})
    created = p.create(smart.server)
    assert created["resourceType"] == "Patient" and created["meta"]["versionId"] == "1"
    pid = created["id"]
    # read: the answer parses into the strict R4 model
    got = Patient.read(pid, smart.server)
    assert got.name[0].given == ["Jules"] and got.meta.versionId == "1"
    # search
    found = list(Patient.where(struct={"identifier": f"{SYS}|{ident}"}).perform_resources_iter(smart.server))
    assert [x.id for x in found] == [pid]
    bundle = next(Patient.where(struct={"identifier": f"{SYS}|{ident}"}).perform_iter(smart.server))
    assert isinstance(bundle, Bundle) and bundle.total == 1
    # update
    got.birthDate = None
    got.gender = "other"
    updated = got.update(smart.server)
    assert updated["meta"]["versionId"] == "2"
    assert Patient.read(pid, smart.server).gender == "other"
    # history parses as a Bundle too
    hist = Bundle(smart.server.request_json(f"Patient/{pid}/_history"))
    assert [e.request.method for e in hist.entry] == ["PUT", "POST"]
    # delete
    got.delete(smart.server)
    with pytest.raises(requests.HTTPError) as gone:
        Patient.read(pid, smart.server)
    assert gone.value.response.status_code == 410
    assert list(Patient.where(struct={"identifier": f"{SYS}|{ident}"}).perform_resources_iter(smart.server)) == []


async def test_fhirclient_smart_client(live_server: str, live_token: str) -> None:
    await asyncio.to_thread(_fhirclient_roundtrip, live_server, live_token)


# -- the command line -----------------------------------------------------------------------
@pytest.fixture
def fresh_database(pg_uri: str):  # type: ignore[no-untyped-def]
    name = f"parcours_cli_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlparse(pg_uri)._replace(path="/" + name).geturl()
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_cli_serve_and_token(fresh_database: str, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("parcours")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARCOURS_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=fresh_database, PARCOURS_HOME=str(tmp_path))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Both commands migrate the fresh database first (serialised by an advisory lock): start them together.
    server = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        minted = subprocess.run([str(exe), "token", "--scope", "system/*.*"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert token.count(".") == 2  # a JWT, alone on stdout
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "parcours serve did not answer /healthz"
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
        r = httpx.post(f"{base}/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Roux"}]}, headers=headers)
        assert r.status_code == 201, r.text
        assert r.headers["location"].startswith(f"{base}/fhir/Patient/")  # the base URL follows --host/--port
        r = httpx.get(f"{base}/fhir/Patient/{r.json()['id']}", headers=headers)
        assert r.status_code == 200 and r.json()["name"][0]["family"] == "Roux"
        assert httpx.get(f"{base}/fhir/Patient", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    output = server.stdout.read() if server.stdout else ""
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM.
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output and "ERROR" not in output, output
