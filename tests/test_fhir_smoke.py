"""The FHIR API answers the basic interactions over ASGI against real PostgreSQL."""

from __future__ import annotations

from tests.conftest import uniq


async def test_create_read_search(client) -> None:
    ident = uniq("ins")
    body = {"resourceType": "Patient", "name": [{"family": "Lefèvre", "given": ["Hélène"]}], "gender": "female",
            "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": ident}]}
    r = await client.post("/fhir/Patient", json=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["meta"]["versionId"] == "1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/Patient/{created['id']}/_history/1")
    r = await client.get(f"/fhir/Patient/{created['id']}")
    assert r.status_code == 200 and r.json()["name"][0]["family"] == "Lefèvre"
    r = await client.get("/fhir/Patient", params={"identifier": f"urn:oid:1.2.250.1.213.1.4.8|{ident}", "name": "helene"})
    bundle = r.json()
    assert bundle["type"] == "searchset"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [created["id"]]


async def test_requires_authentication(anon) -> None:
    r = await anon.get("/fhir/Patient")
    assert r.status_code == 401
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "Bearer" in r.headers["www-authenticate"]


async def test_metadata_is_public(anon) -> None:
    r = await anon.get("/fhir/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["fhirVersion"] == "4.0.1"
    types = {res["type"] for res in cs["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Appointment", "Slot"} <= types
