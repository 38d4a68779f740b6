"""Urgent tele-stroke requests: on-call rosters, alert, acknowledgment deadline, escalation, timeline.

* A **roster** is a FHIR ``Schedule`` (``serviceType`` = the specialty, ``actor`` = the site's
  Location) whose ``oncall-shift`` extensions give weekly shifts: day (``mon``..``sun``),
  ``start``/``end`` times (Europe/Paris; an end before the start runs past midnight) and
  the people on call in escalation order (``valueReference`` repeated).
* A **request** is a ``Task`` (code "Téléavis AVC", priority ``stat``) owned by the first
  person on call, with ``restriction.period.end`` = the acknowledgment deadline, and a
  video ``Appointment`` booked at once for the emergency physician, the on-call
  specialist and the patient: its consultation room opens immediately.
* ``escalate_due(repo, now)`` is the due-job: a request not acknowledged by its deadline
  goes to the next person on the roster (also added to the Appointment). Tests call it
  with their own clock: nothing sleeps.
* Key times (request, escalations, acknowledgment, video start, decision) are extensions
  ``stroke-event`` on the Task, read back by ``timeline``. Every write goes through a
  Repository (audited); Task writes through the platform's, as in ``expertise``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from parcours.core.errors import Conflict, Forbidden, NotFound, Unprocessable
from parcours.store.repository import Repository

PARIS = ZoneInfo("Europe/Paris")
BASE = "https://parcours.example/fhir/StructureDefinition/"
SHIFT_EXT, EVENT_EXT, ROSTER_EXT = BASE + "oncall-shift", BASE + "stroke-event", BASE + "stroke-roster"
KIND = {"text": "Téléavis AVC"}
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EVENTS = frozenset({"requested", "escalated", "acknowledged", "video-start", "decision"})


@dataclass(frozen=True)
class Shift:
    day: str
    start: time
    end: time
    people: tuple[str, ...]


def roster_resource(specialty: str, site: str, shifts: list[Shift]) -> dict:
    return {"resourceType": "Schedule", "active": True, "serviceType": [{"text": specialty}],
            "actor": [{"reference": site}],
            "extension": [{"url": SHIFT_EXT, "extension": [
                {"url": "day", "valueCode": s.day}, {"url": "start", "valueTime": s.start.isoformat()},
                {"url": "end", "valueTime": s.end.isoformat()},
                *({"url": "person", "valueReference": {"reference": p}} for p in s.people)]} for s in shifts]}


def shifts_of(schedule: dict) -> list[Shift]:
    out = []
    for e in schedule.get("extension") or []:
        if e.get("url") != SHIFT_EXT:
            continue
        parts = e.get("extension") or []
        v = {p["url"]: p for p in parts}
        out.append(Shift(v["day"]["valueCode"], time.fromisoformat(v["start"]["valueTime"]), time.fromisoformat(v["end"]["valueTime"]),
                         tuple(p["valueReference"]["reference"] for p in parts if p.get("url") == "person")))
    return out


def on_call(schedule: dict, at: datetime) -> tuple[str, ...]:
    """Who is on call at ``at``, in escalation order (a night shift started the day before counts)."""
    local = at.astimezone(PARIS)
    for s in shifts_of(schedule):
        for day_offset in (0, 1):
            day = (local - timedelta(days=day_offset)).date()
            if DAYS[day.weekday()] != s.day:
                continue
            start = datetime.combine(day, s.start, PARIS)
            end = datetime.combine(day, s.end, PARIS)
            if end <= start:
                end += timedelta(days=1)
            if start <= local < end:
                return s.people
    return ()


def _event(task: dict, code: str, at: datetime, who: str | None = None, text: str | None = None) -> None:
    ext = [{"url": "code", "valueCode": code}, {"url": "time", "valueDateTime": at.isoformat()}]
    if who:
        ext.append({"url": "who", "valueReference": {"reference": who}})
    if text:
        ext.append({"url": "text", "valueString": text})
    task.setdefault("extension", []).append({"url": EVENT_EXT, "extension": ext})


def timeline(task: dict) -> list[dict]:
    out = []
    for e in task.get("extension") or []:
        if e.get("url") == EVENT_EXT:
            v = {p["url"]: p for p in e.get("extension") or []}
            out.append({"event": v["code"]["valueCode"], "time": v["time"]["valueDateTime"],
                        "who": (v.get("who") or {}).get("valueReference", {}).get("reference"),
                        "text": (v.get("text") or {}).get("valueString")})
    return out


@dataclass(frozen=True)
class Sent:
    task: str
    appointment: str
    owner: str


async def send_request(repo: Repository, roster_id: str, patient: str, now: datetime, ack_minutes: int, note: str = "") -> Sent:
    me = repo.caller.fhir_user
    if repo.caller.kind != "practitioner" or not me:
        raise Forbidden("Only professionals send a tele-stroke request")
    roster = (await repo.read("Schedule", roster_id)).resource()
    people = on_call(roster, now)
    if not people:
        raise Unprocessable("Nobody is on call on this roster now")
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    await repo.read("Patient", patient.split("/", 1)[1])
    appointment = (await repo.create("Appointment", {
        "resourceType": "Appointment", "status": "booked", "priority": 1, "serviceType": [{"text": "Téléconsultation AVC"}],
        "start": now.isoformat(), "end": (now + timedelta(hours=1)).isoformat(),
        "participant": [{"actor": {"reference": a}, "status": "accepted"} for a in (patient, me, people[0])]})).stored.id
    task: dict = {"resourceType": "Task", "status": "requested", "intent": "order", "priority": "stat", "code": KIND,
                  "description": note or None, "for": {"reference": patient}, "requester": {"reference": me},
                  "owner": {"reference": people[0]}, "authoredOn": now.isoformat(), "lastModified": now.isoformat(),
                  "focus": {"reference": f"Appointment/{appointment}"},
                  "restriction": {"period": {"end": (now + timedelta(minutes=ack_minutes)).isoformat()}},
                  "input": [{"type": {"text": "roster"}, "valueReference": {"reference": f"Schedule/{roster_id}"}},
                            {"type": {"text": "ack-minutes"}, "valueInteger": ack_minutes},
                            {"type": {"text": "alerted"}, "valueReference": {"reference": people[0]}}]}
    if not note:
        del task["description"]
    _event(task, "requested", now, me)
    tid = (await repo.as_platform().create("Task", task)).stored.id
    return Sent(tid, appointment, people[0])


async def _task(repo: Repository, task_id: str) -> dict:
    task = await repo.as_platform().lock("Task", task_id)
    if task is None or task.get("code") != KIND:
        raise NotFound(f"No tele-stroke request {task_id}")
    return task


async def _party(repo: Repository, task: dict) -> str:
    ctx = await repo.care()
    mine = set(ctx.identities) | {repo.caller.fhir_user}
    if (task.get("owner") or {}).get("reference") in mine:
        return "specialist"
    if (task.get("requester") or {}).get("reference") in mine:
        return "requester"
    raise NotFound("No tele-stroke request here")


async def acknowledge(repo: Repository, task_id: str, now: datetime) -> dict:
    task = await _task(repo, task_id)
    if await _party(repo, task) != "specialist":
        raise Forbidden("Only the specialist alerted acknowledges")
    if task["status"] != "requested":
        raise Conflict(f"This request is already {task['status']}")
    task["status"] = "accepted"
    task["lastModified"] = now.isoformat()
    _event(task, "acknowledged", now, repo.caller.fhir_user)
    await repo.as_platform().update("Task", task_id, task)
    return task


async def record(repo: Repository, task_id: str, event: str, now: datetime, text: str | None = None) -> dict:
    """``video-start`` (either side) or ``decision`` (the specialist, with its text; closes the request)."""
    if event not in ("video-start", "decision"):
        raise Unprocessable(f"Unknown event {event!r}")
    task = await _task(repo, task_id)
    party = await _party(repo, task)
    if task["status"] in ("completed", "cancelled"):
        raise Conflict("This request is closed")
    if event == "decision":
        if party != "specialist" or task["status"] == "requested":
            raise Conflict("The decision comes from the specialist, after acknowledging")
        if not (text or "").strip():
            raise Unprocessable("Give the decision")
        task["status"] = "completed"
        task.setdefault("output", []).append({"type": {"text": "decision"}, "valueString": text})
        note = await _decision_note(repo, task, text or "", now)
        task["output"].append({"type": {"text": "note"}, "valueReference": {"reference": f"DocumentReference/{note}"}})
    _event(task, event, now, repo.caller.fhir_user, text)
    task["lastModified"] = now.isoformat()
    await repo.as_platform().update("Task", task_id, task)
    return task


async def _decision_note(repo: Repository, task: dict, text: str, now: datetime) -> str:
    """The decision as a consult note (LOINC 11488-4) in the patient's shared record, written through
    the specialist's own Repository (a participant of the video Appointment: policy and audit apply)."""
    lines = [f"Téléavis AVC — décision : {text}"]
    if task.get("description"):
        lines.append(f"Contexte transmis : {task['description']}")
    lines += [f"{e['time']} {e['event']}" for e in timeline(task)]
    body = {"resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}]},
            "description": "Téléavis AVC", "date": now.isoformat(), "subject": task["for"],
            "author": [{"reference": repo.caller.fhir_user}],
            "context": {"related": [{"reference": ((task.get("focus") or {}).get("reference") or "")}]},
            "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "title": "Téléavis AVC",
                                        "data": base64.b64encode("\n".join(lines).encode()).decode()}}]}
    return (await repo.create("DocumentReference", body)).stored.id


