"""Bulk Data ``$export`` over HTTP: kick-off, status polling, cancel and file download.

The kick-off answers 202 with ``Content-Location`` (the status URL); polling it
answers 202 with ``X-Progress`` while the job waits or runs, then 200 with the
manifest. Files are downloaded with the same bearer token (``requiresAccessToken``).
"""

from __future__ import annotations

from datetime import UTC
from email.utils import format_datetime

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from parcours.core.errors import ParcoursError
from parcours.services import export
from parcours.services.platform import Platform
from parcours.store.export_jobs import DONE, FAILED
from parcours.web.auth import caller_of
from parcours.web.fhir_render import fhir_response, info_outcome, outcome


def _platform(request: Request) -> Platform:
    return request.app.state.platform


def _prefer(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in request.headers.get("prefer", "").replace(";", ",").split(","):
        k, _, v = item.strip().partition("=")
        if k:
            out[k.strip().lower()] = v.strip().strip('"')
    return out


async def _kick_off(request: Request, level: str, group_id: str | None = None) -> Response:
    p = _platform(request)
    caller = caller_of(request)
    prefer = _prefer(request)
    base = p.settings.fhir_base
    path = request.url.path[len(request.scope.get("root_path", "")):]
    url = base + path + (f"?{request.url.query}" if request.url.query else "")
    req = export.check_request(
        p, level, list(request.query_params.multi_items()), request_url=url,
        respond_async="respond-async" in prefer, strict=prefer.get("handling") == "strict", group_id=group_id,
    )
    job_id = await export.do_kick_off(p, caller, req)
    body = info_outcome(f"Export job {job_id} accepted; poll {base}/$export-status/{job_id}")
    return fhir_response(body, 202, {"Content-Location": f"{base}/$export-status/{job_id}"})


async def system_export(request: Request) -> Response:
    return await _kick_off(request, "system")


async def patient_export(request: Request) -> Response:
    return await _kick_off(request, "patient")


async def group_export(request: Request) -> Response:
    return await _kick_off(request, "group", request.path_params["id"])


async def status(request: Request) -> Response:
    p = _platform(request)
    caller = caller_of(request)
    job_id = request.path_params["job"]
    if request.method == "DELETE":
        await export.do_cancel(p, caller, job_id)
        return fhir_response(info_outcome(f"Export job {job_id} cancelled and its files deleted"), 202)
    job = await export.access_job(p, caller, job_id)
    if job["status"] == DONE:
        headers = {"Expires": format_datetime(job["expires"].astimezone(UTC), usegmt=True)} if job["expires"] else {}
        return Response(orjson.dumps(export.manifest(job, p.settings.fhir_base)), 200, headers, media_type="application/json")
    if job["status"] == FAILED:
        err = ParcoursError(f"Export job {job_id} {job['progress'] or 'failed'}", status=500, code="PRC-1500", fhir_code="exception")
        return fhir_response(outcome(err.issues), 500)
    return Response(status_code=202, headers={"X-Progress": job["progress"] or job["status"], "Retry-After": "2"})


async def download(request: Request) -> Response:
    p = _platform(request)
    path = await export.access_file(p, caller_of(request), request.path_params["job"], request.path_params["name"])
    return FileResponse(path, media_type=export.NDJSON)


# Before the generic /{type} and /{type}/{id} routes of parcours.web.fhir, which would match these paths.
routes = [
    Route("/$export", system_export, methods=["GET"]),
    Route("/Patient/$export", patient_export, methods=["GET"]),
    Route("/Group/{id}/$export", group_export, methods=["GET"]),
    Route("/$export-status/{job}", status, methods=["GET", "DELETE"]),
    Route("/$export-file/{job}/{name}", download, methods=["GET"]),
]
