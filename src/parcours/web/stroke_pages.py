"""Tele-stroke pages: on-call rosters, the urgent request (emergency site), the alert inbox and the
request page (specialist: acknowledge, join the video, record the decision), and the live socket.

Thin adapters over ``services.telehealth.stroke``. The socket ``/workspace/stroke/ws`` reads the
platform's change feed (``events.bus``: LISTEN/NOTIFY on ``resource_log``, after commit): every
server process delivers to its own sockets from the same database log, so an alert reaches a page
whichever process serves it; nothing is fanned out in process memory. Before each delivery the
request is read again through the socket's caller (``stroke.access_request``): only the requester
and the specialist now alerted receive it; the web session is checked again before each frame too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, time
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from parcours.core.errors import ParcoursError
from parcours.services import signin
from parcours.services.telehealth import stroke
from parcours.web.auth import caller_of
from parcours.web.pages import page, platform_of, redirect, render, require_full
from parcours.web.session import cookie_name, require_csrf

log = logging.getLogger(__name__)

DECISIONS = ("thrombolysis", "thrombectomy-transfer", "no-treatment", "other")
SHIFT_ROWS = 7


def _paris(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(stroke.PARIS).strftime("%d/%m/%Y %H:%M:%S")


def _view(task_id: str, task: dict, party: str) -> dict:
    inputs = {(i.get("type") or {}).get("text"): i for i in task.get("input") or []}
    return {"id": task_id, "status": task.get("status"), "party": party, "owner": (task.get("owner") or {}).get("reference"),
            "requester": (task.get("requester") or {}).get("reference"), "patient": (task.get("for") or {}).get("reference"),
            "note": task.get("description") or "", "authored": _paris(task.get("authoredOn")),
            "deadline": _paris(((task.get("restriction") or {}).get("period") or {}).get("end")),
            "appointment": ((task.get("focus") or {}).get("reference") or "").removeprefix("Appointment/"),
            "roster": ((inputs.get("roster") or {}).get("valueReference") or {}).get("reference", ""),
            "timeline": [{**e, "local": _paris(e["time"])} for e in stroke.timeline(task)],
            "decision": next((o.get("valueString") for o in task.get("output") or [] if (o.get("type") or {}).get("text") == "decision"), None)}


# -- the alert inbox, the new request, the request page -------------------------------------------------

@page
async def inbox(request: Request) -> Response:
    require_full(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        me = set((await repo.care()).identities) | {repo.caller.fhir_user}
        items = [{**_view(t["id"], t, "specialist" if (t.get("owner") or {}).get("reference") in me else "requester")}
                 for t in await stroke.my_requests(repo)]
    return render(request, "stroke_inbox.html", current="stroke", items=items)


async def _new_form(request: Request, status: int = 200, error: str | None = None, values: dict | None = None) -> Response:
    async with platform_of(request).transaction(caller_of(request)) as repo:
        choices = [{"id": rid, "label": _roster_label(r)} for rid, r in await stroke.rosters(repo)]
    return render(request, "stroke_new.html", status=status, current="stroke", rosters=choices, error=error,
                  values=values or {"patient": request.query_params.get("patient", ""), "roster": "", "nihss": "", "onset": "", "summary": ""})


@page
async def new_form(request: Request) -> Response:
    require_full(request)
    return await _new_form(request)


@page
async def new_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    require_full(request)
    values = {k: str(form.get(k) or "").strip() for k in ("patient", "roster", "nihss", "onset", "summary")}
    if not values["patient"] or not values["roster"]:
        return await _new_form(request, 422, "stroke.error.required", values)
    note = "; ".join(x for x in (f"NIHSS {values['nihss']}" if values["nihss"] else "",
                                 f"H0 {values['onset']}" if values["onset"] else "", values["summary"]) if x)
    p = platform_of(request)
    try:
        async with p.transaction(caller_of(request)) as repo:
            sent = await stroke.send_request(repo, values["roster"], values["patient"], p.clock.now(),
                                             p.settings.stroke_ack_minutes, note=note)
    except ParcoursError as e:
        if e.status in (401, 403):
            raise
        return await _new_form(request, 422, "stroke.error.nobody" if e.status == 422 else "stroke.error.patient", values)
    return redirect(f"/workspace/stroke/{sent.task}")


@page
async def detail(request: Request) -> Response:
    require_full(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        task, party = await stroke.access_request(repo, request.path_params["task_id"])
    return render(request, "stroke_request.html", current="stroke", r=_view(request.path_params["task_id"], task, party),
                  decisions=DECISIONS, partial=request.query_params.get("partial") == "1")


@page
async def acknowledge(request: Request) -> Response:
    await require_csrf(request)
    require_full(request)
    p = platform_of(request)
    async with p.transaction(caller_of(request)) as repo:
        await stroke.acknowledge(repo, request.path_params["task_id"], p.clock.now())
    return redirect(f"/workspace/stroke/{request.path_params['task_id']}")


@page
async def join_video(request: Request) -> Response:
    """Records the video start (the first time each side joins), then opens the room."""
    await require_csrf(request)
    require_full(request)
    p = platform_of(request)
    task_id = request.path_params["task_id"]
    async with p.transaction(caller_of(request)) as repo:
        task, _ = await stroke.access_request(repo, task_id)
        if not any(e["event"] == "video-start" for e in stroke.timeline(task)) and task.get("status") not in ("completed", "cancelled"):
            task = await stroke.record(repo, task_id, "video-start", p.clock.now())
    return redirect(f"/telehealth/rooms/{((task.get('focus') or {}).get('reference') or '').removeprefix('Appointment/')}")


@page
async def decide(request: Request) -> Response:
    form = await require_csrf(request)
    require_full(request)
    p = platform_of(request)
    task_id = request.path_params["task_id"]
    kind = str(form.get("decision") or "")
    text = str(form.get("text") or "").strip()
    if kind not in DECISIONS:
        async with p.transaction(caller_of(request)) as repo:
            task, party = await stroke.access_request(repo, task_id)
        return render(request, "stroke_request.html", status=422, current="stroke", r=_view(task_id, task, party),
                      decisions=DECISIONS, partial=False, error="stroke.error.decision", text=text)
    async with p.transaction(caller_of(request)) as repo:
        await stroke.record(repo, task_id, "decision", p.clock.now(), f"{kind}: {text}" if text else kind)
    return redirect(f"/workspace/stroke/{task_id}")


# -- rosters ---------------------------------------------------------------------------------------------

def _roster_label(r: dict) -> str:
    return f"{((r.get('serviceType') or [{}])[0]).get('text', '')} — {((r.get('actor') or [{}])[0]).get('reference', '')}"


@page
async def roster_list(request: Request) -> Response:
    require_full(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        items = [{"id": rid, "specialty": ((r.get("serviceType") or [{}])[0]).get("text", ""),
                  "site": ((r.get("actor") or [{}])[0]).get("reference", ""),
                  "grid": {d: [s for s in stroke.shifts_of(r) if s.day == d] for d in stroke.DAYS}}
                 for rid, r in await stroke.rosters(repo)]
    return render(request, "stroke_rosters.html", current="stroke", items=items, days=stroke.DAYS)


def _roster_values(r: dict | None) -> dict:
    shifts = stroke.shifts_of(r) if r else []
    rows = [{"day": s.day, "start": s.start.strftime("%H:%M"), "end": s.end.strftime("%H:%M"), "people": ", ".join(s.people)} for s in shifts]
    rows += [{"day": "", "start": "", "end": "", "people": ""}] * max(0, SHIFT_ROWS - len(rows))
    return {"specialty": ((r or {}).get("serviceType") or [{}])[0].get("text", ""),
            "site": (((r or {}).get("actor") or [{}])[0]).get("reference", ""), "rows": rows}


async def _roster_form(request: Request, rid: str | None, values: dict, errors: list[str], status: int = 200) -> Response:
    return render(request, "stroke_roster_form.html", status=status, current="stroke", rid=rid, values=values,
                  errors=errors, days=stroke.DAYS)


@page
async def roster_form(request: Request) -> Response:
    require_full(request)
    rid = request.path_params.get("roster_id")
    r = None
    if rid:
        async with platform_of(request).transaction(caller_of(request)) as repo:
            r = (await repo.read("Schedule", rid)).resource()
    return await _roster_form(request, rid, _roster_values(r), [])


def check_roster(form: dict) -> tuple[dict, list[str], list[stroke.Shift]]:
    """The form's values as typed (kept on error), the error keys, and the shifts."""
    values = {"specialty": str(form.get("specialty") or "").strip(), "site": str(form.get("site") or "").strip(), "rows": []}
    errors: list[str] = []
    shifts: list[stroke.Shift] = []
    if not values["specialty"]:
        errors.append("stroke.error.specialty")
    if not values["site"].startswith("Location/") or len(values["site"]) <= len("Location/"):
        errors.append("stroke.error.site")
    for i in range(SHIFT_ROWS):
        row = {k: str(form.get(f"{k}_{i}") or "").strip() for k in ("day", "start", "end", "people")}
        values["rows"].append(row)
        if not any(row.values()):
            continue
        people = tuple(p.strip() for p in row["people"].split(",") if p.strip())
        try:
            start, end = time.fromisoformat(row["start"]), time.fromisoformat(row["end"])
        except ValueError:
            errors.append("stroke.error.times")
            continue
        if row["day"] not in stroke.DAYS or not people or not all(p.startswith(("Practitioner/", "PractitionerRole/")) for p in people):
            errors.append("stroke.error.shift")
            continue
        shifts.append(stroke.Shift(row["day"], start, end, people))
    if not shifts and not errors:
        errors.append("stroke.error.no_shift")
    return values, list(dict.fromkeys(errors)), shifts


