"""Pages of the shared record: the patient's documents, results (trend charts), timeline and
summary, for patients in the portal and for professionals in the workspace; the patient
list of professionals; the lab results reconciliation queue of operators.

Thin adapters like ``web.pages``: the caller comes from ``caller_of``, every form passes
``require_csrf``, the rules live in ``services.records``, errors become pages. Everything
works without JavaScript; charts are SVG drawn on the server with a table beside them.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.core.errors import BadRequest, Forbidden, NotFound
from parcours.security.caller import Caller
from parcours.services.records import codes, documents, labs, results, timeline, uploads
from parcours.store import records as record_store
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import language, page, platform_of, redirect, render, require_full, require_space, safe_next
from parcours.web.record_api import FORM_OVERHEAD, content_response, new_document, parse_day, read_body, signed_in
from parcours.web.session import active_session, require_csrf

NOTICES = frozenset({"uploaded", "duplicate", "hidden", "shown", "retracted", "erased", "assigned", "rejected", "replaced"})
HEAD = '<link rel="stylesheet" href="/static/record.css">'


def _space(request: Request) -> str:
    from parcours.security import roles

    active = active_session(request)
    assert active is not None
    return roles.role(active.account.role).space


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done")
    return f"record_{done}" if done in NOTICES else None


def _fmt_date(value: str | date | None, lang: str) -> str:
    if not value:
        return ""
    if isinstance(value, str):
        value = timeline.day_of(value) or value  # type: ignore[assignment]
        if isinstance(value, str):
            return value
    months = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre",
              "décembre") if lang == "fr" else ("January", "February", "March", "April", "May", "June", "July", "August",
                                                  "September", "October", "November", "December")
    return f"{value.day} {months[value.month - 1]} {value.year}"


def _name(patient: dict) -> str:
    n = (patient.get("name") or [{}])[0]
    return " ".join([*(n.get("given") or []), str(n.get("family") or "")]).strip() or patient.get("id", "")


async def _own_patient(repo, caller: Caller, wanted: str | None = None) -> str:  # type: ignore[no-untyped-def]
    """The patient whose record a patient or proxy sees: their own, or one they represent."""
    ctx = await repo.care()
    ids = sorted(p.split("/", 1)[1] for p in ctx.patients)
    if not ids:
        raise Forbidden("Your account is linked to no patient record")
    if wanted:
        if wanted not in ids:
            raise Forbidden("You do not represent this patient")
        return wanted
    if caller.fhir_user and caller.fhir_user.startswith("Patient/") and caller.fhir_user.split("/", 1)[1] in ids:
        return caller.fhir_user.split("/", 1)[1]
    return ids[0]


def _base(request: Request, pid: str) -> str:
    return "/portal/records" if _space(request) == navigation.PORTAL else f"/workspace/patients/{pid}"


async def _context(request: Request, repo, pid: str, tab: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    patient = (await repo.read("Patient", pid)).resource()
    portal = _space(request) == navigation.PORTAL
    lang = language(request)
    base = _base(request, pid)
    return {"patient": patient, "patient_name": _name(patient), "pid": pid, "tab": tab, "portal": portal, "base": base,
            "tabs": [("documents", base), ("results", base + "/results"), ("timeline", base + "/timeline")],
            "summary_url": f"/record/{pid}/summary.pdf?lang={lang}", "fmt_date": lambda v: _fmt_date(v, lang), "lang": lang,
            "current": "records" if portal else "patients", "head": HEAD}


async def _patient_of_request(request: Request, repo, caller: Caller) -> str:  # type: ignore[no-untyped-def]
    if _space(request) == navigation.PORTAL:
        return await _own_patient(repo, caller, request.query_params.get("patient"))
    return str(request.path_params["pid"])


# -- documents ------------------------------------------------------------------------------------------

def _doc_view(d: dict, lang: str, me: str | None) -> dict[str, Any]:
    att = (d.get("content") or [{}])[0].get("attachment") or {}
    type_code = ((d.get("type") or {}).get("coding") or [{}])[0].get("code")
    authors = [a.get("display") or a.get("reference") or "" for a in d.get("author") or []]
    return {"id": d["id"], "title": d.get("description") or codes.type_label(type_code, lang),
            "type": codes.type_label(type_code, lang) or (d.get("type") or {}).get("text", ""),
            "care": ((d.get("context") or {}).get("period") or {}).get("start") or d.get("date"), "status": d.get("status"),
            "hidden": documents.hidden(d), "url": documents.content_path(att.get("url")),
            "content_type": att.get("contentType", ""), "size": att.get("size"), "mine": bool(me and any(
                (a or {}).get("reference") == me for a in d.get("author") or [])), "authors": authors,
            "conf": (((d.get("securityLabel") or [{}])[0].get("coding") or [{}])[0]).get("code", "N")}


@page
async def documents_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    platform = platform_of(request)
    lang = language(request)
    q = (request.query_params.get("q") or "").strip()
    show_old = request.query_params.get("all") == "1"
    async with platform.transaction(caller) as repo:
        pid = await _patient_of_request(request, repo, caller)
        ctx = await _context(request, repo, pid, "documents")
        docs = await documents.list_documents(repo, pid, query=q or None, include_old=show_old)
        notices = []
        orgs: list[tuple[str, str]] = []
        if ctx["portal"]:
            notices = await record_store.notices_of(repo.conn, f"Patient/{pid}", unseen_only=True)
            await record_store.notices_seen(repo.conn, f"Patient/{pid}", platform.clock.now())
        elif caller.fhir_user:
            roles_ = await repo.search(repo.parse_search("PractitionerRole", [
                ("practitioner", caller.fhir_user), ("_include", "PractitionerRole:organization")]))
            orgs = sorted({(f"Organization/{s.id}", s.resource().get("name", s.id)) for s in roles_.includes
                           if s.resource_type == "Organization"})
    views = [_doc_view(d, lang, caller.fhir_user) for d in docs]
    return render(request, "record_documents.html", notice=_notice(request), docs=views, q=q, show_old=show_old,
                  new_count=len(notices), doc_types=codes.DOC_TYPES, settings=codes.PRACTICE_SETTINGS,
                  levels=codes.CONFIDENTIALITY_LEVELS, orgs=orgs, max_mb=platform.settings.record_max_upload_bytes // (1024 * 1024),
                  access_history="/portal/access-history" if ctx["portal"] else None, error=None,
                  upload_action=f"/record/{pid}/documents", replaces=request.query_params.get("replaces") or "", **ctx)


@page
async def upload_submit(request: Request) -> Response:
    platform = platform_of(request)
    signed_in(request)  # before reading what may be 20 MiB
    await read_body(request, platform.settings.record_max_upload_bytes + FORM_OVERHEAD)
    form = await require_csrf(request)
    require_full(request)
    caller = caller_of(request)
    pid = request.path_params["pid"]
    file = form.get("file")
    if not isinstance(file, UploadFile) or not file.filename:
        raise BadRequest("Choose a file to add")
    data = await file.read()
    fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
    new = new_document(pid, data, file.filename, fields)
    new.language = language(request)
    back = safe_next(fields.get("next")) or _base(request, pid)
    checked = await documents.check(platform, uploads.scanner_for(platform.settings.record_clamd_socket), data, file.filename)
    async with platform.transaction(caller) as repo:
        added = await documents.add(platform, repo, new, scanner=uploads.NoScanner(), checked=checked)
    done = "duplicate" if added.duplicate else ("replaced" if added.superseded else "uploaded")
    return redirect(f"{back}?{urlencode({'done': done})}")


def _doc_form_action(kind: str) -> Any:
    @page
    async def action(request: Request) -> Response:
        form = await require_csrf(request)
        require_full(request)
        platform = platform_of(request)
        doc_id = request.path_params["id"]
        purge: list[str] = []
        async with platform.transaction(caller_of(request)) as repo:
            if kind in ("hide", "show"):
                await documents.set_hidden(repo, doc_id, kind == "hide")
            elif kind == "retract":
                await documents.retract(repo, doc_id)
            else:
                purge = await documents.erase(platform, repo, doc_id)
        if purge:
            await documents.blobs_of(platform).purge(purge)
        done = {"hide": "hidden", "show": "shown", "retract": "retracted", "erase": "erased"}[kind]
        return redirect(f"{safe_next(str(form.get('next', ''))) or '/'}?done={done}")

    return action


@page
async def content_page(request: Request) -> Response:
    """A document's content opened from a page (same checks as the API: read through the Repository)."""
    require_full(request)
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        content = await documents.open_content(platform, repo, request.path_params["blob"])
    return content_response(content, inline=request.query_params.get("inline") == "1")


