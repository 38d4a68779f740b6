"""Batch and transaction Bundles (R4 3.1.0.11) over ASGI against real PostgreSQL."""

from __future__ import annotations

import base64
import copy
import json
import re
import uuid
from datetime import datetime

import orjson

try:
    from tests.conftest import BASE, FIXTURES, uniq
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from conftest import BASE, FIXTURES, uniq

FHIR = BASE + "/fhir"
SYS = "urn:oid:1.2.250.1.213.1.4.8"
JSON = {"Content-Type": "application/fhir+json"}


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def patient(ident: str, **extra: object) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYS, "value": ident}], "name": [{"family": "Bernard"}], **extra}


def obs(subject: str, what: str = "tension", **extra: object) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": what}, "subject": {"reference": subject}, **extra}


def tx(*entries: dict, kind: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict, full_url: str | None = None, **request: str) -> dict:
    e: dict = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"], **request}}
    if full_url:
        e["fullUrl"] = full_url
    return e


async def ids_for(client, ident: str, rtype: str = "Patient") -> list[str]:
    r = await client.get(f"/fhir/{rtype}", params={"identifier": f"{SYS}|{ident}"})
    assert r.status_code == 200, r.text
    return sorted(e["resource"]["id"] for e in r.json().get("entry", []))


def ref_id(location: str) -> str:
    """Patient/123/_history/1 -> Patient/123"""
    return "/".join(location.split("/")[:2])


async def test_transaction_resolves_placeholders_and_answers_in_order(client) -> None:
    existing_ident, new_ident, cond_ident, gone_ident = uniq(), uniq(), uniq(), uniq()
    existing = (await client.post("/fhir/Patient", json=patient(existing_ident), headers=JSON)).json()
    already = (await client.post("/fhir/Patient", json=patient(cond_ident), headers=JSON)).json()
    doomed = (await client.post("/fhir/Patient", json=patient(gone_ident), headers=JSON)).json()
    enc_id = uniq("enc")
    p_urn, o_urn, c_urn, e_urn = urn(), urn(), urn(), urn()
    patch = base64.b64encode(orjson.dumps([{"op": "add", "path": "/active", "value": True}])).decode()
    bundle = tx(
        # 0: GET runs last, so it sees what the transaction wrote.
        {"request": {"method": "GET", "url": f"Patient?identifier={SYS}|{new_ident}"}},
        # 1: an Observation pointing at the new patient by its fullUrl, and at an existing one by criteria.
        post(obs(p_urn, performer=[{"reference": f"Patient?identifier={SYS}|{existing_ident}"}],
                 text={"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{p_urn}">patient</a></div>'}),
             o_urn),
        # 2: the new patient.
        post(patient(new_ident), p_urn),
        # 3: conditional create that finds its resource: references to its fullUrl point at it.
        post(patient(cond_ident), c_urn, ifNoneExist=f"identifier={SYS}|{cond_ident}"),
        # 4: update as create with a client id; its fullUrl is a placeholder too.
        {"fullUrl": e_urn, "resource": {"resourceType": "Encounter", "id": enc_id, "status": "finished",
                                         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                                         "subject": {"reference": c_urn}},
         "request": {"method": "PUT", "url": f"Encounter/{enc_id}"}},
        # 5: a second observation, about the encounter, by placeholder.
        post(obs(c_urn, encounter={"reference": e_urn})),
        # 6: delete.
        {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}},
        # 7: patch of an existing resource (a JSON Patch in a Binary).
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch},
         "request": {"method": "PATCH", "url": f"Patient/{existing['id']}"}},
    )
    r = await client.post("/fhir", json=bundle, headers=JSON)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["resourceType"] == "Bundle" and out["type"] == "transaction-response"
    assert len(out["entry"]) == len(bundle["entry"])
    statuses = [e["response"]["status"].split()[0] for e in out["entry"]]
    assert statuses == ["200", "201", "201", "200", "201", "201", "204", "200"]
    for i in (1, 2, 3, 4, 5, 7):
        resp = out["entry"][i]["response"]
        assert re.fullmatch(r"[A-Za-z]+/[A-Za-z0-9\-.]+/_history/\d+", resp["location"]), resp
        assert resp["etag"] == f'W/"{resp["location"].rsplit("/", 1)[1]}"'
        datetime.fromisoformat(resp["lastModified"].replace("Z", "+00:00"))
    new_patient = ref_id(out["entry"][2]["response"]["location"])
    assert ref_id(out["entry"][3]["response"]["location"]) == f"Patient/{already['id']}"
    assert out["entry"][4]["response"]["location"] == f"Encounter/{enc_id}/_history/1"
    assert out["entry"][7]["response"]["etag"] == 'W/"2"'
    # The GET ran after the writes.
    found = out["entry"][0]["resource"]
    assert found["type"] == "searchset" and [e["resource"]["id"] for e in found["entry"]] == [new_patient.split("/")[1]]
    # Stored references point at the real ids.
    o = (await client.get(f"/fhir/{ref_id(out['entry'][1]['response']['location'])}")).json()
    assert o["subject"]["reference"] == new_patient
    assert o["performer"][0]["reference"] == f"Patient/{existing['id']}"
    assert new_patient in o["text"]["div"] and p_urn not in o["text"]["div"]
    enc = (await client.get(f"/fhir/Encounter/{enc_id}")).json()
    assert enc["subject"]["reference"] == f"Patient/{already['id']}"
    o2 = (await client.get(f"/fhir/{ref_id(out['entry'][5]['response']['location'])}")).json()
    assert o2["encounter"]["reference"] == f"Encounter/{enc_id}" and o2["subject"]["reference"] == f"Patient/{already['id']}"
    assert (await client.get(f"/fhir/Patient/{doomed['id']}")).status_code == 410
    assert (await client.get(f"/fhir/Patient/{existing['id']}")).json()["active"] is True
    assert await ids_for(client, cond_ident) == [already["id"]]


