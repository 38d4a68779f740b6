"""Search by parameter type: string, token, date, number, quantity, reference, uri, composite.

Each module fixture creates a small set of records tagged with a unique run code;
every query is restricted to that tag, and its expected ids are computed here from
the records (helpers evaluate the R4 semantics), never copied from the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import uniq
from tests.fixtures.search.helpers import (
    TAG_SYSTEM,
    create_all,
    date_matches,
    date_range,
    ids,
    norm,
    number_matches,
    period_range,
    ref,
    string_matches,
    tagged,
)

INS = "urn:oid:1.2.250.1.213.1.4.8"  # French national health identifier (INS-NIR)
RPPS = "urn:oid:1.2.250.1.71.4.2.1"
LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"


@dataclass
class Data:
    run: str
    records: list[dict[str, Any]]
    ctx: dict[str, str] = field(default_factory=dict)

    def expected(self, rtype: str, predicate: Callable[[dict[str, Any]], bool]) -> list[str]:
        return sorted(r["id"] for r in self.records if r["resourceType"] == rtype and predicate(r))

    async def found(self, client: Any, rtype: str, query: str) -> list[str]:
        params = [tuple(p.split("=", 1)) for p in query.format(**self.ctx).split("&")]
        got = await ids(client, rtype, [*params, ("_tag", f"{TAG_SYSTEM}|{self.run}"), ("_count", "50")])
        assert len(got) == len(set(got)), f"duplicates in {got}"
        return sorted(got)


# -- the records ------------------------------------------------------------------------------
def patients(run: str) -> list[dict[str, Any]]:
    return [
        {"resourceType": "Patient", "identifier": [{"system": INS, "value": f"{run}-1"}], "active": True,
         "name": [{"family": "Lefèvre", "given": ["Hélène"]}], "gender": "female", "birthDate": "1980-05-17",
         "telecom": [{"system": "email", "value": f"helene.{run}@example.fr"}, {"system": "phone", "value": "+33612345678"}],
         "address": [{"line": ["12 rue des Jacobins"], "city": "Amiens", "postalCode": "80000", "country": "FR"}]},
        {"resourceType": "Patient", "identifier": [{"system": INS, "value": f"{run}-2"}], "active": True,
         "name": [{"family": "Helenaire", "given": ["Marc"]}], "gender": "male", "birthDate": "1980-05",
         "address": [{"city": "Abbeville"}]},
        {"resourceType": "Patient", "identifier": [{"system": RPPS, "value": f"{run}-3"}, {"value": f"{run}-nosys"}],
         "name": [{"family": "Smith", "given": ["John", "Jacob"]}], "gender": "male", "birthDate": "1975"},
        {"resourceType": "Patient", "name": [{"family": "Smithson", "given": ["Anne-Sophie"]}], "gender": "female",
         "birthDate": "1992-11-30", "active": False},
        {"resourceType": "Patient", "name": [{"family": "Durand,Leroy", "given": ["Zoé"], "text": "Zoé Durand,Leroy"}],
         "gender": "other", "birthDate": "2001-01-01"},
        {"resourceType": "Patient", "name": [{"family": "HÉLOÏSE", "given": ["Élodie"]}]},
    ]


def given_and_family(r: dict[str, Any]) -> list[str]:
    return [p for n in r.get("name", []) for p in [n.get("family", ""), *n.get("given", []), n.get("text", "")] if p]


def family(r: dict[str, Any]) -> list[str]:
    return [n["family"] for n in r.get("name", []) if "family" in n]


def idents(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i.get("system", ""), i["value"]) for i in r.get("identifier", [])]


def tel(r: dict[str, Any], system: str) -> list[str]:
    return [t["value"] for t in r.get("telecom", []) if t.get("system") == system]


def birth(r: dict[str, Any]) -> tuple[datetime, datetime] | None:
    return date_range(r["birthDate"]) if "birthDate" in r else None


@pytest_asyncio.fixture(scope="module")
async def people(client) -> Data:  # type: ignore[no-untyped-def]
    run = uniq("people")
    created = await create_all(client, [tagged(p, run) for p in patients(run)])
    return Data(run, created, {"run": run, "INS": INS, "RPPS": RPPS})


STRING_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("family=smi", lambda r: string_matches("smi", family(r))),
    ("family=SMITH", lambda r: string_matches("SMITH", family(r))),
    ("family=lefevre", lambda r: string_matches("lefevre", family(r))),
    ("family=LEFÈVRE", lambda r: string_matches("LEFÈVRE", family(r))),
    ("family=heloise", lambda r: string_matches("heloise", family(r))),
    ("name=helene", lambda r: string_matches("helene", given_and_family(r))),
    ("name=HELENE", lambda r: string_matches("helene", given_and_family(r))),
    ("name=Hélène", lambda r: string_matches("Hélène", given_and_family(r))),
    ("name=elodie", lambda r: string_matches("elodie", given_and_family(r))),
    ("given=anne-so", lambda r: string_matches("anne-so", [g for n in r.get("name", []) for g in n.get("given", [])])),
    ("family:exact=Smith", lambda r: string_matches("Smith", family(r), "exact")),
    ("family:exact=smith", lambda r: string_matches("smith", family(r), "exact")),
    ("family:exact=Lefèvre", lambda r: string_matches("Lefèvre", family(r), "exact")),
    ("family:contains=ith", lambda r: string_matches("ith", family(r), "contains")),
    ("name:contains=LEN", lambda r: string_matches("len", given_and_family(r), "contains")),
    ("family:contains=%_", lambda r: string_matches("%_", family(r), "contains")),  # LIKE wildcards are literal
    (r"family=Durand\,Leroy", lambda r: string_matches("Durand,Leroy", family(r))),
    ("family=Durand,Smith", lambda r: string_matches("Durand", family(r)) or string_matches("Smith", family(r))),
    ("family=smith&given=jacob", lambda r: string_matches("smith", family(r)) and "Jacob" in given_and_family(r)),
    ("family=smith&family=smithson", lambda r: string_matches("smithson", family(r))),
    ("address-city=amiens", lambda r: any(norm(a.get("city", "")).startswith("amiens") for a in r.get("address", []))),
    ("address=jacobins", lambda r: False),  # string search matches the start of a part, not a word inside it
    ("address=12 rue", lambda r: any("12 rue des Jacobins" in a.get("line", []) for a in r.get("address", []))),
    ("address-postalcode=80", lambda r: any(a.get("postalCode", "").startswith("80") for a in r.get("address", []))),
]


@pytest.mark.parametrize("query, predicate", STRING_CASES, ids=[c[0] for c in STRING_CASES])
async def test_string(client, people: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await people.found(client, "Patient", query) == people.expected("Patient", predicate)


TOKEN_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("gender=female", lambda r: r.get("gender") == "female"),
    ("gender=|female", lambda r: r.get("gender") == "female"),
    ("gender=male,other", lambda r: r.get("gender") in ("male", "other")),
    ("gender=FEMALE", lambda r: False),  # codes are case-sensitive
    ("identifier={INS}|{run}-1", lambda r: any(s == INS and v.endswith("-1") for s, v in idents(r))),
    ("identifier={run}-3", lambda r: any(v.endswith("-3") for _, v in idents(r))),
    ("identifier={RPPS}|", lambda r: any(s == RPPS for s, _ in idents(r))),
    ("identifier=|{run}-nosys", lambda r: any(not s and v.endswith("-nosys") for s, v in idents(r))),
    ("identifier=|{run}-3", lambda r: False),  # that identifier has a system
    ("identifier={INS}|{run}-1,{RPPS}|{run}-3", lambda r: any(v.endswith(("-1", "-3")) and s in (INS, RPPS) for s, v in idents(r))),
    ("active=true", lambda r: r.get("active") is True),
    ("active=false", lambda r: r.get("active") is False),
    ("email=helene.{run}@example.fr", lambda r: bool(tel(r, "email"))),
    ("phone=+33612345678", lambda r: "+33612345678" in tel(r, "phone")),
    ("telecom=phone|+33612345678", lambda r: "+33612345678" in tel(r, "phone")),
    ("gender=female&active=true", lambda r: r.get("gender") == "female" and r.get("active") is True),
]


@pytest.mark.parametrize("query, predicate", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
async def test_token(client, people: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await people.found(client, "Patient", query) == people.expected("Patient", predicate)


BIRTHDATE_QUERIES = [
    "1980-05-17", "1980-05", "1980", "eq1980", "ge1980-05-17", "gt1980-05-17", "lt1980-05-17", "le1980-05-17",
    "ne1980-05", "sa1979", "eb1981", "gt1992-11-30", "le1975-12-31", "2001-01-01",
]


@pytest.mark.parametrize("value", BIRTHDATE_QUERIES)
async def test_date_of_birth(client, people: Data, value: str) -> None:  # type: ignore[no-untyped-def]
    expected = people.expected("Patient", lambda r: (b := birth(r)) is not None and date_matches(value, b))
    assert await people.found(client, "Patient", f"birthdate={value}") == expected


async def test_date_and_or(client, people: Data) -> None:  # type: ignore[no-untyped-def]
    both = people.expected("Patient", lambda r: (b := birth(r)) is not None and date_matches("ge1980-05-01", b) and date_matches("le1980-05-31", b))
    assert await people.found(client, "Patient", "birthdate=ge1980-05-01&birthdate=le1980-05-31") == both
    either = people.expected("Patient", lambda r: (b := birth(r)) is not None and (date_matches("1975", b) or date_matches("1992", b)))
    assert await people.found(client, "Patient", "birthdate=1975,1992") == either
    assert len(either) == 2


# -- Observations: dates with precision and periods, quantities, composites, references ------
def observations(run: str, subjects: dict[str, str]) -> list[dict[str, Any]]:
    def obs(code: str, display: str, **kw: Any) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": kw.pop("status", "final"),
                "code": {"coding": [{"system": LOINC, "code": code, "display": display}]}, **kw}

    def qty(value: float | int, unit: str, code: str | None = None) -> dict[str, Any]:
        return {"value": value, "unit": unit, "system": UCUM, "code": code or unit}

    helene, smith, group = subjects["helene"], subjects["smith"], subjects["group"]
    return [
        obs("8480-6", "Systolic blood pressure", subject={"reference": helene}, valueQuantity=qty(120, "mm[Hg]"),
            effectiveDateTime="2023-03-15"),
        obs("8480-6", "Systolic blood pressure", subject={"reference": helene}, valueQuantity=qty(145.0, "mmHg", "mm[Hg]"),
            effectiveDateTime="2023-03-15T10:30:00Z", status="preliminary"),
        obs("8462-4", "Diastolic blood pressure", subject={"reference": helene}, valueQuantity=qty(85, "mm[Hg]"),
            effectiveDateTime="2023-03"),
        obs("29463-7", "Body weight", subject={"reference": helene}, valueQuantity=qty(72.5, "kg"),
            effectivePeriod={"start": "2023-03-10", "end": "2023-03-20"}),
        obs("29463-7", "Body weight", subject={"reference": helene}, valueQuantity=qty(72500, "g"),
            effectivePeriod={"start": "2023-03-18T00:00:00Z"}),
        obs("85354-9", "Blood pressure panel", subject={"reference": group}, effectivePeriod={"end": "2023-02-01"},
            component=[{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": qty(150, "mm[Hg]")},
                       {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": qty(95, "mm[Hg]")}]),
        obs("8310-5", "Body temperature", subject={"reference": smith}, valueQuantity=qty(37.2, "Cel"),
            effectiveDateTime="2023-03-16T23:30:00+02:00"),
        obs("72166-2", "Tobacco smoking status", subject={"reference": "http://other.example.org/fhir/Patient/ext-1"},
            valueCodeableConcept={"coding": [{"system": SNOMED, "code": "8517006", "display": "Ex-smoker"}], "text": "Ancien fumeur"},
            effectiveInstant="2024-01-01T00:00:00.000Z"),
        obs("2345-7", "Glucose", subject={"identifier": {"system": INS, "value": f"{run}-ins"}},
            valueQuantity=qty(95, "mg/dL"), effectiveDateTime="2022"),
        obs("8867-4", "Heart rate", subject={"reference": f"http://testserver/fhir/{smith}"}, valueString="irrégulier"),
    ]


def effective(r: dict[str, Any]) -> tuple[datetime, datetime] | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in r:
            return date_range(r[key])
    if "effectivePeriod" in r:
        return period_range(r["effectivePeriod"])
    return None


def quantities(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [r["valueQuantity"]] if "valueQuantity" in r else []


def codes(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for c in r["code"]["coding"]]


def subject(r: dict[str, Any]) -> str:
    return r["subject"].get("reference", "").replace("http://testserver/fhir/", "")


@pytest_asyncio.fixture(scope="module")
async def clinical(client) -> Data:  # type: ignore[no-untyped-def]
    run = uniq("clinical")
    helene, smith = await create_all(client, [tagged(p, run) for p in patients(run)[:3:2]])
    (group,) = await create_all(client, [tagged({"resourceType": "Group", "type": "person", "actual": True}, run)])
    subjects = {"helene": ref(helene), "smith": ref(smith), "group": ref(group)}
    created = await create_all(client, [tagged(o, run) for o in observations(run, subjects)])
    ctx = {"run": run, "INS": INS, "helene": helene["id"], "smith": smith["id"], "group": group["id"]}
    return Data(run, created, ctx)


OBS_DATES = [
    "2023-03-15", "2023-03", "2023", "ge2023-03-16", "gt2023-03-15", "lt2023-03-15", "le2023-03-15", "ne2023-03-15",
    "sa2023-03-15", "eb2023-03-15", "2023-03-15T10:30", "2023-03-15T10:30:00Z", "2023-03-16T21:30:00Z",
    "2023-03-16T23:30:00+02:00", "le2023-02-01", "gt2023-12-31T23:59:59Z", "ge2023-03-20", "lt2023-03-10",
    "2024-01-01T00:00:00.000Z", "ge2023-03-15T10:30:00+00:00",
]


@pytest.mark.parametrize("value", OBS_DATES)
async def test_date_precision_and_periods(client, clinical: Data, value: str) -> None:  # type: ignore[no-untyped-def]
    expected = clinical.expected("Observation", lambda r: (e := effective(r)) is not None and date_matches(value, e))
    assert await clinical.found(client, "Observation", f"date={value}") == expected


async def test_date_combinations(client, clinical: Data) -> None:  # type: ignore[no-untyped-def]
    def has(r: dict[str, Any], *queries: str) -> bool:
        e = effective(r)
        return e is not None and all(date_matches(q, e) for q in queries)

    march = clinical.expected("Observation", lambda r: has(r, "ge2023-03-01", "lt2023-04-01"))
    assert await clinical.found(client, "Observation", "date=ge2023-03-01&date=lt2023-04-01") == march
    assert len(march) >= 5
    either = clinical.expected("Observation", lambda r: has(r, "2022") or has(r, "2024"))
    assert await clinical.found(client, "Observation", "date=2022,2024") == either and len(either) == 2


async def test_date_approximately(client, clinical: Data) -> None:  # type: ignore[no-untyped-def]
    # ap: overlaps the value widened by 10% of its distance to now (at least a day).
    qlo, qhi = date_range("2023-03-16")
    d = max(timedelta(days=1), abs(datetime.now(UTC) - qlo) / 10)
    expected = clinical.expected("Observation", lambda r: (e := effective(r)) is not None and e[0] < qhi + d and e[1] > qlo - d)
    got = await clinical.found(client, "Observation", "date=ap2023-03-16")
    assert got == expected
    assert len(got) >= 5


QUANTITY_QUERIES = [
    "120", "145", "145.0", "gt100", "lt100|{UCUM}|mm[Hg]", "72.5||kg", "ap72500||g", "le37.2", "95|{UCUM}|mg/dL",
    "95||mg/dL", "120|{UCUM}|kg", "ne120", "ge145", "sa145", "eb85", "145||mmHg", "72.5|http://example.org/units|kg",
]


def quantity_matches(query: str, q: dict[str, Any]) -> bool:
    parts = query.format(UCUM=UCUM).split("|")
    if len(parts) == 3:
        system, unit = parts[1], parts[2]
        if system and q.get("system") != system:
            return False
        if unit and unit not in (q.get("code"), q.get("unit")):
            return False
    v = Decimal(str(q["value"]))
    return number_matches(parts[0], v, v)


@pytest.mark.parametrize("value", QUANTITY_QUERIES)
async def test_quantity(client, clinical: Data, value: str) -> None:  # type: ignore[no-untyped-def]
    expected = clinical.expected("Observation", lambda r: any(quantity_matches(value, q) for q in quantities(r)))
    assert await clinical.found(client, "Observation", "value-quantity=" + value.replace("{UCUM}", UCUM)) == expected


def components(r: dict[str, Any]) -> list[dict[str, Any]]:
    return r.get("component", [])


def code_and_quantity(holder: dict[str, Any], code: str, query: str) -> bool:
    return any(c["code"] == code for c in holder["code"]["coding"]) and "valueQuantity" in holder and quantity_matches(query, holder["valueQuantity"])


COMPOSITE_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("code-value-quantity=http://loinc.org|8480-6$gt130", lambda r: code_and_quantity(r, "8480-6", "gt130")),
    ("code-value-quantity=8480-6$lt130", lambda r: code_and_quantity(r, "8480-6", "lt130")),
    ("code-value-quantity=8480-6$lt130,29463-7$72.5", lambda r: code_and_quantity(r, "8480-6", "lt130") or code_and_quantity(r, "29463-7", "72.5")),
    ("component-code-value-quantity=http://loinc.org|8480-6$ge150", lambda r: any(code_and_quantity(c, "8480-6", "ge150") for c in components(r))),
    ("component-code-value-quantity=8462-4$95", lambda r: any(code_and_quantity(c, "8462-4", "95") for c in components(r))),
    # the code and the value must belong to the same component
    ("component-code-value-quantity=8480-6$95", lambda r: any(code_and_quantity(c, "8480-6", "95") for c in components(r))),
    ("combo-code-value-quantity=http://loinc.org|8480-6$gt140",
     lambda r: code_and_quantity(r, "8480-6", "gt140") or any(code_and_quantity(c, "8480-6", "gt140") for c in components(r))),
    ("code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|8517006",
     lambda r: ("http://loinc.org", "72166-2") in codes(r) and "valueCodeableConcept" in r),
    ("code-value-concept=72166-2$http://snomed.info/sct|999", lambda r: False),
    ("code-value-quantity=8480-6$120|{UCUM}|mm[Hg]", lambda r: code_and_quantity(r, "8480-6", "120|{UCUM}|mm[Hg]")),
]


@pytest.mark.parametrize("query, predicate", COMPOSITE_CASES, ids=[c[0] for c in COMPOSITE_CASES])
async def test_composite(client, clinical: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await clinical.found(client, "Observation", query.replace("{UCUM}", UCUM)) == clinical.expected("Observation", predicate)


OBS_TOKEN_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("code=http://loinc.org|8480-6", lambda r: (LOINC, "8480-6") in codes(r)),
    ("code=8480-6", lambda r: (LOINC, "8480-6") in codes(r)),
    ("code=http://loinc.org|", lambda r: any(s == LOINC for s, _ in codes(r))),
    ("code=http://snomed.info/sct|8480-6", lambda r: False),
    ("code=8480-6,8462-4", lambda r: any(c in ("8480-6", "8462-4") for _, c in codes(r))),
    ("code=8480-6&status=preliminary", lambda r: (LOINC, "8480-6") in codes(r) and r["status"] == "preliminary"),
    ("value-concept=http://snomed.info/sct|8517006", lambda r: "valueCodeableConcept" in r),
    ("value-string=irreg", lambda r: norm(r.get("valueString", "")).startswith("irreg")),
    ("value-string=ancien", lambda r: norm(r.get("valueCodeableConcept", {}).get("text", "")).startswith("ancien")),
]


@pytest.mark.parametrize("query, predicate", OBS_TOKEN_CASES, ids=[c[0] for c in OBS_TOKEN_CASES])
async def test_observation_tokens(client, clinical: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await clinical.found(client, "Observation", query) == clinical.expected("Observation", predicate)


REFERENCE_CASES: list[tuple[str, Callable[[dict[str, Any], dict[str, str]], bool]]] = [
    ("subject=Patient/{helene}", lambda r, c: subject(r) == f"Patient/{c['helene']}"),
    ("subject={helene}", lambda r, c: subject(r) == f"Patient/{c['helene']}"),
    ("subject:Patient={helene}", lambda r, c: subject(r) == f"Patient/{c['helene']}"),
    ("patient={helene}", lambda r, c: subject(r) == f"Patient/{c['helene']}"),
    ("patient=Patient/{helene}/_history/1", lambda r, c: subject(r) == f"Patient/{c['helene']}"),
    ("subject:Group={group}", lambda r, c: subject(r) == f"Group/{c['group']}"),
    ("patient={group}", lambda r, c: False),  # patient only follows references to a Patient
    ("subject:Group={helene}", lambda r, c: False),
    # an absolute reference to this server is the same as a relative one, both ways
    ("subject=http://testserver/fhir/Patient/{smith}", lambda r, c: subject(r) == f"Patient/{c['smith']}"),
    ("subject=Patient/{smith}", lambda r, c: subject(r) == f"Patient/{c['smith']}"),
    ("subject=http://other.example.org/fhir/Patient/ext-1", lambda r, c: subject(r).startswith("http://other.example.org")),
    ("subject:identifier={INS}|{run}-ins", lambda r, c: "identifier" in r["subject"]),
    ("subject:identifier={run}-ins", lambda r, c: "identifier" in r["subject"]),
    ("subject=Patient/{helene},Group/{group}", lambda r, c: subject(r) in (f"Patient/{c['helene']}", f"Group/{c['group']}")),
    ("subject=Patient/{helene}&code=29463-7", lambda r, c: subject(r) == f"Patient/{c['helene']}" and (LOINC, "29463-7") in codes(r)),
]


@pytest.mark.parametrize("query, predicate", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
async def test_reference(client, clinical: Data, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    assert await clinical.found(client, "Observation", query) == clinical.expected("Observation", lambda r: predicate(r, clinical.ctx))


# -- number: RiskAssessment.prediction.probability (decimal or Range) ---------------------------
PROBABILITIES: list[Any] = ["0.02", "0.1", "0.15", "0.149", "0.25", "1", ("0.2", "0.4"), ("0.6", None)]


@pytest_asyncio.fixture(scope="module")
async def risks(client) -> Data:  # type: ignore[no-untyped-def]
    run = uniq("risk")
    (patient,) = await create_all(client, [tagged({"resourceType": "Patient"}, run)])

    def prediction(p: Any) -> dict[str, Any]:
        if isinstance(p, tuple):
            rng: dict[str, Any] = {"low": {"value": float(p[0])}}
            if p[1] is not None:
                rng["high"] = {"value": float(p[1])}
            return {"probabilityRange": rng}
        return {"probabilityDecimal": float(p)}

    bodies = [tagged({"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": ref(patient)},
                      "prediction": [prediction(p)]}, run) for p in PROBABILITIES]
    return Data(run, await create_all(client, bodies))


def probability(r: dict[str, Any]) -> tuple[Decimal, Decimal]:
    p = r["prediction"][0]
    if "probabilityDecimal" in p:
        d = Decimal(str(p["probabilityDecimal"]))
        return d, d
    rng = p["probabilityRange"]
    lo = Decimal(str(rng["low"]["value"])) if "low" in rng else Decimal("-Infinity")
    hi = Decimal(str(rng["high"]["value"])) if "high" in rng else Decimal("Infinity")
    return lo, hi


NUMBER_QUERIES = ["0.1", "0.15", "0.150", "gt0.15", "ge0.15", "lt0.1", "le0.1", "ne0.1", "ap0.1", "ge0.3", "lt0.3",
                  "1", "1.0", "ge0.9", "100", "0.02,1", "gt-1", "lt.05"]


@pytest.mark.parametrize("value", NUMBER_QUERIES)
async def test_number(client, risks: Data, value: str) -> None:  # type: ignore[no-untyped-def]
    def pred(r: dict[str, Any]) -> bool:
        lo, hi = probability(r)
        return any(number_matches(v, lo, hi) for v in value.split(","))

    assert await risks.found(client, "RiskAssessment", f"probability={value}") == risks.expected("RiskAssessment", pred)


async def test_number_and(client, risks: Data) -> None:  # type: ignore[no-untyped-def]
    expected = risks.expected("RiskAssessment", lambda r: number_matches("gt0.1", *probability(r)) and number_matches("lt0.3", *probability(r)))
    assert await risks.found(client, "RiskAssessment", "probability=gt0.1&probability=lt0.3") == expected
    assert len(expected) >= 3


# -- canonical references with a version, and Timing values ------------------------------------
async def test_canonical_reference_with_version(client) -> None:  # type: ignore[no-untyped-def]
    run = uniq("canon")
    url = f"http://example.org/{run}/Questionnaire/phq9"
    bodies = [tagged({"resourceType": "QuestionnaireResponse", "status": "completed", "questionnaire": q}, run)
              for q in (f"{url}|2.0", f"{url}|1.0", url, f"{url}-bis")]
    created = await create_all(client, bodies)
    data = Data(run, created)
    cases = {
        url: lambda q: q.split("|")[0] == url,  # the url alone matches every version
        f"{url}|2.0": lambda q: q == f"{url}|2.0",
        f"{url}|3.0": lambda q: False,
    }
    for value, pred in cases.items():
        expected = data.expected("QuestionnaireResponse", lambda r: pred(r["questionnaire"]))
        assert await data.found(client, "QuestionnaireResponse", f"questionnaire={value}") == expected


async def test_timing_with_repeat_bounds(client) -> None:  # type: ignore[no-untyped-def]
    run = uniq("timing")
    (patient,) = await create_all(client, [tagged({"resourceType": "Patient"}, run)])
    bounds = [{"start": "2024-01-01", "end": "2024-03-31"}, {"start": "2025-06-01"}]
    bodies = [tagged({"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": {"reference": ref(patient)},
                      "activity": [{"detail": {"status": "scheduled", "scheduledTiming": {
                          "repeat": {"boundsPeriod": b, "frequency": 1, "period": 1, "periodUnit": "d"}}}}]}, run) for b in bounds]
    data = Data(run, await create_all(client, bodies))
    for value in ("ge2024-03-01", "lt2024-02", "2024", "gt2030", "eb2025-01-01", "sa2024-12-31"):
        expected = data.expected("CarePlan", lambda r: date_matches(
            value, period_range(r["activity"][0]["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"])))
        assert await data.found(client, "CarePlan", f"activity-date={value}") == expected, value