# -- results --------------------------------------------------------------------------------------------

@page
async def results_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    platform = platform_of(request)
    lang = language(request)
    async with platform.transaction(caller) as repo:
        pid = await _patient_of_request(request, repo, caller)
        ctx = await _context(request, repo, pid, "results")
        series = await results.series_of(repo, pid)
    pages_ = request.app.state.pages
    from parcours.web import i18n

    t = i18n.Translator(lang, pages_.catalogs)
    charts = []
    for s in series:
        low, high = s.range
        rng = t("record.results.range", low=_num(low), high=_num(high), unit=s.unit) if (low is not None or high is not None) else ""
        last = s.latest
        desc = t("record.results.chart_desc", n=len(s.points), last=_num(last.value) if last else "", unit=s.unit, range=rng)
        charts.append({"series": s, "svg": results.svg(s, title=s.label, description=desc), "range": rng})
    return render(request, "record_results.html", charts=charts, fmt_num=_num, **ctx)


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:g}"


# -- timeline -------------------------------------------------------------------------------------------

@page
async def timeline_page(request: Request) -> Response:
    require_full(request)
    caller = caller_of(request)
    platform = platform_of(request)
    qp = request.query_params
    zoom = qp.get("zoom") if qp.get("zoom") in timeline.ZOOMS else "year"
    chosen = [c for c in qp.getlist("category") if c in timeline.CATEGORIES]
    async with platform.transaction(caller) as repo:
        pid = await _patient_of_request(request, repo, caller)
        ctx = await _context(request, repo, pid, "timeline")
        evs = await timeline.events(repo, pid, chosen or None)
    today = platform.clock.now().date()
    default = evs[0].day if evs else today
    at = parse_day(qp.get("at"), default)
    shown = timeline.in_window(evs, zoom, at)
    bars = timeline.overview(evs, zoom, at)
    peak = max([sum(c.values()) for _, _, c in bars] + [1])
    base = ctx["base"] + "/timeline"

    def link(**kw: Any) -> str:
        params: list[tuple[str, str]] = [("zoom", kw.get("zoom", zoom)), ("at", kw.get("at", at).isoformat())]
        params += [("category", c) for c in kw.get("category", chosen)]
        if ctx["portal"] and qp.get("patient"):
            params.append(("patient", qp["patient"]))
        return base + "?" + urlencode(params)

    zoom_in = {"year": "month", "month": "day", "day": "day"}[zoom]
    return render(request, "record_timeline.html", zoom=zoom, at=at, chosen=chosen, categories=list(timeline.CATEGORIES),
                  events=shown[:500], more=max(0, len(shown) - 500), total=len(evs), bars=bars, peak=peak, link=link,
                  prev=timeline.step(zoom, at, -1), next_=timeline.step(zoom, at, 1), zoom_in=zoom_in,
                  window_label=_window_label(zoom, at, ctx["lang"]), **ctx)


