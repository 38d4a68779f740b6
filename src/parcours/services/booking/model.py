"""How availability and bookings are written in FHIR: the only place that builds or reads them.

One ``Schedule`` per practitioner role and place (actors: the PractitionerRole, its
Practitioner and the Location). Its opening rules live in the Schedule itself, as
FR Core extensions (``docs/booking.md``):

* each recurring opening is a ``fr-core-schedule-availability-time`` of type
  ``free`` with an ``rrule`` (WEEKLY, ``byDay``) whose ``start``/``end`` give the
  first occurrence; the visit type it offers (care offer, duration, in person /
  video / home visit, new or known patients only) is the Parcours extension
  ``visit-type`` on it;
* each leave or exception is a ``fr-core-schedule-availability-time`` of type
  ``busy-unavailable`` with its period and ``unavailabilityReason``;
* the visit types are also listed with FR Core's ``fr-core-service-type-duration``
  (what the shared-agenda IG reads) and the booking policy (cancellation deadline,
  horizon, notice) is the Parcours extension ``booking-policy``.

Times of day are Europe/Paris wall-clock times: an opening at 08:30 stays at 08:30
across daylight-saving changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from parcours.core.errors import BadRequest
from parcours.services.directory import model as directory
from parcours.services.directory.nomenclatures import nomenclatures

PARIS = ZoneInfo("Europe/Paris")
PARCOURS = directory.PARCOURS
AVAILABILITY_TIME = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-schedule-availability-time"
SERVICE_TYPE_DURATION = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-service-type-duration"
SCHEDULE_TYPE_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-schedule-type"
RRULE_SYSTEM = "https://www.ietf.org/rfc/rfc2445"
VISIT_TYPE = f"{PARCOURS}/StructureDefinition/visit-type"
BOOKING_POLICY = f"{PARCOURS}/StructureDefinition/booking-policy"
SLOT_PATIENTS = f"{PARCOURS}/StructureDefinition/slot-patients"
SLOT_HOLD = f"{PARCOURS}/StructureDefinition/slot-hold"
WAITLIST_BEFORE = f"{PARCOURS}/StructureDefinition/waitlist-before"
WAITLIST_OFFER = f"{PARCOURS}/StructureDefinition/waitlist-offer"
BOOKED_BY = f"{PARCOURS}/StructureDefinition/booked-by"
RULE_ID_SYSTEM = f"{PARCOURS}/NamingSystem/availability-rule"
SCHEDULE_ID_SYSTEM = f"{PARCOURS}/NamingSystem/schedule"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
UCUM = "http://unitsofmeasure.org"
CANCEL_REASON_SYSTEM = "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason"

DAYS = directory.DAYS  # mon..sun
ICAL_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
MODES = {"AMB": "in-person", "VR": "video", "HH": "home"}
MODE_WORDS = {"in-person": "AMB", "video": "VR", "home": "HH", "AMB": "AMB", "VR": "VR", "HH": "HH"}
PATIENTS = ("all", "new", "known")
# Appointment statuses that hold their slots (the others leave them free).
HOLDING = frozenset({"booked", "arrived", "checked-in", "fulfilled", "noshow", "pending"})


@dataclass(frozen=True)
class VisitType:
    offer: str = "consultation"  # care-offer code (docs/directory.md)
    minutes: int = 20
    mode: str = "AMB"  # v3 ActCode: AMB in person, VR video, HH home visit
    patients: str = "all"  # all | new | known

    def key(self) -> str:
        return f"{self.offer}:{self.minutes}:{self.mode}:{self.patients}"


@dataclass(frozen=True)
class OpeningRule:
    """Every ``days`` from ``opens`` to ``closes`` (Paris time), slots of ``visit``."""

    days: tuple[str, ...]
    opens: time
    closes: time
    visit: VisitType = VisitType()
    valid_from: date | None = None
    valid_until: date | None = None
    id: str = ""

    def text(self) -> str:
        v = self.visit
        extra = ("" if v.mode == default_mode(v.offer) else f" {MODES[v.mode]}") + ("" if v.patients == "all" else f" {v.patients}")
        return f"{','.join(self.days)} {self.opens:%H:%M}-{self.closes:%H:%M} {v.offer} {v.minutes}{extra}"


@dataclass(frozen=True)
class Leave:
    start: datetime
    end: datetime
    reason: str = ""
    id: str = ""


@dataclass(frozen=True)
class Policy:
    cancel_hours: int = 24  # patients cancel or move no later than this before the start
    horizon_days: int = 28  # slots are generated this far ahead
    notice_minutes: int = 60  # patients book no later than this before the start


@dataclass
class Availability:
    rules: list[OpeningRule] = field(default_factory=list)
    leaves: list[Leave] = field(default_factory=list)
    policy: Policy = Policy()

    def visit_types(self) -> list[VisitType]:
        return list(dict.fromkeys(r.visit for r in self.rules))


# -- parsing what people type ---------------------------------------------------------------

_RULE_RE = re.compile(r"^\s*(?P<days>[a-z,\-]+)\s+(?P<opens>\d{1,2}[:h]\d{2})\s*-\s*(?P<closes>\d{1,2}[:h]\d{2})"
                      r"(?:\s+(?P<offer>[a-z\-]+))?(?:\s+(?P<minutes>\d{1,3}))?(?P<rest>(?:\s+[a-z\-]+)*)\s*$")


def default_mode(offer: str) -> str:
    concept = nomenclatures().care_offers.get(offer)
    return (concept.act_code if concept and concept.act_code else "AMB")


def parse_days(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            if a not in DAYS or b not in DAYS:
                raise BadRequest(f"Unknown day in {part!r}: use mon, tue, wed, thu, fri, sat, sun")
            i, j = DAYS.index(a), DAYS.index(b)
            out += list(DAYS[i : j + 1]) if i <= j else list(DAYS[i:]) + list(DAYS[: j + 1])
        else:
            if part not in DAYS:
                raise BadRequest(f"Unknown day {part!r}: use mon, tue, wed, thu, fri, sat, sun")
            out.append(part)
    return tuple(d for d in DAYS if d in out)


def _clock(text: str) -> time:
    h, m = re.split("[:h]", text)
    if not (0 <= int(h) <= 23 and 0 <= int(m) <= 59):
        raise BadRequest(f"Invalid time {text!r}")
    return time(int(h), int(m))


def parse_rule(text: str) -> OpeningRule:
    """``mon-fri 08:30-12:00 consultation 20 [video|home|in-person] [new|known]``."""
    m = _RULE_RE.match(text.lower())
    if not m:
        raise BadRequest(f"Cannot read the opening {text!r}: write it as 'mon-fri 08:30-12:00 consultation 20'")
    offer = m["offer"] or "consultation"
    if nomenclatures().care_offers.get(offer) is None:
        raise BadRequest(f"Unknown visit type {offer!r}; known: {', '.join(c.code for c in nomenclatures().care_offers.concepts)}")
    mode, patients = default_mode(offer), "all"
    for word in (m["rest"] or "").split():
        if word in MODE_WORDS:
            mode = MODE_WORDS[word]
        elif word in PATIENTS:
            patients = word
        else:
            raise BadRequest(f"Unknown word {word!r} in {text!r}: say video, home, in-person, new or known")
    rule = OpeningRule(parse_days(m["days"]), _clock(m["opens"]), _clock(m["closes"]),
                       VisitType(offer, int(m["minutes"] or 20), mode, patients))
    check_rule(rule)
    return rule


def check_rule(rule: OpeningRule) -> None:
    if not rule.days:
        raise BadRequest("An opening needs at least one day")
    if rule.closes <= rule.opens:
        raise BadRequest(f"An opening must close after it opens ({rule.opens:%H:%M}-{rule.closes:%H:%M})")
    if not (5 <= rule.visit.minutes <= 240):
        raise BadRequest("A visit lasts between 5 and 240 minutes")
    if rule.visit.mode not in MODES:
        raise BadRequest(f"Unknown visit mode {rule.visit.mode!r}")
    if rule.visit.patients not in PATIENTS:
        raise BadRequest(f"Unknown patients restriction {rule.visit.patients!r}: all, new or known")


# -- Schedule ---------------------------------------------------------------------------------

def schedule_id(role_id: str, location_id: str | None) -> str:
    """A stable id: defining the availability of a role at a place again replaces it."""
    raw = f"{role_id}|{location_id or ''}"
    readable = re.sub(r"[^A-Za-z0-9\-.]", "-", role_id)[:40]
    return f"sch-{readable}-{hashlib.blake2b(raw.encode(), digest_size=5).hexdigest()}"


def _local(day: date, at: time) -> str:
    return datetime.combine(day, at, PARIS).isoformat(timespec="seconds")


def _duration(minutes: int) -> dict:
    return {"value": minutes, "unit": "min", "system": UCUM, "code": "min"}


def offer_concept(offer: str) -> dict:
    o = nomenclatures().care_offers.get(offer)
    if o is None:
        raise BadRequest(f"Unknown visit type {offer!r}")
    return {"coding": [o.coding()], "text": o.fr}


def visit_extension(v: VisitType) -> dict:
    o = nomenclatures().care_offers.get(v.offer)
    subs = [
        {"url": "offer", "valueCoding": o.coding() if o else {"system": directory.PARCOURS, "code": v.offer}},
        {"url": "duration", "valueDuration": _duration(v.minutes)},
        {"url": "mode", "valueCoding": {"system": ACT_CODE_SYSTEM, "code": v.mode}},
        {"url": "patients", "valueCode": v.patients},
    ]
    return {"url": VISIT_TYPE, "extension": subs}


def rule_extension(rule: OpeningRule, first_day: date) -> dict:
    rrule: list[dict] = [{"url": "freq", "valueCoding": {"system": RRULE_SYSTEM, "code": "WEEKLY"}}]
    rrule += [{"url": "byDay", "valueString": ICAL_DAYS[DAYS.index(d)]} for d in rule.days]
    if rule.valid_until:
        rrule.append({"url": "until", "valueDateTime": _local(rule.valid_until, time(23, 59, 59))})
    start_day = rule.valid_from or first_day
    return {"url": AVAILABILITY_TIME, "extension": [
        {"url": "identifier", "valueIdentifier": {"system": RULE_ID_SYSTEM, "value": rule.id or rule_key(rule)}},
        {"url": "type", "valueCoding": {"system": SCHEDULE_TYPE_SYSTEM, "code": "free", "display": "Disponibilité"}},
        {"url": "rrule", "extension": rrule},
        {"url": "start", "valueDateTime": _local(start_day, rule.opens)},
        {"url": "end", "valueDateTime": _local(start_day, rule.closes)},
        visit_extension(rule.visit),
    ]}


def leave_extension(leave: Leave) -> dict:
    return {"url": AVAILABILITY_TIME, "extension": [
        {"url": "identifier", "valueIdentifier": {"system": RULE_ID_SYSTEM, "value": leave.id or leave_key(leave)}},
        {"url": "type", "valueCoding": {"system": SCHEDULE_TYPE_SYSTEM, "code": "busy-unavailable", "display": "Indisponibilité"}},
        {"url": "start", "valueDateTime": leave.start.astimezone(PARIS).isoformat(timespec="seconds")},
        {"url": "end", "valueDateTime": leave.end.astimezone(PARIS).isoformat(timespec="seconds")},
        *([{"url": "unavailabilityReason", "valueCodeableConcept": {"coding": [{"system": SCHEDULE_TYPE_SYSTEM, "code": "busy-unavailable"}],
                                                                      "text": leave.reason}}] if leave.reason else []),
    ]}


def rule_key(rule: OpeningRule) -> str:
    raw = f"{rule.days}|{rule.opens}|{rule.closes}|{rule.visit.key()}|{rule.valid_from}|{rule.valid_until}"
    return "r-" + hashlib.blake2b(raw.encode(), digest_size=6).hexdigest()


def leave_key(leave: Leave) -> str:
    return "l-" + hashlib.blake2b(f"{leave.start.isoformat()}|{leave.end.isoformat()}".encode(), digest_size=6).hexdigest()


def schedule(*, role_id: str, practitioner_id: str | None, location_id: str | None, availability: Availability,
             today: date, specialty: dict | None = None, role_display: str | None = None,
             horizon_end: datetime | None = None, meta: dict | None = None) -> dict:
    actors = [{"reference": f"PractitionerRole/{role_id}", **({"display": role_display} if role_display else {})}]
    if practitioner_id:
        actors.append({"reference": f"Practitioner/{practitioner_id}"})
    if location_id:
        actors.append({"reference": f"Location/{location_id}"})
    p = availability.policy
    ext: list[dict] = [rule_extension(r, today) for r in availability.rules]
    ext += [leave_extension(lv) for lv in availability.leaves]
    for v in availability.visit_types():
        ext.append({"url": SERVICE_TYPE_DURATION, "extension": [
            {"url": "serviceType", "valueCodeableConcept": offer_concept(v.offer)},
            {"url": "duration", "valueDuration": _duration(v.minutes)}]})
    ext.append({"url": BOOKING_POLICY, "extension": [
        {"url": "cancelHours", "valueInteger": p.cancel_hours},
        {"url": "horizonDays", "valueInteger": p.horizon_days},
        {"url": "noticeMinutes", "valueInteger": p.notice_minutes}]})
    res: dict[str, Any] = {
        "resourceType": "Schedule",
        "extension": ext,
        "identifier": [{"system": SCHEDULE_ID_SYSTEM, "value": schedule_id(role_id, location_id)}],
        "active": True,
        "serviceType": [offer_concept(o) for o in dict.fromkeys(v.offer for v in availability.visit_types())],
        "actor": actors,
    }
    if meta:
        res["meta"] = meta
    if specialty:
        res["specialty"] = [specialty]
    if horizon_end is not None:
        res["planningHorizon"] = {"start": _iso(datetime.combine(today, time(0), PARIS)), "end": _iso(horizon_end)}
    if not res["serviceType"]:
        del res["serviceType"]
    return res


def _sub(ext: dict, name: str) -> dict | None:
    return next((e for e in ext.get("extension") or [] if e.get("url") == name), None)


def _subs(ext: dict, name: str) -> list[dict]:
    return [e for e in ext.get("extension") or [] if e.get("url") == name]


def _dt(value: str | None) -> datetime | None:
    if not value:
        return None
    d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=PARIS)


def read_visit(ext: dict | None) -> VisitType:
    if not ext:
        return VisitType()
    offer = ((_sub(ext, "offer") or {}).get("valueCoding") or {}).get("code") or "consultation"
    minutes = int(((_sub(ext, "duration") or {}).get("valueDuration") or {}).get("value") or 20)
    mode = ((_sub(ext, "mode") or {}).get("valueCoding") or {}).get("code") or default_mode(offer)
    patients = (_sub(ext, "patients") or {}).get("valueCode") or "all"
    return VisitType(offer, minutes, mode, patients)


def read_availability(sched: dict) -> Availability:
    out = Availability()
    for ext in sched.get("extension") or []:
        url = ext.get("url")
        if url == AVAILABILITY_TIME:
            kind = ((_sub(ext, "type") or {}).get("valueCoding") or {}).get("code")
            start = _dt((_sub(ext, "start") or {}).get("valueDateTime"))
            end = _dt((_sub(ext, "end") or {}).get("valueDateTime"))
            ident = ((_sub(ext, "identifier") or {}).get("valueIdentifier") or {}).get("value") or ""
            if start is None or end is None:
                continue
            if kind == "free":
                rrule = _sub(ext, "rrule")
                ls, le = start.astimezone(PARIS), end.astimezone(PARIS)
                if rrule is None:
                    days: tuple[str, ...] = (DAYS[ls.weekday()],)
                    until: date | None = ls.date()
                else:
                    by = [e.get("valueString") for e in _subs(rrule, "byDay")]
                    days = tuple(DAYS[ICAL_DAYS.index(b)] for b in ICAL_DAYS if b in by) or (DAYS[ls.weekday()],)
                    u = _dt((_sub(rrule, "until") or {}).get("valueDateTime"))
                    until = u.astimezone(PARIS).date() if u else None
                out.rules.append(OpeningRule(days, ls.time().replace(tzinfo=None), le.time().replace(tzinfo=None),
                                             read_visit(_sub(ext, VISIT_TYPE)), ls.date(), until, ident))
            elif kind == "busy-unavailable":
                reason = ((_sub(ext, "unavailabilityReason") or {}).get("valueCodeableConcept") or {}).get("text") or ""
                out.leaves.append(Leave(start, end, reason, ident))
        elif url == BOOKING_POLICY:
            def num(name: str, default: int) -> int:
                v = (_sub(ext, name) or {}).get("valueInteger")
                return int(v) if v is not None else default
            out.policy = Policy(num("cancelHours", 24), num("horizonDays", 28), num("noticeMinutes", 60))
    return out


def actor_id(sched: dict, rtype: str) -> str | None:
    for a in sched.get("actor") or []:
        rid = directory.reference_id(a, rtype)
        if rid:
            return rid
    return None


# -- Slot -----------------------------------------------------------------------------------

def slot_id(schedule: str, start: datetime, visit: VisitType) -> str:
    """Deterministic: generating the same opening again finds the same slots."""
    raw = f"{schedule}|{start.astimezone(UTC).isoformat()}|{visit.key()}"
    return "slot-" + hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def slot(*, schedule: str, start: datetime, visit: VisitType, status: str = "free", specialty: dict | None = None,
         meta: dict | None = None) -> dict:
    service = offer_concept(visit.offer)
    service["coding"] = [*service["coding"], {"system": ACT_CODE_SYSTEM, "code": visit.mode}]
    res: dict[str, Any] = {
        "resourceType": "Slot",
        "serviceType": [service],
        "schedule": {"reference": f"Schedule/{schedule}"},
        "status": status,
        "start": _iso(start),
        "end": _iso(start + timedelta(minutes=visit.minutes)),
    }
    if meta:
        res["meta"] = meta
    if visit.patients != "all":
        res["extension"] = [{"url": SLOT_PATIENTS, "valueCode": visit.patients}]
    if specialty:
        res["specialty"] = [specialty]
    return res


def slot_start(s: dict) -> datetime:
    return datetime.fromisoformat(s["start"].replace("Z", "+00:00"))


def slot_end(s: dict) -> datetime:
    return datetime.fromisoformat(s["end"].replace("Z", "+00:00"))


def slot_visit(s: dict) -> VisitType:
    offer, mode = "consultation", None
    for concept in s.get("serviceType") or []:
        for c in concept.get("coding") or []:
            if c.get("system") == ACT_CODE_SYSTEM:
                mode = c.get("code")
            elif c.get("system") == nomenclatures().care_offers.system:
                offer = c.get("code") or offer
    patients = next((e.get("valueCode") for e in s.get("extension") or [] if e.get("url") == SLOT_PATIENTS), None) or "all"
    minutes = int((slot_end(s) - slot_start(s)).total_seconds() // 60) if s.get("start") and s.get("end") else 20
    return VisitType(offer, minutes, mode or default_mode(offer), patients)


def slot_schedule(s: dict) -> str | None:
    return directory.reference_id(s.get("schedule"), "Schedule")


def slot_hold(s: dict) -> tuple[str, datetime] | None:
    """A freed slot offered to a patient of the waiting list: (Patient/x, until)."""
    for e in s.get("extension") or []:
        if e.get("url") == SLOT_HOLD:
            who = ((_sub(e, "patient") or {}).get("valueReference") or {}).get("reference")
            until = _dt((_sub(e, "until") or {}).get("valueDateTime"))
            if who and until:
                return who, until
    return None


def with_hold(s: dict, patient: str | None, until: datetime | None) -> dict:
    out = dict(s)
    ext = [e for e in out.get("extension") or [] if e.get("url") != SLOT_HOLD]
    if patient and until:
        ext.append({"url": SLOT_HOLD, "extension": [{"url": "patient", "valueReference": {"reference": patient}},
                                                     {"url": "until", "valueDateTime": _iso(until)}]})
    if ext:
        out["extension"] = ext
    else:
        out.pop("extension", None)
    return out


# -- Appointment ------------------------------------------------------------------------------

def appointment(*, slot: dict, slot_ref: str, patient: str, role: str | None, practitioner: str | None,
                location: str | None, booked_by: str | None, now: datetime, comment: str | None = None) -> dict:
    visit = slot_visit(slot)
    participants = [{"actor": {"reference": patient}, "required": "required", "status": "accepted"}]
    for ref in (role, practitioner, location):
        if ref:
            participants.append({"actor": {"reference": ref}, "required": "required", "status": "accepted"})
    res: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "booked",
        "serviceType": slot.get("serviceType") or [offer_concept(visit.offer)],
        "start": slot["start"],
        "end": slot["end"],
        "minutesDuration": visit.minutes,
        "slot": [{"reference": slot_ref}],
        "created": now.astimezone(PARIS).date().isoformat(),
        "participant": participants,
    }
    if slot.get("specialty"):
        res["specialty"] = slot["specialty"]
    if booked_by:
        # FR Core: who took the appointment (the patient, a proxy, a secretary...).
        res["extension"] = [{"url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-appointment-operator",
                             "valueReference": {"reference": booked_by}}]
    if comment:
        res["comment"] = comment
    return res


def appointment_slots(appt: dict | None) -> list[str]:
    if not appt:
        return []
    return [rid for rid in (directory.reference_id(s, "Slot") for s in appt.get("slot") or []) if rid]


def holds_slots(appt: dict | None) -> bool:
    return bool(appt) and appt.get("status") in HOLDING  # type: ignore[union-attr]


def participants(appt: dict, rtype: str) -> list[str]:
    return [ref for ref in ((p.get("actor") or {}).get("reference") or "" for p in appt.get("participant") or [])
            if ref.startswith(rtype + "/")]


def appointment_start(appt: dict) -> datetime | None:
    return _dt(appt.get("start"))


def waitlist_entry(*, patient: str, role: str, practitioner: str | None, before: datetime, offer: str | None,
                   now: datetime) -> dict:
    """A place on a practitioner's waiting list: an Appointment with status ``waitlist``
    whose ``requestedPeriod`` says until when an earlier slot is wanted."""
    parts = [{"actor": {"reference": patient}, "required": "required", "status": "accepted"},
             {"actor": {"reference": role}, "required": "required", "status": "needs-action"}]
    if practitioner:
        parts.append({"actor": {"reference": practitioner}, "required": "required", "status": "needs-action"})
    res: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "waitlist",
        "created": now.astimezone(PARIS).date().isoformat(),
        # Joined when (to the millisecond: first come, first served) and until when.
        "requestedPeriod": [{"start": now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                             "end": _iso(before)}],
        "participant": parts,
    }
    if offer:
        res["serviceType"] = [offer_concept(offer)]
    return res


def waitlist_offer(appt: dict) -> tuple[str, datetime] | None:
    for e in appt.get("extension") or []:
        if e.get("url") == WAITLIST_OFFER:
            slot_ref = ((_sub(e, "slot") or {}).get("valueReference") or {}).get("reference")
            until = _dt((_sub(e, "until") or {}).get("valueDateTime"))
            if slot_ref and until:
                return slot_ref, until
    return None


def with_offer(appt: dict, slot_ref: str | None, until: datetime | None) -> dict:
    out = dict(appt)
    ext = [e for e in out.get("extension") or [] if e.get("url") != WAITLIST_OFFER]
    if slot_ref and until:
        ext.append({"url": WAITLIST_OFFER, "extension": [{"url": "slot", "valueReference": {"reference": slot_ref}},
                                                          {"url": "until", "valueDateTime": _iso(until)}]})
    if ext:
        out["extension"] = ext
    else:
        out.pop("extension", None)
    return out


def iso(dt: datetime) -> str:
    return _iso(dt)


def parse_instant(value: str) -> datetime:
    try:
        d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            d = datetime.combine(date.fromisoformat(value), time(0))
        except ValueError:
            raise BadRequest(f"Not a date or instant: {value!r}") from None
    return d if d.tzinfo else d.replace(tzinfo=PARIS)


def parse_leaves(text: str) -> list[Leave]:
    """One leave a line: ``2026-12-24 2026-12-27 Congés`` (whole days) or with times ``2026-12-24 08:00 2026-12-24 12:00``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) >= 4 and ":" in parts[1]:
                start = datetime.fromisoformat(f"{parts[0]}T{parts[1]}").replace(tzinfo=PARIS)
                end = datetime.fromisoformat(f"{parts[2]}T{parts[3]}").replace(tzinfo=PARIS)
                reason = " ".join(parts[4:])
            else:
                start = datetime.combine(date.fromisoformat(parts[0]), time(0), PARIS)
                end = datetime.combine(date.fromisoformat(parts[1] if len(parts) > 1 else parts[0]), time(0), PARIS) + timedelta(days=1)
                reason = " ".join(parts[2:])
        except ValueError:
            raise BadRequest(f"Cannot read the leave {line!r}: write '2026-12-24 2026-12-27 reason'") from None
        out.append(Leave(start, end, reason))
    return out