async def escalate_due(platform_repo: Repository, now: datetime) -> list[str]:
    """The due-job: requests past their acknowledgment deadline go to the next on call. Returns their ids."""
    return [tid for tid in await due_requests(platform_repo, now) if await escalate_one(platform_repo, tid, now)]


async def due_requests(platform_repo: Repository, now: datetime, limit: int = 500) -> list[str]:
    """Unacknowledged requests whose deadline has passed (as read now, without locks)."""
    req = platform_repo.parse_search("Task", [("code:text", KIND["text"]), ("status", "requested"), ("_count", str(limit))])
    return [s.id for s in (await platform_repo.search(req)).matches
            if datetime.fromisoformat(s.resource()["restriction"]["period"]["end"]) <= now]


async def escalate_one(platform_repo: Repository, task_id: str, now: datetime) -> bool:
    """Escalate one request if it is still due. The Task row is locked first: a concurrent runner
    waits, then sees the new deadline (or the acknowledgment) and leaves it alone."""
    task = await platform_repo.lock("Task", task_id)
    if task is None or task.get("code") != KIND or task.get("status") != "requested":
        return False
    if datetime.fromisoformat(task["restriction"]["period"]["end"]) > now:
        return False
    inputs = {(i.get("type") or {}).get("text"): i for i in task.get("input") or []}
    roster = (await platform_repo.read(*inputs["roster"]["valueReference"]["reference"].split("/", 1))).resource()
    people = list(on_call(roster, now)) or list(on_call(roster, datetime.fromisoformat(task["authoredOn"])))
    tried = set(alerted(task))
    nxt = next((p for p in people if p not in tried), None)
    if nxt is None:
        nxt = people[0] if people else task["owner"]["reference"]  # everyone was tried: start the round again
    task["owner"] = {"reference": nxt}
    task["input"].append({"type": {"text": "alerted"}, "valueReference": {"reference": nxt}})
    task["restriction"]["period"]["end"] = (now + timedelta(minutes=int(inputs["ack-minutes"]["valueInteger"]))).isoformat()
    task["lastModified"] = now.isoformat()
    _event(task, "escalated", now, nxt)
    await platform_repo.update("Task", task_id, task)
    appt_ref = (task.get("focus") or {}).get("reference", "")
    if appt_ref.startswith("Appointment/"):
        stored_appt = await platform_repo.read("Appointment", appt_ref.split("/", 1)[1])
        appt = stored_appt.resource()
        if all((p.get("actor") or {}).get("reference") != nxt for p in appt["participant"]):
            appt["participant"].append({"actor": {"reference": nxt}, "status": "accepted"})
            await platform_repo.update("Appointment", stored_appt.id, appt)
    return True