async def test_transaction_runs_deletes_before_creates(client) -> None:
    ident = uniq()
    old = (await client.post("/fhir/Patient", json=patient(ident), headers=JSON)).json()
    # Listed first, the conditional create is still matched after the delete: it creates.
    bundle = tx(post(patient(ident), urn(), ifNoneExist=f"identifier={SYS}|{ident}"),
                {"request": {"method": "DELETE", "url": f"Patient?identifier={SYS}|{ident}"}})
    r = await client.post("/fhir", json=bundle, headers=JSON)
    assert r.status_code == 200, r.text
    assert [e["response"]["status"].split()[0] for e in r.json()["entry"]] == ["201", "204"]
    new_id = r.json()["entry"][0]["response"]["location"].split("/")[1]
    assert new_id != old["id"]
    assert await ids_for(client, ident) == [new_id]


async def test_transaction_conditional_create_twice_makes_one(client) -> None:
    ident = uniq()
    a, b = urn(), urn()
    crit = f"identifier={SYS}|{ident}"
    bundle = tx(post(patient(ident), a, ifNoneExist=crit), post(patient(ident), b, ifNoneExist=crit),
                post(obs(b)), post(obs(a)))
    r = await client.post("/fhir", json=bundle, headers=JSON)
    assert r.status_code == 200, r.text
    out = r.json()["entry"]
    assert [e["response"]["status"].split()[0] for e in out] == ["201", "200", "201", "201"]
    pid = ref_id(out[0]["response"]["location"])
    assert ref_id(out[1]["response"]["location"]) == pid
    assert await ids_for(client, ident) == [pid.split("/")[1]]
    for e in out[2:]:
        assert (await client.get(f"/fhir/{ref_id(e['response']['location'])}")).json()["subject"]["reference"] == pid


async def test_failed_transaction_writes_nothing(client) -> None:
    idents = [uniq() for _ in range(5)]
    p_urn = urn()
    existing = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    entries = [
        post(patient(idents[0]), p_urn),
        post(obs(p_urn, identifier=[{"system": SYS, "value": idents[1]}])),
        {"resource": {**existing, "gender": "female"}, "request": {"method": "PUT", "url": f"Patient/{existing['id']}"}},
        post(patient(idents[3])),
        post(patient(idents[4], gender="robot", birthDate="2001-02-30")),  # the 5th entry is invalid
    ]
    r = await client.post("/fhir", json=tx(*entries), headers=JSON)
    assert r.status_code == 422, r.text
    issues = r.json()["issue"]
    exprs = {x for i in issues for x in i.get("expression", [])}
    assert {"Bundle.entry[4].resource.gender", "Bundle.entry[4].resource.birthDate"} <= exprs
    assert all(i["diagnostics"].startswith("Bundle.entry[4]") for i in issues)
    for ident in (idents[0], idents[3], idents[4]):
        assert await ids_for(client, ident) == []
    assert await ids_for(client, idents[1], "Observation") == []
    got = (await client.get(f"/fhir/Patient/{existing['id']}")).json()
    assert got["meta"]["versionId"] == "1" and "gender" not in got
    h = (await client.get("/fhir/_history", params={"_count": 100})).text
    assert not any(ident in h for ident in idents)


