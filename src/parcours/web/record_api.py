"""The shared record's JSON and upload API, content downloads, and HL7 v2 over HTTP.

Thin adapters over ``services.records``: the caller comes from ``web.auth.caller_of``
(bearer token, or session cookie + CSRF token), every read and write goes through that
caller's Repository in one transaction owned here, errors are rendered as JSON by the
app's handler.

* ``POST /api/record/patients/{id}/documents`` — multipart (``file`` + metadata fields)
  or the raw file as the body (metadata in the query, ``filename`` too): 201 with the
  DocumentReference, or 200 with ``duplicate: true`` and the existing one.
* ``GET /api/record/patients/{id}/documents[?q=]`` — documents, ``q`` searches their text.
* ``GET /api/record/binary/{blob}`` — the content, after reading its DocumentReference
  with the caller's Repository (policy and audit).
* ``POST /api/record/documents/{id}/hide|show|retract``, ``DELETE /api/record/documents/{id}``.
* ``GET /api/record/patients/{id}/timeline``, ``.../results``, ``.../summary.pdf``.
* ``POST /api/hl7v2`` — one HL7 v2 message (ORU^R01); the answer is its ACK.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import FastAPI
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parcours.core.errors import BadRequest, TooLarge
from parcours.services.platform import Platform
from parcours.services.records import documents, uploads
from parcours.web.auth import caller_of
from parcours.web.session import require_csrf

FORM_OVERHEAD = 256 * 1024  # multipart boundaries and metadata fields around the file


def platform_of(request: Request) -> Platform:
    return request.app.state.platform


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"The upload is larger than the limit of {limit // 1024} KiB")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise TooLarge(f"The upload is larger than the limit of {limit // 1024} KiB")
    request._body = bytes(buf)  # noqa: SLF001 - Starlette's own cache: form() parses from it
    return request._body  # noqa: SLF001


async def upload_from(request: Request) -> tuple[bytes, str | None, dict[str, str]]:
    """The uploaded file, its name and the metadata fields, from a multipart form or a raw body."""
    settings = platform_of(request).settings
    # Who it is first: nobody unauthenticated gets to make us read 20 MiB.
    if "authorization" in request.headers:
        caller_of(request)
    else:
        signed_in(request)
    await read_body(request, settings.record_max_upload_bytes + FORM_OVERHEAD)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        if "authorization" not in request.headers:
            form = await require_csrf(request)
        else:
            form = await request.form(max_files=1, max_fields=30)
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise BadRequest("The form has no file (field 'file')")
        data = await file.read()
        if len(data) > settings.record_max_upload_bytes:
            raise TooLarge(f"The file is larger than the limit of {settings.record_max_upload_bytes // 1024} KiB")
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        return data, file.filename, fields
    data = request._body  # noqa: SLF001
    if len(data) > settings.record_max_upload_bytes:
        raise TooLarge(f"The file is larger than the limit of {settings.record_max_upload_bytes // 1024} KiB")
    return data, request.query_params.get("filename"), dict(request.query_params)


def signed_in(request: Request) -> None:
    """A fully signed-in session, checked before a form's body (and its CSRF token) is read."""
    from parcours.core.errors import Unauthorized
    from parcours.store.sessions import FULL
    from parcours.web.session import active_session

    active = active_session(request)
    if active is None or active.session.stage != FULL:
        raise Unauthorized("Sign in to add a document")


def new_document(patient_id: str, data: bytes, filename: str | None, fields: dict[str, str]) -> documents.NewDocument:
    def f(name: str) -> str | None:
        v = (fields.get(name) or "").strip()
        return v or None

    return documents.NewDocument(
        patient_id=patient_id, data=data, filename=filename, type_code=f("type"), class_code=f("class"), title=f("title"),
        care_date=f("care_date"), practice_setting=f("practice_setting"), confidentiality=f("confidentiality") or "N",
        organization=f("organization"), replaces=f("replaces"), language=f("language") or "fr")