def alerted(task: dict) -> list[str]:
    """Everyone alerted so far, in order (the last one owns the request)."""
    return [i["valueReference"]["reference"] for i in task.get("input") or [] if (i.get("type") or {}).get("text") == "alerted"]


async def access_request(repo: Repository, task_id: str) -> tuple[dict, str]:
    """One request and the caller's side (``specialist`` | ``requester``): the one door of the pages
    and the live socket (R4 leaves Task out of the patient compartment, as in ``expertise``)."""
    try:
        task = (await repo.as_platform().read("Task", task_id)).resource()
    except NotFound:
        raise NotFound(f"No tele-stroke request {task_id}") from None
    if task.get("code") != KIND:
        raise NotFound(f"No tele-stroke request {task_id}")
    return task, await _party(repo, task)


async def my_requests(repo: Repository, limit: int = 100) -> list[dict]:
    """Requests the caller sent or is alerted for, newest first."""
    ctx = await repo.care()
    mine = sorted(set(ctx.identities) | {repo.caller.fhir_user or ""} - {""})
    platform = repo.as_platform()
    found: dict[str, dict] = {}
    for param in ("owner", "requester"):
        for ref in mine:
            req = platform.parse_search("Task", [("code:text", KIND["text"]), (param, ref), ("_sort", "-_lastUpdated"), ("_count", str(limit))])
            for s in (await platform.search(req)).matches:
                found[s.id] = {"id": s.id, **s.resource()}
    return sorted(found.values(), key=lambda t: t.get("authoredOn") or "", reverse=True)


async def rosters(repo: Repository, limit: int = 200) -> list[tuple[str, dict]]:
    req = repo.parse_search("Schedule", [("active", "true"), ("_count", str(limit))])
    return [(s.id, s.resource()) for s in (await repo.search(req)).matches
            if any(e.get("url") == SHIFT_EXT for e in s.resource().get("extension") or [])]