async def test_transaction_failures_point_at_the_entry(client) -> None:
    ident = uniq()
    twice = uniq()
    for _ in range(2):
        await client.post("/fhir/Patient", json=patient(twice), headers=JSON)
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    cases = [
        # conditional reference with no match, with several matches
        (tx(post(patient(ident)), post(obs(f"Patient?identifier={SYS}|{uniq()}"))), 404, "Bundle.entry[1].resource.subject.reference"),
        (tx(post(patient(ident)), post(obs(f"Patient?identifier={SYS}|{twice}"))), 412, "Bundle.entry[1].resource.subject.reference"),
        # a placeholder that no entry defines
        (tx(post(patient(ident)), post(obs(urn()))), 400, "Bundle.entry[1].resource.subject.reference"),
        # conditional create with several matches
        (tx(post(patient(ident)), post(patient(twice), ifNoneExist=f"identifier={SYS}|{twice}")), 412, None),
        # stale ifMatch
        (tx(post(patient(ident)), {"resource": p, "request": {"method": "PUT", "url": f"Patient/{p['id']}", "ifMatch": 'W/"9"'}}), 412, None),
        # one resource changed twice
        (tx(post(patient(ident)), {"resource": p, "request": {"method": "PUT", "url": f"Patient/{p['id']}"}},
            {"request": {"method": "DELETE", "url": f"Patient/{p['id']}"}}), 400, "Bundle.entry[2].request.url"),
        # unknown type, unknown id to update with a mismatching body, bad url
        (tx(post(patient(ident)), {"resource": {"resourceType": "Nope"}, "request": {"method": "POST", "url": "Nope"}}), 404, None),
        (tx(post(patient(ident)), {"resource": {**p, "id": "x"}, "request": {"method": "PUT", "url": f"Patient/{p['id']}"}}), 400, "Bundle.entry[1].resource.id"),
        (tx(post(patient(ident)), {"request": {"method": "GET", "url": "http://elsewhere.example/fhir/Patient"}}), 400, "Bundle.entry[1].request.url"),
    ]
    for bundle, status, expression in cases:
        r = await client.post("/fhir", json=bundle, headers=JSON)
        assert r.status_code == status, (bundle["entry"][-1], r.text)
        assert r.json()["resourceType"] == "OperationOutcome"
        if expression:
            assert expression in {x for i in r.json()["issue"] for x in i.get("expression", [])}, r.text
        assert await ids_for(client, ident) == []
    assert (await client.get(f"/fhir/Patient/{p['id']}")).json()["meta"]["versionId"] == "1"


async def test_batch_entries_fail_independently(client) -> None:
    ident, bad_ident, twice = uniq(), uniq(), uniq()
    for _ in range(2):
        await client.post("/fhir/Patient", json=patient(twice), headers=JSON)
    p = (await client.post("/fhir/Patient", json=patient(uniq()), headers=JSON)).json()
    bundle = tx(
        post(patient(ident)),
        post(patient(bad_ident, gender="robot")),
        {"request": {"method": "GET", "url": f"Patient/{uniq('nobody')}"}},
        {"resource": {**p, "gender": "male"}, "request": {"method": "PUT", "url": f"Patient/{p['id']}"}},
        post(patient(twice), ifNoneExist=f"identifier={SYS}|{twice}"),
        {"request": {"method": "GET", "url": f"Patient/{p['id']}"}},
        post(obs(f"Patient?identifier={SYS}|{ident}")),  # resolved against what entry 0 wrote
        {"request": {"method": "DELETE", "url": f"Patient/{uniq('nobody')}"}},
        {"request": {"method": "GET", "url": "Nope/1"}},
        kind="batch",
    )
    r = await client.post("/fhir", json=bundle, headers=JSON)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "batch-response" and len(out["entry"]) == len(bundle["entry"])
    statuses = [e["response"]["status"].split()[0] for e in out["entry"]]
    assert statuses == ["201", "422", "404", "200", "412", "200", "201", "204", "404"]
    for i in (1, 2, 4, 8):
        oo = out["entry"][i]["response"]["outcome"]
        assert oo["resourceType"] == "OperationOutcome" and oo["issue"][0]["severity"] == "error"
    assert "Patient.gender" in out["entry"][1]["response"]["outcome"]["issue"][0]["expression"]
    assert out["entry"][5]["resource"]["gender"] == "male"  # the GET after the PUT sees it
    assert len(await ids_for(client, ident)) == 1
    assert await ids_for(client, bad_ident) == []
    o = (await client.get(f"/fhir/{ref_id(out['entry'][6]['response']['location'])}")).json()
    assert o["subject"]["reference"] == f"Patient/{(await ids_for(client, ident))[0]}"