async def upload_document(request: Request) -> Response:
    platform = platform_of(request)
    pid = request.path_params["patient"]
    data, filename, fields = await upload_from(request)
    caller = caller_of(request)
    new = new_document(pid, data, filename, fields)
    checked = await documents.check(platform, uploads.scanner_for(platform.settings.record_clamd_socket), data, filename)
    async with platform.transaction(caller) as repo:
        added = await documents.add(platform, repo, new, scanner=uploads.NoScanner(), checked=checked)
    body = {"duplicate": added.duplicate, "id": added.stored.id, "superseded": added.superseded, "document": added.resource()}
    if added.duplicate:
        body["message"] = "This file is already in the patient's record: the existing document is returned"
    return JSONResponse(body, 200 if added.duplicate else 201,
                        headers={"Location": f"{platform.settings.fhir_base}/DocumentReference/{added.stored.id}"})


async def list_documents(request: Request) -> Response:
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        docs = await documents.list_documents(repo, request.path_params["patient"], query=request.query_params.get("q") or None,
                                              include_old=request.query_params.get("all") == "true")
    return JSONResponse({"documents": docs, "total": len(docs)})


def content_response(content: documents.Content, *, inline: bool = False) -> Response:
    name = content.filename.replace("\r", "").replace("\n", "")
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "'")
    disposition = "inline" if inline and content.info.content_type in (uploads.PDF, uploads.JPEG, uploads.PNG) else "attachment"
    headers = {
        "Content-Disposition": f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
        # A document opened in the browser runs nothing and reaches nothing.
        "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox",
        "ETag": f'"{content.info.sha256}"',
    }
    media = content.info.content_type if content.info.content_type != uploads.CDA else "application/xml"
    return Response(content.data, 200, media_type=media, headers=headers)


async def download(request: Request) -> Response:
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        content = await documents.open_content(platform, repo, request.path_params["blob"])
    return content_response(content, inline=request.query_params.get("inline") == "1")


def _doc_action(kind: str) -> Any:
    async def action(request: Request) -> Response:
        platform = platform_of(request)
        doc_id = request.path_params["id"]
        purge: list[str] = []
        async with platform.transaction(caller_of(request)) as repo:
            if kind == "hide":
                stored = await documents.set_hidden(repo, doc_id, True)
            elif kind == "show":
                stored = await documents.set_hidden(repo, doc_id, False)
            elif kind == "retract":
                stored = await documents.retract(repo, doc_id)
            else:
                purge = await documents.erase(platform, repo, doc_id)
                stored = None
        if purge:
            await documents.blobs_of(platform).purge(purge)
        if stored is None:
            return Response(status_code=204)
        return JSONResponse({"id": stored.id, "document": stored.resource()})

    return action


async def hl7v2_http(request: Request) -> Response:
    """One HL7 v2 message in the body (``application/hl7-v2`` or text); the ACK in the answer.
    AA and AE come with 200 (the ACK says what happened), AR with 400."""
    from parcours.services.records import labs

    platform = platform_of(request)
    caller = caller_of(request)
    data = await read_body(request, 16 * 1024 * 1024)
    who = caller.client_id or caller.user_id or caller.display or caller.kind
    ack, _ = await labs.receive(platform, caller, data, source=f"http {who}")
    status = 400 if "\rMSA|AR|" in ack or "\rMSA^AR" in ack else 200
    return Response(ack, status, media_type="application/hl7-v2; charset=utf-8")