def _window_label(zoom: str, at: date, lang: str) -> str:
    if zoom == "year":
        return str(at.year)
    if zoom == "month":
        return _fmt_date(at, lang).split(" ", 1)[1]
    return _fmt_date(at, lang)


@page
async def item_page(request: Request) -> Response:
    """One event of the timeline opened: the resource's main facts, the content of a document."""
    require_full(request)
    caller = caller_of(request)
    platform = platform_of(request)
    rtype, rid, pid = request.path_params["rtype"], request.path_params["id"], request.path_params["pid"]
    if rtype not in timeline.CATEGORY_OF:
        raise NotFound(f"No {rtype} in the record's timeline")
    async with platform.transaction(caller) as repo:
        if _space(request) == navigation.PORTAL:
            pid = await _own_patient(repo, caller, pid)
        ctx = await _context(request, repo, pid, "timeline")
        stored = await repo.read(rtype, rid)
        res = stored.resource()
        if f"Patient/{pid}" not in str(res.get("subject") or res.get("patient") or res.get("participant") or ""):
            raise NotFound(f"{rtype}/{rid} is not in this record")
        linked: list[dict] = []
        if rtype == "DiagnosticReport":
            for ref in res.get("result") or []:
                try:
                    linked.append((await repo.read("Observation", str(ref.get("reference", "")).split("/", 1)[-1])).resource())
                except (Forbidden, NotFound):
                    continue
    lang = ctx["lang"]
    title, detail = timeline.title_of(rtype, res)
    facts = _facts(rtype, res, lang)
    doc = _doc_view(res, lang, caller.fhir_user) if rtype == "DocumentReference" else None
    return render(request, "record_item.html", rtype=rtype, res=res, title=title or rtype, detail=detail, facts=facts, doc=doc,
                  linked=[{"title": timeline.title_of("Observation", o)[0], "value": timeline.title_of("Observation", o)[1],
                           "range": ((o.get("referenceRange") or [{}])[0]).get("text", ""),
                           "flag": (((o.get("interpretation") or [{}])[0].get("coding") or [{}])[0]).get("code", "")}
                          for o in linked], category=timeline.CATEGORY_OF[rtype], **ctx)


