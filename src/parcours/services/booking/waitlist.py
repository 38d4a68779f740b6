"""The waiting list: patients who want an earlier appointment with a practitioner.

A place on the list is an Appointment with status ``waitlist`` (R4 has the status for
this), the patient and the PractitionerRole as participants, and ``requestedPeriod``
from the moment the patient joined to the date before which they want to be seen.

When a booked slot is freed, the booking rule calls :func:`offer_freed_slot` in the
same transaction: the first patient on the list (by joining time) who wants a slot
that early gets it *held* for them (Slot ``busy-tentative`` with the ``slot-hold``
extension) for ``offer_minutes``, is told (notification job), and may book it from
their appointments page. An offer job expires the hold: the slot goes to the next
patient on the list, or back to everyone.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from parcours.core.errors import BadRequest, BookingRuleViolation, NotFound
from parcours.services.booking import model
from parcours.store import booking as store
from parcours.store.repository import Repository, WriteResult

LAST_CALL = timedelta(minutes=15)  # no offer for a slot starting sooner than this


async def join(repo: Repository, *, patient: str, role_id: str, before: datetime, offer: str | None = None) -> WriteResult:
    now = repo.clock.now()
    if before <= now:
        raise BadRequest("The waiting list is for an appointment before a date to come")
    role = (await repo.read("PractitionerRole", role_id)).resource()
    practitioner = (role.get("practitioner") or {}).get("reference")
    entry = model.waitlist_entry(patient=patient, role=f"PractitionerRole/{role_id}", practitioner=practitioner,
                                 before=before, offer=offer, now=now)
    return await repo.create("Appointment", entry)


def _period(entry: dict) -> tuple[datetime | None, datetime | None]:
    p = (entry.get("requestedPeriod") or [{}])[0]
    start = model.parse_instant(p["start"]) if p.get("start") else None
    end = model.parse_instant(p["end"]) if p.get("end") else None
    return start, end


def _offers(entry: dict) -> list[str]:
    return [c.get("code") for concept in entry.get("serviceType") or [] for c in concept.get("coding") or [] if c.get("code")]


async def candidates(plat: Repository, role_ref: str, slot: dict, now: datetime, exclude: set[str]) -> list[tuple[str, dict]]:
    """Waiting patients who would take ``slot``, first come first."""
    req = plat.parse_search("Appointment", [("status", "waitlist"), ("actor", role_ref), ("_count", "500")])
    res = await plat.search(req)
    start = model.slot_start(slot)
    visit = model.slot_visit(slot)
    out: list[tuple[datetime, str, dict]] = []
    for s in res.matches:
        entry = s.resource()
        joined, before = _period(entry)
        patients = model.participants(entry, "Patient")
        offered = model.waitlist_offer(entry)
        if not patients or patients[0] in exclude or (before is not None and before < start):
            continue
        if offered is not None and offered[1] > now:
            continue  # already holding another offer
        wanted = _offers(entry)
        if wanted and visit.offer not in wanted:
            continue
        if visit.patients == "new":
            continue  # a patient on a practitioner's list is not new to them
        out.append((joined or now, s.id, entry))
    out.sort(key=lambda x: (x[0], x[1]))
    return [(rid, entry) for _, rid, entry in out]


async def offer_freed_slot(plat: Repository, sid: str, slot: dict, now: datetime, *, offer_minutes: int = 120,
                           exclude: list[str] | tuple[str, ...] = ()) -> str | None:
    """Hold a freed slot for the next waiting patient; returns the waiting-list entry id, or None."""
    start = model.slot_start(slot)
    until = min(now + timedelta(minutes=offer_minutes), start - LAST_CALL)
    if until <= now:
        return None
    sched = await plat.lock("Schedule", model.slot_schedule(slot) or "")
    role_id = model.actor_id(sched or {}, "PractitionerRole")
    if role_id is None:
        return None
    found = await candidates(plat, f"PractitionerRole/{role_id}", slot, now, set(exclude))
    if not found:
        return None
    entry_id, entry = found[0]
    patient = model.participants(entry, "Patient")[0]
    await plat.update("Slot", sid, {**model.with_hold(slot, patient, until), "status": "busy-tentative"})
    await plat.update("Appointment", entry_id, {**model.with_offer(entry, f"Slot/{sid}", until), "id": entry_id})
    await store.enqueue(plat.conn, "waitlist-offer", now, now, appointment_id=entry_id, payload={"slot": sid})
    await store.enqueue(plat.conn, "offer-expiry", until, now, appointment_id=entry_id,
                        payload={"slot": sid, "tried": sorted({*exclude, patient})})
    return entry_id


async def expire_offer(plat: Repository, entry_id: str, payload: dict, now: datetime) -> str | None:
    """An offer ran out: free the hold and offer the slot to the next patient."""
    sid = payload.get("slot") or ""
    slot = await plat.lock("Slot", sid)
    entry = await plat.lock("Appointment", entry_id)
    if entry is not None and entry.get("status") == "waitlist":
        offered = model.waitlist_offer(entry)
        if offered and offered[0] == f"Slot/{sid}":
            await plat.update("Appointment", entry_id, {**model.with_offer(entry, None, None), "id": entry_id})
    if slot is None or slot.get("status") != "busy-tentative":
        return None  # booked meanwhile (or changed by the practice)
    hold = model.slot_hold(slot)
    if hold is not None and hold[1] > now:
        return None
    freed = {**model.with_hold(slot, None, None), "status": "free"}
    await plat.update("Slot", sid, freed)
    return await offer_freed_slot(plat, sid, freed, now, exclude=list(payload.get("tried") or []))


async def accept(repo: Repository, entry_id: str) -> WriteResult:
    """The patient takes the slot offered to them: the waiting-list entry becomes the booking."""
    entry = (await repo.read("Appointment", entry_id)).resource()
    offered = model.waitlist_offer(entry) if entry.get("status") == "waitlist" else None
    now = repo.clock.now()
    if offered is None:
        raise NotFound("No slot is offered to you on this waiting list")
    if offered[1] <= now:
        raise BookingRuleViolation("This offer has expired")
    sid = offered[0].split("/", 1)[1]
    slot = await repo.as_platform().lock("Slot", sid)
    if slot is None:
        raise NotFound("The offered slot no longer exists")
    sched = await repo.as_platform().lock("Schedule", model.slot_schedule(slot) or "")
    location = model.actor_id(sched or {}, "Location")
    booked = model.with_offer(entry, None, None)
    booked.update({
        "status": "booked", "slot": [{"reference": offered[0]}], "start": slot["start"], "end": slot["end"],
        "minutesDuration": model.slot_visit(slot).minutes, "serviceType": slot.get("serviceType") or entry.get("serviceType"),
        "id": entry_id,
    })
    booked.pop("requestedPeriod", None)
    if location and f"Location/{location}" not in model.participants(booked, "Location"):
        booked["participant"] = [*booked["participant"], {"actor": {"reference": f"Location/{location}"}, "required": "required",
                                                          "status": "accepted"}]
    booked["participant"] = [{**p, "status": "accepted"} for p in booked["participant"]]
    return await repo.update("Appointment", entry_id, booked)


async def leave(repo: Repository, entry_id: str) -> None:
    entry = (await repo.read("Appointment", entry_id)).resource()
    if entry.get("status") != "waitlist":
        raise BadRequest("This appointment is not a place on a waiting list")
    await repo.update("Appointment", entry_id, {**model.with_offer(entry, None, None), "status": "cancelled", "id": entry_id})


__all__ = ["accept", "candidates", "expire_offer", "join", "leave", "offer_freed_slot"]
