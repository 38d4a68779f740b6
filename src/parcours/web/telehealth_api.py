"""Tele-expertise API (``/api/telehealth/expertise``): thin adapter over ``services.telehealth.expertise``.

Bearer token or session cookie (+ X-CSRF-Token for writes); JSON in, JSON out; errors are
FHIR OperationOutcomes with the platform's codes (409 for a refused transition, 422 for
an incomplete request).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import datetime

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parcours.core.errors import MalformedJson, ParcoursError, Unprocessable
from parcours.services.records import documents, uploads
from parcours.services.telehealth import expertise
from parcours.web.auth import caller_of
from parcours.web.fhir_render import error_response

BASE = "/api/telehealth/expertise"


def _api(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except ParcoursError as e:
            return error_response(e)

    return wrapper


async def _body(request: Request) -> dict:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as e:
        raise MalformedJson("The body is not JSON") from e
    if not isinstance(body, dict):
        raise MalformedJson("The body is a JSON object")
    return body


@_api
async def create(request: Request) -> Response:
    caller = caller_of(request)
    b = await _body(request)
    p = request.app.state.platform
    try:
        due = datetime.fromisoformat(str(b.get("due")))
        sent = [(str(a.get("title") or "Pièce jointe"), base64.b64decode(a["data"], validate=True)) for a in b.get("attachments") or []]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise Unprocessable(f"Invalid request: {e}") from e
    # The record's upload checks and malware scan: the real type is sniffed, the type sent is not trusted.
    scanner = uploads.scanner_for(p.settings.record_clamd_socket)
    files = [expertise.Attachment(title, data, await documents.check(p, scanner, data, title)) for title, data in sent]
    async with p.transaction(caller) as repo:
        task = await expertise.request_opinion(
            p, repo, patient=str(b.get("patient") or ""), expert=str(b.get("expert") or "") or None,
            specialty=str(b.get("specialty") or "") or None, organization=str(b.get("organization") or "") or None,
            question=str(b.get("question") or ""),
            priority=str(b.get("priority") or "routine"), due=due, consent=b.get("consent") is True, now=p.clock.now(),
            attachments=files)
    return JSONResponse({"task": task}, 201)


@_api
async def set_status(request: Request) -> Response:
    b = await _body(request)
    p = request.app.state.platform
    async with p.transaction(caller_of(request)) as repo:
        task = await expertise.transition(repo, request.path_params["task_id"], str(b.get("status") or ""), p.clock.now(),
                                          reason=b.get("reason"))
    return JSONResponse({"status": task["status"]})


@_api
async def give_opinion(request: Request) -> Response:
    b = await _body(request)
    p = request.app.state.platform
    async with p.transaction(caller_of(request)) as repo:
        opinion = expertise.Opinion(
            conclusion=str(b.get("conclusion") or b.get("opinion") or ""), recommendations=str(b.get("recommendations") or ""),
            consultation_needed=b.get("consultationNeeded") is True, follow_up=str(b.get("followUp") or ""))
        doc = await expertise.answer(repo, request.path_params["task_id"], opinion, p.clock.now())
    return JSONResponse({"opinion": f"DocumentReference/{doc}"}, 201)


@_api
async def messages(request: Request) -> Response:
    p = request.app.state.platform
    async with p.transaction(caller_of(request)) as repo:
        if request.method == "POST":
            b = await _body(request)
            cid = await expertise.ask(repo, request.path_params["task_id"], str(b.get("text") or ""), p.clock.now())
            return JSONResponse({"communication": cid}, 201)
        return JSONResponse({"messages": await expertise.thread(repo, request.path_params["task_id"])})


@_api
async def overview(request: Request) -> Response:
    p = request.app.state.platform
    async with p.transaction(caller_of(request)) as repo:
        lists = await expertise.lists(repo)
    now = p.clock.now()
    return JSONResponse({side: {"tasks": tasks, "counters": expertise.counters(tasks, now)} for side, tasks in lists.items()})


def routes() -> list[Route]:
    return [
        Route(BASE, overview, methods=["GET"]),
        Route(BASE, create, methods=["POST"]),
        Route(BASE + "/{task_id}/status", set_status, methods=["POST"]),
        Route(BASE + "/{task_id}/opinion", give_opinion, methods=["POST"]),
        Route(BASE + "/{task_id}/messages", messages, methods=["GET", "POST"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())
