"""FHIR operations of access control: ``Patient/{id}/$emergency-access`` (a professional breaks
the glass, with a stated reason) and ``DocumentReference/{id}/$hide`` / ``$unhide`` (a patient
hides one of their documents from professionals). Thin adapters over ``services.access``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.services import access
from parcours.services.platform import Platform
from parcours.web.auth import caller_of
from parcours.web.fhir_render import fhir_response, version_headers


def _platform(request: Request) -> Platform:
    return request.app.state.platform


async def emergency_access(request: Request) -> Response:
    from parcours.web.fhir import read_json

    p = _platform(request)
    caller = caller_of(request)
    reason, minutes = access.parse_emergency_parameters(await read_json(request, p.settings.max_resource_bytes))
    patient_id = request.path_params["id"]
    async with p.transaction(caller) as repo:
        until = await access.do_emergency_access(repo, patient_id, reason, minutes)
    return fhir_response(access.emergency_parameters(patient_id, reason, until))


async def _set_hidden(request: Request, hidden: bool) -> Response:
    p = _platform(request)
    async with p.transaction(caller_of(request)) as repo:
        stored = await access.do_set_hidden(repo, request.path_params["id"], hidden)
    headers = version_headers(p.settings.fhir_base, stored)
    del headers["Location"]
    return fhir_response(stored.content or b"", 200, headers)


async def hide(request: Request) -> Response:
    return await _set_hidden(request, True)


async def unhide(request: Request) -> Response:
    return await _set_hidden(request, False)


# Before the generic /{type}/{id} routes of parcours.web.fhir.
routes = [
    Route("/Patient/{id}/$emergency-access", emergency_access, methods=["POST"]),
    Route("/DocumentReference/{id}/$hide", hide, methods=["POST"]),
    Route("/DocumentReference/{id}/$unhide", unhide, methods=["POST"]),
]
