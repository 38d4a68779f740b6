"""From opening rules to Slots, over a rolling horizon, kept consistent when the rules change.

``expand`` is pure: the slots a Schedule's rules give in a window, minus leaves.
``sync`` makes the stored Slots of one Schedule match it, from now to the horizon:

* a missing slot is created (deterministic id, so running it again changes nothing);
* a free slot the rules no longer give is deleted, after its row was locked and
  found still free (a booking that committed in between keeps it);
* a booked slot is never touched, even when the rules no longer give it: the
  appointment stands, and no new slot is created over it;
* a slot the practitioner blocked stays blocked while the rules still give it.

Large numbers of new slots go through the Repository's bulk path (COPY).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from parcours.core.errors import BadRequest, NotFound
from parcours.services.booking import model
from parcours.services.booking.model import DAYS, PARIS, Availability, VisitType
from parcours.security.caller import PLATFORM
from parcours.services.platform import Platform
from parcours.store.bulk import BatchBuilder
from parcours.store.repository import Repository

BULK_FROM = 200  # more new slots than this go through COPY


@dataclass
class SyncReport:
    created: int = 0
    deleted: int = 0
    kept_booked: int = 0
    unchanged: int = 0

    def as_json(self) -> dict:
        return {"created": self.created, "deleted": self.deleted, "keptBooked": self.kept_booked, "unchanged": self.unchanged}


def check_availability(av: Availability) -> None:
    """Openings of one schedule may not overlap on the same day: one practitioner, one visit at a time."""
    for r in av.rules:
        model.check_rule(r)
    for i, a in enumerate(av.rules):
        for b in av.rules[i + 1:]:
            if set(a.days) & set(b.days) and a.opens < b.closes and b.opens < a.closes:
                same_period = (a.valid_from or date.min) <= (b.valid_until or date.max) and \
                    (b.valid_from or date.min) <= (a.valid_until or date.max)
                if same_period:
                    raise BadRequest(f"The openings '{a.text()}' and '{b.text()}' overlap")
    for lv in av.leaves:
        if lv.end <= lv.start:
            raise BadRequest("A leave must end after it starts")
    p = av.policy
    if not (0 <= p.cancel_hours <= 24 * 14 and 1 <= p.horizon_days <= 366 and 0 <= p.notice_minutes <= 24 * 60 * 7):
        raise BadRequest("Cancellation deadline 0-336 h, horizon 1-366 days, notice 0-7 days")


def expand(av: Availability, start: datetime, end: datetime) -> list[tuple[datetime, VisitType]]:
    """Slot starts (aware, Paris time) with their visit type in [start, end), leaves removed."""
    out: list[tuple[datetime, VisitType]] = []
    day = start.astimezone(PARIS).date()
    last = end.astimezone(PARIS).date()
    leaves = [(lv.start, lv.end) for lv in av.leaves]
    while day <= last:
        weekday = DAYS[day.weekday()]
        for rule in av.rules:
            if weekday not in rule.days or (rule.valid_from and day < rule.valid_from) or (rule.valid_until and day > rule.valid_until):
                continue
            step = timedelta(minutes=rule.visit.minutes)
            at = datetime.combine(day, rule.opens, PARIS)
            closes = datetime.combine(day, rule.closes, PARIS)
            while at + step <= closes:
                stop = at + step
                if start <= at < end and not any(ls < stop and at < le for ls, le in leaves):
                    out.append((at, rule.visit))
                at = stop
        day += timedelta(days=1)
    out.sort(key=lambda x: x[0])
    return out


def horizon(av: Availability, now: datetime) -> datetime:
    return now + timedelta(days=av.policy.horizon_days)


async def existing_slots(repo: Repository, schedule_id: str, since: datetime) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    offset = 0
    while True:
        req = repo.parse_search("Slot", [("schedule", f"Schedule/{schedule_id}"), ("start", f"ge{model.iso(since)}"),
                                         ("_sort", "start"), ("_count", "1000"), ("_offset", str(offset))])
        res = await repo.search(req)
        out += [(s.id, s.resource()) for s in res.matches]
        if not res.has_more:
            return out
        offset += len(res.matches)


async def sync(repo: Repository, schedule_id: str, *, now: datetime | None = None, audit_each: bool = True) -> SyncReport:
    """Make the Slots of ``Schedule/schedule_id`` match its rules from now to its horizon.

    Runs in the caller's transaction; the Schedule row is locked first, so two syncs of
    one schedule run one after the other.
    """
    now = now or repo.clock.now()
    plat = repo.as_platform()
    sched = await plat.lock("Schedule", schedule_id)
    if sched is None:
        raise NotFound(f"Schedule/{schedule_id} is not known")
    av = model.read_availability(sched)
    end = horizon(av, now)
    wanted = {model.slot_id(schedule_id, at, visit): (at, visit) for at, visit in expand(av, now, end)}
    report = SyncReport()
    taken: list[tuple[datetime, datetime]] = []
    have: set[str] = set()
    for sid, s in await existing_slots(repo, schedule_id, now):
        have.add(sid)
        status = s.get("status")
        if status == "free" and sid in wanted:
            report.unchanged += 1
            continue
        if status in ("busy", "busy-tentative"):
            report.kept_booked += 1
            taken.append((model.slot_start(s), model.slot_end(s)))
            continue
        if status == "busy-unavailable" and sid in wanted:
            report.unchanged += 1
            taken.append((model.slot_start(s), model.slot_end(s)))
            continue
        # Not wanted any more (or entered in error): delete it if it is still what we saw.
        current = await plat.lock("Slot", sid)
        if current is None:
            continue
        if current.get("status") in ("busy", "busy-tentative"):
            report.kept_booked += 1
            taken.append((model.slot_start(current), model.slot_end(current)))
            continue
        await repo.delete("Slot", sid)
        have.discard(sid)
        report.deleted += 1
    specialty = (sched.get("specialty") or [None])[0]
    meta = {"tag": sched["meta"]["tag"]} if (sched.get("meta") or {}).get("tag") else None
    new = [(sid, at, visit) for sid, (at, visit) in wanted.items()
           if sid not in have and not any(ts < at + timedelta(minutes=visit.minutes) and at < te for ts, te in taken)]
    await write_slots(repo, [(sid, model.slot(schedule=schedule_id, start=at, visit=visit, specialty=specialty, meta=meta))
                             for sid, at, visit in new])
    report.created = len(new)
    planned = model.parse_instant((sched.get("planningHorizon") or {}).get("end") or model.iso(now))
    if end - planned > timedelta(hours=1):
        # The rolling horizon moved: say so on the Schedule (what ``roll`` looks at).
        sched = {**sched, "id": schedule_id, "planningHorizon": {"start": model.iso(now), "end": model.iso(end)}}
        await plat.update("Schedule", schedule_id, sched)
    return report


async def roll(platform: Platform, *, now: datetime | None = None, limit: int = 200) -> int:
    """Extend the slots of the schedules whose horizon is behind, oldest horizon first, at
    most ``limit`` schedules per call (the background runner calls it every few hours)."""
    now = now or platform.clock.now()
    done = 0
    async with platform.transaction(PLATFORM) as repo:
        res = await repo.search(repo.parse_search("Schedule", [("active", "true"), ("_sort", "date"), ("_count", str(limit))]))
        due = []
        for s in res.matches:
            sched = s.resource()
            av = model.read_availability(sched)
            end = (sched.get("planningHorizon") or {}).get("end")
            if av.rules and (end is None or model.parse_instant(end) < horizon(av, now) - timedelta(hours=12)):
                due.append(s.id)
    for sid in due:
        async with platform.transaction(PLATFORM) as repo:
            await sync(repo, sid, now=now)
        done += 1
    return done


async def write_slots(repo: Repository, slots: list[tuple[str, dict]]) -> None:
    """Create or replace slots by id: one by one for a few, through COPY for many."""
    if len(slots) < BULK_FROM:
        for sid, res in slots:
            await repo.update("Slot", sid, {**res, "id": sid})
        return
    builder = BatchBuilder(repo.registry, repo.base_url, repo.clock.now())
    writer = repo.bulk_writer()
    for i, (sid, res) in enumerate(slots, 1):
        builder.add("Slot", sid, res, "PUT")
        if i % 5000 == 0:
            for batch in builder.batches():
                await writer.add(batch)
            await writer.flush()
    for batch in builder.batches():
        await writer.add(batch)
    await writer.flush()


__all__ = ["SyncReport", "check_availability", "expand", "horizon", "roll", "sync", "write_slots"]