@page
async def roster_submit(request: Request) -> Response:
    form = await require_csrf(request)
    require_full(request)
    rid = request.path_params.get("roster_id")
    values, errors, shifts = check_roster(dict(form))
    if errors:
        return await _roster_form(request, rid, values, errors, 422)
    body = stroke.roster_resource(values["specialty"], values["site"], shifts)
    try:
        async with platform_of(request).transaction(caller_of(request)) as repo:
            if rid:
                await repo.update("Schedule", rid, {**body, "id": rid})
            else:
                await repo.create("Schedule", body)
    except ParcoursError as e:
        if e.status in (401,):
            raise
        return await _roster_form(request, rid, values, ["stroke.error.save"], 422)
    return redirect("/workspace/stroke/rosters")


# -- the live socket ----------------------------------------------------------------------------------------

def _same_origin(ws: WebSocket) -> bool:
    origin = ws.headers.get("origin")
    return bool(origin) and urlsplit(origin).netloc == ws.headers.get("host", "")


async def stroke_ws(ws: WebSocket) -> None:
    platform = ws.app.state.platform
    events = getattr(ws.app.state, "events", None)
    cookie = ws.cookies.get(cookie_name(platform.settings))
    active = None
    if cookie and _same_origin(ws):
        async with platform.pool.connection() as conn, conn.transaction():
            active = await signin.resolve(platform, conn, cookie)
    if active is None or active.session.stage != "full" or events is None:
        await ws.close(1008, "Sign in first")
        return
    caller = signin.session_caller(active, ws.client.host if ws.client else None)
    await ws.accept()

    async def forward() -> None:
        async with events.feed.stream() as changes:
            await ws.send_text('{"type":"ready"}')
            async for batch in changes:
                for task_id in dict.fromkeys(c.id for c in batch if c.resource_type == "Task" and not c.deleted):
                    try:  # read again through the socket's caller: only its parties receive it
                        async with platform.transaction(caller) as repo:
                            task, party = await stroke.access_request(repo, task_id)
                    except ParcoursError:
                        continue
                    async with platform.pool.connection() as conn, conn.transaction():
                        still = await signin.resolve(platform, conn, cookie)  # signed out or expired since: stop
                    if still is None or still.session.stage != "full":
                        await ws.close(1008, "Session ended")
                        return
                    v = _view(task_id, task, party)
                    await ws.send_text(orjson.dumps({"type": "stroke", "id": task_id, "status": v["status"], "party": party,
                                                     "last": v["timeline"][-1]["event"] if v["timeline"] else None}).decode())

    sender = asyncio.create_task(forward(), name="stroke-socket")
    try:
        while not sender.done():
            receive = asyncio.create_task(ws.receive_text())
            done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
            else:
                receive.result()
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


def routes() -> list[Route | WebSocketRoute]:
    return [
        WebSocketRoute("/workspace/stroke/ws", stroke_ws),
        Route("/workspace/stroke", inbox),
        Route("/workspace/stroke/new", new_form),
        Route("/workspace/stroke/new", new_submit, methods=["POST"]),
        Route("/workspace/stroke/rosters", roster_list),
        Route("/workspace/stroke/rosters/new", roster_form),
        Route("/workspace/stroke/rosters/new", roster_submit, methods=["POST"]),
        Route("/workspace/stroke/rosters/{roster_id}", roster_form),
        Route("/workspace/stroke/rosters/{roster_id}", roster_submit, methods=["POST"]),
        Route("/workspace/stroke/{task_id}", detail),
        Route("/workspace/stroke/{task_id}/acknowledge", acknowledge, methods=["POST"]),
        Route("/workspace/stroke/{task_id}/video", join_video, methods=["POST"]),
        Route("/workspace/stroke/{task_id}/decision", decide, methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())


__all__ = ["install", "routes", "check_roster"]
