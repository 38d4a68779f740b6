"""Agendas for the demo region: opening rules, future slots and a few booked appointments.

``schedules_hook()`` is a ``services.directory.demo.write_region`` hook. Deterministic
like the region: about two thirds of the roles take online bookings (all of the first
GP, whose patient the demo follows), with openings that fit their kind of practice
and their offers; slots cover ``days`` days from today through the bulk path; a few
slots are booked by the demo patients through the booking rule, as anyone would.
"""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timedelta

from parcours.core.errors import ParcoursError
from parcours.services.booking import generation, model, service
from parcours.services.booking.model import Availability, OpeningRule, Policy, VisitType
from parcours.services.directory import model as directory
from parcours.services.directory.demo import DemoRegion, Hook, RoleSpec
from parcours.store.bulk import BatchBuilder
from parcours.store.repository import Repository

DEMO_DAYS = 10  # about 70,000 slots for the default region; the runner rolls the horizon on
BOOKINGS = 120


def _rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))


def availability_for(role: RoleSpec, first_gp: bool, days: int) -> Availability | None:
    """Openings that look like this kind of practice, or None (no online booking)."""
    rng = _rng(role.key)
    if not first_gp and rng.random() > 0.65:
        return None
    rules: list[OpeningRule] = []
    t = model._clock  # noqa: SLF001 - same parser as people's input

    def add(days_: str, opens: str, closes: str, offer: str, minutes: int, patients: str = "all") -> None:
        rules.append(OpeningRule(model.parse_days(days_), t(opens), t(closes),
                                 VisitType(offer, minutes, model.default_mode(offer), patients)))

    kind = role.kind
    if kind == "pharmacist":
        if "vaccination" in role.offers:
            add("tue,thu", "14:00", "17:00", "vaccination", 15)
        return Availability(rules, [], Policy(cancel_hours=2, horizon_days=days, notice_minutes=30)) if rules else None
    if kind == "gp":
        add("mon-fri", "08:30", "12:00", "consultation", 20)
        add("mon,tue,thu,fri", "14:00", "17:00", "consultation", 20)
        if "teleconsultation" in role.offers:
            add("wed", "14:00", "16:00", "teleconsultation", 15)
        if "home-visit" in role.offers:
            add("thu", "17:30", "19:00", "home-visit", 30, "known")
        return Availability(rules, [], Policy(cancel_hours=24, horizon_days=days, notice_minutes=60))
    if kind == "nurse":
        add("mon-sat", "07:00", "10:00", "home-visit" if "home-visit" in role.offers else "consultation", 30)
        add("mon-fri", "17:00", "18:30", "consultation", 15)
        return Availability(rules, [], Policy(cancel_hours=12, horizon_days=days, notice_minutes=120))
    day_sets = ["mon,wed,fri", "tue,thu", "mon,tue,thu", "wed,fri"]
    chosen = rng.choice(day_sets)
    minutes = {"dentist": 30, "physio": 30, "midwife": 30, "speech": 45}.get(kind, 30)
    add(chosen, "09:00", "12:30", "consultation", minutes)
    add(chosen, "14:00", "17:30", "consultation", minutes)
    if "teleconsultation" in role.offers:
        add("sat" if "sat" not in chosen else "mon", "09:00", "11:00", "teleconsultation", 20)
    return Availability(rules, [], Policy(cancel_hours=24, horizon_days=days, notice_minutes=120))


def schedules_hook(*, days: int = DEMO_DAYS, bookings: int = BOOKINGS, now: datetime | None = None) -> Hook:
    async def hook(repo: Repository, region: DemoRegion) -> None:
        await write_agendas(repo, region, days=days, bookings=bookings, now=now)

    return hook


async def write_agendas(repo: Repository, region: DemoRegion, *, days: int = DEMO_DAYS, bookings: int = BOOKINGS,
                        now: datetime | None = None) -> dict[str, int]:
    now = now or repo.clock.now()
    today = now.astimezone(model.PARIS).date()
    first_gp = next((r.key for r in region.roles if r.kind == "gp"), None)
    tag = directory.tag(region.dataset)
    existing = await repo.search(repo.parse_search("Schedule", [("_tag", f"{directory.DATASET_TAG_SYSTEM}|{region.dataset}"),
                                                                ("_count", "1")]))
    schedules: list[tuple[str, dict]] = []
    slots: list[tuple[str, dict]] = []
    for role in region.roles:
        av = availability_for(role, role.key == first_gp, days)
        if av is None:
            continue
        practice = region.practices[role.practice]
        location = f"{practice.key}-loc"
        sid = model.schedule_id(role.key, location)
        spec = None
        if role.specialty:
            spec = {"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale",
                                "code": role.specialty}]}
        practitioner = region.practitioners[role.practitioner]["id"]
        sched = model.schedule(role_id=role.key, practitioner_id=practitioner, location_id=location, availability=av,
                               today=today, specialty=spec, meta=tag, horizon_end=generation.horizon(av, now))
        schedules.append((sid, sched))
        for at, visit in generation.expand(av, now, generation.horizon(av, now)):
            slots.append((model.slot_id(sid, at, visit), model.slot(schedule=sid, start=at, visit=visit, specialty=spec, meta=tag)))
    if existing.matches:
        # Loaded before: roll every agenda forward without touching its bookings.
        for sid, sched in schedules:
            await repo.update("Schedule", sid, {**sched, "id": sid})
            await generation.sync(repo, sid, now=now)
        return {"Schedule": len(schedules)}
    builder = BatchBuilder(repo.registry, repo.base_url, now)
    writer = repo.bulk_writer()
    for sid, sched in schedules:
        builder.add("Schedule", sid, sched, "PUT")
    for i, (sid, s) in enumerate(slots, 1):
        builder.add("Slot", sid, s, "PUT")
        if i % 5000 == 0:
            for batch in builder.batches():
                await writer.add(batch)
            await writer.flush()
    for batch in builder.batches():
        await writer.add(batch)
    await writer.flush()
    booked = await _book_some(repo, region, slots, bookings, first_gp, now)
    return {"Schedule": len(schedules), "Slot": len(slots), "Appointment": booked}


async def _book_some(repo: Repository, region: DemoRegion, slots: list[tuple[str, dict]], n: int, first_gp: str | None,
                     now: datetime) -> int:
    patients = [r["id"] for r in region.resources if r["resourceType"] == "Patient"]
    if not patients or not slots:
        return 0
    rng = _rng(f"{region.dataset}:bookings")
    week = now + timedelta(days=7)
    candidates = [sid for sid, s in slots if model.slot_visit(s).patients == "all" and now < model.slot_start(s) < week]
    rng.shuffle(candidates)
    picked = candidates[:n]
    if first_gp:
        # The followed patient (the first) sees their GP next week, and is on the GP's list.
        gp_role = next(r for r in region.roles if r.key == first_gp)
        gp_sched = model.schedule_id(first_gp, f"{gp_role.practice}-loc")
        gp_slots = [sid for sid, s in slots if s["schedule"]["reference"] == f"Schedule/{gp_sched}"
                    and model.slot_start(s) > now + timedelta(days=3)]
        if gp_slots:
            picked = ([gp_slots[0]] + [p for p in picked if p != gp_slots[0]])[:n]
    done = 0
    for i, sid in enumerate(picked):
        patient = patients[0] if i == 0 else rng.choice(patients)
        try:
            await service.book(repo, sid, patient=f"Patient/{patient}")
            done += 1
        except ParcoursError:
            continue
    return done


__all__ = ["availability_for", "schedules_hook", "write_agendas"]
