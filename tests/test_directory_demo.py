"""The demo region generator: deterministic, realistic proportions and gaps, stored through the Repository."""

from __future__ import annotations

import math
from collections import Counter

import httpx
import pytest

from parcours.services.directory import demo, model
from parcours.services.directory.geo import communes
from parcours.services.platform import Platform
from tests.conftest import uniq


def km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance, written here independently of the code under test."""
    r = 6371.0
    a = math.sin(math.radians(lat2 - lat1) / 2) ** 2 + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * \
        math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


@pytest.fixture(scope="module")
def region() -> demo.DemoRegion:
    return demo.build_region("32", seed=1)


def test_same_seed_same_data_other_seed_other_data(region: demo.DemoRegion) -> None:
    again = demo.build_region("32", seed=1)
    assert again.resources == region.resources
    other = demo.build_region("32", seed=2)
    assert other.resources != region.resources
    assert {r["id"] for r in other.resources}.isdisjoint({r["id"] for r in region.resources})


def test_default_size_and_shape(region: demo.DemoRegion) -> None:
    counts = region.counts()
    assert 1400 <= counts["PractitionerRole"] <= 1600
    assert counts["Practitioner"] < counts["PractitionerRole"]  # some specialists work at two places
    assert counts["Location"] == counts["Organization"] and counts["HealthcareService"] > counts["Organization"]
    assert counts["Patient"] == demo.DEFAULT_PATIENTS
    roles = [r for r in region.resources if r["resourceType"] == "PractitionerRole"]
    offers = Counter(o for r in region.roles for o in r.offers)
    assert offers["teleconsultation"] > 100 and offers["unscheduled-care"] > 100 and offers["home-visit"] > 100
    new = sum(1 for r in roles if model.accepts_new_patients(r))
    assert 0.3 < new / len(roles) < 0.8
    pracs = [r for r in region.resources if r["resourceType"] == "Practitioner"]
    assert sum(1 for p in pracs if "en" in model.languages(p)) > 200
    locs = [r for r in region.resources if r["resourceType"] == "Location"]
    assert 0.4 < sum(1 for loc in locs if model.wheelchair_accessible(loc)) / len(locs) < 0.9
    # Every place is in the region's communes, within a few km of its commune's point.
    geo = communes()
    for loc in locs:
        c = geo.get(loc["address"]["extension"][0]["valueCoding"]["code"])
        assert c.region == "32"
        lat, lon = model.position(loc)  # type: ignore[misc]
        assert km(lat, lon, c.lat, c.lon) <= 3.05


def test_roles_follow_population_and_density(region: demo.DemoRegion) -> None:
    geo = communes()
    pop = Counter()
    for c in geo.in_region("32"):
        pop[c.departement] += c.population
    dens = demo.densities()
    gp_by_dep = Counter(region.practices[r.practice].commune.departement for r in region.roles if r.kind == "gp")
    total_gp = sum(gp_by_dep.values())
    weight = {d: pop[d] * dens[d][0] for d in pop}
    for d in pop:
        expected = total_gp * weight[d] / sum(weight.values())
        assert abs(gp_by_dep[d] - expected) <= max(3, 0.05 * expected), (d, gp_by_dep[d], expected)
    # Per inhabitant, the Nord (dense in physicians) gets more GPs than the Aisne (under-served).
    assert gp_by_dep["59"] / pop["59"] > 1.3 * gp_by_dep["02"] / pop["02"]
    # Towns hold most roles: communes of 20,000+ inhabitants have a far larger share of roles than of people.
    roles_by_commune = Counter(region.practices[r.practice].commune.code for r in region.roles)
    big = {c.code for c in geo.in_region("32") if c.population >= 20_000}
    share_roles = sum(n for code, n in roles_by_commune.items() if code in big) / len(region.roles)
    share_pop = sum(c.population for c in geo.in_region("32") if c.code in big) / sum(pop.values())
    assert share_roles > share_pop + 0.1
    assert roles_by_commune["59350"] == max(roles_by_commune.values())  # Lille
    # Specialists only in towns.
    assert all(region.practices[r.practice].commune.population >= 15_000 for r in region.roles if r.kind in demo.SPECIALIST_KEYS)


def test_rural_areas_without_any_practice_nearby(region: demo.DemoRegion) -> None:
    places = [model.position(r) for r in region.resources if r["resourceType"] == "Location"]
    geo = communes()
    isolated = []
    for c in geo.in_region("32"):
        nearest = min(km(c.lat, c.lon, lat, lon) for lat, lon in places)  # type: ignore[misc]
        if nearest > 10:
            isolated.append((c, nearest))
    assert len(isolated) >= 20, "the demo must show under-served rural areas"
    assert all(c.population < 5000 for c, _ in isolated)
    assert max(d for _, d in isolated) > 12


async def test_write_region_stores_everything_once(platform: Platform, client: httpx.AsyncClient) -> None:
    small = demo.build_region("32", seed=5, roles=120, patients=3, dataset=uniq("demo"))
    counts = await demo.write_region(platform, small)
    again = await demo.write_region(platform, demo.build_region("32", seed=5, roles=120, patients=3, dataset=small.dataset))
    assert counts == again == small.counts()
    for rtype, n in counts.items():
        r = await client.get(f"/fhir/{rtype}", params={"_tag": f"{model.DATASET_TAG_SYSTEM}|{small.dataset}", "_summary": "count"})
        assert r.json()["total"] == n, rtype
    # Writing again replaced, never duplicated: every resource is at version 2.
    some = small.roles[0].key
    r = await client.get(f"/fhir/PractitionerRole/{some}")
    assert r.json()["meta"]["versionId"] == "2"

    hooked: list[int] = []

    async def slots_hook(repo, region) -> None:  # type: ignore[no-untyped-def]
        hooked.append(len(region.roles))

    await demo.write_region(platform, small, hooks=[slots_hook])
    assert hooked == [len(small.roles)]


def test_unknown_region_is_refused() -> None:
    with pytest.raises(Exception, match="Unknown region"):
        demo.build_region("99")
