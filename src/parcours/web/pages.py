"""Web pages: sign-in (password, then TOTP), TOTP enrolment, account settings, and the
home pages of the patient portal and of the professional workspace.

Thin adapters: the rules live in ``services.accounts`` and ``services.signin``;
every state-changing form passes ``require_csrf`` first; errors are rendered as
a page (sign-in page for 401). ``install(app)`` mounts everything on the app.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import segno
from fastapi import FastAPI
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from parcours.core.errors import BadRequest, Forbidden, ParcoursError, Unauthorized
from parcours.security import roles
from parcours.security import totp as totp_codes
from parcours.services import accounts, signin
from parcours.services.platform import Platform
from parcours.store.accounts import Account
from parcours.store.sessions import ENROL, FULL, TOTP, ActiveSession
from parcours.web import i18n, navigation
from parcours.web.auth import caller_of
from parcours.web.session import (
    SessionMiddleware,
    active_session,
    clear_session_cookie,
    client_ip,
    csrf_token,
    require_csrf,
    set_pre_session_cookie,
    set_session_cookie,
)

HERE = Path(__file__).parent
STATIC = HERE / "static"

# Pages only load what they ship: no inline script, no third party, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# Messages a redirect may ask a page to show (?done=...): only these keys, never free text.
NOTICES = frozenset({"signed_out", "signed_out_everywhere", "password_changed", "session_ended", "recovery_used",
                     "totp_enabled", "language_changed"})


class Pages:
    """What the pages of one app share: templates and catalogs (built once per app)."""

    def __init__(self) -> None:
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                               undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.catalogs = i18n.load_catalogs()


def platform_of(request: Request) -> Platform:
    return request.app.state.platform


@asynccontextmanager
async def transaction(request: Request) -> AsyncIterator[AsyncConnection]:
    async with platform_of(request).pool.connection() as conn, conn.transaction():
        yield conn


def language(request: Request) -> str:
    active = active_session(request)
    return i18n.negotiate(
        account_locale=active.account.locale if active and active.session.stage == FULL else None,
        cookie=request.cookies.get(i18n.LANG_COOKIE),
        accept_language=request.headers.get("accept-language"),
    )


def safe_next(value: str | None) -> str | None:
    """A local path to go back to, or None: never another site (open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or "\n" in value:
        return None
    return value


def home_of(account: Account) -> str:
    return navigation.HOME[roles.role(account.role).space]


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    pages: Pages = request.app.state.pages
    lang = language(request)
    t = i18n.Translator(lang, pages.catalogs)
    active = active_session(request)
    token, new_pre = csrf_token(request)
    full = active is not None and active.session.stage == FULL
    space = roles.role(active.account.role).space if full and active else None
    base = {
        # The language switch comes back here, query included (an OAuth consent page lives in its query).
        "t": t, "lang": lang, "languages": i18n.NAMES, "csrf": token,
        "request_path": request.url.path + (f"?{request.url.query}" if request.method == "GET" and request.url.query else ""),
        "account": active.account if full and active else None, "space": space,
        "nav": navigation.items_for(space, active.account.role) if space and active else [],
        "current": None, "notice": None, "error": None, "minimal": False,
    }
    base.update(context)
    html = pages.env.get_template(template).render(**base)
    response = HTMLResponse(html, status, headers=dict(SECURITY_HEADERS))
    if new_pre:
        set_pre_session_cookie(response, platform_of(request).settings, new_pre)
    return response


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, 303, headers=dict(SECURITY_HEADERS))


def notice_of(request: Request) -> str | None:
    done = request.query_params.get("done")
    return done if done in NOTICES else None


Endpoint = Callable[[Request], Awaitable[Response]]


def page(fn: Endpoint) -> Endpoint:
    """Render errors as pages: 401 goes to the sign-in page, others to an error page."""

    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except Unauthorized:
            return redirect("/signin?" + urlencode({"next": request.url.path}))
        except ParcoursError as e:
            return render(request, "error.html", e.status, error_status=e.status, message=e.message, code=e.code)

    return wrapper


def require_full(request: Request) -> ActiveSession:
    """The signed-in session of a page, or 401 (-> sign-in page)."""
    active = active_session(request)
    if active is None or active.session.stage != FULL:
        raise Unauthorized("Sign in to see this page")
    caller_of(request)  # one door: the same Caller the FHIR API builds (and its CSRF rule)
    return active


