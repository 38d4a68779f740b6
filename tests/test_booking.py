"""Booking: opening rules -> slots, the Appointment/Slot rule (409 on double booking, through
every door), cancel and move deadlines, blocking, no-shows, the waiting list, $find and $book.

Expected slots are counted from the rules in the test (days x openings / length), never
read back from the server first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from parcours.core.errors import BookingRuleViolation, SlotTaken
from parcours.security.caller import SYSTEM, Caller
from parcours.services.booking import generation, model, service, waitlist
from parcours.services.booking import notify
from parcours.store import booking as booking_store
from tests.accounts_helpers import create_resource, new_patient
from tests.conftest import uniq
from tests.booking_helpers import FHIR_JSON, appointment_body, define, free_slots, monday_after, new_practice

PATIENT_SCOPES = frozenset({"patient/*.*"})


def patient_caller(pid: str) -> Caller:
    return Caller(kind="patient", user_id=f"u-{pid}", fhir_user=f"Patient/{pid}", scopes=PATIENT_SCOPES, display="patient")


def staff_caller() -> Caller:
    return Caller(kind="staff", user_id="u-staff", scopes=frozenset({"user/*.*"}), display="secrétariat")


def test_migration_writes_the_tables_the_store_uses() -> None:
    import importlib

    from parcours.store import booking as store

    mig = importlib.import_module("parcours.store.migrations.versions.0008_booking")
    src = open(mig.__file__, encoding="utf-8").read()
    for table in store.TABLES:
        assert f'"{table.name}"' in src
        for col in table.columns:
            assert f'"{col.name}"' in src, (table.name, col.name)


async def test_rules_become_slots_and_a_rule_change_keeps_booked_slots(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())  # a Monday, midnight UTC: 4 full weeks ahead
    sid, report = await define(platform, pr["role"], ["mon-fri 08:30-12:00 consultation 30"], now=now)
    # 4 weeks x 5 days x 7 half-hours between 08:30 and 12:00.
    assert report == {"created": 140, "deleted": 0, "keptBooked": 0, "unchanged": 0}
    slots = await free_slots(client, sid)
    assert len(slots) == 140
    first = model.slot_start(slots[0]).astimezone(model.PARIS)
    assert (first.weekday(), first.hour, first.minute) == (0, 8, 30)
    assert {(model.slot_end(s) - model.slot_start(s)) for s in slots} == {timedelta(minutes=30)}
    sched = (await client.get(f"/fhir/Schedule/{sid}")).json()
    assert {a["reference"] for a in sched["actor"]} == {f"PractitionerRole/{pr['role']}", f"Practitioner/{pr['practitioner']}",
                                                       f"Location/{pr['location']}"}
    assert model.read_availability(sched).rules[0].text() == "mon,tue,wed,thu,fri 08:30-12:00 consultation 30"

    # Running it again changes nothing (deterministic slot ids).
    _, again = await define(platform, pr["role"], ["mon-fri 08:30-12:00 consultation 30"], now=now)
    assert again == {"created": 0, "deleted": 0, "keptBooked": 0, "unchanged": 140}

    booked = slots[3]
    pat = await new_patient(client)
    r = await client.post("/fhir/Appointment", json=appointment_body(booked["id"], pat), headers=FHIR_JSON)
    assert r.status_code == 201, r.text

    # Afternoons instead of mornings, and a week of leave: the booked morning slot stays.
    leave_start = now + timedelta(days=14)
    leave = model.Leave(leave_start, leave_start + timedelta(days=7), "Congés")
    _, changed = await define(platform, pr["role"], ["mon-fri 14:00-17:00 consultation 20"], leaves=[leave], now=now)
    # 3 weeks x 5 days x 9 slots of 20 minutes between 14:00 and 17:00.
    assert changed == {"created": 135, "deleted": 139, "keptBooked": 1, "unchanged": 0}
    kept = (await client.get(f"/fhir/Slot/{booked['id']}")).json()
    assert kept["status"] == "busy"
    after = await free_slots(client, sid)
    assert len(after) == 135
    assert all(model.slot_start(s).astimezone(model.PARIS).hour >= 14 for s in after)
    assert not [s for s in after if leave.start <= model.slot_start(s) < leave.end]


def test_expand_follows_paris_wall_clock_across_daylight_saving() -> None:
    av = model.Availability([model.parse_rule("mon-sun 09:00-10:00 consultation 60")])
    start = datetime(2026, 10, 23, tzinfo=UTC)
    got = generation.expand(av, start, start + timedelta(days=4))  # 25 October 2026: back to winter time
    assert [at.astimezone(model.PARIS).hour for at, _ in got] == [9, 9, 9, 9]
    assert [at.astimezone(UTC).hour for at, _ in got] == [7, 7, 8, 8]


def test_overlapping_openings_are_refused() -> None:
    av = model.Availability([model.parse_rule("mon 08:00-12:00 consultation 20"), model.parse_rule("mon,tue 11:00-13:00 teleconsultation 15")])
    with pytest.raises(Exception, match="overlap"):
        generation.check_availability(av)
    assert model.parse_rule("tue 08:00-09:00 home-visit 30 known").visit == model.VisitType("home-visit", 30, "HH", "known")


async def test_double_booking_through_fhir_is_a_409_and_cancelling_frees_the_slot(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    sid, _ = await define(platform, pr["role"], ["tue,thu 09:00-11:00 consultation 30"], now=now)
    start = now + timedelta(days=1)
    # Chained search: free slots of this practitioner from a date.
    r = await client.get("/fhir/Slot", params={"schedule.actor": f"Practitioner/{pr['practitioner']}", "status": "free",
                                               "start": f"ge{model.iso(start)}", "_sort": "start", "_count": "100"})
    assert r.status_code == 200
    found = [e["resource"] for e in r.json()["entry"]]
    assert len(found) == 4 * 2 * 4  # 4 weeks, 2 days, 4 slots a morning
    slot = found[0]
    a, b = await new_patient(client), await new_patient(client)
    r1 = await client.post("/fhir/Appointment", json=appointment_body(slot["id"], a), headers=FHIR_JSON)
    assert r1.status_code == 201, r1.text
    assert (await client.get(f"/fhir/Slot/{slot['id']}")).json()["status"] == "busy"
    r2 = await client.post("/fhir/Appointment", json=appointment_body(slot["id"], b), headers=FHIR_JSON)
    assert r2.status_code == 409
    assert r2.json()["resourceType"] == "OperationOutcome"
    assert "PRC-1491" in r2.json()["issue"][0]["diagnostics"]
    # Through a transaction Bundle too: the whole Bundle is refused.
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": appointment_body(slot["id"], b), "request": {"method": "POST", "url": "Appointment"}}]}
    assert (await client.post("/fhir", json=bundle, headers=FHIR_JSON)).status_code == 409
    # Freeing a booked slot directly is refused: cancel the appointment.
    r = await client.put(f"/fhir/Slot/{slot['id']}", json={**(await client.get(f"/fhir/Slot/{slot['id']}")).json(), "status": "free"},
                         headers=FHIR_JSON)
    assert r.status_code == 409
    assert (await client.delete(f"/fhir/Slot/{slot['id']}")).status_code == 409

    appt = r1.json()
    r = await client.put(f"/fhir/Appointment/{appt['id']}", json={**appt, "status": "cancelled"}, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    assert (await client.get(f"/fhir/Slot/{slot['id']}")).json()["status"] == "free"
    r3 = await client.post("/fhir/Appointment", json=appointment_body(slot["id"], b), headers=FHIR_JSON)
    assert r3.status_code == 201
    async with platform.pool.connection() as conn:
        assert await booking_store.holder(conn, slot["id"]) == r3.json()["id"]
    # A booked appointment must name a slot of this server.
    r = await client.post("/fhir/Appointment", json=appointment_body("no-such-slot", b), headers=FHIR_JSON)
    assert r.status_code == 422


async def test_patients_cancel_and_move_within_the_practitioners_deadline(client, platform) -> None:
    pr = await new_practice(client)
    now = platform.clock.now()
    sid, _ = await define(platform, pr["role"], ["mon-sun 00:00-23:59 consultation 30"],
                          policy=model.Policy(cancel_hours=24, horizon_days=4, notice_minutes=60), now=now)
    slots = await free_slots(client, sid)
    soon = next(s for s in slots if timedelta(hours=3) < model.slot_start(s) - now < timedelta(hours=20))
    later = [s for s in slots if model.slot_start(s) - now > timedelta(hours=30)]
    too_soon = next(s for s in slots if model.slot_start(s) - now < timedelta(minutes=55))
    pid = await new_patient(client)
    me = patient_caller(pid)

    async with platform.transaction(me) as repo:
        with pytest.raises(BookingRuleViolation):
            await service.book(repo, too_soon["id"])  # online booking closes an hour before
    async with platform.transaction(me) as repo:
        soon_appt = (await service.book(repo, soon["id"])).stored
    async with platform.transaction(me) as repo:
        far_appt = (await service.book(repo, later[0]["id"])).stored
    # Less than 24 h before: the patient may neither cancel nor move it...
    with pytest.raises(BookingRuleViolation, match="24 h"):
        async with platform.transaction(me) as repo:
            await service.cancel(repo, soon_appt.id)
    with pytest.raises(BookingRuleViolation):
        async with platform.transaction(me) as repo:
            await service.reschedule(repo, soon_appt.id, later[1]["id"])
    # ... nor through the FHIR API (the rule is in the write, not in the page).
    async with platform.transaction(me) as repo:
        res = soon_appt.resource()
        with pytest.raises(BookingRuleViolation):
            await repo.update("Appointment", soon_appt.id, {**res, "status": "cancelled"})
    # The practice can.
    async with platform.transaction(staff_caller()) as repo:
        await service.cancel(repo, soon_appt.id, reason="Médecin absent")
    # Further ahead, the patient moves it: old slot free, new slot busy, same appointment.
    async with platform.transaction(me) as repo:
        moved = (await service.reschedule(repo, far_appt.id, later[1]["id"])).stored
    assert moved.id == far_appt.id and moved.version_id == 2
    assert (await client.get(f"/fhir/Slot/{later[0]['id']}")).json()["status"] == "free"
    assert (await client.get(f"/fhir/Slot/{later[1]['id']}")).json()["status"] == "busy"
    assert (await client.get(f"/fhir/Slot/{soon['id']}")).json()["status"] == "free"
    # A patient books for themselves only.
    other = await new_patient(client)
    with pytest.raises(Exception, match="themselves"):
        async with platform.transaction(me) as repo:
            await service.book(repo, later[2]["id"], patient=f"Patient/{other}")


async def test_blocking_no_show_and_known_patients_only(client, platform) -> None:
    pr = await new_practice(client)
    now = platform.clock.now()
    sid, _ = await define(platform, pr["role"], ["mon-sun 07:00-08:00 consultation 30 known", "mon-sun 00:00-06:00 consultation 60"],
                          policy=model.Policy(horizon_days=3, notice_minutes=0), now=now - timedelta(days=1))
    slots = await free_slots(client, sid)
    known_only = [s for s in slots if model.slot_visit(s).patients == "known" and model.slot_start(s) > now + timedelta(hours=2)]
    open_slots = [s for s in slots if model.slot_visit(s).patients == "all" and model.slot_start(s) > now + timedelta(hours=1)]
    pid = await new_patient(client)
    with pytest.raises(BookingRuleViolation, match="already follows"):
        async with platform.transaction(patient_caller(pid)) as repo:
            await service.book(repo, known_only[0]["id"])
    async with platform.transaction(patient_caller(pid)) as repo:
        await service.book(repo, open_slots[0]["id"])
    async with platform.transaction(patient_caller(pid)) as repo:
        await service.book(repo, known_only[0]["id"])  # now the practitioner knows them

    staff = staff_caller()
    async with platform.transaction(staff) as repo:
        await service.set_blocked(repo, open_slots[1]["id"], True)
    with pytest.raises(SlotTaken):
        async with platform.transaction(patient_caller(pid)) as repo:
            await service.book(repo, open_slots[1]["id"])
    with pytest.raises(BookingRuleViolation):
        async with platform.transaction(staff) as repo:
            await service.set_blocked(repo, open_slots[0]["id"], True)  # booked: cancel it first
    async with platform.transaction(staff) as repo:
        await service.set_blocked(repo, open_slots[1]["id"], False)
    assert (await client.get(f"/fhir/Slot/{open_slots[1]['id']}")).json()["status"] == "free"

    # A no-show is recorded once the time has come, and keeps the slot taken.
    past = next(s for s in slots if model.slot_start(s) < now - timedelta(hours=1) and s["status"] == "free")
    r = await client.post("/fhir/Appointment", json=appointment_body(past["id"], pid), headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    async with platform.transaction(staff) as repo:
        with pytest.raises(BookingRuleViolation):
            future = await service.book(repo, open_slots[2]["id"], patient=pid)
            await service.mark_noshow(repo, future.stored.id)
    async with platform.transaction(staff) as repo:
        noshow = (await service.mark_noshow(repo, r.json()["id"])).stored.resource()
    assert noshow["status"] == "noshow"
    assert (await client.get(f"/fhir/Slot/{past['id']}")).json()["status"] == "busy"
    # The agenda of the day lists slots and appointments with the patient's name.
    async with platform.transaction(SYSTEM) as repo:
        day_slots, appts, patients = await service.agenda(repo, pr["role"], now - timedelta(days=1), now + timedelta(days=2))
    assert {s.id for s in day_slots} >= {past["id"], open_slots[0]["id"]}
    assert f"Patient/{pid}" in patients and len(appts) >= 3


async def test_a_freed_slot_is_offered_to_the_waiting_list(client, platform) -> None:
    pr = await new_practice(client)
    now = platform.clock.now()
    sid, _ = await define(platform, pr["role"], ["mon-sun 10:00-12:00 consultation 60"],
                          policy=model.Policy(cancel_hours=1, horizon_days=10, notice_minutes=0), now=now)
    slots = await free_slots(client, sid)
    target = next(s for s in slots if model.slot_start(s) > now + timedelta(days=2))
    early, late_comer, third = [await new_patient(client) for _ in range(3)]
    address = f"{uniq('waiting')}@example.org"
    waiting = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Attente", "given": ["Léon"]}],
                                             "telecom": [{"system": "email", "value": address}]})
    async with platform.transaction(patient_caller(early)) as repo:
        taken = (await service.book(repo, target["id"])).stored
    # Two patients wait for an earlier slot (before day 5); one only before day 1: not offered.
    async with platform.transaction(patient_caller(third)) as repo:
        await waitlist.join(repo, patient=f"Patient/{third}", role_id=pr["role"], before=now + timedelta(days=1))
    async with platform.transaction(patient_caller(waiting)) as repo:
        entry = (await waitlist.join(repo, patient=f"Patient/{waiting}", role_id=pr["role"], before=now + timedelta(days=5))).stored
    async with platform.transaction(patient_caller(late_comer)) as repo:
        second = (await waitlist.join(repo, patient=f"Patient/{late_comer}", role_id=pr["role"], before=now + timedelta(days=5))).stored

    async with platform.transaction(patient_caller(early)) as repo:
        await service.cancel(repo, taken.id)
    held = (await client.get(f"/fhir/Slot/{target['id']}")).json()
    assert held["status"] == "busy-tentative"
    assert model.slot_hold(held)[0] == f"Patient/{waiting}"
    # Someone else cannot take it meanwhile.
    with pytest.raises(SlotTaken):
        async with platform.transaction(patient_caller(third)) as repo:
            await service.book(repo, target["id"])
    # The offer expires unanswered: it goes to the next patient.
    async with platform.pool.connection() as conn:
        jobs = await booking_store.jobs_of(conn, entry.id)
    expiry = next(j for j in jobs if j["kind"] == "offer-expiry")
    notifier = notify.Notifier(platform.settings, notify.LoggingEmail(), notify.LoggingSms())
    await notify.run_due(platform, notifier, now=platform.clock.now(), limit=10_000)  # the offer is told at once
    [offer] = [m for m in notifier.email.sent if m["To"] == address]  # type: ignore[attr-defined]
    assert "Un créneau plus tôt" in offer["Subject"] and "Durand" in offer.get_content()
    await notify.run_due(platform, notifier, now=expiry["due_at"] + timedelta(seconds=1), limit=10_000)
    held = (await client.get(f"/fhir/Slot/{target['id']}")).json()
    assert held["status"] == "busy-tentative" and model.slot_hold(held)[0] == f"Patient/{late_comer}"
    async with platform.transaction(patient_caller(late_comer)) as repo:
        booked = (await waitlist.accept(repo, second.id)).stored.resource()
    assert booked["status"] == "booked" and booked["slot"] == [{"reference": f"Slot/{target['id']}"}]
    assert (await client.get(f"/fhir/Slot/{target['id']}")).json()["status"] == "busy"


async def test_find_and_book_operations(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    await define(platform, pr["role"], ["wed 09:00-10:00 consultation 20", "wed 14:00-15:00 teleconsultation 15"], now=now)
    r = await client.get("/fhir/Slot/$find", params={"practitioner": pr["practitioner"], "start": model.iso(now), "_count": "50"})
    assert r.status_code == 200, r.text
    slots = [e["resource"] for e in r.json()["entry"]]
    assert len(slots) == 4 * (3 + 4)
    assert [s["start"] for s in slots] == sorted(s["start"] for s in slots)
    r = await client.get("/fhir/Slot/$find", params={"practitioner-role": pr["role"], "service-type": "teleconsultation",
                                                     "start": model.iso(now)})
    assert {model.slot_visit(e["resource"]).mode for e in r.json()["entry"]} == {"VR"}
    r = await client.get("/fhir/Appointment/$find", params={"actor": f"Practitioner/{pr['practitioner']}", "start": model.iso(now),
                                                            "_count": "2"})
    proposed = [e["resource"] for e in r.json()["entry"] if e["search"]["mode"] == "match"]
    assert [p["status"] for p in proposed] == ["proposed", "proposed"]
    pid = await new_patient(client)
    booking = {**proposed[0], "participant": [*proposed[0]["participant"], {"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"}]}
    r = await client.post("/fhir/Appointment/$book", json={"resourceType": "Parameters", "parameter": [{"name": "appointment", "resource": booking}]},
                          headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "booked"
    r = await client.post("/fhir/Appointment/$book", json=booking, headers=FHIR_JSON)
    assert r.status_code == 409
    issues = r.json()["issue"]
    assert issues[0]["code"] == "conflict"
    # Then the next free slots, the soonest after the taken one first.
    assert issues[1]["expression"] == [proposed[1]["slot"][0]["reference"]]
    assert len(issues) == 1 + 5
    rest = (await client.get("/fhir/metadata")).json()["rest"][0]["resource"]
    ops = {r["type"]: {o["name"] for o in r.get("operation", [])} for r in rest}
    assert ops["Appointment"] >= {"find", "book"} and "find" in ops["Slot"]


async def test_json_api_answers_slot_taken_with_alternatives(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    sid, _ = await define(platform, pr["role"], ["fri 16:00-17:00 consultation 15"], now=now)
    slots = await free_slots(client, sid)
    pid = await new_patient(client)
    r = await client.post("/api/booking/book", json={"slot": slots[1]["id"], "patient": f"Patient/{pid}"})
    assert r.status_code == 201, r.text
    r = await client.post("/api/booking/book", json={"slot": slots[1]["id"], "patient": f"Patient/{pid}"})
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "PRC-1491"
    # The next ones after the taken slot first, then the earlier one.
    assert [a["id"] for a in body["alternatives"]] == [s["id"] for s in slots[2:7]]
    r = await client.put(f"/api/booking/schedules/{pr['role']}", json={"rules": ["fri 16:00-17:00 consultation 15"],
                                                                      "policy": {"horizonDays": 14}})
    assert r.status_code == 200, r.text
    assert r.json()["slots"]["keptBooked"] == 1


async def test_the_horizon_rolls_forward(client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now(), weeks=3)
    sid, first = await define(platform, pr["role"], ["mon-fri 13:00-14:00 consultation 30"],
                              policy=model.Policy(horizon_days=14), now=now)
    assert first["created"] == 2 * 5 * 2
    rolled = await generation.roll(platform, now=now + timedelta(days=7), limit=10_000)
    assert rolled >= 1
    sched = (await client.get(f"/fhir/Schedule/{sid}")).json()
    assert sched["planningHorizon"]["end"] == model.iso(now + timedelta(days=21))
    # One more week of slots; the past week's are still there (history of the agenda).
    assert len(await free_slots(client, sid)) == 3 * 5 * 2
