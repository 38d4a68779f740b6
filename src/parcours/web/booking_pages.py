"""Booking pages: search with a map, a practitioner's profile and free slots, the booking
flow, "my appointments" for patients and proxies, and the agenda of practitioners and staff.

Thin adapters like ``web.pages``: every form passes ``require_csrf`` first; the rules live
in ``services.booking``; errors become pages. Server-rendered lists work without
JavaScript and without map tiles; ``static/booking.js`` only draws the Leaflet map.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.core.errors import BadRequest, Forbidden, NotFound, ParcoursError, SlotTaken
from parcours.services.booking import feed, model, service, waitlist
from parcours.services.booking.directory_slots import NextSlots
from parcours.services.directory import model as directory
from parcours.services.directory import search as directory_search
from parcours.services.directory.geo import communes
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.store.sessions import FULL
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import page, platform_of, redirect, render, require_full, require_space, transaction
from parcours.web.session import active_session, require_csrf

# The specialties offered in the search form (the directory knows them all; these are asked most).
COMMON_SPECIALTIES = ("SM54", "SM04", "SM15", "SM38", "SM40", "SM19", "SM42", "SM39")
COMMON_PROFESSIONS = ("10", "60", "70", "40", "50", "21", "91")
NOTICES = frozenset({"booked", "cancelled", "moved", "waitlisted", "left_waitlist", "rules_saved", "blocked", "unblocked",
                     "noshow", "feed_created"})


def _lang(request: Request) -> str:
    from parcours.web.pages import language

    return language(request)


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done")
    return f"booking.{done}" if done in NOTICES else None


def fmt_day(d: date | datetime | str, lang: str) -> str:
    if isinstance(d, str):
        d = model.parse_instant(d) if "T" in d else date.fromisoformat(d)
    if isinstance(d, datetime):
        d = d.astimezone(model.PARIS).date()
    if lang == "en":
        return d.strftime("%A %d %B").replace(" 0", " ")
    days = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
    months = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre")
    return f"{days[d.weekday()]} {d.day} {months[d.month - 1]}"


def fmt_time(value: str | datetime) -> str:
    dt = model.parse_instant(value) if isinstance(value, str) else value
    return dt.astimezone(model.PARIS).strftime("%H:%M")


def fmt_when(value: str | datetime, lang: str) -> str:
    dt = model.parse_instant(value) if isinstance(value, str) else value
    return f"{fmt_day(dt, lang)} {dt.astimezone(model.PARIS).year}, {fmt_time(dt)}"


def helpers(lang: str) -> dict[str, Any]:
    nom = nomenclatures()

    def offer_label(code: str) -> str:
        c = nom.care_offers.get(code)
        return c.label(lang) if c else code

    return {"fmt_day": lambda d: fmt_day(d, lang), "fmt_time": fmt_time, "fmt_when": lambda v: fmt_when(v, lang),
            "offer_label": offer_label, "visit_of": model.slot_visit}


def _page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    lang = _lang(request)
    context.setdefault("notice", None)
    return render(request, template, status, **helpers(lang), **context)


# -- search --------------------------------------------------------------------------------------

@page
async def search_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    qp = request.query_params
    lang = _lang(request)
    nom = nomenclatures()
    form = {"place": qp.get("place", ""), "specialty": qp.get("specialty", ""), "profession": qp.get("profession", ""),
            "offer": qp.get("offer", ""), "radius": qp.get("radius", "10"), "new_patients": qp.get("new_patients") == "on"}
    result, place, error = None, None, None
    if form["place"]:
        try:
            place = communes().resolve_place(form["place"])
            radius = float(form["radius"] or 10)
            q = directory_search.DirectoryQuery(
                lat=place.lat, lon=place.lon, radius_km=radius, profession=form["profession"] or None,
                specialty=form["specialty"] or None, offers=(form["offer"],) if form["offer"] else (),
                accepts_new_patients=form["new_patients"], limit=20, lang=lang)
            async with platform_of(request).transaction(caller) as repo:
                result = await directory_search.search(repo, q, slots=NextSlots())
        except (ParcoursError, ValueError) as e:
            error = e.message if isinstance(e, ParcoursError) else str(e)
    points = []
    if result is not None:
        for i, h in enumerate(result.hits, 1):
            pos = directory.position(h.location)
            if pos:
                points.append({"n": i, "lat": pos[0], "lon": pos[1], "name": directory.display_name(h.practitioner or {}),
                               "href": f"/booking/practitioners/{h.role.id}"})
    center = {"lat": place.lat, "lon": place.lon} if place else {"lat": 49.894, "lon": 2.295}
    response = _page(request, "booking_search.html", form=form, result=result, error=error, place=place,
                 hits=[h.as_json(lang) for h in result.hits] if result else [],
                 specialties=[nom.specialties.get(c) for c in COMMON_SPECIALTIES if nom.specialties.get(c)],
                 professions=[nom.professions.get(c) for c in COMMON_PROFESSIONS if nom.professions.get(c)],
                 offers=nom.care_offers.active(), map_data=json.dumps({"center": center, "points": points,
                                                                        "tiles": platform_of(request).settings.map_tiles_url}),
                 current="appointments" if _space(request) == navigation.PORTAL else "agenda")
    tiles = platform_of(request).settings.map_tiles_url
    if tiles:
        # The map's tiles come from the configured tile server: this page alone may load its images.
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(tiles))
        csp = response.headers["Content-Security-Policy"].replace("img-src 'self' data:", f"img-src 'self' data: {origin}")
        response.headers["Content-Security-Policy"] = csp
    return response


def _space(request: Request) -> str | None:
    active = active_session(request)
    if active is None or active.session.stage != FULL:
        return None
    from parcours.security import roles

    return roles.role(active.account.role).space


# -- practitioner profile and slots ----------------------------------------------------------------

async def _role_view(repo, role_id: str) -> dict:  # type: ignore[no-untyped-def]
    res = await repo.search(repo.parse_search("PractitionerRole", [
        ("_id", role_id), ("_include", "PractitionerRole:practitioner"), ("_include", "PractitionerRole:location"),
        ("_include", "PractitionerRole:organization")]))
    if not res.matches:
        raise NotFound(f"PractitionerRole/{role_id} is not known")
    role = res.matches[0].resource()
    inc = {(s.resource_type, s.id): s.resource() for s in res.includes}
    prac = inc.get(("Practitioner", directory.reference_id(role.get("practitioner"), "Practitioner") or ""), {})
    locs = [inc[("Location", lid)] for lid in (directory.reference_id(r, "Location") for r in role.get("location") or [])
            if ("Location", lid or "") in inc]
    org = inc.get(("Organization", directory.reference_id(role.get("organization"), "Organization") or ""), {})
    return {"id": role_id, "role": role, "practitioner": prac, "name": directory.display_name(prac), "locations": locs,
            "organization": org}


def _labels(role: dict, lang: str) -> list[str]:
    nom = nomenclatures()
    out = [c.label(lang) for c in (nom.specialties.get(x) for x in directory.role_specialties(role)) if c]
    if not out:
        out = [c.label(lang) for c in (nom.professions.get(x) for x in directory.role_professions(role)) if c]
    return out


def _by_day(slots: list, lang: str) -> list[tuple[str, list[dict]]]:
    days: dict[str, list[dict]] = {}
    for s in slots:
        r = s.resource()
        start = model.slot_start(r)
        key = start.astimezone(model.PARIS).date().isoformat()
        days.setdefault(key, []).append({"id": s.id, "start": r["start"], "visit": model.slot_visit(r)})
    return [(fmt_day(date.fromisoformat(k), lang), v) for k, v in sorted(days.items())]


@page
async def profile_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    role_id = request.path_params["role"]
    lang = _lang(request)
    now = platform_of(request).clock.now()
    start = max(now, model.parse_instant(request.query_params["from"])) if request.query_params.get("from") else now
    move = request.query_params.get("move") or ""
    async with platform_of(request).transaction(caller) as repo:
        view = await _role_view(repo, role_id)
        slots = await service.find(repo, service.SlotQuery(start=start, end=start + timedelta(days=7), roles=[role_id], limit=300))
    later = (start + timedelta(days=7)).astimezone(model.PARIS).date().isoformat()
    return _page(request, "booking_profile.html", view=view, labels=_labels(view["role"], lang), days=_by_day(slots, lang),
                 later=later, earlier=start > now + timedelta(hours=1), move=move, address=directory.address_text,
                 accepts=directory.accepts_new_patients(view["role"]), spoken=directory.languages(view["practitioner"]),
                 can_waitlist=caller.kind in ("patient", "proxy") and not move,
                 default_before=(now + timedelta(days=14)).astimezone(model.PARIS).date().isoformat(),
                 current="appointments" if _space(request) == navigation.PORTAL else "agenda")


# -- booking flow --------------------------------------------------------------------------------------

async def _patient_choices(repo, caller) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    if caller.kind not in ("patient", "proxy"):
        return []
    out = []
    for ref in sorted((await repo.care()).patients):
        try:
            out.append((ref, directory.display_name((await repo.read("Patient", ref.split("/", 1)[1])).resource())))
        except ParcoursError:
            out.append((ref, ref))
    return out


async def _patient_search(repo, text: str) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    if not text.strip():
        return []
    res = await repo.search(repo.parse_search("Patient", [("name", text.strip()), ("_count", "10")]))
    return [(f"Patient/{s.id}", f"{directory.display_name(s.resource())} ({s.resource().get('birthDate', '')})") for s in res.matches]


@page
async def confirm_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    sid = request.path_params["slot"]
    lang = _lang(request)
    async with platform_of(request).transaction(caller) as repo:
        ctx = await service.slot_context(repo, sid)
        choices = await _patient_choices(repo, caller)
        found = await _patient_search(repo, request.query_params.get("who", "")) if caller.kind not in ("patient", "proxy") else []
    return _page(request, "booking_confirm.html", ctx=ctx, choices=choices, found=found, who=request.query_params.get("who", ""),
                 name=directory.display_name(ctx.practitioner), labels=_labels_of_ctx(ctx, lang), address=directory.address_text,
                 move=request.query_params.get("move", ""), on_behalf=caller.kind not in ("patient", "proxy"),
                 current="appointments" if _space(request) == navigation.PORTAL else "agenda")


def _labels_of_ctx(ctx: service.SlotContext, lang: str) -> list[str]:
    sched = ctx.schedule
    nom = nomenclatures()
    out = []
    for concept in sched.get("specialty") or []:
        for c in concept.get("coding") or []:
            sp = nom.specialties.get(c.get("code") or "")
            if sp:
                out.append(sp.label(lang))
    return out


async def _taken_page(request: Request, sid: str, err: SlotTaken) -> Response:
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        alts = await service.alternatives(repo, sid)
    return _page(request, "booking_taken.html", 409, alternatives=[{"id": a.id, "start": a.resource()["start"],
                                                                    "visit": model.slot_visit(a.resource())} for a in alts],
                 move=request.query_params.get("move", ""))


@page
async def book_submit(request: Request) -> Response:
    form = await require_csrf(request)
    active = require_full(request)
    caller = caller_of(request)
    sid = request.path_params["slot"]
    move = str(form.get("move") or "")
    p = platform_of(request)
    patient = str(form.get("patient") or "") or None
    try:
        if move:
            async with p.transaction(caller) as repo:
                await service.reschedule(repo, move, sid)
            done = "moved"
        else:
            await service.book_or_alternatives(p, caller, sid, patient=patient)
            done = "booked"
    except SlotTaken as err:
        return await _taken_page(request, sid, err)
    from parcours.security import roles

    if roles.role(active.account.role).space == navigation.PORTAL:
        return redirect(f"/portal/appointments?done={done}")
    async with p.transaction(caller) as repo:
        slot = (await repo.read("Slot", sid)).resource()
        sched = (await repo.read("Schedule", model.slot_schedule(slot) or "")).resource()
    day = model.slot_start(slot).astimezone(model.PARIS).date().isoformat()
    return redirect(f"/workspace/agenda?{urlencode({'role': model.actor_id(sched, 'PractitionerRole') or '', 'date': day, 'done': done})}")


# -- my appointments -------------------------------------------------------------------------------------

@page
async def my_appointments(request: Request) -> Response:
    active = require_space(request, navigation.PORTAL)
    caller = caller_of(request)
    p = platform_of(request)
    now = p.clock.now()
    upcoming, past, waiting = [], [], []
    async with p.transaction(caller) as repo:
        patients = sorted((await repo.care()).patients)
        names = {ref: name for ref, name in await _patient_choices(repo, caller)}
        for s in await service.appointments_of_patients(repo, patients):
            appt = s.resource()
            item = await _appointment_view(repo, appt, names)
            if appt.get("status") == "waitlist":
                waiting.append(item)
            elif (model.appointment_start(appt) or now) >= now and appt.get("status") == "booked":
                item.update(await _cancel_window(repo, appt, now))
                upcoming.append(item)
            else:
                past.append(item)
    async with transaction(request) as conn:
        from parcours.store import booking as booking_store

        has_feed = await booking_store.has_feed(conn, active.account.id)
    upcoming.sort(key=lambda x: x["start"] or "")
    past.sort(key=lambda x: x["start"] or "", reverse=True)
    return _page(request, "booking_mine.html", upcoming=upcoming, past=past[:20], waiting=waiting, has_feed=has_feed,
                 feed_url=request.query_params.get("feed") if request.query_params.get("done") == "feed_created" else None,
                 notice=_notice(request), current="appointments", several=len(names) > 1, now=model.iso(now))


async def _cancel_window(repo, appt: dict, now) -> dict:  # type: ignore[no-untyped-def]
    """Whether a patient may still cancel or move ``appt`` online: the booking rule refuses it
    later than the agenda's ``cancelHours`` before the start (``rules._check_deadline``), so the
    page shows the deadline instead of a button that would be refused."""
    start = model.appointment_start(appt)
    policy = model.Policy()
    slot_ref = next((r.get("reference") for r in appt.get("slot") or [] if (r.get("reference") or "").startswith("Slot/")), None)
    if slot_ref:
        try:
            slot = (await repo.read("Slot", slot_ref.split("/", 1)[1])).resource()
            sched_id = model.slot_schedule(slot)
            if sched_id:
                policy = model.read_availability((await repo.read("Schedule", sched_id)).resource()).policy
        except ParcoursError:
            pass
    if start is None:
        return {"can_cancel": True}
    until = start - timedelta(hours=policy.cancel_hours)
    return {"can_cancel": now < until, "cancel_hours": policy.cancel_hours, "cancel_until": model.iso(until)}


async def _appointment_view(repo, appt: dict, names: dict[str, str]) -> dict:  # type: ignore[no-untyped-def]
    who, where = "", ""
    for ref in model.participants(appt, "Practitioner"):
        try:
            who = directory.display_name((await repo.read("Practitioner", ref.split("/", 1)[1])).resource())
        except ParcoursError:
            pass
    for ref in model.participants(appt, "Location"):
        try:
            loc = (await repo.read("Location", ref.split("/", 1)[1])).resource()
            where = ", ".join(x for x in (loc.get("name"), directory.address_text(loc.get("address"))) if x)
        except ParcoursError:
            pass
    roles = model.participants(appt, "PractitionerRole")
    offer = model.waitlist_offer(appt)
    patient = (model.participants(appt, "Patient") or [""])[0]
    mode = next((c.get("code") for concept in appt.get("serviceType") or [] for c in concept.get("coding") or []
                 if c.get("system") == model.ACT_CODE_SYSTEM), "AMB")
    before = ((appt.get("requestedPeriod") or [{}])[0]).get("end")
    return {"id": appt["id"], "status": appt.get("status"), "start": appt.get("start"), "who": who, "where": where, "mode": mode,
            "role": roles[0].split("/", 1)[1] if roles else None, "patient": names.get(patient, ""),
            "offer": {"slot": offer[0].split("/", 1)[1], "until": model.iso(offer[1])} if offer else None, "before": before}


@page
async def cancel_submit(request: Request) -> Response:
    form = await require_csrf(request)
    active = require_full(request)
    caller = caller_of(request)
    async with platform_of(request).transaction(caller) as repo:
        result = await service.cancel(repo, request.path_params["id"], reason=str(form.get("reason") or "") or None)
    from parcours.security import roles

    if roles.role(active.account.role).space == navigation.PORTAL:
        return redirect("/portal/appointments?done=cancelled")
    appt = result.stored.resource()
    role = (model.participants(appt, "PractitionerRole") or ["/"])[0].split("/", 1)[1]
    day = (model.appointment_start(appt) or platform_of(request).clock.now()).astimezone(model.PARIS).date().isoformat()
    return redirect(f"/workspace/agenda?{urlencode({'role': role, 'date': day, 'done': 'cancelled'})}")


@page
async def waitlist_submit(request: Request) -> Response:
    form = await require_csrf(request)
    require_full(request)
    caller = caller_of(request)
    before = model.parse_instant(str(form.get("before") or ""))
    before = datetime.combine(before.astimezone(model.PARIS).date(), time(23, 59), model.PARIS)
    async with platform_of(request).transaction(caller) as repo:
        patient = await service.access_patient(repo, str(form.get("patient") or "") or None)
        await waitlist.join(repo, patient=patient, role_id=request.path_params["role"], before=before)
    return redirect("/portal/appointments?done=waitlisted")


@page
async def accept_submit(request: Request) -> Response:
    await require_csrf(request)
    require_full(request)
    caller = caller_of(request)
    try:
        async with platform_of(request).transaction(caller) as repo:
            await waitlist.accept(repo, request.path_params["id"])
    except SlotTaken as err:
        return await _taken_page(request, "", err)
    return redirect("/portal/appointments?done=booked")


@page
async def leave_waitlist_submit(request: Request) -> Response:
    await require_csrf(request)
    require_full(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        await waitlist.leave(repo, request.path_params["id"])
    return redirect("/portal/appointments?done=left_waitlist")


@page
async def feed_submit(request: Request) -> Response:
    await require_csrf(request)
    active = require_full(request)
    p = platform_of(request)
    async with transaction(request) as conn:
        token = await feed.new_token(p, conn, active.account)
    back = "/portal/appointments" if _space(request) == navigation.PORTAL else "/workspace/agenda"
    return redirect(f"{back}?{urlencode({'done': 'feed_created', 'feed': feed.feed_url(p, token)})}")


# -- the agenda ---------------------------------------------------------------------------------------------

def _agenda_days(request: Request, now: datetime) -> tuple[date, str, int]:
    qp = request.query_params
    try:
        day = date.fromisoformat(qp["date"]) if qp.get("date") else now.astimezone(model.PARIS).date()
    except ValueError:
        raise BadRequest("date must be YYYY-MM-DD") from None
    view = "week" if qp.get("view") == "week" else "day"
    if view == "week":
        day -= timedelta(days=day.weekday())
    return day, view, 7 if view == "week" else 1


@page
async def agenda_page(request: Request) -> Response:
    active = require_space(request, navigation.WORKSPACE)
    if active.account.role not in ("practitioner", "staff"):
        raise Forbidden("The agenda is for practitioners and their staff")
    caller = caller_of(request)
    p = platform_of(request)
    lang = _lang(request)
    now = p.clock.now()
    day, view, ndays = _agenda_days(request, now)
    start = datetime.combine(day, time(0), model.PARIS)
    async with p.transaction(caller) as repo:
        mine = await service.roles_of(repo)
        role_id = request.query_params.get("role") or (mine[0].id if mine else "")
        if not role_id:
            return _page(request, "booking_agenda.html", role=None, mine=[], current="agenda", view=view, rows=[], days=[],
                         rules_text="", leaves_text="", policy=model.Policy(), notice=_notice(request), day=day.isoformat(),
                         prev="", next="", title_day="", feed_url=None, view_name=view)
        view_role = await _role_view(repo, role_id)
        slots, appts, patients = await service.agenda(repo, role_id, start, start + timedelta(days=ndays))
        scheds = await service.schedules_of(repo, [role_id])
        av = model.read_availability(scheds[0].resource()) if scheds else model.Availability()
        mine_views = [(s.id, ", ".join(_labels(s.resource(), lang)) or s.id) for s in mine]
    by_slot: dict[str, dict] = {}
    loose: list[dict] = []
    for a in appts:
        r = a.resource()
        if r.get("status") in ("cancelled", "entered-in-error", "waitlist"):
            continue
        patient = (model.participants(r, "Patient") or [""])[0]
        item = {"id": a.id, "status": r.get("status"), "start": r.get("start"), "patient": directory.display_name(patients.get(patient, {})),
                "past": (model.appointment_start(r) or now) <= now}
        slots_of = model.appointment_slots(r)
        if slots_of:
            by_slot[slots_of[0]] = item
        else:
            loose.append(item)
    rows: dict[str, list[dict]] = {}
    for s in slots:
        r = s.resource()
        key = model.slot_start(r).astimezone(model.PARIS).date().isoformat()
        rows.setdefault(key, []).append({"id": s.id, "start": r["start"], "status": r.get("status"), "visit": model.slot_visit(r),
                                         "appointment": by_slot.get(s.id), "past": model.slot_start(r) <= now})
    days = [(fmt_day(day + timedelta(days=i), lang), rows.get((day + timedelta(days=i)).isoformat(), [])) for i in range(ndays)]
    step = timedelta(days=ndays)
    return _page(request, "booking_agenda.html", role=view_role, mine=mine_views, view=view, days=days, loose=loose,
                 rules_text="\n".join(r.text() for r in av.rules),
                 leaves_text="\n".join(f"{lv.start.astimezone(model.PARIS):%Y-%m-%d %H:%M} {lv.end.astimezone(model.PARIS):%Y-%m-%d %H:%M} {lv.reason}".strip()
                                       for lv in av.leaves),
                 policy=av.policy, notice=_notice(request), day=day.isoformat(), prev=(day - step).isoformat(),
                 next=(day + step).isoformat(), title_day=fmt_day(day, lang), current="agenda",
                 feed_url=request.query_params.get("feed") if request.query_params.get("done") == "feed_created" else None)


@page
async def rules_submit(request: Request) -> Response:
    form = await require_csrf(request)
    require_space(request, navigation.WORKSPACE)
    caller = caller_of(request)
    role_id = request.path_params["role"]
    rules = [model.parse_rule(line) for line in str(form.get("rules") or "").splitlines() if line.strip()]
    try:
        policy = model.Policy(int(form.get("cancel_hours") or 24), int(form.get("horizon_days") or 28),
                              int(form.get("notice_minutes") or 60))
    except ValueError:
        raise BadRequest("The deadlines are whole numbers") from None
    av = model.Availability(rules, model.parse_leaves(str(form.get("leaves") or "")), policy)
    async with platform_of(request).transaction(caller) as repo:
        await service.define(repo, role_id, None, av)
    return redirect(f"/workspace/agenda?{urlencode({'role': role_id, 'done': 'rules_saved'})}")


def _slot_action(action: str) -> Any:
    @page
    async def handler(request: Request) -> Response:
        form = await require_csrf(request)
        require_space(request, navigation.WORKSPACE)
        caller = caller_of(request)
        target = request.path_params["id"]
        async with platform_of(request).transaction(caller) as repo:
            if action == "noshow":
                await service.mark_noshow(repo, target)
            else:
                await service.set_blocked(repo, target, action == "blocked")
        back = {"role": str(form.get("role") or ""), "date": str(form.get("date") or ""), "view": str(form.get("view") or "day"),
                "done": action}
        return redirect(f"/workspace/agenda?{urlencode(back)}")

    return handler


def routes() -> list[Route]:
    return [
        Route("/booking/search", search_page, methods=["GET"]),
        Route("/booking/practitioners/{role}", profile_page, methods=["GET"]),
        Route("/booking/practitioners/{role}/waitlist", waitlist_submit, methods=["POST"]),
        Route("/booking/slots/{slot}", confirm_page, methods=["GET"]),
        Route("/booking/slots/{slot}/book", book_submit, methods=["POST"]),
        Route("/booking/appointments/{id}/cancel", cancel_submit, methods=["POST"]),
        Route("/booking/waitlist/{id}/accept", accept_submit, methods=["POST"]),
        Route("/booking/waitlist/{id}/leave", leave_waitlist_submit, methods=["POST"]),
        Route("/booking/feed", feed_submit, methods=["POST"]),
        Route("/portal/appointments", my_appointments, methods=["GET"]),
        Route("/workspace/agenda", agenda_page, methods=["GET"]),
        Route("/workspace/agenda/{role}/rules", rules_submit, methods=["POST"]),
        Route("/workspace/agenda/slots/{id}/block", _slot_action("blocked"), methods=["POST"]),
        Route("/workspace/agenda/slots/{id}/unblock", _slot_action("unblocked"), methods=["POST"]),
        Route("/workspace/agenda/appointments/{id}/noshow", _slot_action("noshow"), methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    """Mount the booking pages (their navigation items are available: no "coming soon" page)."""
    app.router.routes.extend(routes())


__all__ = ["install", "routes"]
