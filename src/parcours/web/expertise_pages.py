"""Tele-expertise pages of the professional workspace: the requester's and the expert's flows.

Thin adapters over ``services.telehealth.expertise`` (same rules as ``/api/telehealth/expertise``).
A form with a mistake comes back with what was typed and the error tied to its field; the
files have to be chosen again (browsers never refill a file input).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.core.errors import Forbidden, NotFound, ParcoursError
from parcours.fhir import fr_core
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.services.messaging import service as messaging
from parcours.services.records import documents, uploads
from parcours.services.telehealth import expertise
from parcours.store.repository import Repository
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import language, page, platform_of, redirect, render, require_space
from parcours.web.session import require_csrf

BASE = "/workspace/expertise"
MAX_FILES = 5
STATUSES = ("requested", "accepted", "in-progress", "completed", "rejected", "cancelled")
NOTICES = {"sent", "accepted", "rejected", "in-progress", "cancelled", "message", "opinion"}
PARIS = ZoneInfo("Europe/Paris")


def _require(request: Request) -> None:
    active = require_space(request, navigation.WORKSPACE)
    if active.account.role != "practitioner":
        raise Forbidden("Tele-expertise is for professionals")


def _when(value: str, lang: str) -> str:
    if not value:
        return ""
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        return value
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.astimezone(PARIS).strftime("%d/%m/%Y %H:%M" if lang == "fr" else "%Y-%m-%d %H:%M")


async def _names(repo: Repository, refs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ref in dict.fromkeys(r for r in refs if r and "/" in r):
        try:
            res = (await repo.read(*ref.split("/", 1))).resource()
        except ParcoursError:
            continue
        if res.get("resourceType") == "PractitionerRole":
            out[ref] = ((res.get("practitioner") or {}).get("display")) or ref
        else:
            out[ref] = fr_core.display_name(res) or ref
    return out


def _specialties(lang: str) -> list[tuple[str, str]]:
    return sorted(((c.code, c.label(lang)) for c in nomenclatures().specialties.active()), key=lambda x: x[1])


def _row(task: dict, names: dict[str, str], lang: str, now: datetime) -> dict:
    due = ((task.get("restriction") or {}).get("period") or {}).get("end") or ""
    overdue = bool(due) and task.get("status") not in expertise.TERMINAL and datetime.fromisoformat(due) < now
    code = expertise.pool_specialty(task)
    concept = nomenclatures().specialties.get(code) if code else None
    return {"id": task["id"], "status": task.get("status", ""), "priority": task.get("priority", "routine"),
            "question": (task.get("description") or "")[:120], "due": _when(due, lang), "overdue": overdue,
            "patient": names.get(((task.get("for") or {}).get("reference")) or "", ""),
            "requester": names.get(((task.get("requester") or {}).get("reference")) or "", ""),
            "expert": names.get(((task.get("owner") or {}).get("reference")) or "", ""),
            "pool": concept.label(lang) if concept else ""}


# -- lists -----------------------------------------------------------------------------------------

@page
async def home(request: Request) -> Response:
    _require(request)
    p = platform_of(request)
    lang = language(request)
    now = p.clock.now()
    async with p.transaction(caller_of(request)) as repo:
        lists = await expertise.lists(repo)
        refs = [((t.get(k) or {}).get("reference")) or "" for ts in lists.values() for t in ts for k in ("owner", "requester")]
        names = await _names(repo, refs)
        # Patients: only those the caller may read (the pool sees none before accepting).
        pats = await _names(repo, [((t.get("for") or {}).get("reference")) or "" for side in ("sent", "received") for t in lists[side]])
    names.update(pats)
    sections = {side: {"rows": [_row(t, names, lang, now) for t in ts], "counters": expertise.counters(ts, now)}
                for side, ts in lists.items()}
    done = request.query_params.get("done")
    return render(request, "expertise_home.html", current="expertise", sections=sections, statuses=STATUSES,
                  flash=f"exp.notice.{done}" if done in NOTICES else None)


# -- new request -----------------------------------------------------------------------------------

async def _new_form(request: Request, values: dict, errors: dict[str, str], status: int = 200, candidates: list | None = None) -> Response:
    p = platform_of(request)
    lang = language(request)
    async with p.transaction(caller_of(request)) as repo:
        found = await repo.search(repo.parse_search("Patient", [("_count", "100"), ("_sort", "family")]))
        patients = [(f"Patient/{m.id}", fr_core.display_name(m.resource())) for m in found.matches]
        expert_name = (await _names(repo, [values["expert"]])).get(values["expert"], "") if values.get("expert") else ""
    return render(request, "expertise_new.html", status, current="expertise", values=values, errors=errors,
                  patients=patients, specialties=_specialties(lang), candidates=candidates, expert_name=expert_name,
                  max_kib=p.settings.record_max_upload_bytes // 1024, max_files=MAX_FILES)


def _defaults(now: datetime) -> dict:
    return {"patient": "", "target": "expert", "expert": "", "expert_q": "", "specialty": "", "question": "",
            "priority": "routine", "due": (now + timedelta(days=7)).astimezone(PARIS).strftime("%Y-%m-%dT%H:%M"), "consent": False}


@page
async def new_page(request: Request) -> Response:
    _require(request)
    values = _defaults(platform_of(request).clock.now())
    if (pat := request.query_params.get("patient")):
        values["patient"] = pat if pat.startswith("Patient/") else f"Patient/{pat}"
    return await _new_form(request, values, {})


@page
async def new_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    _require(request)
    p = platform_of(request)
    now = p.clock.now()
    values = {**_defaults(now), **{k: str(form.get(k) or "").strip() for k in
                                   ("patient", "target", "expert", "expert_q", "specialty", "question", "priority", "due")},
              "consent": form.get("consent") == "1"}
    if form.get("action") == "search":
        async with p.transaction(caller_of(request)) as repo:
            candidates = await messaging.find_professionals(repo, values["expert_q"])
        return await _new_form(request, {**values, "target": "expert"}, {}, candidates=candidates)
    errors: dict[str, str] = {}
    if not values["patient"]:
        errors["patient"] = "exp.error.patient"
    if values["target"] == "pool":
        if not values["specialty"] or nomenclatures().specialties.get(values["specialty"]) is None:
            errors["specialty"] = "exp.error.specialty"
    elif not values["expert"]:
        errors["expert"] = "exp.error.expert"
    if not values["question"]:
        errors["question"] = "exp.error.question"
    if values["priority"] not in expertise.PRIORITIES:
        errors["priority"] = "exp.error.priority"
    due = None
    try:
        due = datetime.fromisoformat(values["due"])
        due = due.replace(tzinfo=PARIS) if due.tzinfo is None else due
        if due <= now:
            errors["due"] = "exp.error.due_past"
    except ValueError:
        errors["due"] = "exp.error.due"
    if not values["consent"]:
        errors["consent"] = "exp.error.consent"
    files: list[expertise.Attachment] = []
    limit = p.settings.record_max_upload_bytes
    chosen = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
    if len(chosen) > MAX_FILES:
        errors["files"] = "exp.error.too_many"
    else:
        for f in chosen:
            data = await f.read(limit + 1)
            try:
                checked = await documents.check(p, uploads.scanner_for(p.settings.record_clamd_socket), data, f.filename)
            except ParcoursError as e:
                errors["files"] = "exp.error.file"
                values["file_detail"] = f"{f.filename}: {e.message}"
                break
            files.append(expertise.Attachment(f.filename or "Pièce jointe", data, checked))
    if errors:
        return await _new_form(request, values, errors, 422)
    assert due is not None
    try:
        async with p.transaction(caller_of(request)) as repo:
            task = await expertise.request_opinion(
                p, repo, patient=values["patient"], expert=values["expert"] if values["target"] != "pool" else None,
                specialty=values["specialty"] if values["target"] == "pool" else None, question=values["question"],
                priority=values["priority"], due=due, consent=True, now=now, attachments=files)
    except (NotFound, Forbidden) as e:
        values["file_detail"] = e.message
        return await _new_form(request, values, {"form": "exp.error.refused"}, 422)
    return redirect(f"{BASE}/{task}?done=sent")


async def _readable(coro: Any, default: Any) -> Any:
    try:
        return await coro
    except (Forbidden, NotFound):
        return default


async def _attachments(repo: Repository, task: dict) -> list[dict]:
    focus = ((task.get("focus") or {}).get("reference")) or ""
    sr = (await repo.read(*focus.split("/", 1))).resource()
    out = []
    for info in sr.get("supportingInfo") or []:
        ref = info.get("reference") or ""
        if ref.startswith("DocumentReference/"):
            doc = (await repo.read("DocumentReference", ref.split("/", 1)[1])).resource()
            att = (doc.get("content") or [{}])[0].get("attachment") or {}
            # The content lives in the record's encrypted blob store: the page shows it through
            # the record's content route (read again through the Repository, audited).
            url = documents.content_path(att.get("url")) or None
            image = str(att.get("contentType", "")).startswith("image/") and url
            out.append({"title": att.get("title") or doc.get("description") or "", "type": att.get("contentType", ""),
                        "src": f"{url}?inline=1" if image else None, "url": url, "id": doc.get("id")})
    return out


async def _opinion(repo: Repository, task: dict) -> tuple[str | None, expertise.Opinion | None]:
    for out in task.get("output") or []:
        ref = ((out.get("valueReference") or {}).get("reference")) or ""
        if ref.startswith("DocumentReference/"):
            doc = (await repo.read("DocumentReference", ref.split("/", 1)[1])).resource()
            att = (doc.get("content") or [{}])[0].get("attachment") or {}
            return doc.get("id"), expertise.opinion_of(doc) or expertise.Opinion(
                conclusion=base64.b64decode(att.get("data", "")).decode("utf-8", "replace"))
    return None, None


# -- one request -----------------------------------------------------------------------------------

async def _detail(request: Request, *, errors: dict[str, str] | None = None, values: dict | None = None, status: int = 200) -> Response:
    p = platform_of(request)
    lang = language(request)
    task_id = request.path_params["task_id"]
    async with p.transaction(caller_of(request)) as repo:
        task, party = await expertise.access_task(repo, task_id)
        steps = await expertise.timeline(repo, task_id)
        messages, attachments, opinion, opinion_id, patient_name = [], [], None, None, ""
        if party != "pool":
            # Once closed, the expert's care relationship ends (``store.care``): what the record no
            # longer lets them read is left out rather than failing the page.
            messages = await _readable(expertise.thread(repo, task_id), [])
            attachments = await _readable(_attachments(repo, task), [])
            opinion_id, opinion = await _readable(_opinion(repo, task), (None, None))
        refs = [((task.get(k) or {}).get("reference")) or "" for k in ("owner", "requester", "for")]
        refs += [((m.get("sender") or {}).get("reference")) or "" for m in messages]
        names = await _names(repo, refs) if party != "pool" else await _names(repo, refs[:2])
        patient_name = names.get(((task.get("for") or {}).get("reference")) or "", "")
    row = {**_row(task, names, lang, p.clock.now()), "question_full": task.get("description") or ""}
    actions = [to for to, who in expertise.TRANSITIONS.get(task.get("status", ""), {}).items()
               if to != "completed" and (who == party or (party == "pool" and to == "accepted"))]
    thread = [{"mine": ((m.get("sender") or {}).get("reference")) == caller_of(request).fhir_user,
               "who": names.get(((m.get("sender") or {}).get("reference")) or "", ""), "when": _when(m.get("sent", ""), lang),
               "text": ((m.get("payload") or [{}])[0]).get("contentString", "")} for m in messages]
    done = request.query_params.get("done")
    return render(request, "expertise_detail.html", status, current="expertise", task=row, party=party, steps=[
        {**s, "at": _when(s["at"], lang)} for s in steps], thread=thread, attachments=attachments, opinion=opinion,
        opinion_id=opinion_id, patient_id=((task.get("for") or {}).get("reference") or "").removeprefix("Patient/"),
        patient_name=patient_name, actions=actions, open=task.get("status") not in expertise.TERMINAL,
        errors=errors or {}, values=values or {}, flash=f"exp.notice.{done}" if done in NOTICES else None)


@page
async def detail_page(request: Request) -> Response:
    _require(request)
    return await _detail(request)


@page
async def status_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    _require(request)
    p = platform_of(request)
    to, reason = str(form.get("status") or ""), str(form.get("reason") or "").strip()
    if to == "rejected" and not reason:
        return await _detail(request, errors={"reason": "exp.error.reason"}, values={"reason": reason}, status=422)
    try:
        async with p.transaction(caller_of(request)) as repo:
            await expertise.transition(repo, request.path_params["task_id"], to, p.clock.now(), reason=reason or None)
    except ParcoursError as e:
        if e.status == 409:
            return await _detail(request, errors={"status": "exp.error.taken" if "already taken" in e.message else "exp.error.transition"},
                                 status=409)
        raise
    return redirect(f"{BASE}/{request.path_params['task_id']}?done={to}")


@page
async def message_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    _require(request)
    p = platform_of(request)
    text = str(form.get("text") or "").strip()
    if not text:
        return await _detail(request, errors={"text": "exp.error.message"}, status=422)
    try:
        async with p.transaction(caller_of(request)) as repo:
            await expertise.ask(repo, request.path_params["task_id"], text, p.clock.now())
    except ParcoursError as e:
        if e.status == 409:
            return await _detail(request, errors={"text": "exp.error.closed"}, values={"text": text}, status=409)
        raise
    return redirect(f"{BASE}/{request.path_params['task_id']}?done=message#thread")


@page
async def opinion_submit(request: Request) -> Response:
    form = await require_csrf(request)  # first: the session Caller of a POST needs the CSRF check done
    _require(request)
    p = platform_of(request)
    values: dict[str, Any] = {k: str(form.get(k) or "").strip() for k in ("conclusion", "recommendations", "follow_up")}
    values["consultation"] = str(form.get("consultation") or "")
    errors = {}
    if not values["conclusion"]:
        errors["conclusion"] = "exp.error.conclusion"
    if values["consultation"] not in ("yes", "no"):
        errors["consultation"] = "exp.error.consultation"
    if errors:
        return await _detail(request, errors=errors, values=values, status=422)
    opinion = expertise.Opinion(conclusion=values["conclusion"], recommendations=values["recommendations"],
                                consultation_needed=values["consultation"] == "yes", follow_up=values["follow_up"])
    try:
        async with p.transaction(caller_of(request)) as repo:
            await expertise.answer(repo, request.path_params["task_id"], opinion, p.clock.now())
    except ParcoursError as e:
        if e.status == 409:
            return await _detail(request, errors={"conclusion": "exp.error.not_started"}, values=values, status=409)
        raise
    return redirect(f"{BASE}/{request.path_params['task_id']}?done=opinion")


def routes() -> list[Route]:
    return [
        Route(BASE, home),
        Route(BASE + "/new", new_page),
        Route(BASE + "/new", new_submit, methods=["POST"]),
        Route(BASE + "/{task_id}", detail_page),
        Route(BASE + "/{task_id}/status", status_submit, methods=["POST"]),
        Route(BASE + "/{task_id}/messages", message_submit, methods=["POST"]),
        Route(BASE + "/{task_id}/opinion", opinion_submit, methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())


__all__ = ["install", "routes"]