async def _fields(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await request.json()
        return {k: str(v) for k, v in body.items()} if isinstance(body, dict) else {}
    if "authorization" not in request.headers:
        form = await require_csrf(request)
    else:
        form = await request.form()
    return {k: str(v) for k, v in form.items() if isinstance(v, str)}


async def inbox_list(request: Request) -> Response:
    from parcours.services.records import labs

    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        items = await labs.inbox(repo)
    return JSONResponse({"items": [{
        "id": i.id, "received_at": i.received_at.isoformat(), "source": i.source, "control_id": i.control_id, "sender": i.sender,
        "patient_name": i.patient_name, "birth_date": i.birth_date, "sex": i.sex, "identifiers": i.identifiers, "reason": i.reason,
        "summary": i.summary} for i in items]})


async def inbox_assign(request: Request) -> Response:
    from parcours.services.records import labs

    platform = platform_of(request)
    fields = await _fields(request)
    patient = (fields.get("patient") or "").removeprefix("Patient/").strip()
    if not patient:
        raise BadRequest("Name the patient the results belong to (field 'patient')")
    async with platform.transaction(caller_of(request)) as repo:
        refs = await labs.assign(platform, repo, int(request.path_params["id"]), patient)
    return JSONResponse({"status": "assigned", "patient": f"Patient/{patient}", "references": refs})


async def inbox_reject(request: Request) -> Response:
    from parcours.services.records import labs

    platform = platform_of(request)
    fields = await _fields(request)
    async with platform.transaction(caller_of(request)) as repo:
        await labs.reject(platform, repo, int(request.path_params["id"]), fields.get("reason") or "")
    return JSONResponse({"status": "rejected"})


def parse_day(value: str | None, default: date) -> date:
    if not value:
        return default
    try:
        if len(value) == 4:
            return date(int(value), 1, 1)
        if len(value) == 7:
            return date(int(value[:4]), int(value[5:7]), 1)
        return date.fromisoformat(value[:10])
    except ValueError:
        raise BadRequest(f"Not a date: {value!r} (YYYY, YYYY-MM or YYYY-MM-DD)") from None


async def timeline_json(request: Request) -> Response:
    from parcours.services.records import timeline

    platform = platform_of(request)
    qp = request.query_params
    cats = qp.getlist("category") or None
    zoom = qp.get("zoom")
    if zoom is not None and zoom not in timeline.ZOOMS:
        raise BadRequest(f"zoom is one of {', '.join(timeline.ZOOMS)}")
    at = parse_day(qp.get("at"), platform.clock.now().date()) if zoom else None
    async with platform.reading(caller_of(request)) as repo:  # only reads: no transaction block
        evs = await timeline.events(repo, request.path_params["patient"], cats, zoom=zoom, at=at)
    body = {"events": [{"when": e.when, "category": e.category, "reference": e.ref, "title": e.title, "status": e.status,
                        "detail": e.detail} for e in evs], "total": len(evs)}
    return Response(orjson.dumps(body), media_type="application/json")


async def results_json(request: Request) -> Response:
    from parcours.services.records import results

    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        series = await results.series_of(repo, request.path_params["patient"])
    return JSONResponse({"series": [{"code": s.code, "label": s.label, "unit": s.unit, "points": [
        {"when": p.when, "value": p.value, "low": p.low, "high": p.high, "flag": p.flag, "observation": p.obs_id} for p in s.points],
        "texts": [{"when": w, "value": v, "observation": o} for w, v, o in s.texts]} for s in series]})


async def summary_pdf(request: Request) -> Response:
    from parcours.services.records import summary

    platform = platform_of(request)
    lang = request.query_params.get("lang") or "fr"
    async with platform.transaction(caller_of(request)) as repo:
        pdf, filename = await summary.summary_pdf(repo, request.path_params["patient"], lang=lang, now=platform.clock.now())
    return Response(pdf, 200, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="{quote(filename)}"', "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff"})


def routes() -> list[Route]:
    return [
        Route("/api/record/patients/{patient}/timeline", timeline_json, methods=["GET"]),
        Route("/api/record/patients/{patient}/results", results_json, methods=["GET"]),
        Route("/api/record/patients/{patient}/summary.pdf", summary_pdf, methods=["GET"]),
        Route("/api/record/lab-inbox", inbox_list, methods=["GET"]),
        Route("/api/record/lab-inbox/{id:int}/assign", inbox_assign, methods=["POST"]),
        Route("/api/record/lab-inbox/{id:int}/reject", inbox_reject, methods=["POST"]),
        Route("/api/hl7v2", hl7v2_http, methods=["POST"]),
        Route("/api/record/patients/{patient}/documents", upload_document, methods=["POST"]),
        Route("/api/record/patients/{patient}/documents", list_documents, methods=["GET"]),
        Route("/api/record/binary/{blob}", download, methods=["GET"]),
        Route("/api/record/documents/{id}/hide", _doc_action("hide"), methods=["POST"]),
        Route("/api/record/documents/{id}/show", _doc_action("show"), methods=["POST"]),
        Route("/api/record/documents/{id}/retract", _doc_action("retract"), methods=["POST"]),
        Route("/api/record/documents/{id}", _doc_action("erase"), methods=["DELETE"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())


__all__ = ["install", "routes", "read_body", "upload_from", "content_response"]
