"""SMART on FHIR at the HTTP edge: discovery documents, the authorization endpoint and its
consent page, the token, revocation and introspection endpoints, the key set, and the
administrators' page to register client applications.

Thin adapters over ``services.smart``: each request gets one transaction; OAuth
answers (JSON or redirects) are Authlib's, pages are rendered like the others.
``install(app)`` mounts everything and keeps the revoked-token cache fresh.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from urllib.parse import urlencode, urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from parcours.core.errors import BadRequest, Forbidden
from parcours.core.settings import Settings
from parcours.services import smart
from parcours.services.smart import FORM_ONLY, ConsentView, HttpRequest, NewClient, OAuthResponse
from parcours.store.sessions import FULL, ActiveSession
from parcours.web.pages import (
    SECURITY_HEADERS,
    page,
    platform_of,
    redirect,
    render,
    require_space,
    transaction,
)
from parcours.web.session import active_session, require_csrf

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
ADMIN_TOOLS = (("admin.tool.clients", "admin.tool.clients_lead", "/workspace/administration/clients"),)


def smart_of(request: Request) -> smart.Smart:
    return request.app.state.smart


def _public_url(request: Request, path: str, query: str = "") -> str:
    base = platform_of(request).settings.base_url.rstrip("/")
    return base + path + ("?" + query if query else "")


async def oauth_request(request: Request, path: str) -> HttpRequest:
    """The OAuth parameters of a request: the query of a GET, the form of a POST (never both:
    a client secret does not belong in a URL)."""
    params: dict[str, list[str]] = defaultdict(list)
    if request.method == "POST":
        for k, v in (await request.form()).multi_items():
            if isinstance(v, str):
                params[k].append(v)
    else:
        for k, v in request.query_params.multi_items():
            params[k].append(v)
    return HttpRequest(request.method, _public_url(request, path, request.url.query), request.headers, dict(params))


def oauth_response(answer: OAuthResponse) -> Response:
    headers = {k: v for k, v in answer.headers if k.lower() not in ("content-type", "location")}
    if answer.location:
        return RedirectResponse(answer.location, 302, headers={**SECURITY_HEADERS, **headers})
    if isinstance(answer.body, dict):
        return JSONResponse(answer.body, answer.status, headers={**NO_STORE, **headers})
    return Response(answer.body, answer.status, headers=headers)


# -- discovery ---------------------------------------------------------------------------------

async def smart_configuration(request: Request) -> Response:
    return JSONResponse(smart.smart_configuration(platform_of(request)), headers={"Cache-Control": "max-age=300"})


async def openid_configuration(request: Request) -> Response:
    return JSONResponse(smart.openid_configuration(platform_of(request)), headers={"Cache-Control": "max-age=300"})


async def jwks(request: Request) -> Response:
    return JSONResponse(await smart_of(request).jwks(platform_of(request)), headers={"Cache-Control": "max-age=300"})


# -- token, revocation, introspection -------------------------------------------------------------

async def token(request: Request) -> Response:
    http = await oauth_request(request, "/oauth/token")
    await smart_of(request).signing_key(platform_of(request))  # before the transaction: it may create the key
    async with transaction(request) as conn:
        answer = await smart_of(request).token(platform_of(request), conn, http)
    return oauth_response(answer)


async def revoke(request: Request) -> Response:
    http = await oauth_request(request, "/oauth/revoke")
    async with transaction(request) as conn:
        answer = await smart_of(request).revoke(platform_of(request), conn, http)
    return oauth_response(answer)


async def introspect(request: Request) -> Response:
    http = await oauth_request(request, "/oauth/introspect")
    async with transaction(request) as conn:
        answer = await smart_of(request).introspect(platform_of(request), conn, http)
    return oauth_response(answer)


# -- authorization and consent -------------------------------------------------------------------------

def _consent_page(request: Request, view: ConsentView, status: int = 200) -> Response:
    response = render(request, "smart_consent.html", status, view=view, error=view.error)
    # The answer redirects the form to the app: browsers apply form-action to that redirect too.
    target = urlsplit(view.params.get("redirect_uri") or (view.client.redirect_uris or [""])[0])
    source = f"{target.scheme}://{target.netloc}" if target.scheme in ("http", "https") else f"{target.scheme}:"
    if re.fullmatch(r"[a-z][a-z0-9+.-]*:(//[A-Za-z0-9.\-\[\]:]+)?", source):
        csp = response.headers["Content-Security-Policy"]
        response.headers["Content-Security-Policy"] = csp.replace("form-action 'self'", f"form-action 'self' {source}")
    return response


@page
async def authorize(request: Request) -> Response:
    if request.method == "POST":
        # "authorize-post": the same request, sent as a form by the app.
        form = await request.form()
        query = urlencode([(k, v) for k, v in form.multi_items() if isinstance(v, str)])
        return redirect("/oauth/authorize?" + query)
    http = await oauth_request(request, "/oauth/authorize")
    active = active_session(request)
    account = active.account if active is not None and active.session.stage == FULL else None
    async with transaction(request) as conn:
        answer = await smart_of(request).authorization_request(platform_of(request), conn, http, account)
    if answer is None:
        return redirect("/signin?" + urlencode({"next": "/oauth/authorize?" + request.url.query}))
    if isinstance(answer, OAuthResponse):
        return oauth_response(answer)
    return _consent_page(request, answer)


@page
async def authorize_decision(request: Request) -> Response:
    form = await require_csrf(request)
    active = active_session(request)
    if active is None or active.session.stage != FULL:
        raise Forbidden("Your session has ended: start again from the application")
    fields: dict[str, list[str]] = defaultdict(list)
    for k, v in form.multi_items():
        if isinstance(v, str) and k not in FORM_ONLY:
            fields[k].append(v)
    http = HttpRequest("GET", _public_url(request, "/oauth/authorize"), request.headers, dict(fields))
    patient = str(form.get("patient_id") or form.get("patient") or "").strip() or None  # typed wins over ticked
    async with transaction(request) as conn:
        answer = await smart_of(request).authorization_decision(
            platform_of(request), conn, http, active.account, active.session.created_at,
            approve=form.get("decision") == "approve", patient=patient)
    if isinstance(answer, OAuthResponse):
        return oauth_response(answer)
    return _consent_page(request, answer, 400)


# -- administration: client applications --------------------------------------------------------------

def require_admin(request: Request) -> ActiveSession:
    active = require_space(request, "workspace")
    if active.account.role != "admin":
        raise Forbidden("This page is for administrators")
    return active


@page
async def admin_home(request: Request) -> Response:
    require_admin(request)
    return render(request, "admin_home.html", tools=ADMIN_TOOLS, current="administration")


async def _clients_page(request: Request, status: int = 200, **context: object) -> Response:
    async with transaction(request) as conn:
        clients = await smart.list_clients(conn)
    context.setdefault("form", {"name": "", "client_type": "public", "redirect_uris": "", "scope": "", "jwks_url": "", "jwks": ""})
    context.setdefault("created", None)
    context.setdefault("secret", None)
    context.setdefault("problem", None)
    return render(request, "admin_clients.html", status, clients=clients, current="administration",
                  smart_config=platform_of(request).settings.fhir_base + "/.well-known/smart-configuration", **context)


@page
async def admin_clients(request: Request) -> Response:
    require_admin(request)
    return await _clients_page(request)


@page
async def admin_client_create(request: Request) -> Response:
    form = await require_csrf(request)
    active = require_admin(request)
    values = {k: str(form.get(k, "") or "") for k in ("name", "client_type", "redirect_uris", "scope", "jwks_url", "jwks")}
    try:
        jwks_doc = json.loads(values["jwks"]) if values["jwks"].strip() else None
    except ValueError:
        return await _clients_page(request, 400, form=values, error="admin.clients.invalid", problem="The JWKS is not JSON")
    new = NewClient(name=values["name"], client_type=values["client_type"],
                    redirect_uris=[u.strip() for u in values["redirect_uris"].split() if u.strip()],
                    scope=values["scope"], jwks=jwks_doc, jwks_url=values["jwks_url"].strip() or None)
    try:
        async with transaction(request) as conn:
            client, secret = await smart.register_client(platform_of(request), conn, new, created_by=active.account.id)
    except BadRequest as e:
        return await _clients_page(request, 400, form=values, error="admin.clients.invalid", problem=e.message)
    return await _clients_page(request, 201, created=client, secret=secret, notice="client_created")


@page
async def admin_client_status(request: Request) -> Response:
    form = await require_csrf(request)
    require_admin(request)
    active = form.get("active") == "true"
    async with transaction(request) as conn:
        await smart.set_client_active(platform_of(request), conn, request.path_params["client_id"], active)
    return redirect("/workspace/administration/clients")


# -- installation -----------------------------------------------------------------------------------------

class RevocationRefresh:
    """Before a request that carries a bearer token (or opens a websocket), make sure this
    process's copy of the revoked-token list is at most ``oauth_revocation_cache_seconds`` old."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" or (scope["type"] == "http" and _has_bearer(scope)):
            state = scope["app"].state
            # Fails closed: without a fresh list, no bearer request goes through.
            await state.smart.revoked.refresh_if_stale(state.platform)
        await self.app(scope, receive, send)


