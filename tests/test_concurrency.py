"""Optimistic locking under real concurrency: the live server over HTTP, two
connections, requests in flight at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

try:
    from tests.conftest import uniq
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest import uniq

JSON = {"Content-Type": "application/fhir+json"}
ROUNDS = 20


@pytest_asyncio.fixture(scope="module")
async def pair(live_server: str, live_token: str) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two clients, each with its own connection, so the two requests really overlap."""
    headers = {"Authorization": f"Bearer {live_token}"}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=30) as a, \
            httpx.AsyncClient(base_url=live_server, headers=headers, timeout=30) as b:
        yield a, b


async def _new_patient(c: httpx.AsyncClient) -> dict:
    r = await c.post("/fhir/Patient", json={"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": uniq()}]}, headers=JSON)
    assert r.status_code == 201, r.text
    return r.json()


async def test_same_if_match_exactly_one_update_wins(pair) -> None:
    a, b = pair
    for _ in range(ROUNDS):
        p = await _new_patient(a)
        url = f"/fhir/Patient/{p['id']}"
        ra, rb = await asyncio.gather(
            a.put(url, json={**p, "gender": "male"}, headers={**JSON, "If-Match": 'W/"1"'}),
            b.put(url, json={**p, "gender": "female"}, headers={**JSON, "If-Match": 'W/"1"'}),
        )
        assert sorted((ra.status_code, rb.status_code)) == [200, 412], (ra.text, rb.text)
        winner, loser = (ra, rb) if ra.status_code == 200 else (rb, ra)
        assert loser.json()["resourceType"] == "OperationOutcome"
        assert winner.headers["etag"] == 'W/"2"'
        current = (await a.get(url)).json()
        assert current["meta"]["versionId"] == "2" and current["gender"] == winner.json()["gender"]
        assert len((await b.get(f"{url}/_history")).json()["entry"]) == 2


async def test_same_if_match_patch_and_delete(pair) -> None:
    a, b = pair
    patch = {"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'}
    for n in range(ROUNDS // 2):
        p = await _new_patient(a)
        url = f"/fhir/Patient/{p['id']}"
        second = (b.patch(url, json=[{"op": "add", "path": "/active", "value": True}], headers=patch) if n % 2
                  else b.delete(url, headers={"If-Match": 'W/"1"'}))
        ra, rb = await asyncio.gather(a.patch(url, json=[{"op": "add", "path": "/gender", "value": "other"}], headers=patch), second)
        assert sorted((ra.status_code, rb.status_code)) in ([200, 412], [204, 412]), (ra.text, rb.text)
        assert len((await a.get(f"{url}/_history")).json()["entry"]) == 2


async def test_concurrent_transactions_with_the_same_if_match(pair) -> None:
    a, b = pair
    for _ in range(ROUNDS // 2):
        p = await _new_patient(a)
        ident = uniq()

        def bundle(gender: str) -> dict:
            return {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": ident}]},
                 "request": {"method": "POST", "url": "Patient"}},
                {"resource": {**p, "gender": gender}, "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"1"'}},
            ]}

        ra, rb = await asyncio.gather(a.post("/fhir", json=bundle("male"), headers=JSON), b.post("/fhir", json=bundle("female"), headers=JSON))
        assert sorted((ra.status_code, rb.status_code)) == [200, 412], (ra.text, rb.text)
        # The losing transaction left nothing behind: one new patient, not two.
        found = (await a.get("/fhir/Patient", params={"identifier": f"urn:test|{ident}"})).json()
        assert len(found.get("entry", [])) == 1
