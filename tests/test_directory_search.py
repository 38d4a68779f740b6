"""Geolocated directory search: the domain service, its JSON API, and the standard FHIR searches.

Expected results are computed here from the generated data with this file's own
great-circle distance, never copied from the server's answers.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio

from parcours.security.caller import SYSTEM
from parcours.services.directory import demo
from parcours.services.directory.search import DirectoryQuery, search
from parcours.services.platform import Platform
from tests.conftest import uniq

CARE = "https://parcours.example/fhir/CodeSystem/care-offer"
SPEC = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"
PROF = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
NEW_PATIENTS = "https://parcours.example/fhir/StructureDefinition/accepting-new-patients"
AMIENS = (49.8934, 2.2954)  # INSEE 80021, the commune point of the bundled table


def km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    r = 6371.0088
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * r * math.asin(math.sqrt(h))


def codes(concepts: list[dict] | None, system: str) -> set[str]:
    return {c["code"] for cc in concepts or [] for c in cc.get("coding", []) if c.get("system") == system}


@dataclass
class Data:
    region: demo.DemoRegion
    by_id: dict[str, dict]

    def get(self, ref: str) -> dict:
        return self.by_id[ref]

    def expected(self, lat: float, lon: float, radius: float, *, specialty: str | None = None, profession: str | None = None,
                 offers: tuple[str, ...] = (), new_patients: bool = False, language: str | None = None,
                 wheelchair: bool = False) -> list[tuple[float, str]]:
        out = []
        for res in self.region.resources:
            if res["resourceType"] != "PractitionerRole":
                continue
            if specialty and specialty not in codes(res.get("specialty"), SPEC):
                continue
            if profession and profession not in codes(res.get("code"), PROF):
                continue
            offered = set().union(*(codes(self.get(s["reference"])["type"], CARE) for s in res.get("healthcareService", [])))
            if not set(offers) <= offered:
                continue
            if new_patients and not any(e["url"] == NEW_PATIENTS and e["valueBoolean"] for e in res.get("extension", [])):
                continue
            prac = self.get(res["practitioner"]["reference"])
            if language and language not in {c["code"] for cc in prac.get("communication", []) for c in cc["coding"]}:
                continue
            dists = []
            for ref in res.get("location", []):
                loc = self.get(ref["reference"])
                if wheelchair and "wheelchair" not in str(loc.get("extension", "")):
                    continue
                dists.append(km(lat, lon, loc["position"]["latitude"], loc["position"]["longitude"]))
            if dists and min(dists) <= radius:
                out.append((min(dists), res["id"]))
        return sorted(out)


@pytest_asyncio.fixture(scope="module")
async def data(platform: Platform) -> AsyncIterator[Data]:
    region = demo.build_region("32", seed=11, roles=500, patients=2, dataset=uniq("dirsearch"))
    await demo.write_region(platform, region)
    yield Data(region, {f"{r['resourceType']}/{r['id']}": r for r in region.resources})


def check(hits: list, expected: list[tuple[float, str]]) -> None:  # type: ignore[type-arg]
    """Same roles, same distances, in distance order (ties in any order)."""
    got = [(h.distance_km, h.role.id) for h in hits]
    assert [round(d, 6) for d, _ in got] == [round(d, 6) for d, _ in expected]
    assert {i for _, i in got} == {i for _, i in expected}
    want = {i: d for d, i in expected}
    assert all(abs(want[i] - d) < 1e-6 for d, i in got)


@pytest.mark.parametrize("criteria", [
    {},
    {"specialty": "SM54"},
    {"specialty": "SM54", "offers": ("teleconsultation",), "new_patients": True},
    {"profession": "60", "offers": ("home-visit", "vaccination")},
    {"offers": ("unscheduled-care",), "wheelchair": True},
    {"language": "en"},
    {"profession": "10", "language": "es", "wheelchair": True},
])
async def test_search_matches_the_generated_data(platform: Platform, data: Data, criteria: dict) -> None:
    expected = data.expected(*AMIENS, 15, **criteria)
    assert expected or criteria.get("language") == "es"
    q = DirectoryQuery(lat=AMIENS[0], lon=AMIENS[1], radius_km=15, profession=criteria.get("profession"),
                       specialty=criteria.get("specialty"), offers=criteria.get("offers", ()),
                       accepts_new_patients=criteria.get("new_patients", False), language=criteria.get("language"),
                       wheelchair=criteria.get("wheelchair", False), limit=100, dataset=data.region.dataset)
    async with platform.transaction(SYSTEM) as repo:
        result = await search(repo, q)
    assert len(expected) <= 100
    check(result.hits, expected)
    assert result.total == len(expected) and not result.has_more


async def test_search_pages_outwards_in_distance_order(platform: Platform, data: Data) -> None:
    lille = (50.6309, 3.0709)
    expected = data.expected(*lille, 30)
    assert len(expected) > 60
    seen: list = []  # type: ignore[type-arg]
    async with platform.transaction(SYSTEM) as repo:
        for offset in (0, 25, 50):
            page = await search(repo, DirectoryQuery(lat=lille[0], lon=lille[1], radius_km=30, limit=25, offset=offset,
                                                     dataset=data.region.dataset))
            assert page.has_more == (offset + 25 < len(expected))
            seen += page.hits
    window = expected[:75]
    assert [round(h.distance_km, 6) for h in seen] == [round(d, 6) for d, _ in window]
    assert len({h.role.id for h in seen}) == 75
    assert {h.role.id for h in seen} <= {i for d, i in expected if d <= window[-1][0]}


async def test_rural_commune_has_nothing_within_five_km(platform: Platform, data: Data) -> None:
    # Find, from the data, a commune with no practice within 5 km, and ask the service.
    from parcours.services.directory.geo import communes

    places = [(r["position"]["latitude"], r["position"]["longitude"]) for r in data.region.resources if r["resourceType"] == "Location"]
    lonely = next(c for c in communes().in_region("32") if min(km(c.lat, c.lon, a, b) for a, b in places) > 5)
    async with platform.transaction(SYSTEM) as repo:
        result = await search(repo, DirectoryQuery(lat=lonely.lat, lon=lonely.lon, radius_km=5, dataset=data.region.dataset))
    assert result.hits == [] and result.total == 0


async def test_json_api_search_by_place(client: httpx.AsyncClient, data: Data) -> None:
    ours = {r["id"] for r in data.region.resources if r["resourceType"] == "PractitionerRole"}
    expected = data.expected(*AMIENS, 12, specialty="SM54", offers=("teleconsultation",))
    r = await client.get("/api/directory/search", params={"place": "80000", "radius": "12", "specialty": "SM54",
                                                          "teleconsultation": "true", "limit": "100", "lang": "en"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["place"]["code"] == "80021" and body["center"] == {"lat": AMIENS[0], "lon": AMIENS[1]}
    results = [x for x in body["results"] if x["id"] in ours]  # other tests may have data around Amiens
    assert len(expected) >= 3
    assert {x["id"] for x in results} == {i for _, i in expected}
    want = {i: d for d, i in expected}
    assert all(abs(x["distanceKm"] - want[x["id"]]) < 1e-3 for x in results)
    assert [x["distanceKm"] for x in body["results"]] == sorted(x["distanceKm"] for x in body["results"])
    first = results[0]
    assert first["specialties"] == [{"code": "SM54", "label": "General practice"}]
    assert "teleconsultation" in [o["code"] for o in first["offers"]]
    assert first["practitioner"]["name"] and first["location"]["lat"] and first["nextSlots"] == []  # booking fills it: no agenda here
    role = data.get(f"PractitionerRole/{first['id']}")
    assert first["acceptsNewPatients"] == role["extension"][0]["valueBoolean"]


async def test_json_api_by_coordinates_and_errors(client: httpx.AsyncClient, data: Data) -> None:
    r = await client.get("/api/directory/search", params={"lat": AMIENS[0], "lon": AMIENS[1], "radius": 5, "wheelchair": "1",
                                                          "new_patients": "1", "offer": "vaccination"})
    assert r.status_code == 200
    for x in r.json()["results"]:
        assert x["location"]["wheelchairAccessible"] and x["acceptsNewPatients"] is True and x["distanceKm"] <= 5
        assert "vaccination" in [o["code"] for o in x["offers"]]
    bad = await client.get("/api/directory/search", params={"place": "80021", "specialty": "SM99"})
    assert bad.status_code == 400 and bad.json()["error"] == "PRC-1400" and "SM99" in bad.json()["message"]
    assert (await client.get("/api/directory/search")).status_code == 400
    assert (await client.get("/api/directory/search", params={"place": "Atlantis"})).status_code == 400
    assert (await client.get("/api/directory/search", params={"place": "80021", "radius": "500"})).status_code == 400
    assert (await client.get("/api/directory/search", params={"place": "80021", "radius": "0"})).status_code == 400


async def test_json_api_autocomplete_and_nomenclatures(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    r = await client.get("/api/directory/places", params={"q": "amie", "limit": 3})
    assert r.status_code == 200
    first = r.json()["results"][0]
    assert (first["code"], first["name"], first["label"], first["departementName"]) == ("80021", "Amiens", "Amiens (80000)", "Somme")
    r = await client.get("/api/directory/places", params={"q": "62100"})
    # Postal code 62100 is Calais; INSEE code 62100 (Beaurainville) comes after.
    assert [x["name"] for x in r.json()["results"]] == ["Calais", "Beaurainville"]
    r = await client.get("/api/directory/specialties", params={"q": "cardio", "lang": "en"})
    assert {"code": "SM04", "label": "Cardiology and vascular diseases"}.items() <= \
        next(x for x in r.json()["results"] if x["code"] == "SM04").items()
    r = await client.get("/api/directory/specialties", params={"profession": "40"})
    assert [x["code"] for x in r.json()["results"]] == ["SCD01", "SCD02", "SCD03"]
    r = await client.get("/api/directory/professions")
    assert {"code": "60", "fr": "Infirmier", "en": "Nurse"}.items() <= next(x for x in r.json()["results"] if x["code"] == "60").items()
    r = await client.get("/api/directory/offers", params={"lang": "en"})
    assert [x["code"] for x in r.json()["results"]][:2] == ["consultation", "teleconsultation"]
    assert (await anon.get("/api/directory/places", params={"q": "amie"})).status_code == 401


async def test_standard_fhir_searches(client: httpx.AsyncClient, data: Data) -> None:
    tag = f"https://parcours.example/fhir/CodeSystem/dataset|{data.region.dataset}"
    # Location?near= answers nearest first.
    locs = [(km(*AMIENS, r["position"]["latitude"], r["position"]["longitude"]), r["id"])
            for r in data.region.resources if r["resourceType"] == "Location"]
    want = sorted(x for x in locs if x[0] <= 8)
    r = await client.get("/fhir/Location", params={"near": f"{AMIENS[0]}|{AMIENS[1]}|8|km", "_tag": tag, "_count": 500})
    got = [e["resource"]["id"] for e in r.json()["entry"]]
    assert sorted(got) == sorted(i for _, i in want)
    assert [round(km(*AMIENS, *(lambda p: (p["latitude"], p["longitude"]))(e["resource"]["position"])), 6)
            for e in r.json()["entry"]] == [round(d, 6) for d, _ in want]
    # PractitionerRole by specialty near a point, through the location chain.
    expected = data.expected(*AMIENS, 10, specialty="SM54")
    r = await client.get("/fhir/PractitionerRole", params={"specialty": f"{SPEC}|SM54", "location.near": f"{AMIENS[0]}|{AMIENS[1]}|10|km",
                                                           "_tag": tag, "_count": 500})
    assert sorted(e["resource"]["id"] for e in r.json()["entry"]) == sorted(i for _, i in expected)
    # Roles offering teleconsultation, through the service chain.
    r = await client.get("/fhir/PractitionerRole", params={"service.service-type": f"{CARE}|teleconsultation",
                                                           "location.near": f"{AMIENS[0]}|{AMIENS[1]}|10|km", "_tag": tag, "_count": 500})
    tele = data.expected(*AMIENS, 10, offers=("teleconsultation",))
    assert tele and sorted(e["resource"]["id"] for e in r.json()["entry"]) == sorted(i for _, i in tele)
