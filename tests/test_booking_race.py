"""Atomic booking under contention, over real HTTP: 200 concurrent attempts on one slot give
exactly one appointment; the 199 others are told the slot is taken, with the next free ones.
The same holds for concurrent FHIR creates of booked Appointments."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.accounts_helpers import new_patient
from tests.booking_helpers import FHIR_JSON, appointment_body, define, free_slots, monday_after, new_practice

ATTEMPTS = 200


async def test_200_concurrent_bookings_of_one_slot_make_one_appointment(live_server: str, live_token: str, client, platform) -> None:
    pr = await new_practice(client)
    sid, _ = await define(platform, pr["role"], ["mon-fri 09:00-10:00 consultation 15"], now=monday_after(platform.clock.now()))
    slots = await free_slots(client, sid)
    target, fhir_target = slots[0]["id"], slots[1]["id"]
    patients = [await new_patient(client) for _ in range(10)]
    limits = httpx.Limits(max_connections=ATTEMPTS, max_keepalive_connections=ATTEMPTS)
    async with httpx.AsyncClient(base_url=live_server, headers={"Authorization": f"Bearer {live_token}"}, limits=limits,
                                 timeout=120) as http:
        answers = await asyncio.gather(*[
            http.post("/api/booking/book", json={"slot": target, "patient": f"Patient/{patients[i % len(patients)]}"})
            for i in range(ATTEMPTS)])
        assert Counter(r.status_code for r in answers) == {201: 1, 409: ATTEMPTS - 1}, Counter(r.text[:200] for r in answers)
        refused = [r.json() for r in answers if r.status_code == 409]
        assert {b["error"] for b in refused} == {"PRC-1491"}
        assert all(b["alternatives"] and target not in [a["id"] for a in b["alternatives"]] for b in refused)
        assert refused[0]["alternatives"][0]["id"] == fhir_target  # the next slot of the same agenda

        fhir = await asyncio.gather(*[
            http.post("/fhir/Appointment", json=appointment_body(fhir_target, patients[i % len(patients)]), headers=FHIR_JSON)
            for i in range(50)])
        assert Counter(r.status_code for r in fhir) == {201: 1, 409: 49}
        assert all(r.json()["resourceType"] == "OperationOutcome" for r in fhir if r.status_code == 409)

    winners = [r.json()["appointment"]["id"] for r in answers if r.status_code == 201]
    r = await client.get("/fhir/Appointment", params={"slot": f"Slot/{target}", "_count": "300"})
    assert [e["resource"]["id"] for e in r.json().get("entry", [])] == winners
    assert (await client.get(f"/fhir/Slot/{target}")).json()["status"] == "busy"
