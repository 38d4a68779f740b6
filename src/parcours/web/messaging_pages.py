"""Messaging pages (``/portal/messages``, ``/workspace/messages``) and the messaging JSON API
(``/api/messaging``).

Thin adapters like ``web.pages``: the rules live in ``services.messaging``; every form
passes ``require_csrf`` first; errors become pages (JSON under ``/api``). Pages work
without JavaScript (forms post and redirect); ``static/messaging.js`` adds live updates
over the ``/messages/ws`` socket (``web.messaging_ws``), de-duplicated by message id, and
htmx posts replies without a page load.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from parcours.core.errors import BadRequest, Forbidden, ParcoursError, TooLarge
from parcours.security import roles
from parcours.services.messaging import model, service
from parcours.services.messaging.service import MessageView, Upload
from parcours.store import messaging as store
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import page, platform_of, redirect, render, require_space
from parcours.web.session import require_csrf

PARIS = ZoneInfo("Europe/Paris")
PREFIX = {navigation.PORTAL: "/portal/messages", navigation.WORKSPACE: "/workspace/messages"}
NOTICES = frozenset({"muted", "unmuted", "filed", "settings_saved"})
MAX_FILES = 3


def fmt_when(value: str | datetime, lang: str) -> str:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    local = dt.astimezone(PARIS)
    if lang == "en":
        return local.strftime("%d %b %Y, %H:%M")
    months = ("janv.", "févr.", "mars", "avr.", "mai", "juin", "juil.", "août", "sept.", "oct.", "nov.", "déc.")
    return f"{local.day} {months[local.month - 1]} {local.year}, {local:%H:%M}"


def fmt_size(n: int | None, lang: str) -> str:
    n = int(n or 0)
    unit = ("Ko", "Mo") if lang == "fr" else ("KB", "MB")
    return f"{max(1, n // 1024)} {unit[0]}" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} {unit[1]}"


def message_context(view: MessageView, *, me: list[str], prefix: str, lang: str, can_file: bool,
                    readers: list[str] | None = None) -> dict[str, Any]:
    """What ``_message.html`` needs (pages and the socket render it alike)."""
    doc_types: list[tuple[str, str]] = []
    if can_file and view.attachments:
        from parcours.services.records import codes

        doc_types = [(d.code, d.fr if lang == "fr" else d.en) for d in codes.DOC_TYPES]
    return {"m": view, "mine": view.sender in me or view.sender == "", "prefix": prefix, "can_file": can_file,
            "when": fmt_when(view.sent, lang), "size": lambda n: fmt_size(n, lang), "readers": readers or [],
            "doc_types": doc_types}


def _space_of(request: Request) -> str:
    from parcours.web.session import active_session

    active = active_session(request)
    return roles.role(active.account.role).space if active else navigation.PORTAL


def _lang(request: Request) -> str:
    from parcours.web.pages import language

    return language(request)


def _require(request: Request, space: str) -> None:
    active = require_space(request, space)
    if active.account.role not in ("patient", "proxy", "practitioner"):
        raise Forbidden("Messaging is for patients, their proxies and professionals")


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done")
    return f"msg.notice.{done}" if done in NOTICES else None


def _max(request: Request) -> int:
    return platform_of(request).settings.messaging_max_attachment_bytes


async def _uploads(form: Any, limit: int) -> list[Upload]:
    out = []
    for f in form.getlist("file"):
        if not isinstance(f, UploadFile) or not f.filename:
            continue
        if f.size is not None and f.size > limit:
            raise TooLarge(f"The file is {f.size // 1024} KiB; messages carry files up to {limit // 1024} KiB")
        data = await f.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"The file is larger than {limit // 1024} KiB, the largest a message carries")
        if data:
            out.append(Upload(data, f.filename))
    if len(out) > MAX_FILES:
        raise BadRequest(f"Attach at most {MAX_FILES} files to one message")
    return out


# -- inbox -------------------------------------------------------------------------------------------

def _inbox_page(space: str):  # type: ignore[no-untyped-def]
    @page
    async def inbox_page(request: Request) -> Response:
        _require(request, space)
        caller = caller_of(request)
        q = (request.query_params.get("q") or "").strip()
        patient = request.query_params.get("patient") or None
        if patient and not patient.startswith("Patient/"):
            raise BadRequest("patient must be a reference such as Patient/123")
        async with platform_of(request).transaction(caller) as repo:
            items = await service.inbox(repo, patient=patient)
            hits = await service.search(repo, q) if q else None
            patient_name = (await service.display_names(repo, [patient])).get(patient) if patient else None
            accepts = await service.accepts_patients(repo) if caller.kind == "practitioner" else None
        lang = _lang(request)
        context = {"items": items, "prefix": PREFIX[space], "when": lambda v: fmt_when(v, lang), "q": q, "hits": hits,
                   "patient": patient, "patient_name": patient_name, "accepts": accepts, "current": "messages",
                   "notice": _notice(request)}
        if request.query_params.get("fragment") == "list":
            return render(request, "_messaging_list.html", **context)
        return render(request, "messaging_inbox.html", **context)

    return inbox_page


# -- new conversation ------------------------------------------------------------------------------------

def _new_page(space: str):  # type: ignore[no-untyped-def]
    @page
    async def new_page(request: Request) -> Response:
        _require(request, space)
        return await _new_form(request, space)

    return new_page


async def _new_form(request: Request, space: str, status: int = 200, error: str | None = None) -> Response:
    caller = caller_of(request)
    qp = request.query_params
    chosen = list(dict.fromkeys(r for r in qp.getlist("to") if r.startswith(("Practitioner/", "PractitionerRole/"))))[:20]
    about = qp.get("about") or None
    if about and not about.startswith("Patient/"):
        about = None
    q, pq = (qp.get("q") or "").strip(), (qp.get("pq") or "").strip()
    async with platform_of(request).transaction(caller) as repo:
        names = await service.display_names(repo, chosen + ([about] if about else []))
        found = await service.find_professionals(repo, q) if q else []
        mine = await service.my_professionals(repo) if caller.kind in ("patient", "proxy") else []
        patients = await service.my_patients(repo, pq) if pq and caller.kind == "practitioner" else []
        represented = await service.me(repo) if caller.kind == "proxy" else []
        if represented:
            names.update(await service.display_names(repo, represented))

    def link(**changes: Any) -> str:
        params: list[tuple[str, str]] = [("to", r) for r in changes.get("to", chosen)]
        a = changes.get("about", about)
        if a:
            params.append(("about", a))
        return PREFIX[space] + "/new?" + urlencode(params)

    return render(request, "messaging_new.html", status, prefix=PREFIX[space], chosen=chosen, names=names, about=about,
                  q=q, pq=pq, found=found, mine=[c for c in mine if c.reference not in chosen],
                  patients=patients, represented=represented, link=link, error=error, current="messages",
                  max_kib=_max(request) // 1024, professional=caller.kind == "practitioner")


def _new_submit(space: str):  # type: ignore[no-untyped-def]
    @page
    async def new_submit(request: Request) -> Response:
        form = await require_csrf(request)
        _require(request, space)
        caller = caller_of(request)
        to = [str(r) for r in form.getlist("to") if str(r)]
        about = str(form.get("about") or "") or None
        if caller.kind == "practitioner" and about and form.get("with_patient"):
            to.append(about)
        uploads = await _uploads(form, _max(request))
        async with platform_of(request).transaction(caller) as repo:
            started = await service.start_conversation(
                repo, to=to, topic=str(form.get("topic") or ""), text=str(form.get("text") or ""), uploads=uploads,
                about=about, max_attachment_bytes=_max(request))
        return redirect(f"{PREFIX[space]}/{started.conversation.id}")

    return new_submit


# -- one conversation ----------------------------------------------------------------------------------------

def _conversation_page(space: str):  # type: ignore[no-untyped-def]
    @page
    async def conversation_page(request: Request) -> Response:
        _require(request, space)
        caller = caller_of(request)
        cid = request.path_params["cid"]
        async with platform_of(request).transaction(caller) as repo:
            view = await service.conversation(repo, cid)
            if view.last_seq:
                await service.mark_read(repo, cid, view.last_seq)
        lang = _lang(request)
        can_file = caller.kind == "practitioner" and bool(view.patient)
        others = [p for p in view.participants if p not in view.me]
        messages = []
        for m in view.messages:
            readers = [view.names.get(p, p) for p in others if view.read_marks.get(p, 0) >= m.seq and p != m.sender]
            messages.append(message_context(m, me=[caller.fhir_user or ""], prefix=PREFIX[space], lang=lang, can_file=can_file,
                                            readers=readers))
        return render(request, "messaging_conversation.html", view=view, messages=messages, prefix=PREFIX[space],
                      names_json=json.dumps({p: view.names.get(p, p) for p in view.participants}),
                      me_json=json.dumps(view.me), marks_json=json.dumps(view.read_marks), others=others,
                      can_file=can_file, max_kib=_max(request) // 1024, current="messages", notice=_notice(request))

    return conversation_page


def _send_submit(space: str):  # type: ignore[no-untyped-def]
    @page
    async def send_submit(request: Request) -> Response:
        form = await require_csrf(request)
        _require(request, space)
        caller = caller_of(request)
        cid = request.path_params["cid"]
        htmx = request.headers.get("hx-request") == "true"
        try:
            uploads = await _uploads(form, _max(request))
            async with platform_of(request).transaction(caller) as repo:
                stored = await service.send(repo, cid, text=str(form.get("text") or ""), uploads=uploads,
                                            in_reply_to=str(form.get("in_reply_to") or "") or None,
                                            max_attachment_bytes=_max(request))
                row = (await store.messages_by_id(repo.conn, [stored.id]))[0]
        except ParcoursError as e:
            if not htmx:
                raise
            # The reply form shows why, as text (the script puts it in its alert).
            return PlainTextResponse(e.message, e.status, headers={"X-Content-Type-Options": "nosniff"})
        if htmx:
            view = service.view_of(row, stored.resource())
            ctx = message_context(view, me=[caller.fhir_user or ""], prefix=PREFIX[space], lang=_lang(request),
                                  can_file=caller.kind == "practitioner" and bool(model.subject(stored.resource())))
            return render(request, "_message.html", **ctx)
        return redirect(f"{PREFIX[space]}/{cid}#msg-{stored.id}")

    return send_submit


def _mute_submit(space: str):  # type: ignore[no-untyped-def]
    @page
    async def mute_submit(request: Request) -> Response:
        form = await require_csrf(request)
        _require(request, space)
        cid = request.path_params["cid"]
        muted = str(form.get("muted") or "") == "1"
        async with platform_of(request).transaction(caller_of(request)) as repo:
            await service.mute(repo, cid, muted)
        return redirect(f"{PREFIX[space]}/{cid}?done={'muted' if muted else 'unmuted'}")

    return mute_submit


def _read_submit(space: str):  # type: ignore[no-untyped-def]
    async def read_submit(request: Request) -> Response:
        form = await require_csrf(request)
        _require(request, space)
        try:
            seq = int(str(form.get("seq") or "0"))
        except ValueError:
            raise BadRequest("seq must be a message number") from None
        async with platform_of(request).transaction(caller_of(request)) as repo:
            mark = await service.mark_read(repo, request.path_params["cid"], seq)
        return JSONResponse({"read": mark})

    return read_submit


def _attachment_get(space: str):  # type: ignore[no-untyped-def]
    @page
    async def attachment_get(request: Request) -> Response:
        _require(request, space)
        try:
            index = int(request.path_params["n"])
        except ValueError:
            raise BadRequest("No such attachment") from None
        async with platform_of(request).transaction(caller_of(request)) as repo:
            f = await service.attachment(repo, request.path_params["mid"], index)
        inline = f.content_type in ("image/jpeg", "image/png", "image/webp", "application/pdf")
        disposition = ("inline" if inline else "attachment") + "; filename*=UTF-8''" + _quote(f.title)
        # The file is the sender's: it runs nothing here (sandbox), and is never sniffed into something else.
        return Response(f.data, media_type=f.content_type, headers={
            "Content-Disposition": disposition, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
            "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
            "Referrer-Policy": "same-origin"})

    return attachment_get


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


@page
async def file_submit(request: Request) -> Response:
    form = await require_csrf(request)
    _require(request, navigation.WORKSPACE)
    try:
        mid, n = request.path_params["mid"], int(request.path_params["n"])
    except ValueError:
        raise BadRequest("No such attachment") from None
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        await service.file_into_record(platform, repo, mid, n, type_code=str(form.get("type") or "") or None,
                                       language=_lang(request))
        cid = model.conversation_of((await repo.read("Communication", mid)).resource())
    return redirect(f"{PREFIX[navigation.WORKSPACE]}/{cid}?done=filed#msg-{mid}")


@page
async def settings_submit(request: Request) -> Response:
    form = await require_csrf(request)
    _require(request, navigation.WORKSPACE)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        await service.set_accepts_patients(repo, str(form.get("accepts") or "") == "1")
    return redirect(f"{PREFIX[navigation.WORKSPACE]}?done=settings_saved")


# -- JSON API ------------------------------------------------------------------------------------------------

def _json_errors(fn):  # type: ignore[no-untyped-def]
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except ParcoursError as e:
            return JSONResponse({"error": e.code, "message": e.message}, e.status, headers=e.headers or None)

    return wrapper


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("The body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    return body


@_json_errors
async def api_inbox(request: Request) -> Response:
    async with platform_of(request).transaction(caller_of(request)) as repo:
        items = await service.inbox(repo, patient=request.query_params.get("patient") or None)
    return JSONResponse({"conversations": [{
        "id": i.id, "topic": i.topic, "participants": [{"reference": r, "display": n} for r, n in i.participants],
        "patient": i.patient[0] if i.patient else None, "last_message_at": model.iso(i.last_message_at), "last_seq": i.last_seq,
        "last_read_seq": i.last_read_seq, "unread": i.unread, "muted": i.muted} for i in items]})


@_json_errors
async def api_start(request: Request) -> Response:
    body = await _body(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        started = await service.start_conversation(repo, to=[str(x) for x in body.get("to") or []], topic=str(body.get("topic") or ""),
                                                   text=str(body.get("text") or ""),
                                                   about=str(body["about"]) if body.get("about") else None,
                                                   max_attachment_bytes=_max(request))
    return JSONResponse({"id": started.conversation.id, "message": started.message.id if started.message else None}, 201)


@_json_errors
async def api_send(request: Request) -> Response:
    body = await _body(request)
    cid = request.path_params["cid"]
    async with platform_of(request).transaction(caller_of(request)) as repo:
        stored = await service.send(repo, cid, text=str(body.get("text") or ""),
                                    in_reply_to=str(body["in_reply_to"]) if body.get("in_reply_to") else None,
                                    max_attachment_bytes=_max(request))
        seq = service.number_of(repo, stored.id)
        if seq is None:
            seq = (await store.messages_by_id(repo.conn, [stored.id]))[0].seq
    return JSONResponse({"id": stored.id, "conversation": cid, "seq": seq, "sent": stored.resource().get("sent")}, 201)


@_json_errors
async def api_read(request: Request) -> Response:
    body = await _body(request)
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise BadRequest("seq must be a message number")
    async with platform_of(request).transaction(caller_of(request)) as repo:
        mark = await service.mark_read(repo, request.path_params["cid"], seq)
    return JSONResponse({"read": mark})


@_json_errors
async def api_mute(request: Request) -> Response:
    body = await _body(request)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        await service.mute(repo, request.path_params["cid"], bool(body.get("muted")))
    return JSONResponse({"muted": bool(body.get("muted"))})


@_json_errors
async def api_search(request: Request) -> Response:
    async with platform_of(request).transaction(caller_of(request)) as repo:
        hits = await service.search(repo, request.query_params.get("q") or "")
    return JSONResponse({"hits": [h.__dict__ for h in hits]})


def routes() -> list[Route]:
    out: list[Route] = []
    for space, prefix in PREFIX.items():
        out += [
            Route(prefix, _inbox_page(space), methods=["GET"]),
            Route(prefix + "/new", _new_page(space), methods=["GET"]),
            Route(prefix + "/new", _new_submit(space), methods=["POST"]),
            Route(prefix + "/attachments/{mid}/{n}", _attachment_get(space), methods=["GET"]),
            Route(prefix + "/{cid}", _conversation_page(space), methods=["GET"]),
            Route(prefix + "/{cid}/send", _send_submit(space), methods=["POST"]),
            Route(prefix + "/{cid}/mute", _mute_submit(space), methods=["POST"]),
            Route(prefix + "/{cid}/read", _json_errors(_read_submit(space)), methods=["POST"]),
        ]
    out += [
        Route(PREFIX[navigation.WORKSPACE] + "/attachments/{mid}/{n}/file", file_submit, methods=["POST"]),
        Route(PREFIX[navigation.WORKSPACE] + "/settings", settings_submit, methods=["POST"]),
        Route("/api/messaging/conversations", api_inbox, methods=["GET"]),
        Route("/api/messaging/conversations", api_start, methods=["POST"]),
        Route("/api/messaging/conversations/{cid}/messages", api_send, methods=["POST"]),
        Route("/api/messaging/conversations/{cid}/read", api_read, methods=["POST"]),
        Route("/api/messaging/conversations/{cid}/mute", api_mute, methods=["POST"]),
        Route("/api/messaging/search", api_search, methods=["GET"]),
    ]
    return out


def install(app: FastAPI) -> None:
    """Mount the messaging pages and API (their navigation items are available: no "coming soon" page)."""
    app.router.routes.extend(routes())


__all__ = ["install", "message_context", "routes", "PREFIX"]
