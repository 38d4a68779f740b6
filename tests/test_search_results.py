"""Result parameters and special searches: _sort, _count paging, _total, _summary,
_elements, _id, _lastUpdated, _tag/_profile/_security, French full text, near,
errors (lenient and strict handling) and POST _search.

Expected answers are computed here from the created records.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import uniq
from tests.fixtures.search.helpers import (
    TAG_SYSTEM,
    create,
    create_all,
    date_matches,
    date_range,
    expect_error,
    haversine_km,
    ids,
    link,
    match_ids,
    norm,
    outcomes,
    pages,
    search,
    tagged,
)

SUBSETTED = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "SUBSETTED")


def scope(run: str) -> tuple[str, str]:
    return ("_tag", f"{TAG_SYSTEM}|{run}")


# -- sorting ----------------------------------------------------------------------------------
PEOPLE = [  # family, given, birthDate, gender
    ("Dubois", "Anne", "1980-03-01", "female"),
    ("durand", "Marc", "1975-06-15", "male"),
    ("Émery", "Luc", "1990", "male"),
    ("Zola", "Émile", "1980-03-01", "male"),
    (None, "Sans-Nom", "1980-03", None),
    ("dubois", "Zoé", "2001-12-31", "female"),
    ("Ångström", "Eva", None, "female"),
    ("Bernard", "Paul", "1980-03", "other"),
]


@pytest_asyncio.fixture(scope="module")
async def people(client) -> tuple[str, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    run = uniq("sort")
    out = []
    for family, given, birth, gender in PEOPLE:  # one by one: distinct lastUpdated
        body: dict[str, Any] = {"resourceType": "Patient", "name": [{"given": [given], **({"family": family} if family else {})}]}
        if birth:
            body["birthDate"] = birth
        if gender:
            body["gender"] = gender
        out.append(await create(client, tagged(body, run)))
    return run, out


def family_key(r: dict[str, Any], desc: bool) -> str | None:
    fams = [norm(n["family"]) for n in r.get("name", []) if "family" in n]
    return (max(fams) if desc else min(fams)) if fams else None


def birth_key(r: dict[str, Any], desc: bool) -> datetime | None:
    if "birthDate" not in r:
        return None
    lo, hi = date_range(r["birthDate"])
    return hi if desc else lo


KEYS = {
    "family": family_key,
    "birthdate": birth_key,
    "gender": lambda r, desc: r.get("gender"),
    "_id": lambda r, desc: r["id"],
    "_lastUpdated": lambda r, desc: r["meta"]["lastUpdated"],
}


def sorted_ids(records: list[dict[str, Any]], sort: str) -> list[str]:
    """R4 _sort: ascending uses the lowest value, descending the highest; records
    without a value come last either way; ties end in id order (the server's
    stable tie-breaker)."""
    out = sorted(records, key=lambda r: r["id"])
    for part in reversed(sort.split(",")):
        desc = part.startswith("-")
        key = KEYS[part.lstrip("-")]
        present = [r for r in out if key(r, desc) is not None]
        missing = [r for r in out if key(r, desc) is None]
        out = sorted(present, key=lambda r: key(r, desc), reverse=desc) + missing  # stable
    return [r["id"] for r in out]


SORTS = ["family", "-family", "birthdate", "-birthdate", "-birthdate,family", "gender,-family", "_id", "-_id",
         "_lastUpdated", "-_lastUpdated", "birthdate,-_lastUpdated"]


@pytest.mark.parametrize("sort", SORTS)
async def test_sort(client, people, sort: str) -> None:  # type: ignore[no-untyped-def]
    run, records = people
    assert await ids(client, "Patient", [scope(run), ("_sort", sort)]) == sorted_ids(records, sort)


async def test_sort_descending_date_then_family_is_meaningful(people) -> None:  # type: ignore[no-untyped-def]
    # the fixture has ties on birthDate that family must break, and a month that
    # sorts after its own first day when descending (its range ends later)
    _, records = people
    order = sorted_ids(records, "-birthdate,family")
    by_id = {r["id"]: r for r in records}
    births = [by_id[i].get("birthDate") for i in order]
    assert births.index("1980-03") < births.index("1980-03-01")
    assert [norm(by_id[i]["name"][0].get("family", "")) for i in order if by_id[i].get("birthDate") == "1980-03-01"] == ["dubois", "zola"]


# -- paging and totals --------------------------------------------------------------------------
FAMILIES = ["Petit", "Martin", "Bernard", "Thomas", "Robert", "Richard", "Durand"]


@pytest_asyncio.fixture(scope="module")
async def crowd(client) -> tuple[str, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    run = uniq("page")
    bodies = [tagged({"resourceType": "Patient", "name": [{"family": FAMILIES[i % len(FAMILIES)], "given": [f"P{i:02d}"]}]}, run)
              for i in range(23)]
    return run, await create_all(client, bodies)


@pytest.mark.parametrize("sort", [None, "family", "-family,given"])
async def test_paging_follows_next_links_to_the_end(client, crowd, sort) -> None:  # type: ignore[no-untyped-def]
    run, records = crowd
    params = [scope(run), ("_count", "5")] + ([("_sort", sort)] if sort else [])
    bundles = await pages(client, "Patient", params)
    got = [i for b in bundles for i in match_ids(b)]
    if sort is None:
        expected = sorted(r["id"] for r in records)
    elif sort == "family":
        expected = [r["id"] for r in sorted(records, key=lambda r: (norm(r["name"][0]["family"]), r["id"]))]
    else:
        by_given = sorted(records, key=lambda r: (r["name"][0]["given"][0], r["id"]))
        expected = [r["id"] for r in sorted(by_given, key=lambda r: norm(r["name"][0]["family"]), reverse=True)]
    assert got == expected  # every match exactly once, in order
    assert [len(match_ids(b)) for b in bundles] == [5, 5, 5, 5, 3]
    assert link(bundles[0], "previous") is None and link(bundles[1], "previous") is not None
    assert link(bundles[-1], "next") is None
    assert bundles[-1]["total"] == 23  # known on the last page
    nxt = link(bundles[0], "next")
    assert nxt is not None and nxt.count("_count=") == 1 and nxt.count("_offset=") == 1


async def test_total(client, crowd) -> None:  # type: ignore[no-untyped-def]
    run, records = crowd
    n = len(records)
    b = await search(client, "Patient", [scope(run), ("_count", "2"), ("_total", "accurate")])
    assert b["total"] == n and len(match_ids(b)) == 2
    b = await search(client, "Patient", [scope(run), ("_count", "2"), ("_total", "none")])
    assert "total" not in b and len(match_ids(b)) == 2
    b = await search(client, "Patient", [scope(run), ("_count", "2"), ("_total", "estimate")])
    assert isinstance(b.get("total"), int) and b["total"] >= 2
    b = await search(client, "Patient", [scope(run), ("_summary", "count")])
    assert b["total"] == n and not b.get("entry")
    b = await search(client, "Patient", [scope(run), ("_count", "0")])
    assert b["total"] == n and not match_ids(b)
    b = await search(client, "Patient", [scope(run), ("family", "martin"), ("_total", "accurate")])
    assert b["total"] == sum(1 for r in records if r["name"][0]["family"] == "Martin")


# -- _summary and _elements -----------------------------------------------------------------------
# R4 Patient elements flagged "summary" (and those that are not)
PATIENT_SUMMARY = {"identifier", "active", "name", "telecom", "gender", "birthDate", "deceasedBoolean", "address",
                   "managingOrganization", "link"}


@pytest_asyncio.fixture(scope="module")
async def full_patient(client) -> tuple[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    run = uniq("summary")
    body = {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Hélène Lefèvre</div>"},
        "identifier": [{"system": "urn:test", "value": run}], "active": True,
        "name": [{"family": "Lefèvre", "given": ["Hélène"]}], "gender": "female", "birthDate": "1980-05-17",
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]},
        "contact": [{"name": {"family": "Lefèvre", "given": ["Paul"]}}],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "fr"}]}}],
    }
    return run, await create(client, tagged(body, run))


def tags(resource: dict[str, Any]) -> set[tuple[str, str]]:
    return {(t.get("system"), t.get("code")) for t in resource.get("meta", {}).get("tag", [])}


@pytest.mark.parametrize("mode", ["true", "text", "data", "false"])
async def test_summary(client, full_patient, mode: str) -> None:  # type: ignore[no-untyped-def]
    run, created = full_patient
    b = await search(client, "Patient", [scope(run), ("_summary", mode)])
    (res,) = [e["resource"] for e in b["entry"]]
    data_keys = set(created) - {"resourceType", "id", "meta"}
    expected = {
        "true": data_keys & PATIENT_SUMMARY,
        "text": {"text"},
        "data": data_keys - {"text"},
        "false": data_keys,
    }[mode]
    assert set(res) - {"resourceType", "id", "meta"} == expected
    assert res["id"] == created["id"]
    assert (SUBSETTED in tags(res)) == (mode != "false")


async def test_elements(client, full_patient) -> None:  # type: ignore[no-untyped-def]
    run, created = full_patient
    b = await search(client, "Patient", [scope(run), ("_elements", "name,gender,Patient.birthDate")])
    (res,) = [e["resource"] for e in b["entry"]]
    assert set(res) == {"resourceType", "id", "meta", "name", "gender", "birthDate"}
    assert res["name"] == created["name"] and SUBSETTED in tags(res)


# -- _id, _lastUpdated, _tag, _profile, _security -------------------------------------------------
async def test_id(client, people) -> None:  # type: ignore[no-untyped-def]
    run, records = people
    a, b = records[0]["id"], records[1]["id"]
    assert sorted(await ids(client, "Patient", [("_id", f"{a},{b}")])) == sorted([a, b])
    assert await ids(client, "Patient", [("_id", a), ("_id", b)]) == []
    assert await ids(client, "Patient", [("_id", a), scope(run)]) == [a]
    assert await ids(client, "Patient", [("_id", "no-such-id-" + run)]) == []


@pytest.mark.parametrize("prefix", ["", "eq", "ge", "gt", "le", "lt", "ne"])
async def test_last_updated(client, people, prefix: str) -> None:  # type: ignore[no-untyped-def]
    run, records = people
    stamps = [r["meta"]["lastUpdated"] for r in records]
    assert len(set(stamps)) == len(stamps), "records created one by one have distinct instants"
    pivot = stamps[3]
    expected = sorted(r["id"] for r in records if date_matches(prefix + pivot, date_range(r["meta"]["lastUpdated"])))
    assert sorted(await ids(client, "Patient", [scope(run), ("_lastUpdated", prefix + pivot)])) == expected
    assert expected


async def test_last_updated_day(client, people) -> None:  # type: ignore[no-untyped-def]
    run, records = people
    day = records[0]["meta"]["lastUpdated"][:10]
    expected = sorted(r["id"] for r in records if r["meta"]["lastUpdated"].startswith(day))
    assert sorted(await ids(client, "Patient", [scope(run), ("_lastUpdated", day)])) == expected


CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PROFILE = "http://example.org/fhir/StructureDefinition"


@pytest_asyncio.fixture(scope="module")
async def labelled(client) -> tuple[str, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    run = uniq("meta")

    def obs(tag: str | None, profile: str | None, security: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"tag": [{"system": "http://example.org/tags", "code": tag}] if tag else []}
        if profile:
            meta["profile"] = [f"{PROFILE}/{profile}"]
        if security:
            meta["security"] = [{"system": CONF, "code": security}]
        return tagged({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "meta": meta}, run)

    return run, await create_all(client, [obs("urgent", "fr-bp", "N"), obs("routine", "fr-bp-child", "N"),
                                          obs(None, "fr-weight|1.0", None), obs("urgent", None, "N")])


def meta_tags(r: dict[str, Any]) -> set[str]:
    return {t["code"] for t in r["meta"].get("tag", []) if t["system"] == "http://example.org/tags"}


META_CASES = [
    ("_tag", "http://example.org/tags|urgent", lambda r: "urgent" in meta_tags(r)),
    ("_tag", "urgent,routine", lambda r: bool(meta_tags(r) & {"urgent", "routine"})),
    ("_tag:not", "http://example.org/tags|urgent", lambda r: "urgent" not in meta_tags(r)),
    ("_tag:missing", "false", lambda r: True),  # the run tag is always there
    ("_profile", f"{PROFILE}/fr-bp", lambda r: f"{PROFILE}/fr-bp" in r["meta"].get("profile", [])),
    ("_profile:below", f"{PROFILE}/fr-bp", lambda r: any(p.startswith(f"{PROFILE}/fr-bp") for p in r["meta"].get("profile", []))),
    ("_profile:missing", "true", lambda r: "profile" not in r["meta"]),
    ("_profile", f"{PROFILE}/fr-weight", lambda r: any(p.split("|")[0] == f"{PROFILE}/fr-weight" for p in r["meta"].get("profile", []))),
    ("_security", f"{CONF}|N", lambda r: any(s["code"] == "N" for s in r["meta"].get("security", []))),
    ("_security:missing", "true", lambda r: not r["meta"].get("security")),
]


@pytest.mark.parametrize("key, value, predicate", META_CASES, ids=[f"{c[0]}={c[1]}" for c in META_CASES])
async def test_meta_parameters(client, labelled, key: str, value: str, predicate) -> None:  # type: ignore[no-untyped-def]
    run, records = labelled
    expected = sorted(r["id"] for r in records if predicate(r))
    assert expected
    assert sorted(await ids(client, "Observation", [scope(run), (key, value)])) == expected


# -- French full text: _text (narrative) and _content (every text) ---------------------------
CONDITIONS = [  # narrative, code text, note
    ("<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Douleur thoracique aiguë</p></div>", "Angor", None),
    ("<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient se plaint de <b>céphalées</b> matinales</div>", "Migraine", None),
    (None, "Céphalée de tension", "Douleurs abdominales associées"),
    ("<div xmlns=\"http://www.w3.org/1999/xhtml\">Suivi diab&#233;tique trimestriel</div>", "Diabète de type 2", None),
    ("<div xmlns=\"http://www.w3.org/1999/xhtml\">Entorse de la cheville</div>", "Entorse", "Repos"),
]


@pytest_asyncio.fixture(scope="module")
async def notes(client) -> tuple[str, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    run = uniq("fts")
    bodies = []
    for div, code_text, note in CONDITIONS:
        body: dict[str, Any] = {"resourceType": "Condition", "subject": {"reference": "Patient/fts-1"}, "code": {"text": code_text}}
        if div:
            body["text"] = {"status": "generated", "div": div}
        if note:
            body["note"] = [{"text": note}]
        bodies.append(tagged(body, run))
    return run, await create_all(client, bodies)


def words(text: str) -> list[str]:
    import html
    import re

    return re.findall(r"\w+", norm(html.unescape(re.sub(r"<[^>]+>", " ", text))))


def narrative(r: dict[str, Any]) -> list[str]:
    return words(r.get("text", {}).get("div", ""))


def content(r: dict[str, Any]) -> list[str]:
    return words(" ".join([r["code"]["text"], *(n["text"] for n in r.get("note", []))]))


# query -> French stems every word must match (a word of the text starting with the stem)
FTS = [
    ("douleurs", ["douleur"]),
    ("DOULEUR", ["douleur"]),
    ("cephalee", ["cephal"]),
    ("céphalées", ["cephal"]),
    ("diabetique", ["diabet"]),
    ("douleur thoracique", ["douleur", "thorac"]),
    ("entorse,migraine", None),  # OR: handled below
    ("fracture", ["fractur"]),
]


@pytest.mark.parametrize("param, source", [("_text", narrative), ("_content", content)])
@pytest.mark.parametrize("query, stems", FTS, ids=[q for q, _ in FTS])
async def test_full_text_is_french_aware(client, notes, param: str, source, query: str, stems) -> None:  # type: ignore[no-untyped-def]
    run, records = notes

    def matches(r: dict[str, Any], stems: list[str]) -> bool:
        return all(any(w.startswith(s) for w in source(r)) for s in stems)

    if stems is None:
        expected = sorted(r["id"] for r in records if matches(r, ["entors"]) or matches(r, ["migrain"]))
    else:
        expected = sorted(r["id"] for r in records if matches(r, stems))
    assert sorted(await ids(client, "Condition", [scope(run), (param, query)])) == expected


async def test_full_text_expectations_are_not_empty(notes) -> None:  # type: ignore[no-untyped-def]
    _, records = notes
    assert sum(any(w.startswith("cephal") for w in narrative(r)) for r in records) == 1
    assert sum(any(w.startswith("cephal") for w in content(r)) for r in records) == 1
    assert sum(any(w.startswith("diabet") for w in narrative(r)) for r in records) == 1  # only once &#233; is decoded


# -- near --------------------------------------------------------------------------------------
CITIES = {
    "Paris": (48.8566, 2.3522), "Lille": (50.6292, 3.0573), "Amiens": (49.8941, 2.2958),
    "Rouen": (49.4432, 1.0999), "Marseille": (43.2965, 5.3698), "Suva": (-18.1416, 178.4419),
}


def widest_point(lat: float, lon: float, km: float) -> tuple[float, float]:
    """The point of the circle of radius km around (lat, lon) farthest east: north
    of lat, so a box of +-km/cos(lat) in longitude would miss it."""
    r = km / 6371.0088
    plat = math.degrees(math.asin(math.sin(math.radians(lat)) / math.cos(r)))
    plon = lon + math.degrees(math.asin(math.sin(r) / math.cos(math.radians(lat))))
    return round(plat, 6), round(plon, 6)


@pytest_asyncio.fixture(scope="module")
async def places(client) -> tuple[str, dict[str, dict[str, Any]], dict[str, tuple[float, float]]]:  # type: ignore[no-untyped-def]
    run = uniq("near")
    coords = dict(CITIES)
    coords["East of Paris (1990 km)"] = widest_point(*CITIES["Paris"], 1990)
    bodies = [tagged({"resourceType": "Location", "name": name, "position": {"latitude": lat, "longitude": lon}}, run)
              for name, (lat, lon) in coords.items()]
    bodies.append(tagged({"resourceType": "Location", "name": "Nowhere"}, run))
    created = await create_all(client, bodies)
    return run, {r["name"]: r for r in created}, coords


NEAR = [  # center, distance, unit
    ("Amiens", 150, "km"), ("Amiens", 100, "mi"), ("Paris", 1000, "km"), ("Lille", 0.5, "km"), ("Rouen", 130000, "m"),
    ("Paris", 2000, "km"), ("Marseille", 5000, "km"), ("Suva", 5, "km"),
]
UNIT_KM = {"km": 1.0, "mi": 1.609344, "m": 0.001}


@pytest.mark.parametrize("center, distance, unit", NEAR, ids=[f"{c}-{d}{u}" for c, d, u in NEAR])
async def test_near(client, places, center: str, distance: float, unit: str) -> None:  # type: ignore[no-untyped-def]
    run, by_name, coords = places
    lat, lon = CITIES[center]
    limit = distance * UNIT_KM[unit]
    dist = {name: haversine_km(lat, lon, *c) for name, c in coords.items()}
    expected = [by_name[n]["id"] for n in sorted((n for n in dist if dist[n] <= limit), key=dist.__getitem__)]
    got = await ids(client, "Location", [scope(run), ("near", f"{lat}|{lon}|{distance}|{unit}")])
    assert got == expected  # sorted by distance by default


async def test_near_boundaries_and_units(client, places) -> None:  # type: ignore[no-untyped-def]
    run, by_name, coords = places
    d = haversine_km(*CITIES["Amiens"], *CITIES["Paris"])
    assert 110 < d < 120
    lat, lon = CITIES["Amiens"]
    inside = await ids(client, "Location", [scope(run), ("near", f"{lat}|{lon}|{d + 0.2:.3f}|km")])
    outside = await ids(client, "Location", [scope(run), ("near", f"{lat}|{lon}|{d - 0.2:.3f}|km")])
    assert by_name["Paris"]["id"] in inside and by_name["Paris"]["id"] not in outside
    miles = await ids(client, "Location", [scope(run), ("near", f"{lat}|{lon}|{(d + 0.2) / 1.609344:.4f}|mi")])
    assert miles == inside
    # the widest point of a 1990 km circle lies outside the naive bounding box of a 2000 km one
    east = by_name["East of Paris (1990 km)"]["id"]
    assert haversine_km(*CITIES["Paris"], *coords["East of Paris (1990 km)"]) == pytest.approx(1990, abs=0.5)
    assert east in await ids(client, "Location", [scope(run), ("near", f"{CITIES['Paris'][0]}|{CITIES['Paris'][1]}|2000|km")])
    # across the antimeridian: 178.44 E is near 179.5 W
    assert await ids(client, "Location", [scope(run), ("near", "-17.9|-179.5|300|km")]) == [by_name["Suva"]["id"]]


async def test_near_sort_can_be_overridden(client, places) -> None:  # type: ignore[no-untyped-def]
    run, by_name, coords = places
    lat, lon = CITIES["Amiens"]
    got = await ids(client, "Location", [scope(run), ("near", f"{lat}|{lon}|300|km"), ("_sort", "name")])
    names = sorted(n for n in coords if haversine_km(lat, lon, *coords[n]) <= 300)
    assert got == [by_name[n]["id"] for n in names]


# -- errors: lenient and strict handling ------------------------------------------------------------
async def test_unknown_parameter_lenient_and_strict(client, people) -> None:  # type: ignore[no-untyped-def]
    run, records = people
    b = await search(client, "Patient", [scope(run), ("foo", "bar"), ("family", "dubois")])
    assert sorted(match_ids(b)) == sorted(r["id"] for r in records if family_key(r, False) == "dubois")
    (oo,) = outcomes(b)
    assert oo["resourceType"] == "OperationOutcome" and "foo" in oo["issue"][0]["diagnostics"]
    assert oo["issue"][0]["severity"] in ("information", "warning")
    await expect_error(client, "Patient", [scope(run), ("foo", "bar")], headers={"Prefer": "handling=strict"}, mentions="foo")
    b = await search(client, "Patient", [scope(run), ("family", "dubois")], headers={"Prefer": "handling=strict"})
    assert not outcomes(b)
    # an empty criterion constrains nothing
    assert sorted(await ids(client, "Patient", [scope(run), ("family", "")])) == sorted(r["id"] for r in records)


BAD = [
    ("Patient", "birthdate", "2020-13-45", "date"),
    ("Patient", "birthdate", "xx2020", "date"),
    ("Patient", "birthdate", "ge", "date"),
    ("Patient", "_lastUpdated", "yesterday", "date"),
    ("RiskAssessment", "probability", "abc", "number"),
    ("RiskAssessment", "probability", "zz0.5", "number"),
    ("Observation", "value-quantity", "five|http://unitsofmeasure.org|mg", "number"),
    ("Observation", "code-value-quantity", "8480-6", "$"),
    ("Patient", "_count", "abc", "_count"),
    ("Patient", "_count", "-1", "_count"),
    ("Patient", "_offset", "x", "_offset"),
    ("Patient", "_sort", "foo", "foo"),
    ("Patient", "_summary", "maybe", "_summary"),
    ("Patient", "_total", "all", "_total"),
    ("Patient", "family:foo", "x", "modifier"),
    ("Location", "near", "abc", "near"),
    ("Location", "near", "48.8|2.3|10|furlongs", "unit"),
    ("Location", "near", "95|2.3|10|km", "near"),
]


@pytest.mark.parametrize("rtype, key, value, mentions", BAD, ids=[f"{r}?{k}={v}" for r, k, v, _ in BAD])
async def test_bad_values_are_a_clear_400(client, rtype: str, key: str, value: str, mentions: str) -> None:  # type: ignore[no-untyped-def]
    oo = await expect_error(client, rtype, [(key, value)], mentions=mentions)
    assert any(i["diagnostics"].startswith("PRC-") for i in oo["issue"])


# -- POST _search ---------------------------------------------------------------------------------
async def test_post_search_gives_the_same_results(client, people, crowd, places) -> None:  # type: ignore[no-untyped-def]
    run, _ = people
    crowd_run, _ = crowd
    near_run, _, _ = places
    queries = [
        ("Patient", [scope(run), ("family", "dub")]),
        ("Patient", [scope(run), ("_sort", "-birthdate,family")]),
        ("Patient", [scope(run), ("gender", "male,other"), ("birthdate", "ge1980")]),
        ("Patient", [scope(crowd_run), ("_count", "4"), ("_sort", "family"), ("_total", "accurate")]),
        ("Location", [scope(near_run), ("near", "49.8941|2.2958|200|km")]),
    ]
    for rtype, params in queries:
        got = await search(client, rtype, params)
        posted = await search(client, rtype, params, post=True)
        assert match_ids(posted) == match_ids(got) and posted.get("total") == got.get("total")
        assert match_ids(got)
    # criteria may also be split between the URL and the form body
    r = await client.post("/fhir/Patient/_search", params=[scope(run)], data={"family": "dub"})
    assert r.status_code == 200 and match_ids(r.json()) == match_ids(await search(client, "Patient", queries[0][1]))


async def test_system_search_across_types(client, people, labelled) -> None:  # type: ignore[no-untyped-def]
    run, patients = people
    b = await search(client, None, [scope(run), ("_type", "Patient,Observation"), ("_count", "100")])
    assert sorted(match_ids(b)) == sorted(r["id"] for r in patients)