def _facts(rtype: str, r: dict, lang: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    when = timeline.when_of(rtype, r)
    if when:
        out.append(("record.item.when", _fmt_date(when, lang) + (f" {when[11:16]}" if "T" in when else "")))
    if r.get("status"):
        out.append(("record.item.status", str(r["status"])))
    for key, label in (("performer", "record.item.by"), ("author", "record.item.by"), ("participant", "record.item.with")):
        names = [str((x.get("individual") or x).get("display") or "") for x in r.get(key) or [] if isinstance(x, dict)]
        names = [n for n in names if n]
        if names:
            out.append((label, ", ".join(names)))
            break
    return out


# -- summary ---------------------------------------------------------------------------------------------

@page
async def summary_page(request: Request) -> Response:
    require_full(request)
    from parcours.services.records import summary

    caller = caller_of(request)
    platform = platform_of(request)
    async with platform.transaction(caller) as repo:
        pid = request.path_params["pid"]
        if _space(request) == navigation.PORTAL:
            pid = await _own_patient(repo, caller, pid)
        pdf, filename = await summary.summary_pdf(repo, pid, lang=language(request), now=platform.clock.now())
    return Response(pdf, 200, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# -- professionals: their patients ------------------------------------------------------------------------

@page
async def patients_page(request: Request) -> Response:
    active = require_space(request, navigation.WORKSPACE)
    if active.account.role != "practitioner":
        raise Forbidden("The patient list is for professionals")
    caller = caller_of(request)
    q = (request.query_params.get("q") or "").strip()
    items = [("_count", "50"), ("_sort", "family")]
    if q:
        items.append(("identifier", q) if q.isdigit() else ("name", q))
    async with platform_of(request).transaction(caller) as repo:
        res = await repo.search(repo.parse_search("Patient", items))
    lang = language(request)
    rows = [{"id": m.id, "name": _name(m.resource()), "birth": _fmt_date(m.resource().get("birthDate"), lang)} for m in res.matches]
    return render(request, "record_patients.html", patients=rows, q=q, current="patients", head=HEAD)


# -- operators: the reconciliation queue -----------------------------------------------------------------

@page
async def inbox_page(request: Request) -> Response:
    require_space(request, navigation.WORKSPACE)
    caller = caller_of(request)
    if not labs.may_reconcile(caller):
        raise Forbidden("The lab messages waiting for reconciliation are handled by operators")
    platform = platform_of(request)
    q = (request.query_params.get("q") or "").strip()
    candidates: list[dict] = []
    async with platform.transaction(caller) as repo:
        items = await labs.inbox(repo)
        if q:
            res = await repo.search(repo.parse_search("Patient", [("identifier" if q.isdigit() else "name", q), ("_count", "10")]))
            lang = language(request)
            candidates = [{"id": m.id, "name": _name(m.resource()), "birth": _fmt_date(m.resource().get("birthDate"), lang),
                           "ins": next((i.get("value") for i in m.resource().get("identifier") or []
                                        if "1.2.250.1.213.1.4" in str(i.get("system"))), "")} for m in res.matches]
    return render(request, "record_inbox.html", items=items, q=q, candidates=candidates, notice=_notice(request),
                  current="lab_inbox", head=HEAD, fmt_time=lambda d: d.strftime("%Y-%m-%d %H:%M"))


def _inbox_action(kind: str) -> Any:
    @page
    async def action(request: Request) -> Response:
        form = await require_csrf(request)
        require_space(request, navigation.WORKSPACE)
        platform = platform_of(request)
        async with platform.transaction(caller_of(request)) as repo:
            if kind == "assign":
                pid = str(form.get("patient", "")).strip()
                if not pid:
                    raise BadRequest("Choose the patient")
                await labs.assign(platform, repo, int(request.path_params["id"]), pid)
            else:
                await labs.reject(platform, repo, int(request.path_params["id"]), str(form.get("reason", "")))
        return redirect(f"/workspace/lab-inbox?done={'assigned' if kind == 'assign' else 'rejected'}")

    return action


def routes() -> list[Route]:
    return [
        Route("/portal/records", documents_page, methods=["GET"]),
        Route("/portal/records/results", results_page, methods=["GET"]),
        Route("/portal/records/timeline", timeline_page, methods=["GET"]),
        Route("/workspace/patients", patients_page, methods=["GET"]),
        Route("/workspace/patients/{pid}", documents_page, methods=["GET"]),
        Route("/workspace/patients/{pid}/results", results_page, methods=["GET"]),
        Route("/workspace/patients/{pid}/timeline", timeline_page, methods=["GET"]),
        Route("/record/{pid}/documents", upload_submit, methods=["POST"]),
        Route("/record/{pid}/items/{rtype}/{id}", item_page, methods=["GET"]),
        Route("/record/{pid}/summary.pdf", summary_page, methods=["GET"]),
        Route("/record/content/{blob}", content_page, methods=["GET"]),
        Route("/record/documents/{id}/hide", _doc_form_action("hide"), methods=["POST"]),
        Route("/record/documents/{id}/show", _doc_form_action("show"), methods=["POST"]),
        Route("/record/documents/{id}/retract", _doc_form_action("retract"), methods=["POST"]),
        Route("/record/documents/{id}/erase", _doc_form_action("erase"), methods=["POST"]),
        Route("/workspace/lab-inbox", inbox_page, methods=["GET"]),
        Route("/workspace/lab-inbox/{id:int}/assign", _inbox_action("assign"), methods=["POST"]),
        Route("/workspace/lab-inbox/{id:int}/reject", _inbox_action("reject"), methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    """Mount the record pages; ``web.pages`` must be installed after, or its "coming soon"
    routes for the same paths must be gone (the navigation items are available)."""
    app.router.routes[:0] = routes()


__all__ = ["install", "routes"]
