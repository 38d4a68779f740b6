"""Sign-in with an external identity provider at the HTTP edge: the buttons of the sign-in
page, the redirect to the provider, and its callback (``services.oidc_signin``).

A cookie (``parcours_oidc``, HttpOnly, SameSite=Lax, only sent to ``/signin/oidc``)
binds the callback to the browser that started the sign-in, so nobody can sign
a victim into the attacker's account with a callback URL.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from parcours.core.errors import NotFound
from parcours.core.settings import OidcProvider, Settings
from parcours.services import oidc_signin, signin
from parcours.services.oidc_signin import ExternalSignin, ExternalSigninRefused
from parcours.store.sessions import ENROL, FULL, TOTP
from parcours.web.pages import SECURITY_HEADERS, home_of, page, platform_of, redirect, render, safe_next, transaction
from parcours.web.session import active_session, client_ip, is_https, set_session_cookie

BROWSER_COOKIE = "parcours_oidc"
COOKIE_PATH = "/signin/oidc"


def external_of(request: Request) -> ExternalSignin:
    return request.app.state.external_signin


def provider_of(request: Request) -> OidcProvider:
    provider = oidc_signin.provider_named(platform_of(request), request.path_params["name"])
    if provider is None:
        raise NotFound("No such identity provider")
    return provider


def _refused(request: Request, provider: OidcProvider, err: ExternalSigninRefused) -> Response:
    return render(request, "signin_external_error.html", err.status, reason=err.reason, provider=provider.label,
                  detail=err.message, code=err.code)


@page
async def start(request: Request) -> Response:
    provider = provider_of(request)
    platform = platform_of(request)
    nxt = safe_next(request.query_params.get("next")) or ""
    try:
        async with transaction(request) as conn:
            begun = await external_of(request).start(platform, conn, provider, next=nxt,
                                                     browser=request.cookies.get(BROWSER_COOKIE))
    except ExternalSigninRefused as err:
        return _refused(request, provider, err)
    response = RedirectResponse(begun.url, 303, headers=dict(SECURITY_HEADERS))
    response.set_cookie(BROWSER_COOKIE, begun.browser, max_age=int(oidc_signin.PENDING_LIFETIME.total_seconds()),
                        path=COOKIE_PATH, httponly=True, samesite="lax", secure=is_https(platform.settings))
    return response


@page
async def callback(request: Request) -> Response:
    provider = provider_of(request)
    platform = platform_of(request)
    external = external_of(request)
    params = {k: v for k, v in request.query_params.items()}
    try:
        async with transaction(request) as conn:
            pending = await external.take_pending(platform, conn, provider, params.get("state"),
                                                  request.cookies.get(BROWSER_COOKIE))
        identity = await external.verify_callback(platform, provider, pending, params)
        async with transaction(request) as conn:
            outcome = await external.sign_in(platform, conn, provider, identity, pending.next)
            previous = active_session(request)
            if previous is not None:
                await signin.sign_out(conn, previous.session.id)
            token, _ = await signin.open_session(platform, conn, outcome.account, outcome.stage, ip=client_ip(request),
                                                 user_agent=request.headers.get("user-agent"))
    except ExternalSigninRefused as err:
        return _refused(request, provider, err)
    nxt = safe_next(outcome.next) or ""
    query = "?" + urlencode({"next": nxt}) if nxt else ""
    target = {FULL: nxt or home_of(outcome.account), TOTP: "/signin/totp" + query, ENROL: "/account/totp" + query}[outcome.stage]
    response = redirect(target)
    set_session_cookie(response, platform.settings, token)
    response.delete_cookie(BROWSER_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax", secure=is_https(platform.settings))
    return response


def routes() -> list[Route]:
    return [
        Route("/signin/oidc/{name}", start, methods=["GET"]),
        Route("/signin/oidc/{name}/callback", callback, methods=["GET"]),
    ]


def install(app: FastAPI, settings: Settings) -> None:
    """Mount the routes and put the providers' buttons on the sign-in page (after ``pages.install``)."""
    app.state.external_signin = ExternalSignin()
    app.router.routes.extend(routes())
    app.state.pages.env.globals["signin_providers"] = [(p.name, p.label) for p in settings.oidc_providers]