def require_space(request: Request, space: str) -> ActiveSession:
    active = require_full(request)
    if roles.role(active.account.role).space != space:
        raise Forbidden("This space is not for your kind of account")
    return active


# -- sign-in ------------------------------------------------------------------------------

@page
async def root(request: Request) -> Response:
    active = active_session(request)
    if active is not None and active.session.stage == FULL:
        return redirect(home_of(active.account))
    return redirect("/signin")


@page
async def signin_form(request: Request) -> Response:
    active = active_session(request)
    if active is not None and active.session.stage == FULL:
        return redirect(safe_next(request.query_params.get("next")) or home_of(active.account))
    notice = notice_of(request) or ("session_expired" if request.scope.get("parcours.session_expired") else None)
    return render(request, "signin.html", next=safe_next(request.query_params.get("next")) or "", notice=notice, email="")


def _locked_page(request: Request, template: str, attempt: signin.Attempt, **context: Any) -> HTMLResponse:
    until = attempt.retry_at
    assert until is not None
    seconds = max(1, int((until - platform_of(request).clock.now()).total_seconds()))
    response = render(request, template, 429, error="signin.locked", minutes=(seconds + 59) // 60, **context)
    response.headers["Retry-After"] = str(seconds)
    return response


@page
async def signin_submit(request: Request) -> Response:
    form = await require_csrf(request)
    email = str(form.get("email", "")).strip()
    password = str(form.get("password", ""))
    nxt = safe_next(str(form.get("next", ""))) or ""
    platform = platform_of(request)
    previous = active_session(request)
    async with transaction(request) as conn:
        attempt = await signin.check_password(platform, conn, email, password, client_ip(request))
        if attempt.outcome != signin.OK:
            session_token = None
        else:
            assert attempt.account is not None and attempt.next_stage is not None
            if previous is not None:
                await signin.sign_out(conn, previous.session.id)
            session_token, _ = await signin.open_session(platform, conn, attempt.account, attempt.next_stage,
                                                         ip=client_ip(request), user_agent=request.headers.get("user-agent"))
    if attempt.outcome == signin.LOCKED:
        return _locked_page(request, "signin.html", attempt, next=nxt, email=email)
    if attempt.outcome != signin.OK or session_token is None:
        return render(request, "signin.html", 401, error="signin.invalid", next=nxt, email=email)
    assert attempt.account is not None
    query = "?" + urlencode({"next": nxt}) if nxt else ""
    target = {FULL: nxt or home_of(attempt.account), TOTP: "/signin/totp" + query, ENROL: "/account/totp" + query}[attempt.next_stage or FULL]
    response = redirect(target)
    set_session_cookie(response, platform.settings, session_token)
    return response


def _pending(request: Request, stage: str) -> ActiveSession | None:
    active = active_session(request)
    return active if active is not None and active.session.stage == stage else None


@page
async def totp_form(request: Request) -> Response:
    if _pending(request, TOTP) is None:
        return redirect("/signin")
    return render(request, "signin_totp.html", next=safe_next(request.query_params.get("next")) or "")


@page
async def totp_submit(request: Request) -> Response:
    form = await require_csrf(request)
    active = _pending(request, TOTP)
    if active is None:
        return redirect("/signin")
    nxt = safe_next(str(form.get("next", ""))) or ""
    platform = platform_of(request)
    async with transaction(request) as conn:
        attempt = await signin.check_second_factor(platform, conn, active.account, str(form.get("code", "")), client_ip(request))
        token = None
        if attempt.outcome == signin.OK:
            token, _ = await signin.promote(platform, conn, active, ip=client_ip(request), user_agent=request.headers.get("user-agent"))
    if attempt.outcome == signin.LOCKED:
        return _locked_page(request, "signin_totp.html", attempt, next=nxt)
    if token is None:
        return render(request, "signin_totp.html", 401, error="totp.invalid", next=nxt)
    response = redirect("/account?done=recovery_used" if attempt.used_recovery_code else (nxt or home_of(active.account)))
    set_session_cookie(response, platform.settings, token)
    return response


# -- TOTP enrolment -------------------------------------------------------------------------

def _enrolling(request: Request) -> ActiveSession:
    active = active_session(request)
    if active is None or active.session.stage not in (ENROL, FULL):
        raise Unauthorized("Sign in first")
    return active


def _qr_svg(uri: str, title: str) -> str:
    return segno.make(uri, error="m").svg_inline(scale=5, border=4, title=title, svgclass="qr-code", lineclass="qr-line",
                                                 dark="#000", light="#fff")


async def _enrolment_page(request: Request, active: ActiveSession, status: int = 200, error: str | None = None) -> Response:
    secret = active.session.data.get("totp_pending")
    if not secret:
        secret = totp_codes.new_secret()
        async with transaction(request) as conn:
            await signin.remember(conn, active.session, totp_pending=secret)
    pages: Pages = request.app.state.pages
    t = i18n.Translator(language(request), pages.catalogs)
    uri = totp_codes.provisioning_uri(secret, active.account.email)
    grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
    return render(request, "totp_enrol.html", status, qr=_qr_svg(uri, t("totp.qr_title")), secret=grouped,
                  required=active.session.stage == ENROL, enabled=active.account.totp_enabled, error=error,
                  next=safe_next(request.query_params.get("next")) or "")


@page
async def totp_enrol_form(request: Request) -> Response:
    active = _enrolling(request)
    if active.session.stage == FULL:
        require_full(request)
        if active.account.totp_enabled:
            return render(request, "totp_enrol.html", qr="", secret="", required=False, enabled=True, next="", current="account")
    return await _enrolment_page(request, active)


@page
async def totp_enrol_submit(request: Request) -> Response:
    form = await require_csrf(request)
    active = _enrolling(request)
    if active.account.totp_enabled:
        raise BadRequest("An authenticator is already enrolled for this account")
    secret = active.session.data.get("totp_pending")
    if not secret:
        return redirect("/account/totp")
    platform = platform_of(request)
    nxt = safe_next(str(form.get("next", ""))) or ""
    async with transaction(request) as conn:
        codes = await accounts.enrol_totp(platform, conn, active.account, secret, str(form.get("code", "")))
        token = None
        if codes is not None:
            if active.session.stage == ENROL:
                token, _ = await signin.promote(platform, conn, active, ip=client_ip(request),
                                                user_agent=request.headers.get("user-agent"))
            else:
                await signin.remember(conn, active.session, totp_pending=None)
    if codes is None:
        return await _enrolment_page(request, active, 400, error="totp.invalid")
    if token is not None:
        # The new session is only known from the cookie we are about to set: show the codes on a
        # page of its own that needs no session, then continue.
        response = render(request, "recovery_codes.html", codes=codes, continue_to=nxt or home_of(active.account),
                          notice="totp_enabled", minimal=True)
        set_session_cookie(response, platform.settings, token)
        return response
    return render(request, "recovery_codes.html", codes=codes, continue_to="/account", notice="totp_enabled")


# -- account settings -----------------------------------------------------------------------

async def _account_page(request: Request, active: ActiveSession, status: int = 200, **context: Any) -> Response:
    platform = platform_of(request)
    async with transaction(request) as conn:
        sessions = await signin.sessions_of(platform, conn, active.account.id)
        codes_left = await accounts.recovery_codes_left(conn, active.account)
    context.setdefault("notice", notice_of(request))
    return render(request, "account.html", status, sessions=sessions, this_session=active.session.id, codes_left=codes_left,
                  totp_enabled=active.account.totp_enabled, current="account", fmt_time=_fmt_time,
                  min_length=platform.settings.password_min_length, **context)


def _fmt_time(dt: Any) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


@page
async def account_page(request: Request) -> Response:
    return await _account_page(request, require_full(request))


@page
async def password_submit(request: Request) -> Response:
    form = await require_csrf(request)
    active = require_full(request)
    new = str(form.get("new_password", ""))
    if new != str(form.get("confirm_password", "")):
        return await _account_page(request, active, 400, password_errors=["password.mismatch"])
    platform = platform_of(request)
    async with transaction(request) as conn:
        problems = await accounts.change_password(platform, conn, active.account, str(form.get("current_password", "")), new)
        if not problems:
            # Whoever else held a session may have known the old password.
            await signin.sign_out_everywhere(conn, active.account.id, keep=active.session.id)
    if problems:
        return await _account_page(request, active, 400, password_errors=problems)
    return redirect("/account?done=password_changed")


@page
async def recovery_codes_submit(request: Request) -> Response:
    await require_csrf(request)
    active = require_full(request)
    if not active.account.totp_enabled:
        raise BadRequest("Recovery codes come with an authenticator: enrol one first")
    async with transaction(request) as conn:
        codes = await accounts.new_recovery_codes(platform_of(request), conn, active.account)
    return render(request, "recovery_codes.html", codes=codes, continue_to="/account", notice=None, current="account")


@page
async def end_session(request: Request) -> Response:
    await require_csrf(request)
    active = require_full(request)
    target = request.path_params["session_id"]
    async with transaction(request) as conn:
        await signin.sign_out(conn, target, account_id=active.account.id)
    if target == active.session.id:
        response = redirect("/signin?done=signed_out")
        clear_session_cookie(response, platform_of(request).settings)
        return response
    if request.headers.get("hx-request") == "true":
        async with transaction(request) as conn:
            sessions = await signin.sessions_of(platform_of(request), conn, active.account.id)
        return render(request, "_sessions.html", sessions=sessions, this_session=active.session.id, fmt_time=_fmt_time,
                      notice="session_ended")
    return redirect("/account?done=session_ended")


@page
async def signout(request: Request) -> Response:
    await require_csrf(request)
    active = active_session(request)
    if active is not None:
        async with transaction(request) as conn:
            await signin.sign_out(conn, active.session.id)
    response = redirect("/signin?done=signed_out")
    clear_session_cookie(response, platform_of(request).settings)
    return response


@page
async def signout_everywhere(request: Request) -> Response:
    await require_csrf(request)
    active = require_full(request)
    async with transaction(request) as conn:
        await signin.sign_out_everywhere(conn, active.account.id)
    response = redirect("/signin?done=signed_out_everywhere")
    clear_session_cookie(response, platform_of(request).settings)
    return response


@page
async def set_language(request: Request) -> Response:
    form = await require_csrf(request)
    lang = str(form.get("lang", ""))
    if lang not in i18n.SUPPORTED:
        raise BadRequest(f"Unsupported language {lang!r}")
    active = active_session(request)
    if active is not None and active.session.stage == FULL:
        async with transaction(request) as conn:
            await accounts.set_locale(platform_of(request), conn, active.account, lang)
    response = redirect(safe_next(str(form.get("next", ""))) or "/")
    response.set_cookie(i18n.LANG_COOKIE, lang, max_age=365 * 24 * 3600, path="/", samesite="lax",
                        secure=platform_of(request).settings.base_url.startswith("https://"))
    return response


# -- homes ---------------------------------------------------------------------------------------

async def _home(request: Request, space: str, template: str) -> Response:
    active = require_space(request, space)
    async with transaction(request) as conn:
        prof = await accounts.profile(platform_of(request), conn, active.account)
    cards = [i for i in navigation.items_for(space, active.account.role) if i.key not in ("home",)]
    return render(request, template, profile=prof, cards=cards, current="home")


@page
async def portal_home(request: Request) -> Response:
    return await _home(request, navigation.PORTAL, "portal_home.html")


@page
async def workspace_home(request: Request) -> Response:
    return await _home(request, navigation.WORKSPACE, "workspace_home.html")


def _coming_soon(space: str, item: navigation.NavItem) -> Endpoint:
    @page
    async def coming_soon(request: Request) -> Response:
        active = require_space(request, space)
        if item.roles and active.account.role not in item.roles:
            raise Forbidden("This section is not for your kind of account")
        return render(request, "coming_soon.html", item=item, current=item.key)

    return coming_soon


def routes() -> list[Route]:
    out = [
        Route("/", root, methods=["GET"]),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin_submit, methods=["POST"]),
        Route("/signin/totp", totp_form, methods=["GET"]),
        Route("/signin/totp", totp_submit, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/signout/everywhere", signout_everywhere, methods=["POST"]),
        Route("/language", set_language, methods=["POST"]),
        Route("/account", account_page, methods=["GET"]),
        Route("/account/password", password_submit, methods=["POST"]),
        Route("/account/recovery-codes", recovery_codes_submit, methods=["POST"]),
        Route("/account/sessions/{session_id}/end", end_session, methods=["POST"]),
        Route("/account/totp", totp_enrol_form, methods=["GET"]),
        Route("/account/totp", totp_enrol_submit, methods=["POST"]),
        Route("/portal", portal_home, methods=["GET"]),
        Route("/workspace", workspace_home, methods=["GET"]),
    ]
    for space, items in navigation.NAV.items():
        for item in items:
            if not item.available:
                out.append(Route(item.path, _coming_soon(space, item), methods=["GET"]))
    return out


def install(app: FastAPI) -> None:
    """Mount the pages, their static files and the session middleware on ``app``."""
    app.state.pages = Pages()
    app.add_middleware(SessionMiddleware)
    app.router.routes.extend(routes())
    app.router.routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))


__all__ = ["install", "routes"]
