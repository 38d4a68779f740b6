"""Shared helpers of the booking tests: a practitioner with a role at a place, and its agenda."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from parcours.fhir import fr_core
from parcours.security.caller import SYSTEM
from parcours.services.booking import model, service
from parcours.services.platform import Platform
from tests.accounts_helpers import FHIR_JSON, create_resource
from tests.conftest import uniq


async def new_practice(client: httpx.AsyncClient, *, family: str = "Durand", given: str = "Paul",
                       lat: float = 49.894, lon: float = 2.295, specialty: str | None = "SM54") -> dict:
    """A Practitioner, an Organization, a Location and the PractitionerRole tying them; their ids."""
    tag = uniq("bk")
    prac = await create_resource(client, {
        "resourceType": "Practitioner", "name": [{"family": family, "given": [given], "prefix": ["Dr"]}],
        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}]})
    org = await create_resource(client, {"resourceType": "Organization", "name": f"Cabinet {family}"})
    loc = await create_resource(client, {
        "resourceType": "Location", "status": "active", "name": f"Cabinet {family} {tag}",
        "address": {"line": ["12 rue des Lilas"], "postalCode": "80000", "city": "Amiens"},
        "position": {"latitude": lat, "longitude": lon}, "managingOrganization": {"reference": f"Organization/{org}"}})
    role_body: dict = {
        "resourceType": "PractitionerRole", "active": True, "practitioner": {"reference": f"Practitioner/{prac}"},
        "organization": {"reference": f"Organization/{org}"}, "location": [{"reference": f"Location/{loc}"}],
        "code": [{"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante",
                              "code": "10", "display": "Médecin"}]}]}
    if specialty:
        role_body["specialty"] = [{"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale",
                                               "code": specialty}]}]
    role = await create_resource(client, role_body)
    return {"practitioner": prac, "organization": org, "location": loc, "role": role, "tag": tag}


def monday_after(now: datetime, weeks: int = 1) -> datetime:
    """Midnight UTC of a Monday at least ``weeks`` weeks ahead (room for deadlines and notices)."""
    day = (now + timedelta(days=7 * weeks)).date()
    day -= timedelta(days=day.weekday())
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def define(platform: Platform, role: str, rules: list[str], *, leaves: list[model.Leave] | None = None,
                 policy: model.Policy | None = None, now: datetime | None = None) -> tuple[str, dict]:
    av = model.Availability([model.parse_rule(r) for r in rules], leaves or [], policy or model.Policy())
    async with platform.transaction(SYSTEM) as repo:
        sid, report = await service.define(repo, role, None, av, now=now)
    return sid, report.as_json()


async def free_slots(client: httpx.AsyncClient, schedule: str) -> list[dict]:
    r = await client.get("/fhir/Slot", params={"schedule": f"Schedule/{schedule}", "status": "free", "_sort": "start", "_count": "1000"})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


def appointment_body(slot_id: str, patient: str, status: str = "booked") -> dict:
    return {"resourceType": "Appointment", "status": status, "slot": [{"reference": f"Slot/{slot_id}"}],
            "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"}]}


__all__ = ["FHIR_JSON", "appointment_body", "define", "free_slots", "monday_after", "new_practice"]
