"""The patient's timeline ("ligne de vie"): everything in the record, in time order.

Built from one ``Patient/$everything`` read through the caller's Repository, so the access
policy decides what appears (a hidden document is not on a professional's timeline) and
the read is audited once (``store.compartment.everything_rows``: one statement for every
type, the JSON text only). Each resource becomes an :class:`Event` with the date that
matters clinically (the encounter's start, the appointment's start, the document's date of
care, the report's effective time...: :data:`DATES`), a category and a short title;
observations that a report the caller sees lists are shown through that report. Asked for
one window (a year, a month, a day), the database returns only the resources with one of
those dates near it, found in the date search rows, and the exact test is made here.

The view zooms by year, month or day: :func:`window` gives the period around an anchor
date, :func:`overview` counts events per sub-period and category for the chart above the list.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from operator import attrgetter
from typing import Any

import orjson

from parcours.store.compartment import DateFilter, everything_rows
from parcours.store.repository import Repository

CATEGORIES: dict[str, tuple[str, ...]] = {
    "encounter": ("Encounter",),
    "appointment": ("Appointment",),
    "document": ("DocumentReference",),
    "result": ("DiagnosticReport", "Observation"),
    "prescription": ("MedicationRequest",),
    "condition": ("Condition",),
    "immunization": ("Immunization",),
    "procedure": ("Procedure",),
    "alert": ("Flag",),
    "message": ("Communication",),
}
CATEGORY_OF = {t: c for c, types in CATEGORIES.items() for t in types}
ZOOMS = ("year", "month", "day")


@dataclass(slots=True)
class Event:
    when: str  # FHIR date or dateTime
    day: date
    category: str
    rtype: str
    id: str
    title: str
    status: str | None
    detail: str

    @property
    def ref(self) -> str:
        return f"{self.rtype}/{self.id}"


def text_of(cc: Any) -> str:
    if isinstance(cc, list):
        cc = cc[0] if cc else {}
    if not isinstance(cc, dict):
        return ""
    if cc.get("text"):
        return str(cc["text"])
    for c in cc.get("coding") or []:
        if c.get("display"):
            return str(c["display"])
    return str(((cc.get("coding") or [{}])[0]).get("code") or "")


# The date that matters clinically, per type: the first of these paths that holds a string, and
# the date search parameter that indexes it (None: no parameter does; the JSON key is looked for
# instead). ``events`` with a window lets the database keep only resources with a date near it.
DATES: dict[str, tuple[tuple[tuple[str, ...], str | None], ...]] = {
    "Encounter": ((("period", "start"), "date"),),
    "Appointment": ((("start",), "date"),),
    "DocumentReference": ((("context", "period", "start"), "period"), (("date",), "date")),
    "DiagnosticReport": ((("effectiveDateTime",), "date"), (("effectivePeriod", "start"), "date"), (("issued",), "issued")),
    "Observation": ((("effectiveDateTime",), "date"), (("effectivePeriod", "start"), "date"), (("issued",), None)),
    "MedicationRequest": ((("authoredOn",), "authoredon"),),
    "Condition": ((("onsetDateTime",), "onset-date"), (("onsetPeriod", "start"), "onset-date"), (("recordedDate",), "recorded-date")),
    "Immunization": ((("occurrenceDateTime",), "date"), (("recorded",), None)),
    "Procedure": ((("performedDateTime",), "date"), (("performedPeriod", "start"), "date")),
    "Flag": ((("period", "start"), "date"),),
    "Communication": ((("sent",), "sent"), (("received",), "received")),
}
DATE_FILTERS = {t: DateFilter(tuple(dict.fromkeys(c for _, c in paths if c)), tuple(p[-1] for p, c in paths if c is None))
                for t, paths in DATES.items()}
# Observations a visible report lists are shown through that report.
LISTED = {"Observation": ("DiagnosticReport", "result")}
# Dates are indexed in UTC and shown as days in Paris: the database looks this much around a window.
MARGIN = timedelta(days=2)


def when_of(rtype: str, r: dict) -> str | None:
    for path, _ in DATES.get(rtype, ()):
        v: Any = r
        for step in path:
            v = v.get(step) if isinstance(v, dict) else None
        if isinstance(v, str) and v:
            return v
    return None


def title_of(rtype: str, r: dict) -> tuple[str, str]:
    if rtype == "Encounter":
        return text_of(r.get("type")) or text_of(r.get("serviceType")) or "", text_of(r.get("reasonCode"))
    if rtype == "Appointment":
        return r.get("description") or text_of(r.get("serviceType")) or text_of(r.get("appointmentType")), ""
    if rtype == "DocumentReference":
        return r.get("description") or text_of(r.get("type")), text_of(r.get("type"))
    if rtype == "DiagnosticReport":
        return text_of(r.get("code")), f"{len(r.get('result') or [])}"
    if rtype == "Observation":
        q = r.get("valueQuantity") or {}
        value = f"{q.get('value')} {q.get('unit') or ''}".strip() if q else str(r.get("valueString") or text_of(r.get("valueCodeableConcept")))
        return text_of(r.get("code")), value
    if rtype == "MedicationRequest":
        return text_of(r.get("medicationCodeableConcept")) or ((r.get("medicationReference") or {}).get("display") or ""), \
            "; ".join(str(d.get("text") or "") for d in r.get("dosageInstruction") or [])
    if rtype in ("Condition", "Procedure"):
        return text_of(r.get("code")), text_of(r.get("clinicalStatus"))
    if rtype == "Immunization":
        return text_of(r.get("vaccineCode")), ""
    if rtype == "Flag":
        return text_of(r.get("code")), text_of(r.get("category"))
    if rtype == "Communication":
        return text_of(r.get("category")) or (str(((r.get("payload") or [{}])[0]).get("contentString") or "")[:80]), ""
    return rtype, ""


def day_of(when: str) -> date | None:
    try:
        if len(when) == 4:
            return date(int(when), 1, 1)
        if len(when) == 7:
            return date(int(when[:4]), int(when[5:7]), 1)
        if "T" in when and when.endswith(("Z", "+00:00")):  # UTC: the day in Paris may be the next one
            from parcours.services.booking.model import PARIS

            return datetime.fromisoformat(when.replace("Z", "+00:00")).astimezone(PARIS).date()
        return date.fromisoformat(when[:10])  # a local time: its own date
    except ValueError:
        return None


async def events(repo: Repository, patient_id: str, categories: list[str] | None = None, *, zoom: str | None = None,
                 at: date | None = None) -> list[Event]:
    """Every event of the record the caller may see, newest first; with ``zoom`` and ``at``,
    only those of that window (the database reads only resources dated near it)."""
    wanted = [c for c in (categories or list(CATEGORIES)) if c in CATEGORIES]
    types = sorted({t for c in wanted for t in CATEGORIES[c]})
    bounds = window(zoom, at) if zoom and at else None
    near = (datetime.combine(bounds[0], datetime.min.time(), UTC) - MARGIN,
            datetime.combine(bounds[1], datetime.min.time(), UTC) + MARGIN) if bounds else None
    rows = await everything_rows(repo, patient_id, types, window=near, dates=DATE_FILTERS, listed=LISTED)
    out: list[Event] = []
    for rtype, rid, content in rows:
        r = orjson.loads(content)
        if r.get("status") == "entered-in-error" and rtype != "DocumentReference":
            continue
        when = when_of(rtype, r)
        day = day_of(when) if when else None
        if day is None or (bounds and not bounds[0] <= day < bounds[1]):
            continue
        title, detail = title_of(rtype, r)
        out.append(Event(when, day, CATEGORY_OF[rtype], rtype, rid, title or rtype, r.get("status"), detail))
    out.sort(key=attrgetter("when", "rtype", "id"), reverse=True)
    return out


def window(zoom: str, at: date) -> tuple[date, date]:
    """[start, end) of the period shown: the year, the month or the day of ``at``."""
    if zoom == "year":
        return date(at.year, 1, 1), date(at.year + 1, 1, 1)
    if zoom == "month":
        return date(at.year, at.month, 1), (date(at.year + (at.month == 12), at.month % 12 + 1, 1))
    return at, at + timedelta(days=1)


def step(zoom: str, at: date, n: int) -> date:
    if zoom == "year":
        return date(at.year + n, 1, 1)
    if zoom == "month":
        m = at.year * 12 + at.month - 1 + n
        return date(m // 12, m % 12 + 1, 1)
    return at + timedelta(days=n)


def overview(evs: list[Event], zoom: str, at: date) -> list[tuple[str, date, dict[str, int]]]:
    """Counts per sub-period of the window (months of a year, days of a month, the day itself)."""
    start, end = window(zoom, at)
    if zoom == "year":
        slots = [date(start.year, m, 1) for m in range(1, 13)]
        key = lambda d: date(d.year, d.month, 1)  # noqa: E731
    elif zoom == "month":
        slots = [date(start.year, start.month, d) for d in range(1, calendar.monthrange(start.year, start.month)[1] + 1)]
        key = lambda d: d  # noqa: E731
    else:
        slots = [start]
        key = lambda d: d  # noqa: E731
    counts: dict[date, dict[str, int]] = {s: {} for s in slots}
    for e in evs:
        if start <= e.day < end:
            c = counts.setdefault(key(e.day), {})
            c[e.category] = c.get(e.category, 0) + 1
    return [(s.isoformat(), s, counts[s]) for s in slots]


def in_window(evs: list[Event], zoom: str, at: date) -> list[Event]:
    start, end = window(zoom, at)
    return [e for e in evs if start <= e.day < end]


__all__ = ["CATEGORIES", "DATES", "Event", "ZOOMS", "day_of", "events", "in_window", "overview", "step", "text_of", "title_of", "when_of",
           "window"]
