"""Booking at the HTTP edge: the JSON API under ``/api/booking``, the FHIR operations
``$find`` and ``$book``, and the private iCalendar feeds. Thin adapters over
``services.booking``: one transaction per request, errors rendered once (JSON, or an
OperationOutcome under ``/fhir``). A slot taken by someone else is a 409 that lists
the next free slots.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from parcours.core.errors import BadRequest, Issue, NotFound, ParcoursError, SlotTaken, Unauthorized
from parcours.services.booking import feed, model, service, waitlist
from parcours.services.booking.directory_slots import NextSlots
from parcours.services.booking.model import Availability, Leave, Policy
from parcours.services.booking.notify import Notifier
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.services.platform import Platform
from parcours.store.repository import Stored
from parcours.web.auth import caller_of
from parcours.web.fhir_render import FHIR_JSON, fhir_response, outcome

# -- shared helpers ---------------------------------------------------------------------------------


def platform_of(request: Request) -> Platform:
    return request.app.state.platform


async def body_of(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    return body


def instant(value: str | None, default: datetime | None = None) -> datetime | None:
    if value in (None, ""):
        return default
    return model.parse_instant(value)


def slot_json(s: Stored | dict, sid: str | None = None) -> dict:
    r = s.resource() if isinstance(s, Stored) else s
    v = model.slot_visit(r)
    return {"id": sid or (s.id if isinstance(s, Stored) else r.get("id")), "start": r["start"], "end": r["end"],
            "status": r.get("status"), "schedule": model.slot_schedule(r), "offer": v.offer, "minutes": v.minutes,
            "mode": v.mode, "patients": v.patients}


def appointment_json(s: Stored | dict) -> dict:
    r = s.resource() if isinstance(s, Stored) else s
    return {"id": r.get("id"), "status": r.get("status"), "start": r.get("start"), "end": r.get("end"),
            "slots": model.appointment_slots(r), "patients": model.participants(r, "Patient"),
            "practitionerRoles": model.participants(r, "PractitionerRole"), "resource": r}


def taken_body(err: SlotTaken) -> dict:
    alts = getattr(err, "alternatives", []) or []
    return {"error": err.code, "message": "This slot was just taken by someone else. Here are the next free ones.",
            "detail": err.message, "alternatives": [slot_json(a) for a in alts]}


# -- JSON API -----------------------------------------------------------------------------------------

async def find_slots(request: Request) -> JSONResponse:
    caller = caller_of(request)
    qp = request.query_params
    now = platform_of(request).clock.now()
    q = service.SlotQuery(start=max(now, instant(qp.get("from"), now) or now), end=instant(qp.get("to")),
                          roles=[r for r in qp.getlist("role") if r], practitioner=qp.get("practitioner") or None,
                          location=qp.get("location") or None, offer=qp.get("offer") or None, mode=qp.get("mode") or None,
                          limit=int(qp.get("limit") or 20))
    async with platform_of(request).transaction(caller) as repo:
        slots = await service.find(repo, q)
    return JSONResponse({"results": [slot_json(s) for s in slots]})


async def book(request: Request) -> JSONResponse:
    caller = caller_of(request)
    body = await body_of(request)
    if not body.get("slot"):
        raise BadRequest("Say which slot to book: {\"slot\": \"<id>\"}")
    try:
        stored = await service.book_or_alternatives(platform_of(request), caller, str(body["slot"]),
                                                    patient=body.get("patient"), comment=body.get("comment"))
    except SlotTaken as err:
        return JSONResponse(taken_body(err), 409)
    return JSONResponse({"appointment": appointment_json(stored)}, 201)


async def my_appointments(request: Request) -> JSONResponse:
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        patients = sorted((await repo.care()).patients) if caller.kind in ("patient", "proxy") else \
            [p if p.startswith("Patient/") else f"Patient/{p}" for p in request.query_params.getlist("patient")]
        items = await service.appointments_of_patients(repo, patients)
    return JSONResponse({"results": [appointment_json(s) for s in items]})


async def cancel(request: Request) -> JSONResponse:
    caller = caller_of(request)
    body = await body_of(request)
    async with platform_of(request).transaction(caller) as repo:
        result = await service.cancel(repo, request.path_params["id"], reason=body.get("reason"))
    return JSONResponse({"appointment": appointment_json(result.stored)})


async def reschedule(request: Request) -> JSONResponse:
    caller = caller_of(request)
    body = await body_of(request)
    if not body.get("slot"):
        raise BadRequest("Say which slot to move to: {\"slot\": \"<id>\"}")
    p = platform_of(request)
    try:
        async with p.transaction(caller) as repo:
            result = await service.reschedule(repo, request.path_params["id"], str(body["slot"]))
    except SlotTaken as err:
        async with p.transaction(caller) as repo:
            err.alternatives = [s.resource() for s in await service.alternatives(repo, str(body["slot"]))]  # type: ignore[attr-defined]
        return JSONResponse(taken_body(err), 409)
    return JSONResponse({"appointment": appointment_json(result.stored)})


async def noshow(request: Request) -> JSONResponse:
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        result = await service.mark_noshow(repo, request.path_params["id"])
    return JSONResponse({"appointment": appointment_json(result.stored)})


def availability_of(body: dict) -> Availability:
    rules = []
    for r in body.get("rules") or []:
        if isinstance(r, str):
            rules.append(model.parse_rule(r))
        elif isinstance(r, dict):
            rules.append(model.parse_rule(f"{r.get('days', '')} {r.get('opens', '')}-{r.get('closes', '')} "
                                          f"{r.get('offer', 'consultation')} {r.get('minutes', 20)} {r.get('mode', '')} "
                                          f"{r.get('patients', '')}".replace("  ", " ").strip()))
        else:
            raise BadRequest("Each rule is a text such as 'mon-fri 08:30-12:00 consultation 20'")
    leaves = []
    for lv in body.get("leaves") or []:
        start, end = instant(lv.get("start")), instant(lv.get("end"))
        if start is None or end is None:
            raise BadRequest("A leave needs a start and an end")
        leaves.append(Leave(start, end, str(lv.get("reason") or "")))
    p = body.get("policy") or {}
    policy = Policy(int(p.get("cancelHours", 24)), int(p.get("horizonDays", 28)), int(p.get("noticeMinutes", 60)))
    return Availability(rules, leaves, policy)


async def define_schedule(request: Request) -> JSONResponse:
    caller = caller_of(request)
    body = await body_of(request)
    av = availability_of(body)
    async with platform_of(request).transaction(caller) as repo:
        sid, report = await service.define(repo, request.path_params["role"], body.get("location"), av)
    return JSONResponse({"schedule": sid, "slots": report.as_json()})


async def sync_schedule(request: Request) -> JSONResponse:
    from parcours.services.booking import generation

    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        sched = (await repo.read("Schedule", request.path_params["id"])).resource()
        await service.access_agenda(repo, model.actor_id(sched, "PractitionerRole") or "")
        report = await generation.sync(repo, request.path_params["id"])
    return JSONResponse({"schedule": request.path_params["id"], "slots": report.as_json()})


async def agenda(request: Request) -> JSONResponse:
    caller = caller_of(request)
    qp = request.query_params
    p = platform_of(request)
    start = instant(qp.get("start"), p.clock.now()) or p.clock.now()
    days = max(1, min(int(qp.get("days") or 7), 31))
    async with p.transaction(caller) as repo:
        slots, appts, patients = await service.agenda(repo, qp.get("role") or "", start, start + timedelta(days=days))
    return JSONResponse({"slots": [slot_json(s) for s in slots], "appointments": [appointment_json(a) for a in appts],
                         "patients": {ref: _name(r) for ref, r in patients.items()}})


def _name(patient: dict) -> str:
    from parcours.services.directory import model as directory

    return directory.display_name(patient)


def _block(blocked: bool):  # type: ignore[no-untyped-def]
    async def handler(request: Request) -> JSONResponse:
        caller = caller_of(request)
        async with platform_of(request).transaction(caller) as repo:
            result = await service.set_blocked(repo, request.path_params["id"], blocked)
        return JSONResponse({"slot": slot_json(result.stored.resource(), result.stored.id)})

    return handler


async def join_waitlist(request: Request) -> JSONResponse:
    caller = caller_of(request)
    body = await body_of(request)
    before = instant(body.get("before"))
    if before is None or not body.get("role"):
        raise BadRequest("Say which practitioner role and before when: {\"role\": ..., \"before\": ...}")
    async with platform_of(request).transaction(caller) as repo:
        patient = await service.access_patient(repo, body.get("patient"))
        result = await waitlist.join(repo, patient=patient, role_id=str(body["role"]), before=before, offer=body.get("offer"))
    return JSONResponse({"waitlist": appointment_json(result.stored)}, 201)


async def accept_offer(request: Request) -> JSONResponse:
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        result = await waitlist.accept(repo, request.path_params["id"])
    return JSONResponse({"appointment": appointment_json(result.stored)})


async def leave_waitlist(request: Request) -> JSONResponse:
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        await waitlist.leave(repo, request.path_params["id"])
    return JSONResponse({"left": True})


async def new_feed(request: Request) -> JSONResponse:
    caller = caller_of(request)
    if not caller.user_id or caller.kind in ("system", "platform"):
        raise BadRequest("Feeds are for user accounts")
    from parcours.store import accounts as account_store

    p = platform_of(request)
    async with p.pool.connection() as conn, conn.transaction():
        account = await account_store.get(conn, caller.user_id)
        if account is None:
            raise NotFound("No such account")
        token = await feed.new_token(p, conn, account)
    return JSONResponse({"url": feed.feed_url(p, token)}, 201)


async def feed_calendar(request: Request) -> Response:
    token = request.path_params["token"]
    body = await feed.calendar(platform_of(request), token)
    if body is None:
        return Response("Unknown calendar", 404, media_type="text/plain")
    return Response(body, 200, media_type="text/calendar; charset=utf-8", headers={"Cache-Control": "private, max-age=300"})


# -- FHIR operations ------------------------------------------------------------------------------------

def _ref_id(value: str | None, rtype: str) -> str | None:
    if not value:
        return None
    return value.split("/", 1)[1] if value.startswith(rtype + "/") else value


def _find_query(request: Request) -> service.SlotQuery:
    qp = request.query_params
    now = platform_of(request).clock.now()
    roles = [x for v in qp.getlist("practitioner-role") + [a for a in qp.getlist("actor") if a.startswith("PractitionerRole/")]
             for x in [_ref_id(v, "PractitionerRole")] if x]
    practitioner = _ref_id(qp.get("practitioner") or next((a for a in qp.getlist("actor") if a.startswith("Practitioner/")), None),
                           "Practitioner")
    offer = qp.get("service-type")
    if offer and "|" in offer:
        offer = offer.split("|", 1)[1]
    if offer and nomenclatures().care_offers.get(offer) is None:
        raise BadRequest(f"Unknown service-type {offer!r}: use a care-offer code (consultation, teleconsultation...)")
    start = instant(qp.get("start"), now) or now
    try:
        count = int(qp.get("_count") or 20)
    except ValueError:
        raise BadRequest("_count must be a whole number") from None
    return service.SlotQuery(start=max(start, now), end=instant(qp.get("end")), roles=roles, practitioner=practitioner,
                             location=_ref_id(qp.get("location"), "Location"), offer=offer, limit=max(1, min(count, 200)))


def _bundle(base: str, request: Request, entries: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": str(request.url)}], "entry": entries}


async def fhir_slot_find(request: Request) -> Response:
    """``GET /fhir/Slot/$find``: free slots (start, end, practitioner, practitioner-role, location, service-type)."""
    p = platform_of(request)
    q = _find_query(request)
    async with p.transaction(caller_of(request)) as repo:
        slots = await service.find(repo, q)
    base = p.settings.fhir_base
    return fhir_response(_bundle(base, request, [
        {"fullUrl": f"{base}/Slot/{s.id}", "resource": orjson.Fragment(s.content or b"{}"), "search": {"mode": "match"}}
        for s in slots]))


async def fhir_appointment_find(request: Request) -> Response:
    """``GET /fhir/Appointment/$find``: the appointments one could book, as ``proposed``
    Appointments each naming its free Slot (the slots are included)."""
    p = platform_of(request)
    q = _find_query(request)
    base = p.settings.fhir_base
    entries: list[dict] = []
    async with p.transaction(caller_of(request)) as repo:
        slots = await service.find(repo, q)
        scheds: dict[str, dict] = {}
        for s in slots:
            r = s.resource()
            sid = model.slot_schedule(r) or ""
            if sid not in scheds:
                scheds[sid] = (await repo.read("Schedule", sid)).resource() if sid else {}
            actors = [a for a in scheds[sid].get("actor") or [] if a.get("reference")]
            proposed = {"resourceType": "Appointment", "status": "proposed", "serviceType": r.get("serviceType"),
                        "start": r["start"], "end": r["end"], "minutesDuration": model.slot_visit(r).minutes,
                        "slot": [{"reference": f"Slot/{s.id}"}],
                        "participant": [{"actor": {"reference": a["reference"]}, "required": "required", "status": "needs-action"}
                                        for a in actors]}
            entries.append({"resource": proposed, "search": {"mode": "match"}})
            entries.append({"fullUrl": f"{base}/Slot/{s.id}", "resource": r, "search": {"mode": "include"}})
    return fhir_response(_bundle(base, request, entries))


async def fhir_appointment_book(request: Request) -> Response:
    """``POST /fhir/Appointment/$book``: the body is an Appointment (or a Parameters with
    ``appointment``) naming a free Slot; it is stored as ``booked`` (201), or refused
    with 409 and an OperationOutcome listing the next free slots."""
    p = platform_of(request)
    caller = caller_of(request)
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw.strip() else None
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON") from None
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        body = next((x.get("resource") for x in body.get("parameter") or [] if isinstance(x, dict)
                     and x.get("name") in ("appointment", "appointments")), None)
    if not isinstance(body, dict) or body.get("resourceType") != "Appointment":
        raise BadRequest("$book needs an Appointment, or a Parameters with an 'appointment' resource")
    slots = model.appointment_slots(body)
    if not slots:
        raise BadRequest("The Appointment must name the Slot to book (Appointment.slot)")
    body = {**body, "status": "booked"}
    if "start" not in body or "end" not in body:
        async with p.transaction(caller) as repo:
            first = (await repo.read("Slot", slots[0])).resource()
        body.setdefault("start", first["start"])
        body.setdefault("end", first["end"])
    try:
        async with p.transaction(caller) as repo:
            result = await repo.create("Appointment", body)
    except SlotTaken as err:
        async with p.transaction(caller) as repo:
            alts = await service.alternatives(repo, slots[0])
        issues = [*err.issues, *[Issue("informational", f"Free: Slot/{a.id} at {a.resource()['start']}", severity="information",
                                       expression=(f"Slot/{a.id}",)) for a in alts]]
        return fhir_response(outcome(issues), 409)
    s = result.stored
    base = p.settings.fhir_base
    headers = {"ETag": s.etag, "Location": f"{base}/Appointment/{s.id}/_history/{s.version_id}"}
    return Response(s.content or b"", 201, headers=headers, media_type=FHIR_JSON)


def fhir_routes() -> list[Route]:
    return [
        Route("/fhir/Slot/$find", fhir_slot_find, methods=["GET"]),
        Route("/fhir/Appointment/$find", fhir_appointment_find, methods=["GET"]),
        Route("/fhir/Appointment/$book", fhir_appointment_book, methods=["POST"]),
    ]


routes = [
    Route("/slots", find_slots, methods=["GET"]),
    Route("/book", book, methods=["POST"]),
    Route("/appointments", my_appointments, methods=["GET"]),
    Route("/appointments/{id}/cancel", cancel, methods=["POST"]),
    Route("/appointments/{id}/reschedule", reschedule, methods=["POST"]),
    Route("/appointments/{id}/noshow", noshow, methods=["POST"]),
    Route("/schedules/{role}", define_schedule, methods=["PUT"]),
    Route("/schedules/{id}/sync", sync_schedule, methods=["POST"]),
    Route("/agenda", agenda, methods=["GET"]),
    Route("/slots/{id}/block", _block(True), methods=["POST"]),
    Route("/slots/{id}/unblock", _block(False), methods=["POST"]),
    Route("/waitlist", join_waitlist, methods=["POST"]),
    Route("/waitlist/{id}/accept", accept_offer, methods=["POST"]),
    Route("/waitlist/{id}", leave_waitlist, methods=["DELETE"]),
    Route("/feed", new_feed, methods=["POST"]),
]


def install(app: FastAPI) -> None:
    """Mount the API, the FHIR operations (before the generic /fhir routes) and the feeds;
    install the directory's next-slots hook and the notification channels."""
    app.router.routes[0:0] = fhir_routes()
    app.router.routes.append(Mount("/api/booking", routes=routes))
    app.router.routes.append(Route("/booking/feed/{token}.ics", feed_calendar, methods=["GET"]))
    app.state.directory_slots = NextSlots()


def notifier_of(app: Any, platform: Platform) -> Notifier:
    """The app's notification channels (tests may set ``app.state.booking_notifier`` first)."""
    existing = getattr(app.state, "booking_notifier", None)
    if existing is None:
        existing = Notifier.from_settings(platform.settings)
        app.state.booking_notifier = existing
    return existing


__all__ = ["install", "notifier_of", "routes", "fhir_routes", "Unauthorized", "ParcoursError"]
