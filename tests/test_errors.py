"""Bad requests get an OperationOutcome with the right status, and change nothing.

After every failing write the test looks at search and history to check that
nothing was written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest_asyncio

from parcours.security import tokens

try:
    from tests.conftest import BASE, uniq
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest import BASE, uniq

SYS = "urn:oid:1.2.250.1.213.1.4.8"
JSON = {"Content-Type": "application/fhir+json"}


def patient(ident: str, **extra: object) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYS, "value": ident}], "name": [{"family": "Durand"}], **extra}


def outcome(r: httpx.Response, status: int) -> list[dict]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and all(i["severity"] in ("error", "fatal") for i in body["issue"])
    return body["issue"]


async def nothing_with(client, ident: str) -> None:
    """No Patient carries the identifier, and no version of one was ever written."""
    r = await client.get("/fhir/Patient", params={"identifier": f"{SYS}|{ident}"})
    assert r.status_code == 200 and r.json().get("entry", []) == []
    h = await client.get("/fhir/Patient/_history", params={"_count": 200})
    assert ident not in h.text


async def unchanged(client, rtype: str, rid: str, version: int) -> None:
    r = await client.get(f"/fhir/{rtype}/{rid}")
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == str(version)
    h = (await client.get(f"/fhir/{rtype}/{rid}/_history")).json()
    assert len(h["entry"]) == version


async def test_malformed_json_is_400(client) -> None:
    ident = uniq()
    for body in (b'{"resourceType": "Patient", "identifier": [{"value": "' + ident.encode() + b'"}', b"", b"   ", b"\xff\xfe"):
        issues = outcome(await client.post("/fhir/Patient", content=body, headers=JSON), 400)
        assert issues[0]["code"] in ("structure", "invalid")
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    outcome(await client.put(f"/fhir/Patient/{p['id']}", content=b"{not json", headers=JSON), 400)
    outcome(await client.patch(f"/fhir/Patient/{p['id']}", content=b"[{", headers={"Content-Type": "application/json-patch+json"}), 400)
    await unchanged(client, "Patient", p["id"], 1)
    await nothing_with(client, ident)


async def test_not_a_resource_of_the_type_is_400(client) -> None:
    ident = uniq()
    for body in ([patient(ident)], "Patient", None, {"identifier": [{"value": ident}]}):
        outcome(await client.post("/fhir/Patient", content=orjson.dumps(body), headers=JSON), 400)
    issues = outcome(await client.post("/fhir/Patient", json={**patient(ident), "resourceType": "Observation"}, headers=JSON), 400)
    assert issues[0]["expression"] == ["resourceType"]
    await nothing_with(client, ident)


async def test_invalid_resource_is_422_with_expressions(client) -> None:
    ident = uniq()
    body = patient(ident, gender="robot", birthDate="1990-13-45", active="yes", unknownElement=1)
    issues = outcome(await client.post("/fhir/Patient", json=body, headers=JSON), 422)
    exprs = {x for i in issues for x in i.get("expression", [])}
    assert {"Patient.gender", "Patient.birthDate", "Patient.active", "Patient.unknownElement"} <= exprs
    await nothing_with(client, ident)
    # Same on update: the stored resource stays as it was.
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    issues = outcome(await client.put(f"/fhir/Patient/{p['id']}", json={**p, "name": [{"family": 3}]}, headers=JSON), 422)
    assert any(x.startswith("Patient.name[0].family") for i in issues for x in i.get("expression", []))
    await unchanged(client, "Patient", p["id"], 1)


async def test_unknown_type_and_unknown_id_are_404(client) -> None:
    issues = outcome(await client.get("/fhir/Patient/" + uniq("nobody")), 404)
    assert issues[0]["code"] == "not-found"
    for r in (await client.get("/fhir/Patientt/1"), await client.get("/fhir/Patientt"),
              await client.post("/fhir/Patientt", json={"resourceType": "Patientt"}, headers=JSON),
              await client.put("/fhir/Patientt/1", json={"resourceType": "Patientt", "id": "1"}, headers=JSON),
              await client.delete("/fhir/Patientt/1"), await client.get("/fhir/Patientt/1/_history")):
        outcome(r, 404)
    outcome(await client.get("/fhir/Patient/x/y/z"), 404)
    outcome(await client.patch(f"/fhir/Patient/{uniq('nobody')}", json=[], headers={"Content-Type": "application/json-patch+json"}), 404)


async def test_methods_not_allowed_are_405(client) -> None:
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    r = await client.post(f"/fhir/Patient/{p['id']}", json=p, headers=JSON)
    outcome(r, 405)
    assert "PUT" in r.headers.get("allow", "")
    outcome(await client.delete(f"/fhir/Patient/{p['id']}/_history/1"), 405)
    outcome(await client.put("/fhir/metadata", json={}, headers=JSON), 405)
    outcome(await client.delete("/fhir/Patient/_history"), 405)
    await unchanged(client, "Patient", p["id"], 1)


async def test_deleted_is_410(client) -> None:
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    await client.delete(f"/fhir/Patient/{p['id']}")
    issues = outcome(await client.get(f"/fhir/Patient/{p['id']}"), 410)
    assert issues[0]["code"] == "deleted"
    outcome(await client.patch(f"/fhir/Patient/{p['id']}", json=[{"op": "add", "path": "/active", "value": True}],
                               headers={"Content-Type": "application/json-patch+json"}), 410)
    assert len((await client.get(f"/fhir/Patient/{p['id']}/_history")).json()["entry"]) == 2


async def test_preconditions(client) -> None:
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    url = f"/fhir/Patient/{p['id']}"
    # Stale version: 412. A malformed ETag is a bad request, not a failed precondition.
    outcome(await client.put(url, json=p, headers={**JSON, "If-Match": 'W/"2"'}), 412)
    for tag in ('W/"abc"', "W/", '"1.5"', "version-1"):
        issues = outcome(await client.put(url, json=p, headers={**JSON, "If-Match": tag}), 400)
        assert "If-Match" in issues[0]["diagnostics"]
        outcome(await client.patch(url, json=[], headers={"Content-Type": "application/json-patch+json", "If-Match": tag}), 400)
        outcome(await client.delete(url, headers={"If-Match": tag}), 400)
    # If-Match on an id that does not exist cannot hold.
    rid = uniq("pid")
    outcome(await client.put(f"/fhir/Patient/{rid}", json={**p, "id": rid}, headers={**JSON, "If-Match": 'W/"1"'}), 412)
    outcome(await client.get(f"/fhir/Patient/{rid}"), 404)
    await unchanged(client, "Patient", p["id"], 1)


async def test_unsupported_media_types_are_415(client) -> None:
    ident = uniq()
    body = orjson.dumps(patient(ident))
    for ctype in ("text/plain", "application/fhir+xml", "application/xml", "application/x-www-form-urlencoded", "multipart/form-data"):
        outcome(await client.post("/fhir/Patient", content=body, headers={"Content-Type": ctype}), 415)
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    outcome(await client.put(f"/fhir/Patient/{p['id']}", content=orjson.dumps(p), headers={"Content-Type": "text/plain"}), 415)
    outcome(await client.patch(f"/fhir/Patient/{p['id']}", content=b"[]", headers={"Content-Type": "text/plain"}), 415)
    outcome(await client.post("/fhir", content=b"{}", headers={"Content-Type": "text/xml"}), 415)
    await nothing_with(client, ident)
    await unchanged(client, "Patient", p["id"], 1)


async def test_xml_is_not_acceptable(client) -> None:
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    outcome(await client.get(f"/fhir/Patient/{p['id']}", params={"_format": "xml"}), 406)
    outcome(await client.get(f"/fhir/Patient/{p['id']}", headers={"Accept": "application/fhir+xml"}), 406)
    r = await client.get(f"/fhir/Patient/{p['id']}", params={"_format": "json"})
    assert r.status_code == 200


async def test_authentication_and_scopes(anon, app, platform) -> None:
    outcome(await anon.post("/fhir/Patient", json=patient(uniq()), headers=JSON), 401)
    outcome(await anon.get("/fhir/Patient/x", headers={"Authorization": "Bearer not-a-token"}), 401)
    token = tokens.issue(platform.token_key, subject="reader", kind="system", scopes=["system/Patient.read"])
    ident = uniq()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers={"Authorization": f"Bearer {token}"}) as reader:
        outcome(await reader.post("/fhir/Patient", json=patient(ident), headers=JSON), 403)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient(ident), "request": {"method": "POST", "url": "Patient"}}]}
        outcome(await reader.post("/fhir", json=bundle, headers=JSON), 403)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {tokens.issue(platform.token_key, subject='t', kind='system', scopes=['system/*.*'])}"}) as c:
        await nothing_with(c, ident)


# -- size limits ----------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module")
async def small(platform, system_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """The same platform with tiny size limits, in an app of its own."""
    from parcours.web.app import create_app

    settings = platform.settings.model_copy(update={"max_resource_bytes": 2_000, "max_bundle_bytes": 6_000, "max_bundle_entries": 5})
    app = create_app(settings, platform=dataclasses.replace(platform, settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers={"Authorization": f"Bearer {system_token}"}) as c:
        yield c


async def test_too_large_is_413(small) -> None:
    ident = uniq()
    big = patient(ident, name=[{"family": "x" * 3_000}])
    issues = outcome(await small.post("/fhir/Patient", json=big, headers=JSON), 413)
    assert issues[0]["code"] == "too-costly"

    async def chunks():  # no Content-Length: the limit holds while streaming too
        data = orjson.dumps(big)
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    outcome(await small.post("/fhir/Patient", content=chunks(), headers=JSON), 413)
    ok = await small.post("/fhir/Patient", json=patient(uniq()), headers=JSON)
    assert ok.status_code == 201
    p = ok.json()
    outcome(await small.put(f"/fhir/Patient/{p['id']}", json={**big, "id": p["id"]}, headers=JSON), 413)
    # Bundles have their own, larger byte limit, and an entry limit.
    entry = {"resource": patient(ident), "request": {"method": "POST", "url": "Patient"}}
    outcome(await small.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry] * 6}, headers=JSON), 413)
    outcome(await small.post("/fhir", json={"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient(ident, text={"status": "generated", "div": "<div>" + "y" * 7_000 + "</div>"}), "request": {"method": "POST", "url": "Patient"}}]},
        headers=JSON), 413)
    await nothing_with(small, ident)
    await unchanged(small, "Patient", p["id"], 1)


async def test_errors_outside_fhir_are_json(client) -> None:
    r = await client.get("/nowhere")
    assert r.status_code == 404
    assert r.json().get("resourceType") != "OperationOutcome"
