"""Web sessions at the HTTP edge: the session cookie, CSRF tokens, and the session Caller.

* The cookie holds a random value; the database holds its hash (``store.sessions``).
  HttpOnly, SameSite=Lax, and Secure with the ``__Host-`` prefix when the public
  base URL is https.
* ``SessionMiddleware`` resolves the cookie once per request (idle and absolute
  timeouts are checked and the idle clock reset in one statement) and leaves the
  result in the ASGI scope, where ``web.auth.caller_of`` and the pages find it.
* CSRF: a synchronizer token stored with the session, sent back as the
  ``csrf_token`` form field or the ``X-CSRF-Token`` header (htmx). Before there is
  a session (the sign-in form) the token is an HMAC of a random pre-session cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from parcours.core.errors import Forbidden
from parcours.core.settings import Settings
from parcours.security.caller import Caller
from parcours.services import signin
from parcours.services.platform import Platform
from parcours.store.sessions import FULL, ActiveSession

SESSION_SCOPE_KEY = "parcours.session"
CSRF_OK_KEY = "parcours.csrf_ok"
PRE_SESSION_COOKIE = "parcours_presession"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_https(settings: Settings) -> bool:
    return settings.base_url.lower().startswith("https://")


def cookie_name(settings: Settings) -> str:
    # The __Host- prefix makes browsers refuse the cookie unless Secure, host-only and Path=/.
    return "__Host-parcours_session" if is_https(settings) else "parcours_session"


def set_session_cookie(response: Response, settings: Settings, token: str) -> None:
    # No Max-Age: the cookie ends with the browser; the server ends the session earlier still.
    response.set_cookie(cookie_name(settings), token, path="/", httponly=True, samesite="lax", secure=is_https(settings))


def clear_session_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(cookie_name(settings), path="/", httponly=True, samesite="lax", secure=is_https(settings))


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


class SessionMiddleware:
    """Resolve the session cookie of each request (except static files and bearer calls)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/static/"):
            request = Request(scope)
            platform: Platform = scope["app"].state.platform
            token = request.cookies.get(cookie_name(platform.settings))
            if token and "authorization" not in request.headers:
                async with platform.pool.connection() as conn, conn.transaction():
                    active = await signin.resolve(platform, conn, token)
                scope[SESSION_SCOPE_KEY] = active
                if active is None:
                    scope["parcours.session_expired"] = True
        await self.app(scope, receive, send)


def active_session(request: Request) -> ActiveSession | None:
    return request.scope.get(SESSION_SCOPE_KEY)


def _pre_session_token(platform: Platform, pre_session: str) -> str:
    key = hashlib.sha256(b"parcours-csrf:" + platform.token_key.encode()).digest()
    return hmac.new(key, pre_session.encode(), hashlib.sha256).hexdigest()


def csrf_token(request: Request) -> tuple[str, str | None]:
    """The token to put in this page's forms, and a new pre-session cookie value to set (or None)."""
    active = active_session(request)
    if active is not None:
        return active.session.csrf_token, None
    platform: Platform = request.app.state.platform
    pre = request.cookies.get(PRE_SESSION_COOKIE)
    new = None
    if not pre or len(pre) < 32:
        pre = new = secrets.token_urlsafe(32)
        request.scope["parcours.new_pre_session"] = new
    return _pre_session_token(platform, pre), new


def set_pre_session_cookie(response: Response, settings: Settings, value: str) -> None:
    response.set_cookie(PRE_SESSION_COOKIE, value, path="/", httponly=True, samesite="lax", secure=is_https(settings))


def _expected(request: Request) -> str | None:
    active = active_session(request)
    if active is not None:
        return active.session.csrf_token
    pre = request.cookies.get(PRE_SESSION_COOKIE)
    return _pre_session_token(request.app.state.platform, pre) if pre else None


def _matches(request: Request, sent: str | None) -> bool:
    expected = _expected(request)
    return bool(sent and expected and hmac.compare_digest(sent.encode(), expected.encode()))


async def require_csrf(request: Request) -> FormData:
    """The form of a state-changing request whose CSRF token is right; 403 otherwise."""
    form = await request.form()
    sent = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if not _matches(request, sent if isinstance(sent, str) else None):
        raise Forbidden("The form has expired or did not come from this site (CSRF check failed): reload the page and try again")
    request.scope[CSRF_OK_KEY] = True
    return form


def session_caller(request: Request) -> Caller | None:
    """The Caller of a fully signed-in session cookie, or None.

    Cookies ride along with cross-site requests, so a state-changing request
    authenticated by the cookie alone must also prove it came from our pages.
    """
    active = active_session(request)
    if active is None or active.session.stage != FULL:
        return None
    if request.method not in SAFE_METHODS and not request.scope.get(CSRF_OK_KEY):
        if not _matches(request, request.headers.get(CSRF_HEADER)):
            raise Forbidden("A request authenticated by a session cookie needs its X-CSRF-Token header")
    return signin.session_caller(active, client_ip(request))