def _has_bearer(scope: Scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            return value[:7].lower() == b"bearer "
    return False


def routes() -> list[Route]:
    return [
        Route("/.well-known/smart-configuration", smart_configuration, methods=["GET"]),
        Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/fhir/.well-known/smart-configuration", smart_configuration, methods=["GET"]),
        Route("/fhir/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/oauth/jwks", jwks, methods=["GET"]),
        Route("/oauth/authorize", authorize, methods=["GET", "POST"]),
        Route("/oauth/authorize/decision", authorize_decision, methods=["POST"]),
        Route("/oauth/token", token, methods=["POST"]),
        Route("/oauth/revoke", revoke, methods=["POST"]),
        Route("/oauth/introspect", introspect, methods=["POST"]),
        Route("/workspace/administration", admin_home, methods=["GET"]),
        Route("/workspace/administration/clients", admin_clients, methods=["GET"]),
        Route("/workspace/administration/clients", admin_client_create, methods=["POST"]),
        Route("/workspace/administration/clients/{client_id}/status", admin_client_status, methods=["POST"]),
    ]


def install(app: FastAPI, settings: Settings) -> None:
    app.state.smart = smart.Smart(settings.oauth_revocation_cache_seconds)
    # Before the /fhir mount, which would take /fhir/.well-known/... as a resource type.
    app.router.routes[0:0] = routes()
    app.add_middleware(RevocationRefresh)
