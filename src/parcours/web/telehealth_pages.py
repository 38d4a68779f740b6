"""Teleconsultation pages: the list, the device check, the room (video, waiting room, chat), the report.

Thin adapters over ``services.telehealth``; the signaling socket is ``web.telehealth_ws``.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parcours.core.errors import BadRequest
from parcours.services.telehealth import listing, rooms
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import page, platform_of, redirect, render, require_full, require_space
from parcours.web.session import require_csrf


def _start_of(resource: dict) -> str:
    return (resource.get("start") or "")[:16].replace("T", " ")


async def _home(request: Request, space: str) -> Response:
    require_space(request, space)
    p = platform_of(request)
    async with p.transaction(caller_of(request)) as repo:
        items = [{"id": s.id, "start": _start_of(s.resource()), "what": ((s.resource().get("serviceType") or [{}])[0]).get("text", "")}
                 for s in await listing.my_consultations(repo, p.clock.now())]
    return render(request, "telehealth_home.html", current="telehealth", items=items,
                  professional=space == navigation.WORKSPACE)


@page
async def workspace_home(request: Request) -> Response:
    return await _home(request, navigation.WORKSPACE)


@page
async def portal_home(request: Request) -> Response:
    return await _home(request, navigation.PORTAL)


@page
async def open_room(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    require_space(request, navigation.WORKSPACE)
    patient = str(form.get("patient") or "").strip().removeprefix("Patient/")
    if not patient:
        raise BadRequest("Give the patient")
    p = platform_of(request)
    async with p.transaction(caller_of(request)) as repo:
        appointment = await rooms.open_ad_hoc(repo, patient, p.clock.now())
    return redirect(f"/telehealth/rooms/{appointment}/check")


async def _room(request: Request) -> rooms.Room:
    require_full(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        return await rooms.access_room(repo, request.path_params["room_id"])


@page
async def device_check(request: Request) -> Response:
    room = await _room(request)
    return render(request, "telehealth_check.html", current="telehealth", room=room)


@page
async def room_page(request: Request) -> Response:
    room = await _room(request)
    return render(request, "telehealth_room.html", current="telehealth", room=room)


async def end(request: Request) -> Response:
    """JSON for the room's script: records the Encounter, then tells every participant."""
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    require_full(request)
    p = platform_of(request)
    try:
        started = datetime.fromisoformat(str(form.get("started") or ""))
    except ValueError as e:
        raise BadRequest("Give the start of the call (ISO 8601)") from e
    attended = [str(v) for v in form.getlist("attended")][:10]
    async with p.transaction(caller_of(request)) as repo:
        room = await rooms.access_room(repo, request.path_params["room_id"])
        encounter = await rooms.end_call(repo, room, started, p.clock.now(), attended)
    hub = getattr(request.app.state, "telehealth", None)
    if hub is not None:
        await hub.publish({"room": room.appointment_id, "type": "ended", "from": "", "data": {"encounter": encounter}})
    return JSONResponse({"encounter": encounter,
                         "report": f"/telehealth/rooms/{room.appointment_id}/report?encounter={encounter}"})


@page
async def report_form(request: Request) -> Response:
    room = await _room(request)
    return render(request, "telehealth_report.html", current="telehealth", room=room,
                  encounter=request.query_params.get("encounter", ""), done=None)


@page
async def report_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    require_full(request)
    p = platform_of(request)
    encounter = str(form.get("encounter") or "")
    async with p.transaction(caller_of(request)) as repo:
        room = await rooms.access_room(repo, request.path_params["room_id"])
        await repo.read("Encounter", encounter)
        doc = await rooms.write_report(repo, room, encounter, str(form.get("text") or ""), p.clock.now())
    return render(request, "telehealth_report.html", current="telehealth", room=room, encounter=encounter, done=doc)


def routes() -> list[Route]:
    return [
        Route("/workspace/telehealth", workspace_home),
        Route("/portal/telehealth", portal_home),
        Route("/workspace/telehealth/rooms", open_room, methods=["POST"]),
        Route("/telehealth/rooms/{room_id}/check", device_check),
        Route("/telehealth/rooms/{room_id}", room_page),
        Route("/telehealth/rooms/{room_id}/end", end, methods=["POST"]),
        Route("/telehealth/rooms/{room_id}/report", report_form),
        Route("/telehealth/rooms/{room_id}/report", report_submit, methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())


__all__ = ["install", "routes"]
