"""Search modifiers: :missing :not :exact :contains :text :of-type :identifier
:above :below and resource-type modifiers, with their errors.

Expected ids come from the records (Python predicates), never from the server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import uniq
from tests.fixtures.search.helpers import TAG_SYSTEM, create_all, expect_error, ids, norm, ref, tagged

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"


class Data:
    def __init__(self, run: str, records: list[dict[str, Any]], **ctx: str) -> None:
        self.run, self.records, self.ctx = run, records, {"run": run, **ctx}

    def expected(self, rtype: str, predicate: Callable[[dict[str, Any]], bool]) -> list[str]:
        return sorted(r["id"] for r in self.records if r["resourceType"] == rtype and predicate(r))

    async def found(self, client: Any, rtype: str, query: str) -> list[str]:
        params = [tuple(p.split("=", 1)) for p in query.format(**self.ctx).split("&")]
        return sorted(await ids(client, rtype, [*params, ("_tag", f"{TAG_SYSTEM}|{self.run}")]))


@pytest_asyncio.fixture(scope="module")
async def data(client) -> Data:  # type: ignore[no-untyped-def]
    run = uniq("mod")
    patients = await create_all(client, [tagged(p, run) for p in [
        {"resourceType": "Patient", "name": [{"family": "Martin", "given": ["Léa"]}], "gender": "female", "birthDate": "1990-01-01",
         "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "MR"}], "text": "Dossier médical"},
                         "system": "urn:oid:1.2.250.1.71.4.2.7", "value": f"{run}-mr"}]},
        {"resourceType": "Patient", "name": [{"family": "Martinez"}], "identifier": [{"system": "urn:x", "value": f"{run}-b"}]},
        {"resourceType": "Patient", "gender": "male", "telecom": [{"system": "phone", "value": "0102030405"}]},
        {"resourceType": "Patient", "name": [{"family": "Dupont", "given": ["Jean"]}], "gender": "unknown", "deceasedBoolean": True},
    ]])
    martin = patients[0]
    observations = await create_all(client, [tagged(o, run) for o in [
        {"resourceType": "Observation", "status": "final", "subject": {"reference": ref(martin)},
         "code": {"coding": [{"system": LOINC, "code": "1558-6", "display": "Glycémie à jeun"}], "text": "Glucose sanguin"},
         "valueQuantity": {"value": 5.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
         "performer": [{"reference": "Practitioner/p-1"}]},
        {"resourceType": "Observation", "status": "amended", "subject": {"reference": ref(martin)},
         "code": {"coding": [{"system": LOINC, "code": "8310-5", "display": "Température corporelle"}]}},
        {"resourceType": "Observation", "status": "cancelled", "code": {"text": "Ressenti de fatigue"},
         "performer": [{"identifier": {"system": "urn:oid:1.2.250.1.71.4.2.1", "value": f"{run}-rpps"}}]},
    ]])
    base = f"http://example.org/{run}/Questionnaire"
    questionnaires = await create_all(client, [tagged(q, run) for q in [
        {"resourceType": "Questionnaire", "status": "active", "url": f"{base}/phq9"},
        {"resourceType": "Questionnaire", "status": "active", "url": f"{base}/phq9/v2"},
        {"resourceType": "Questionnaire", "status": "draft", "url": f"{base}/gad7"},
        {"resourceType": "Questionnaire", "status": "draft", "url": f"urn:uuid:{uuid.uuid4()}"},
        {"resourceType": "Questionnaire", "status": "retired"},
    ]])
    return Data(run, patients + observations + questionnaires, base=base, martin=martin["id"])


def fam(r: dict[str, Any]) -> list[str]:
    return [n["family"] for n in r.get("name", []) if "family" in n]


def texts(r: dict[str, Any]) -> list[str]:
    code = r["code"]
    return [c["display"] for c in code.get("coding", []) if "display" in c] + ([code["text"]] if "text" in code else [])


def word_prefix(query: str, values: list[str]) -> bool:
    return any(w.startswith(norm(query)) for v in values for w in norm(v).split())


PATIENT_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("family:missing=true", lambda r: not fam(r)),
    ("family:missing=false", lambda r: bool(fam(r))),
    ("gender:missing=true", lambda r: "gender" not in r),
    ("gender:missing=false", lambda r: "gender" in r),
    ("birthdate:missing=true", lambda r: "birthDate" not in r),
    ("phone:missing=false", lambda r: bool(r.get("telecom"))),
    ("gender:not=male", lambda r: r.get("gender") != "male"),  # includes the patient with no gender
    ("gender:not=male,female", lambda r: r.get("gender") not in ("male", "female")),
    ("gender:not=male&family:missing=false", lambda r: r.get("gender") != "male" and bool(fam(r))),
    ("family:exact=Martin", lambda r: "Martin" in fam(r)),
    ("family:exact=martin", lambda r: "martin" in fam(r)),
    ("family=martin", lambda r: any(norm(f).startswith("martin") for f in fam(r))),
    ("family:contains=RTI", lambda r: any("rti" in norm(f) for f in fam(r))),
    ("given:contains=é", lambda r: any("e" in norm(g) for n in r.get("name", []) for g in n.get("given", []))),
    ("identifier:of-type=" + V2_0203 + "|MR|{run}-mr", lambda r: any(i.get("type") for i in r.get("identifier", []))),
    ("identifier:of-type=" + V2_0203 + "|DL|{run}-mr", lambda r: False),
    ("identifier:text=dossier", lambda r: any(i.get("type") for i in r.get("identifier", []))),
    ("deceased=true", lambda r: r.get("deceasedBoolean") is True),
    ("deceased=false", lambda r: not r.get("deceasedBoolean")),
]


@pytest.mark.parametrize("query, predicate", PATIENT_CASES, ids=[c[0] for c in PATIENT_CASES])
async def test_patient_modifiers(client, data: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await data.found(client, "Patient", query) == data.expected("Patient", predicate)


OBSERVATION_CASES: list[tuple[str, Callable[[dict[str, Any], dict[str, str]], bool]]] = [
    ("code:text=glycemie", lambda r, c: word_prefix("glycemie", texts(r))),
    ("code:text=JEUN", lambda r, c: word_prefix("jeun", texts(r))),  # any word of the display
    ("code:text=glucose sang", lambda r, c: any(norm(t).startswith("glucose sang") for t in texts(r))),
    ("code:text=temperature,fatigue", lambda r, c: word_prefix("temperature", texts(r)) or word_prefix("fatigue", texts(r))),
    ("status:not=final", lambda r, c: r["status"] != "final"),
    ("status:not=final&status:not=cancelled", lambda r, c: r["status"] not in ("final", "cancelled")),
    ("performer:missing=true", lambda r, c: "performer" not in r),
    ("performer:missing=false", lambda r, c: "performer" in r),
    ("value-quantity:missing=true", lambda r, c: "valueQuantity" not in r),
    ("subject:missing=true", lambda r, c: "subject" not in r),
    ("subject:Patient={martin}", lambda r, c: r.get("subject", {}).get("reference") == f"Patient/{c['martin']}"),
    ("performer:identifier=urn:oid:1.2.250.1.71.4.2.1|{run}-rpps", lambda r, c: any("identifier" in p for p in r.get("performer", []))),
    ("performer:Practitioner=p-1", lambda r, c: {"reference": "Practitioner/p-1"} in r.get("performer", [])),
    ("code:missing=false", lambda r, c: True),
]


@pytest.mark.parametrize("query, predicate", OBSERVATION_CASES, ids=[c[0] for c in OBSERVATION_CASES])
async def test_observation_modifiers(client, data: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await data.found(client, "Observation", query) == data.expected("Observation", lambda r: predicate(r, data.ctx))


URI_CASES: list[tuple[str, Callable[[str | None, str], bool]]] = [
    ("url={base}/phq9", lambda u, base: u == f"{base}/phq9"),
    ("url:below={base}/phq9", lambda u, base: u is not None and u.startswith(f"{base}/phq9")),
    ("url:below={base}/", lambda u, base: u is not None and u.startswith(f"{base}/")),
    ("url:above={base}/phq9/v2/extra", lambda u, base: u is not None and f"{base}/phq9/v2/extra".startswith(u)),
    ("url:above={base}/gad7", lambda u, base: u is not None and f"{base}/gad7".startswith(u)),
    ("url:missing=true", lambda u, base: u is None),
    ("url={base}/phq9,{base}/gad7", lambda u, base: u in (f"{base}/phq9", f"{base}/gad7")),
    ("url=" + "{base}/PHQ9", lambda u, base: False),  # uris are case-sensitive
]


@pytest.mark.parametrize("query, predicate", URI_CASES, ids=[c[0] for c in URI_CASES])
async def test_uri_above_below(client, data: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    base = data.ctx["base"]
    expected = data.expected("Questionnaire", lambda r: predicate(r.get("url"), base))
    assert await data.found(client, "Questionnaire", query) == expected


ERROR_CASES: list[tuple[str, str, str]] = [
    # tokens have no terminology server here: :above/:below/:in/:not-in are refused clearly
    ("Observation", "code:above=http://snomed.info/sct|73211009", "terminology"),
    ("Observation", "code:below=http://snomed.info/sct|73211009", "terminology"),
    ("Observation", "code:in=http://example.org/ValueSet/vs", "terminology"),
    ("Observation", "code:not-in=http://example.org/ValueSet/vs", "terminology"),
    ("Patient", "family:foo=x", "modifier"),
    ("Patient", "family:not=x", ":not"),
    ("Patient", "family:below=x", ":below"),
    ("Patient", "gender:contains=fem", ":contains"),
    ("Patient", "birthdate:exact=2000", ":exact"),
    ("Patient", "birthdate:text=2000", ":text"),
    ("Patient", "gender:missing=maybe", "missing"),
    ("Patient", "family:Patient=x", "reference"),
    ("Observation", "subject:Medication=123", "Medication"),
    ("Observation", "subject:not=Patient/1", ":not"),
    ("Observation", "subject:contains=Patient", ":contains"),
    ("Patient", "identifier:of-type=" + V2_0203 + "|MR", "of-type"),
    ("Patient", "_id:contains=abc", ":contains"),
    ("Patient", "_lastUpdated:exact=2020", ":exact"),
    ("Questionnaire", "url:contains=example", ":contains"),
]


@pytest.mark.parametrize("rtype, query, mentions", ERROR_CASES, ids=[f"{c[0]}?{c[1]}" for c in ERROR_CASES])
async def test_invalid_modifier_is_a_clear_400(client, rtype: str, query: str, mentions: str) -> None:  # type: ignore[no-untyped-def]
    key, _, value = query.partition("=")
    await expect_error(client, rtype, [(key, value)], mentions=mentions)