async def test_prefer_representation_in_bundles(client) -> None:
    ident = uniq()
    r = await client.post("/fhir", json=tx(post(patient(ident), urn())), headers={**JSON, "Prefer": "return=representation"})
    assert r.status_code == 200
    e = r.json()["entry"][0]
    assert e["resource"]["resourceType"] == "Patient" and e["resource"]["meta"]["versionId"] == "1"
    r = await client.post("/fhir", json=tx(post(patient(uniq()))), headers=JSON)
    assert "resource" not in r.json()["entry"][0]


async def test_bad_bundles_are_400(client) -> None:
    for body in ({"resourceType": "Patient"}, {"resourceType": "Bundle", "type": "collection", "entry": []},
                 {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient(uniq())}]},
                 {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "FETCH", "url": "Patient"}}]},
                 {"resourceType": "Bundle", "type": "batch", "entry": {"request": {}}}):
        r = await client.post("/fhir", json=body, headers=JSON)
        assert r.status_code == 400, body
        assert r.json()["resourceType"] == "OperationOutcome"
    r = await client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction"}, headers=JSON)
    assert r.status_code == 200 and r.json()["entry"] == []


async def test_synthea_records_as_one_transaction(client) -> None:
    """Real generated records: the collection's urn:uuid graph posted as a transaction."""
    sample = json.loads((FIXTURES / "synthea-sample.json").read_text())
    entries = copy.deepcopy(sample["entry"])
    # The sample keeps two resources of each type from three records, so some references
    # dangle; keep the entries whose placeholders all resolve inside the sample.
    while True:
        urls = {e["fullUrl"] for e in entries}
        keep = [e for e in entries if set(re.findall(r"urn:uuid:[0-9a-f\-]{36}", json.dumps(e["resource"]))) <= urls]
        if len(keep) == len(entries):
            break
        entries = keep
    tag = uniq("synthea")
    for e in entries:
        e["resource"].pop("id", None)
        e["resource"]["meta"] = {"tag": [{"system": "urn:test", "code": tag}]}
        e["request"] = {"method": "POST", "url": e["resource"]["resourceType"]}
    assert len(entries) > 20
    r = await client.post("/fhir", json=tx(*entries), headers=JSON)
    assert r.status_code == 200, r.text[:2000]
    out = r.json()["entry"]
    assert all(e["response"]["status"].startswith("201") for e in out)
    real = {e["fullUrl"]: ref_id(o["response"]["location"]) for e, o in zip(entries, out, strict=True)}
    # Every placeholder became the id of what the same transaction created.
    for e, o in zip(entries, out, strict=True):
        stored = (await client.get(f"/fhir/{ref_id(o['response']['location'])}")).text
        assert "urn:uuid:" not in re.sub(r'"(system|url|value)":"urn:uuid:[^"]*"', "", stored)
        for placeholder in set(re.findall(r"urn:uuid:[0-9a-f\-]{36}", json.dumps(e["resource"]))):
            assert f'"reference":"{real[placeholder]}"' in stored
    r = await client.get("/fhir/Patient", params={"_tag": f"urn:test|{tag}", "_count": 100})
    assert r.json()["total"] == sum(1 for e in entries if e["resource"]["resourceType"] == "Patient")
