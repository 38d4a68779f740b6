"""Booking: availability, free slots, booking, cancelling, moving, the practitioner's agenda.

``check_*`` validates, ``access_*`` fetches and authorises, the others change state; all
run in the caller's transaction through its Repository. Double booking is prevented by
the booking write rule (``rules.py``) inside the write of the Appointment, not here:
what this module adds is the domain's vocabulary and the checks that need context
(new or known patients, who may manage which agenda).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from parcours.core.errors import BadRequest, BookingRuleViolation, Forbidden, NotFound, SlotTaken
from parcours.services.booking import generation, model
from parcours.services.booking.model import Availability
from parcours.services.directory import model as directory
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.services.platform import Platform
from parcours.security.caller import Caller
from parcours.store.repository import Repository, Stored, WriteResult

CANCELLED_BY_PATIENT = "pat"
CANCELLED_BY_PRACTICE = "prov"


# -- who manages which agenda ---------------------------------------------------------------

async def access_agenda(repo: Repository, role_id: str) -> dict:
    """The PractitionerRole whose agenda the caller manages: its practitioner, staff, or the platform."""
    role = (await repo.read("PractitionerRole", role_id)).resource()
    kind = repo.caller.kind
    if repo.caller.is_system or kind == "staff":
        return role
    if kind == "practitioner":
        ctx = await repo.care()
        if f"PractitionerRole/{role_id}" in ctx.identities:
            return role
    raise Forbidden("Only the practitioner and their staff manage this agenda")


async def roles_of(repo: Repository) -> list[Stored]:
    """The PractitionerRoles whose agenda the caller may open by default."""
    who = repo.caller.fhir_user or ""
    if who.startswith("Practitioner/"):
        res = await repo.search(repo.parse_search("PractitionerRole", [("practitioner", who), ("_count", "50")]))
        return res.matches
    if who.startswith("PractitionerRole/"):
        return [await repo.read("PractitionerRole", who.split("/", 1)[1])]
    return []


# -- availability -------------------------------------------------------------------------------

async def define(repo: Repository, role_id: str, location_id: str | None, availability: Availability, *,
                 now: datetime | None = None) -> tuple[str, generation.SyncReport]:
    """Set the opening rules of a role at a place (its Schedule) and generate its slots."""
    now = now or repo.clock.now()
    role = await access_agenda(repo, role_id)
    generation.check_availability(availability)
    locations = [directory.reference_id(r, "Location") for r in role.get("location") or []]
    if location_id is None and locations:
        location_id = locations[0]
    if location_id and location_id not in locations:
        raise BadRequest(f"Location/{location_id} is not a place of PractitionerRole/{role_id}")
    sid = model.schedule_id(role_id, location_id)
    practitioner = directory.reference_id(role.get("practitioner"), "Practitioner")
    specialty = None
    for concept in role.get("specialty") or []:
        specialty = concept
        break
    meta = {"tag": role["meta"]["tag"]} if (role.get("meta") or {}).get("tag") else None
    sched = model.schedule(role_id=role_id, practitioner_id=practitioner, location_id=location_id, availability=availability,
                           today=now.astimezone(model.PARIS).date(), specialty=specialty, meta=meta,
                           horizon_end=generation.horizon(availability, now))
    await repo.update("Schedule", sid, {**sched, "id": sid})
    return sid, await generation.sync(repo, sid, now=now)


async def schedules_of(repo: Repository, role_ids: list[str]) -> list[Stored]:
    if not role_ids:
        return []
    res = await repo.search(repo.parse_search("Schedule", [("actor", ",".join(f"PractitionerRole/{r}" for r in role_ids)),
                                                           ("_count", "200")]))
    return res.matches


# -- free slots ---------------------------------------------------------------------------------

@dataclass
class SlotQuery:
    start: datetime
    end: datetime | None = None
    roles: list[str] = field(default_factory=list)  # PractitionerRole ids
    practitioner: str | None = None  # Practitioner id
    location: str | None = None
    schedules: list[str] = field(default_factory=list)
    offer: str | None = None  # care-offer code
    mode: str | None = None  # AMB | VR | HH
    limit: int = 20


async def find(repo: Repository, q: SlotQuery) -> list[Stored]:
    """Free slots, earliest first (``Slot?schedule.actor=...&status=free&start=ge...``)."""
    items: list[tuple[str, str]] = [("status", "free"), ("start", f"ge{model.iso(q.start)}"), ("_sort", "start"),
                                    ("_count", str(max(1, min(q.limit, 500))))]
    if q.end:
        items.append(("start", f"lt{model.iso(q.end)}"))
    actors = [f"PractitionerRole/{r}" for r in q.roles]
    if q.practitioner:
        actors.append(f"Practitioner/{q.practitioner}")
    # The agendas first (``schedule.actor`` resolved to Schedule ids, each group of actors an
    # AND criterion as in the chained search): the Slot search is then on a few schedules'
    # rows, whatever the number of slots, instead of walking every future slot in start
    # order until the page fills (a role with few free slots among millions).
    schedules: set[str] | None = set(q.schedules) if q.schedules else None
    for group in (actors, [f"Location/{q.location}"] if q.location else []):
        if not group:
            continue
        res = await repo.search(repo.parse_search("Schedule", [("actor", ",".join(group)), ("_elements", "id"), ("_count", "500")]))
        if res.has_more:  # more agendas than a page: the chained search itself
            items.append(("schedule.actor", ",".join(group)))
            continue
        found = {m.id for m in res.matches}
        schedules = found if schedules is None else schedules & found
    if schedules is not None:
        if not schedules:
            return []
        items.append(("schedule", ",".join(f"Schedule/{s}" for s in sorted(schedules))))
    if q.offer:
        items.append(("service-type", f"{nomenclatures().care_offers.system}|{q.offer}"))
    if q.mode:
        items.append(("service-type", f"{model.ACT_CODE_SYSTEM}|{q.mode}"))
    return (await repo.search(repo.parse_search("Slot", items))).matches


async def alternatives(repo: Repository, slot_id: str, n: int = 5) -> list[Stored]:
    """Free slots to propose when ``slot_id`` was taken: the same agenda and visit type, the
    soonest after it first, then the soonest from now."""
    try:
        taken = (await repo.read("Slot", slot_id)).resource()
    except NotFound:
        return []
    now = repo.clock.now()
    sched = model.slot_schedule(taken)
    visit = model.slot_visit(taken)
    start = max(now, model.slot_start(taken))
    after = await find(repo, SlotQuery(start=start, schedules=[sched] if sched else [], offer=visit.offer, limit=n))
    if len(after) < n and start > now:
        before = await find(repo, SlotQuery(start=now, end=start, schedules=[sched] if sched else [], offer=visit.offer, limit=n))
        after += before[: n - len(after)]
    return [s for s in after if s.id != slot_id][:n]


# -- booking ----------------------------------------------------------------------------------------

async def access_patient(repo: Repository, patient: str | None) -> str:
    """The patient the caller books for: themselves, the person a proxy helps, anyone for the practice."""
    caller = repo.caller
    if patient is None:
        if caller.kind == "patient" and caller.fhir_user:
            return caller.fhir_user
        raise BadRequest("Say for which patient (Patient/id)")
    if not patient.startswith("Patient/"):
        patient = f"Patient/{patient}"
    if caller.kind == "patient" and patient != caller.fhir_user:
        raise Forbidden("Patients book for themselves (a proxy books for the people they help)")
    if caller.kind == "proxy" and patient not in (await repo.care()).patients:
        raise Forbidden("You do not act for this patient")
    return patient


async def known_patient(repo: Repository, patient: str, role_ref: str, practitioner_ref: str | None) -> bool:
    """Whether the patient was seen (or is expected) by this practitioner before."""
    actors = ",".join(r for r in (role_ref, practitioner_ref) if r)
    plat = repo.as_platform()
    res = await plat.search(plat.parse_search("Appointment", [
        ("patient", patient), ("actor", actors), ("status", "booked,arrived,checked-in,fulfilled"), ("_count", "1")]))
    return bool(res.matches)


async def book(repo: Repository, slot_id: str, *, patient: str | None = None, comment: str | None = None) -> WriteResult:
    """Book a free slot for a patient (themselves, the person a proxy helps, or on their behalf)."""
    patient_ref = await access_patient(repo, patient)
    try:
        slot = (await repo.read("Slot", slot_id)).resource()
    except NotFound:
        raise NotFound(f"Slot/{slot_id} is not known") from None
    if slot.get("status") != "free" and slot.get("status") != "busy-tentative":
        raise SlotTaken(f"Slot/{slot_id} is already taken")
    sched_id = model.slot_schedule(slot)
    sched = (await repo.read("Schedule", sched_id)).resource() if sched_id else {}
    role = model.actor_id(sched, "PractitionerRole")
    practitioner = model.actor_id(sched, "Practitioner")
    location = model.actor_id(sched, "Location")
    role_ref = f"PractitionerRole/{role}" if role else None
    prac_ref = f"Practitioner/{practitioner}" if practitioner else None
    visit = model.slot_visit(slot)
    if visit.patients != "all" and role_ref:
        known = await known_patient(repo, patient_ref, role_ref, prac_ref)
        if visit.patients == "known" and not known:
            raise BookingRuleViolation("This slot is kept for patients the practitioner already follows")
        if visit.patients == "new" and known:
            raise BookingRuleViolation("This slot is kept for new patients")
    appt = model.appointment(slot=slot, slot_ref=f"Slot/{slot_id}", patient=patient_ref, role=role_ref, practitioner=prac_ref,
                             location=f"Location/{location}" if location else None,
                             booked_by=repo.caller.fhir_user, now=repo.clock.now(), comment=comment)
    return await repo.create("Appointment", appt)


async def book_or_alternatives(platform: Platform, caller: Caller, slot_id: str, *, patient: str | None = None,
                               comment: str | None = None) -> Stored:
    """Book in a transaction of its own; when the slot was taken, the SlotTaken error carries
    ``alternatives`` (the next free slots, from a second transaction)."""
    try:
        async with platform.transaction(caller) as repo:
            return (await book(repo, slot_id, patient=patient, comment=comment)).stored
    except SlotTaken as err:
        async with platform.transaction(caller) as repo:
            err.alternatives = [s.resource() for s in await alternatives(repo, slot_id)]  # type: ignore[attr-defined]
        raise


async def access_appointment(repo: Repository, appointment_id: str) -> dict:
    return (await repo.read("Appointment", appointment_id)).resource()


async def cancel(repo: Repository, appointment_id: str, *, reason: str | None = None) -> WriteResult:
    appt = await access_appointment(repo, appointment_id)
    if appt.get("status") in ("cancelled", "entered-in-error"):
        raise BadRequest("This appointment is already cancelled")
    if appt.get("status") in ("fulfilled", "noshow"):
        raise BookingRuleViolation("This appointment is over")
    by = CANCELLED_BY_PATIENT if repo.caller.kind in ("patient", "proxy") else CANCELLED_BY_PRACTICE
    appt = {**appt, "status": "cancelled",
            "cancelationReason": {"coding": [{"system": model.CANCEL_REASON_SYSTEM, "code": by}], **({"text": reason} if reason else {})}}
    return await repo.update("Appointment", appointment_id, appt)


async def reschedule(repo: Repository, appointment_id: str, slot_id: str) -> WriteResult:
    """Move a booking to another free slot: the old slot is freed and the new one taken in the same write."""
    appt = await access_appointment(repo, appointment_id)
    if not model.holds_slots(appt) or appt.get("status") != "booked":
        raise BookingRuleViolation("Only a booked appointment can be moved")
    slot = (await repo.read("Slot", slot_id)).resource()
    if slot.get("status") != "free":
        raise SlotTaken(f"Slot/{slot_id} is already taken")
    old = [s for s in model.appointment_slots(appt)]
    old_sched = None
    if old:
        old_slot = await repo.as_platform().lock("Slot", old[0])
        old_sched = model.slot_schedule(old_slot or {})
    new_sched = model.slot_schedule(slot)
    if old_sched and new_sched != old_sched:
        o = (await repo.read("Schedule", old_sched)).resource()
        n = (await repo.read("Schedule", new_sched or "")).resource()
        if model.actor_id(o, "PractitionerRole") != model.actor_id(n, "PractitionerRole"):
            raise BookingRuleViolation("An appointment moves within the same practitioner's agenda; book a new one instead")
    visit = model.slot_visit(slot)
    moved = {**appt, "slot": [{"reference": f"Slot/{slot_id}"}], "start": slot["start"], "end": slot["end"],
             "minutesDuration": visit.minutes, "serviceType": slot.get("serviceType") or appt.get("serviceType")}
    return await repo.update("Appointment", appointment_id, moved)


async def mark_noshow(repo: Repository, appointment_id: str) -> WriteResult:
    if repo.caller.kind in ("patient", "proxy"):
        raise Forbidden("The practice records no-shows")
    appt = await access_appointment(repo, appointment_id)
    if appt.get("status") not in ("booked", "arrived", "checked-in"):
        raise BookingRuleViolation("Only a booked appointment can be marked as missed")
    start = model.appointment_start(appt)
    if start and start > repo.clock.now():
        raise BookingRuleViolation("An appointment is marked as missed once its time has come")
    return await repo.update("Appointment", appointment_id, {**appt, "status": "noshow"})


async def set_blocked(repo: Repository, slot_id: str, blocked: bool) -> WriteResult:
    """Block a free slot (the practitioner is not available) or free it again."""
    slot = (await repo.read("Slot", slot_id)).resource()
    sched = (await repo.read("Schedule", model.slot_schedule(slot) or "")).resource()
    await access_agenda(repo, model.actor_id(sched, "PractitionerRole") or "")
    if blocked and slot.get("status") != "free":
        raise BookingRuleViolation("Only a free slot can be blocked")
    if not blocked and slot.get("status") != "busy-unavailable":
        raise BookingRuleViolation("This slot is not blocked")
    return await repo.update("Slot", slot_id, {**slot, "status": "busy-unavailable" if blocked else "free"})


# -- reading ------------------------------------------------------------------------------------------

async def appointments_of_patients(repo: Repository, patients: list[str], *, include_past: bool = True) -> list[Stored]:
    if not patients:
        return []
    items = [("patient", ",".join(patients)), ("_sort", "date"), ("_count", "200")]
    if not include_past:
        items.append(("date", f"ge{model.iso(repo.clock.now() - timedelta(hours=1))}"))
    return (await repo.search(repo.parse_search("Appointment", items))).matches


async def agenda(repo: Repository, role_id: str, start: datetime, end: datetime) -> tuple[list[Stored], list[Stored], dict[str, dict]]:
    """Slots and appointments of one role's agenda in [start, end), and the patients named."""
    await access_agenda(repo, role_id)
    scheds = [s.id for s in await schedules_of(repo, [role_id])]
    slots: list[Stored] = []
    if scheds:
        offset = 0
        while True:
            res = await repo.search(repo.parse_search("Slot", [
                ("schedule", ",".join(f"Schedule/{s}" for s in scheds)), ("start", f"ge{model.iso(start)}"),
                ("start", f"lt{model.iso(end)}"), ("_sort", "start"), ("_count", "1000"), ("_offset", str(offset))]))
            slots += res.matches
            if not res.has_more:
                break
            offset += len(res.matches)
    res = await repo.search(repo.parse_search("Appointment", [
        ("actor", f"PractitionerRole/{role_id}"), ("date", f"ge{model.iso(start)}"), ("date", f"lt{model.iso(end)}"),
        ("_sort", "date"), ("_count", "500"), ("_include", "Appointment:patient")]))
    patients = {f"Patient/{s.id}": s.resource() for s in res.includes if s.resource_type == "Patient"}
    return slots, res.matches, patients


