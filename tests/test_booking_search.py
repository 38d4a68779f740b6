"""Issue #4's remaining parts: the free-slot index behind the search page's next free slots
(revision 0014_booking_search), the directory filters kept in extensions now applied in SQL,
Corsica in the demo builder, and no cancel button inside the cancellation deadline."""

from __future__ import annotations

import importlib
import re

from parcours.security.caller import SYSTEM
from parcours.services.booking import model, service
from parcours.services.booking.directory_slots import NextSlots
from parcours.services.directory import demo
from parcours.services.directory import model as directory
from parcours.services.directory.search import DirectoryQuery, search
from parcours.store import booking as store
from tests.accounts_helpers import create_resource, new_account
from tests.booking_helpers import FHIR_JSON, appointment_body, define, free_slots, monday_after, new_practice
from tests.conftest import uniq
from tests.test_booking_web import sign_in, web


def test_migration_writes_the_free_slot_table() -> None:
    mig = importlib.import_module("parcours.store.migrations.versions.0014_booking_search")
    src = open(mig.__file__, encoding="utf-8").read()
    t = store.booking_free_slot
    assert f'"{t.name}"' in src and all(f'"{c.name}"' in src for c in t.columns)
    assert "booking_free_slot_next" in src and 'ON "Slot"' in src


