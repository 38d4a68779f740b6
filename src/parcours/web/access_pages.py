"""Pages of access control: the patient's access history ("who accessed my record"), the
patient's privacy choices (documents hidden from professionals, blocked professionals),
and the professionals' emergency access with its patient lookup.

Thin adapters over ``services.access``: each request runs in one transaction of the
signed-in caller (``Platform.transaction``: policy and audit in the Repository);
every form passes ``require_csrf``. ``install(app)`` adds the routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.core.errors import BadRequest, Forbidden, NotFound
from parcours.services import access
from parcours.web import navigation
from parcours.web.auth import caller_of
from parcours.web.pages import Pages, language, page, platform_of, redirect, render, require_space
from parcours.web.session import require_csrf

PARIS = ZoneInfo("Europe/Paris")
# Messages a redirect may ask these pages to show (?done=...): only these keys.
NOTICES = frozenset({"emergency_granted", "document_hidden", "document_shown", "professional_blocked", "professional_unblocked"})


def _labels(request: Request) -> Any:
    """``label(prefix, value)``: the text of ``prefix.value`` when the catalog has one, else ``value``."""
    pages: Pages = request.app.state.pages
    catalog = pages.catalogs.get(language(request), {})

    def label(prefix: str, value: str) -> str:
        return catalog.get(f"{prefix}.{value}", value)

    return label


def _when(request: Request) -> Any:
    fmt = "%d/%m/%Y %H:%M" if language(request) == "fr" else "%Y-%m-%d %H:%M"

    def when(value: str | datetime | None) -> str:
        if not value:
            return ""
        dt = datetime.fromisoformat(value) if isinstance(value, str) else value
        return dt.astimezone(PARIS).strftime(fmt)

    return when


def _notice(request: Request) -> str | None:
    done = request.query_params.get("done")
    return done if done in NOTICES else None


# -- patient portal: who accessed my record ---------------------------------------------------------

@page
async def access_history_page(request: Request) -> Response:
    require_space(request, navigation.PORTAL)
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        entries = await access.access_history(platform, repo)
    return render(request, "access_history.html", entries=entries, current="access_history", label=_labels(request),
                  when=_when(request))


# -- patient portal: hidden documents, blocked professionals -------------------------------------------

async def _privacy_page(request: Request, status: int = 200, error: str | None = None) -> Response:
    active = require_space(request, navigation.PORTAL)
    if active.account.role != "patient":
        raise Forbidden("These choices are the patient's")
    platform = platform_of(request)
    async with platform.transaction(caller_of(request)) as repo:
        documents = await access.my_documents(repo)
        blocks = await access.blocks(repo)
        history = await access.access_history(platform, repo)
    blocked = {b.practitioner for b in blocks}
    seen: dict[str, str] = {}
    for e in history:
        if e.who_ref and e.who_ref.startswith("Practitioner/") and e.who_ref not in blocked:
            seen.setdefault(e.who_ref, e.who)
    return render(request, "privacy.html", status, documents=documents, blocks=blocks, candidates=sorted(seen.items(), key=lambda x: x[1]),
                  current="privacy", when=_when(request), notice=_notice(request), error=error)


@page
async def privacy_page(request: Request) -> Response:
    return await _privacy_page(request)


@page
async def document_visibility(request: Request) -> Response:
    form = await require_csrf(request)
    require_space(request, navigation.PORTAL)
    hidden = str(form.get("hidden", "")) == "1"
    async with platform_of(request).transaction(caller_of(request)) as repo:
        await access.do_set_hidden(repo, request.path_params["doc_id"], hidden)
    return redirect("/portal/privacy?done=" + ("document_hidden" if hidden else "document_shown") + "#documents")


@page
async def block_professional(request: Request) -> Response:
    form = await require_csrf(request)
    require_space(request, navigation.PORTAL)
    practitioner = str(form.get("practitioner", "")).strip()
    rpps = str(form.get("rpps", "")).strip()
    try:
        async with platform_of(request).transaction(caller_of(request)) as repo:
            if not practitioner and rpps:
                practitioner = f"Practitioner/{(await access.find_practitioner(repo, rpps)).id}"
            if not practitioner:
                raise BadRequest("Choose a professional or give their RPPS number")
            await access.do_block(repo, practitioner)
    except NotFound:
        return await _privacy_page(request, 404, error="access.block.not_found")
    except BadRequest:
        return await _privacy_page(request, 400, error="access.block.choose")
    return redirect("/portal/privacy?done=professional_blocked#blocks")


@page
async def unblock_professional(request: Request) -> Response:
    await require_csrf(request)
    require_space(request, navigation.PORTAL)
    async with platform_of(request).transaction(caller_of(request)) as repo:
        await access.do_unblock(repo, request.path_params["consent_id"])
    return redirect("/portal/privacy?done=professional_unblocked#blocks")


# -- professional workspace: emergency access ---------------------------------------------------------

async def _emergency_page(request: Request, status: int = 200, *, query: str = "", error: str | None = None,
                          failed_patient: str | None = None, reason: str = "") -> Response:
    active = require_space(request, navigation.WORKSPACE)
    if active.account.role != "practitioner":
        raise Forbidden("Emergency access is for health professionals")
    platform = platform_of(request)
    matches: list[access.PatientMatch] = []
    if query:
        async with platform.transaction(caller_of(request)) as repo:
            matches = await access.find_patients(platform, repo, query)
    until = request.query_params.get("until")
    return render(request, "emergency_access.html", status, query=query, matches=matches, searched=bool(query),
                  minutes=access.MINUTES_CHOICES, default_minutes=access.DEFAULT_MINUTES, current="emergency",
                  notice=_notice(request), granted=request.query_params.get("patient"), until=until, when=_when(request),
                  error=error, failed_patient=failed_patient, reason=reason)


@page
async def emergency_page(request: Request) -> Response:
    return await _emergency_page(request, query=request.query_params.get("q", "").strip()[:100])


@page
async def emergency_submit(request: Request) -> Response:
    form = await require_csrf(request)
    require_space(request, navigation.WORKSPACE)
    query = str(form.get("q", "")).strip()[:100]
    patient = str(form.get("patient", "")).strip()
    reason = str(form.get("reason", ""))
    try:
        minutes = int(str(form.get("minutes", access.DEFAULT_MINUTES)))
    except ValueError:
        minutes = access.DEFAULT_MINUTES
    try:
        async with platform_of(request).transaction(caller_of(request)) as repo:
            until = await access.do_emergency_access(repo, patient, reason, minutes)
    except BadRequest:
        return await _emergency_page(request, 400, query=query, error="access.emergency.reason_needed", failed_patient=patient,
                                     reason=reason)
    return redirect("/workspace/emergency-access?" + urlencode(
        {"q": query, "done": "emergency_granted", "patient": patient, "until": until.isoformat()}))


def routes() -> list[Route]:
    return [
        Route("/portal/access-history", access_history_page, methods=["GET"]),
        Route("/portal/privacy", privacy_page, methods=["GET"]),
        Route("/portal/privacy/documents/{doc_id}", document_visibility, methods=["POST"]),
        Route("/portal/privacy/block", block_professional, methods=["POST"]),
        Route("/portal/privacy/blocks/{consent_id}/end", unblock_professional, methods=["POST"]),
        Route("/workspace/emergency-access", emergency_page, methods=["GET"]),
        Route("/workspace/emergency-access", emergency_submit, methods=["POST"]),
    ]


def install(app: FastAPI) -> None:
    app.router.routes.extend(routes())


__all__ = ["install", "routes"]