@dataclass
class SlotContext:
    """What a page shows about a slot: who, where, what."""

    slot_id: str
    slot: dict
    schedule: dict
    role_id: str | None
    practitioner: dict
    location: dict
    organization: dict


async def slot_context(repo: Repository, slot_id: str) -> SlotContext:
    slot = (await repo.read("Slot", slot_id)).resource()
    sched_id = model.slot_schedule(slot) or ""
    res = await repo.search(repo.parse_search("Schedule", [("_id", sched_id), ("_include", "Schedule:actor")]))
    if not res.matches:
        raise NotFound(f"Slot/{slot_id} has no schedule")
    sched = res.matches[0].resource()
    inc = {(s.resource_type, s.id): s.resource() for s in res.includes}
    role_id = model.actor_id(sched, "PractitionerRole")
    role = inc.get(("PractitionerRole", role_id or ""), {})
    org = {}
    org_id = directory.reference_id(role.get("organization"), "Organization")
    if org_id:
        try:
            org = (await repo.read("Organization", org_id)).resource()
        except NotFound:
            org = {}
    return SlotContext(slot_id, slot, sched, role_id, inc.get(("Practitioner", model.actor_id(sched, "Practitioner") or ""), {}),
                       inc.get(("Location", model.actor_id(sched, "Location") or ""), {}), org)


__all__ = ["SlotContext", "SlotQuery", "access_agenda", "access_patient", "agenda", "alternatives", "appointments_of_patients", "book",
           "book_or_alternatives", "cancel", "define", "find", "known_patient", "mark_noshow", "reschedule", "roles_of",
           "schedules_of", "set_blocked", "slot_context"]
