"""The demo region gets agendas: schedules from opening rules, future slots, a few bookings."""

from __future__ import annotations

from parcours.security.caller import SYSTEM
from parcours.services.booking import demo as booking_demo
from parcours.services.booking import model
from parcours.services.directory import demo
from parcours.services.directory import model as directory
from tests.conftest import uniq


async def test_demo_region_gets_schedules_slots_and_bookings(platform, client) -> None:
    region = demo.build_region("32", seed=3, roles=60, patients=4, dataset=uniq("demo"))
    await demo.write_region(platform, region, hooks=[booking_demo.schedules_hook(days=7, bookings=12)])
    tag = f"{directory.DATASET_TAG_SYSTEM}|{region.dataset}"
    r = await client.get("/fhir/Schedule", params={"_tag": tag, "_count": "500", "_summary": "count"})
    schedules = r.json()["total"]
    expected = sum(1 for role in region.roles
                   if booking_demo.availability_for(role, role.key == next(x.key for x in region.roles if x.kind == "gp"), 7))
    assert schedules == expected > 0
    r = await client.get("/fhir/Slot", params={"_tag": tag, "status": "busy", "_count": "100"})
    busy = [e["resource"] for e in r.json().get("entry", [])]
    r = await client.get("/fhir/Appointment", params={"patient": ",".join(f"Patient/{r['id']}" for r in region.resources
                                                                           if r["resourceType"] == "Patient"),
                                                      "status": "booked", "_count": "100"})
    appts = [e["resource"] for e in r.json().get("entry", [])]
    assert len(appts) == len(busy) == 12
    # The followed patient sees the first GP.
    gp = next(x for x in region.roles if x.kind == "gp")
    first_patient = f"{region.prefix}-pat1"
    assert any(f"PractitionerRole/{gp.key}" in model.participants(a, "PractitionerRole") and
               f"Patient/{first_patient}" in model.participants(a, "Patient") for a in appts)
    # Loading again rolls the agendas forward and keeps the bookings.
    async with platform.transaction(SYSTEM) as repo:
        await booking_demo.write_agendas(repo, region, days=7, bookings=12)
    r = await client.get("/fhir/Slot", params={"_tag": tag, "status": "busy", "_count": "100"})
    assert sorted(e["resource"]["id"] for e in r.json().get("entry", [])) == sorted(s["id"] for s in busy)