async def _index_rows(platform, schedule: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    async with platform.transaction(SYSTEM) as repo:
        cur = await repo.conn.execute("SELECT slot_id, start FROM booking_free_slot WHERE schedule_id = %s ORDER BY start, slot_id",
                                      (schedule,))
        return [(r[0], r[1]) for r in await cur.fetchall()]


async def test_free_slot_index_follows_every_write_and_matches_the_fhir_search(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    sid, _ = await define(platform, pr["role"], ["mon-fri 09:00-10:00 consultation 20"], now=now)

    async def agree() -> list[dict]:
        fhir = await free_slots(client, sid)  # Slot?schedule=...&status=free&_sort=start
        rows = await _index_rows(platform, sid)
        assert [s["id"] for s in fhir] == [r[0] for r in rows]
        assert [model.slot_start(s) for s in fhir] == [r[1] for r in rows]
        return fhir

    slots = await agree()
    assert len(slots) == 4 * 5 * 3
    patient = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Index"}]})
    r = await client.post("/fhir/Appointment", json=appointment_body(slots[0]["id"], patient), headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    after_booking = await agree()
    assert slots[0]["id"] not in {s["id"] for s in after_booking}
    async with platform.transaction(SYSTEM) as repo:  # blocked by the practice: not free any more
        await service.set_blocked(repo, slots[1]["id"], True)
    assert slots[1]["id"] not in {s["id"] for s in await agree()}
    async with platform.transaction(SYSTEM) as repo:
        await service.set_blocked(repo, slots[1]["id"], False)
    assert slots[1]["id"] in {s["id"] for s in await agree()}
    appt = r.json()
    appt["status"] = "cancelled"
    r = await client.put(f"/fhir/Appointment/{appt['id']}", json=appt, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    assert slots[0]["id"] in {s["id"] for s in await agree()}
    # A rule change deletes the free slots it no longer gives: gone from the index too.
    await define(platform, pr["role"], ["mon-fri 09:00-09:40 consultation 20"], now=now)
    assert len(await agree()) < len(after_booking)
    # The search page's hook gives the first three of the FHIR search, soonest first.
    async with platform.transaction(SYSTEM) as repo:
        hits = (await search(repo, DirectoryQuery(lat=49.894, lon=2.295, radius_km=0.5, limit=100))).hits
        mine = [h for h in hits if h.role.id == pr["role"]]
        assert mine
        await NextSlots()(repo, mine)
        expected = await service.find(repo, service.SlotQuery(start=repo.clock.now(), roles=[pr["role"]], limit=3))
    assert [s["id"] for s in mine[0].next_slots] == [s.id for s in expected]


async def test_directory_filters_kept_in_extensions_page_in_sql(platform) -> None:
    region = demo.build_region("32", seed=5, roles=300, patients=1, dataset=uniq("flags"))
    await demo.write_region(platform, region)
    roles = {r["id"]: r for r in region.resources if r["resourceType"] == "PractitionerRole"}
    locs = {r["id"]: r for r in region.resources if r["resourceType"] == "Location"}
    # The builders mirror the extensions as tags, and the tags only where the extension says so.
    for r in roles.values():
        tagged = {"system": directory.FLAG_TAG_SYSTEM, "code": directory.FLAG_NEW_PATIENTS} in (r.get("meta") or {}).get("tag", [])
        assert tagged == (directory.accepts_new_patients(r) is True)
    for loc in locs.values():
        tagged = {"system": directory.FLAG_TAG_SYSTEM, "code": directory.FLAG_WHEELCHAIR} in (loc.get("meta") or {}).get("tag", [])
        assert tagged == directory.wheelchair_accessible(loc)
    amiens = (49.894, 2.2957)
    async with platform.transaction(SYSTEM) as repo:
        full = await search(repo, DirectoryQuery(lat=amiens[0], lon=amiens[1], radius_km=40, limit=100, accepts_new_patients=True,
                                                 wheelchair=True, dataset=region.dataset))
        assert full.hits and full.total == len(full.hits)
        for h in full.hits:
            assert directory.accepts_new_patients(h.role.resource()) is True and directory.wheelchair_accessible(h.location)
        # Small pages are exact windows of the same list (the filter is applied before paging).
        paged = []
        for offset in range(0, len(full.hits), 3):
            page = await search(repo, DirectoryQuery(lat=amiens[0], lon=amiens[1], radius_km=40, limit=3, offset=offset,
                                                     accepts_new_patients=True, wheelchair=True, dataset=region.dataset))
            assert page.has_more == (offset + 3 < len(full.hits))
            paged += page.hits
        assert [round(h.distance_km, 6) for h in paged] == [round(h.distance_km, 6) for h in full.hits]
        # The same through standard FHIR searches.
        res = await repo.search(repo.parse_search("PractitionerRole", [
            ("_tag", f"{directory.FLAG_TAG_SYSTEM}|{directory.FLAG_NEW_PATIENTS}"), ("_tag", f"{directory.DATASET_TAG_SYSTEM}|{region.dataset}"),
            ("_count", "1000")]))
        assert {s.id for s in res.matches} == {i for i, r in roles.items() if directory.accepts_new_patients(r) is True}


def test_corsica_builds_with_its_departements_2a_and_2b() -> None:
    region = demo.build_region("94", seed=1, roles=150, patients=2, dataset="corse-test")
    deps = {p.commune.departement for p in region.practices.values()}
    assert deps <= {"2A", "2B"} and deps
    finess = [i["value"] for r in region.resources if r["resourceType"] == "Organization" for i in r.get("identifier", [])
              if i.get("system") == directory.FINESS_SYSTEM]
    assert finess and all(f[:2] in ("2A", "2B") and directory.luhn_ok(f) for f in finess)
    assert directory.luhn_ok(directory.with_luhn("2A000123"))
    assert not directory.luhn_ok("2A0001231") or not directory.luhn_ok("2A0001232")


async def test_no_cancel_button_inside_the_cancellation_deadline(app, client, platform) -> None:
    now = monday_after(platform.clock.now())
    strict, relaxed = await new_practice(client, family="Strict"), await new_practice(client, family="Souple")
    s1, _ = await define(platform, strict["role"], ["mon-fri 10:00-11:00 consultation 30"], now=now,
                         policy=model.Policy(cancel_hours=24 * 14, horizon_days=28, notice_minutes=60))
    s2, _ = await define(platform, relaxed["role"], ["mon-fri 10:00-11:00 consultation 30"], now=now)
    patient = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Delai", "given": ["Anne"]}]})
    booked = {}
    for sched in (s1, s2):
        slot = (await free_slots(client, sched))[0]
        async with platform.transaction(SYSTEM) as repo:
            booked[sched] = (await service.book(repo, slot["id"], patient=f"Patient/{patient}")).stored.id
    account = await new_account(platform, "patient", f"Patient/{patient}")
    async with web(app) as c:
        await sign_in(c, account.email)
        page = (await c.get("/portal/appointments")).text
        assert f"/booking/appointments/{booked[s2]}/cancel" in page
        assert f"/booking/appointments/{booked[s1]}/cancel" not in page
        assert "Trop tard pour annuler ou déplacer en ligne" in page and "336 h" in page
        assert len(re.findall(r"/booking/appointments/[^/]+/cancel", page)) == 1
    english = await new_account(platform, "patient", f"Patient/{patient}", locale="en")
    async with web(app) as c:
        await sign_in(c, english.email)
        assert "Too late to cancel or move online" in (await c.get("/portal/appointments")).text


async def test_spatial_index_gives_the_places_of_the_near_search_in_the_same_order(client, platform) -> None:
    import random

    from parcours.services.directory.geo import haversine_km
    from parcours.store import geo

    rng = random.Random(3)
    tag = uniq("geo")
    centre = (43.2965, 5.3698)  # Marseille
    ids = []
    for i in range(60):
        lat, lon = centre[0] + rng.uniform(-0.15, 0.15), centre[1] + rng.uniform(-0.2, 0.2)
        ids.append(await create_resource(client, {
            "resourceType": "Location", "status": "active", "name": f"P{i}", "position": {"latitude": lat, "longitude": lon},
            "meta": {"tag": [{"system": "https://parcours.example/fhir/CodeSystem/test", "code": tag}]}}))
    r = await client.get("/fhir/Location", params={"near": f"{centre[0]}|{centre[1]}|12|km", "_tag": f"https://parcours.example/fhir/CodeSystem/test|{tag}",
                                                  "_sort": "near", "_count": "100"})
    assert r.status_code == 200, r.text
    fhir = [e["resource"] for e in r.json().get("entry", [])]
    assert 5 < len(fhir) < 60
    mine = set(ids)
    async with platform.transaction(SYSTEM) as repo:
        nearest = [(lid, km) for lid, km in await geo.nearest_locations(repo.conn, centre[0], centre[1], 12, limit=100_000)
                   if lid in mine]
        paged = []
        for offset in range(0, 100_000, 7):  # pages give the same sequence
            page = await geo.nearest_locations(repo.conn, centre[0], centre[1], 12, limit=7, offset=offset)
            paged += page
            if len(page) < 7:
                break
    assert [lid for lid, _ in nearest] == [x["id"] for x in fhir]
    assert [x for x in paged if x[0] in mine] == nearest
    for (lid, km), x in zip(nearest, fhir, strict=True):
        assert abs(km - haversine_km(centre[0], centre[1], x["position"]["latitude"], x["position"]["longitude"])) < 1e-6
