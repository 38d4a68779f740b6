"""Sign-in pages, sessions and CSRF over ASGI, on a platform whose clock the tests move."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
from starlette.responses import Response

from parcours.core.settings import Settings
from parcours.security import totp as totp_codes
from parcours.services.platform import Platform
from parcours.web import i18n
from parcours.web.session import set_session_cookie
from tests.accounts_helpers import (
    PASSWORD,
    new_account,
    new_patient,
    new_practitioner,
    random_ip,
    start_clocked_platform,
    totp_now,
)
from tests.conftest import BASE

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


class Web:
    def __init__(self, platform: Platform, app) -> None:  # type: ignore[no-untyped-def]
        self.platform, self.app = platform, app

    def client(self, **headers: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(random_ip(), 40000))
        return httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers)


@pytest_asyncio.fixture(scope="module")
async def web(settings: Settings) -> AsyncIterator[Web]:
    from parcours.web.app import create_app

    p = await start_clocked_platform(settings, session_idle_minutes=30, session_absolute_minutes=120)
    yield Web(p, create_app(p.settings, platform=p))
    await p.close()


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1)


async def sign_in(c: httpx.AsyncClient, email: str, password: str = PASSWORD, next_: str = "") -> httpx.Response:
    page = await c.get("/signin")
    return await c.post("/signin", data={"email": email, "password": password, "csrf_token": csrf_of(page.text), "next": next_})


async def post_form(c: httpx.AsyncClient, page: str, action: str, **data: str) -> httpx.Response:
    html = (await c.get(page)).text
    return await c.post(action, data={"csrf_token": csrf_of(html), **data})


async def test_forms_without_csrf_token_are_refused(web: Web, client) -> None:
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    async with web.client() as c:
        r = await c.post("/signin", data={"email": acct.email, "password": PASSWORD})
        assert r.status_code == 403
        await c.get("/signin")
        r = await c.post("/signin", data={"email": acct.email, "password": PASSWORD, "csrf_token": "forged"})
        assert r.status_code == 403
        r = await sign_in(c, acct.email)
        assert r.status_code == 303
        # Signed in: every form still needs the session's token.
        for action in ("/signout", "/signout/everywhere", "/account/password", "/language", "/account/recovery-codes"):
            assert (await c.post(action, data={"lang": "en"})).status_code == 403, action
        assert (await c.get("/portal")).status_code == 200  # nothing above signed us out


async def test_patient_signs_in_with_password_only(web: Web, client) -> None:
    pid = await new_patient(client, family="Moreau", given="Léa")
    acct = await new_account(web.platform, "patient", f"Patient/{pid}", identity_status="qualified")
    async with web.client() as c:
        r = await sign_in(c, acct.email, "wrong password")
        assert r.status_code == 401 and "Adresse e-mail ou mot de passe incorrect" in r.text
        r = await sign_in(c, acct.email.upper())
        assert r.status_code == 303 and r.headers["location"] == "/portal"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("parcours_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Secure" not in cookie and "Max-Age" not in cookie
        home = await c.get("/portal")
        assert home.status_code == 200
        assert "Bonjour Léa Moreau" in home.text and "Identité qualifiée" in home.text
        assert home.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in home.headers["content-security-policy"]
        assert (await c.get("/")).headers["location"] == "/portal"
        # A patient has no business in the professional workspace.
        assert (await c.get("/workspace")).status_code == 403
        mine = await c.get("/portal/appointments")  # booking's page; other sections are still to come
        assert mine.status_code == 200 and "Mes rendez-vous" in mine.text and "Bientôt disponible" in mine.text


def test_session_cookie_is_secure_on_https() -> None:
    r = Response()
    set_session_cookie(r, Settings(base_url="https://parcours.example"), "abc")
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("__Host-parcours_session=abc") and "Secure" in cookie and "Path=/" in cookie


async def test_professional_needs_totp(web: Web, client) -> None:
    secret = totp_codes.new_secret()
    pract = await new_practitioner(client, family="Bernard", given="Anne")
    acct = await new_account(web.platform, "practitioner", f"Practitioner/{pract}", totp_secret=secret)
    async with web.client() as c:
        r = await sign_in(c, acct.email, next_="/workspace/agenda")
        assert r.status_code == 303 and r.headers["location"].startswith("/signin/totp")
        # Password alone opens nothing.
        assert (await c.get("/workspace")).headers["location"].startswith("/signin")
        assert (await c.get(f"/fhir/Practitioner/{pract}")).status_code == 401
        r = await post_form(c, "/signin/totp", "/signin/totp", code="000000", next="/workspace/agenda")
        assert r.status_code == 401
        r = await post_form(c, "/signin/totp", "/signin/totp", code=totp_now(secret, web.platform.clock.now()),
                            next="/workspace/agenda")
        assert r.status_code == 303 and r.headers["location"] == "/workspace/agenda"
        home = await c.get("/workspace")
        assert home.status_code == 200
        assert "Anne Bernard" in home.text and "Médecin généraliste" in home.text and "Maison de santé des Tilleuls" in home.text
        assert (await c.get("/portal")).status_code == 403


async def test_professional_enrols_totp_then_uses_recovery_code_once(web: Web, client) -> None:
    acct = await new_account(web.platform, "practitioner", f"Practitioner/{await new_practitioner(client)}")
    async with web.client() as c:
        r = await sign_in(c, acct.email)
        assert r.status_code == 303 and r.headers["location"] == "/account/totp"
        page = await c.get("/account/totp")
        assert page.status_code == 200 and "<svg" in page.text and "qr-code" in page.text
        secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")  # type: ignore[union-attr]
        assert (await c.get("/workspace")).status_code == 303  # not before enrolment
        bad = await c.post("/account/totp", data={"csrf_token": csrf_of(page.text), "code": "123456"})
        assert bad.status_code == 400
        done = await c.post("/account/totp", data={"csrf_token": csrf_of(page.text),
                                                   "code": totp_now(secret, web.platform.clock.now())})
        assert done.status_code == 200
        codes = re.findall(r"<code>([A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4})</code>", done.text)
        assert len(codes) == 10
        assert (await c.get("/workspace")).status_code == 200
        await post_form(c, "/account", "/signout")
        assert (await c.get("/workspace")).status_code == 303

        web.platform.clock.advance(seconds=60)  # a new time step for the next code
        r = await sign_in(c, acct.email)
        assert r.headers["location"] == "/signin/totp"
        r = await post_form(c, "/signin/totp", "/signin/totp", code=codes[0])
        assert r.status_code == 303 and r.headers["location"] == "/account?done=recovery_used"
        settings_page = await c.get("/account")
        assert "Codes de secours restants : 9" in settings_page.text
        await post_form(c, "/account", "/signout")
        r = await sign_in(c, acct.email)
        r = await post_form(c, "/signin/totp", "/signin/totp", code=codes[0])
        assert r.status_code == 401  # single use


async def test_idle_and_absolute_timeouts(web: Web, client) -> None:
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    clock = web.platform.clock
    async with web.client() as c:
        assert (await sign_in(c, acct.email)).status_code == 303
        clock.advance(minutes=29)
        assert (await c.get("/portal")).status_code == 200  # activity resets the idle clock
        clock.advance(minutes=29)
        assert (await c.get("/portal")).status_code == 200
        clock.advance(minutes=31)
        r = await c.get("/portal")
        assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2Fportal"
        assert "Votre session a expiré" in (await c.get("/signin")).text

        assert (await sign_in(c, acct.email)).status_code == 303
        for _ in range(4):  # active all along: 100 minutes
            clock.advance(minutes=25)
            assert (await c.get("/portal")).status_code == 200
        clock.advance(minutes=21)  # 121 minutes after sign-in: past the absolute limit
        assert (await c.get("/portal")).status_code == 303


async def test_sign_out_everywhere_and_one_session(web: Web, client) -> None:
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    async with web.client(**{"user-agent": "Phone"}) as a, web.client(**{"user-agent": "Laptop"}) as b, web.client() as third:
        for c in (a, b, third):
            assert (await sign_in(c, acct.email)).status_code == 303
        page = await a.get("/account")
        assert "Phone" in page.text and "Laptop" in page.text
        # End the laptop's session from the phone, as htmx does it: token in the header, partial answer.
        laptop_id = re.search(r'/account/sessions/([0-9a-f-]+)/end', page.text.split("Laptop")[1]).group(1)  # type: ignore[union-attr]
        r = await a.post(f"/account/sessions/{laptop_id}/end", headers={"HX-Request": "true", "X-CSRF-Token": csrf_of(page.text)})
        assert r.status_code == 200 and 'id="sessions"' in r.text and "<html" not in r.text and "Laptop" not in r.text
        assert (await b.get("/portal")).status_code == 303
        assert (await third.get("/portal")).status_code == 200
        r = await post_form(a, "/account", "/signout/everywhere")
        assert r.status_code == 303 and r.headers["location"] == "/signin?done=signed_out_everywhere"
        assert (await a.get("/portal")).status_code == 303
        assert (await third.get("/portal")).status_code == 303


async def test_fhir_api_takes_the_session_cookie(web: Web, client) -> None:
    pid = await new_patient(client)
    acct = await new_account(web.platform, "patient", f"Patient/{pid}")
    async with web.client() as c:
        assert (await c.get(f"/fhir/Patient/{pid}")).status_code == 401
        assert (await sign_in(c, acct.email)).status_code == 303
        r = await c.get(f"/fhir/Patient/{pid}")
        assert r.status_code == 200 and r.json()["id"] == pid
        # A cookie-authenticated write must prove it comes from our pages.
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "Poids"},
               "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 70, "unit": "kg"}}
        r = await c.post("/fhir/Observation", json=obs, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 403


async def test_change_password(web: Web, client) -> None:
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    new_password = "an even better passphrase"
    async with web.client() as a, web.client() as b:
        for c in (a, b):
            assert (await sign_in(c, acct.email)).status_code == 303
        r = await post_form(a, "/account", "/account/password", current_password="nope", new_password=new_password,
                            confirm_password=new_password)
        assert r.status_code == 400 and "Le mot de passe actuel est incorrect" in r.text
        r = await post_form(a, "/account", "/account/password", current_password=PASSWORD, new_password="short",
                            confirm_password="short")
        assert r.status_code == 400 and "au moins 12 caractères" in r.text
        r = await post_form(a, "/account", "/account/password", current_password=PASSWORD, new_password=new_password,
                            confirm_password=new_password)
        assert r.status_code == 303
        assert (await a.get("/account")).status_code == 200
        assert (await b.get("/account")).status_code == 303  # the other session was closed
        await post_form(a, "/account", "/signout")
        assert (await sign_in(a, acct.email)).status_code == 401
        assert (await sign_in(a, acct.email, new_password)).status_code == 303


async def test_language_choice(web: Web, client) -> None:
    async with web.client() as fr, web.client(**{"accept-language": "en-GB,en;q=0.9,fr;q=0.5"}) as en:
        assert '<html lang="fr">' in (await fr.get("/signin")).text
        page = (await en.get("/signin")).text
        assert '<html lang="en">' in page and "Sign in" in page
        r = await post_form(fr, "/signin", "/language", lang="en", next="/signin")
        assert r.status_code == 303 and r.headers["location"] == "/signin"
        assert '<html lang="en">' in (await fr.get("/signin")).text
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}", locale="en")
    async with web.client() as c:
        await sign_in(c, acct.email)
        assert "Hello" in (await c.get("/portal")).text  # the account's own choice wins


async def test_redirects_stay_on_this_site(web: Web, client) -> None:
    acct = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    async with web.client() as c:
        r = await sign_in(c, acct.email, next_="//evil.example/x")
        assert r.headers["location"] == "/portal"


def test_catalogs_are_complete() -> None:
    import pathlib

    catalogs = i18n.load_catalogs()
    assert set(catalogs["fr"]) == set(catalogs["en"])
    templates = pathlib.Path(i18n.__file__).parent / "templates"
    used = set()
    for f in templates.glob("*.html"):
        used |= {k for k in re.findall(r'\bt\("([a-z_.]+)"', f.read_text()) if not k.endswith((".", "_"))}
    # Keys the templates build from values.
    from parcours.fhir.fr_core import STATUS_CODES
    from parcours.security.roles import ROLES
    from parcours.web import navigation, pages

    used |= {f"notice.{n}" for n in pages.NOTICES | {"session_expired"}}
    used |= {f"role.{r}" for r in ROLES} | {f"space.{s}" for s in navigation.NAV} | {f"nav.label.{s}" for s in navigation.NAV}
    used |= {f"identity.{kind}.{s}" for s in STATUS_CODES for kind in ("status", "explain")}
    used |= {f"error.status.{s}" for s in ("400", "403", "404", "409", "422", "429", "other")}
    used |= {f"record.tl.by_{z}" for z in ("year", "month", "day")}
    used |= {k for items in navigation.NAV.values() for i in items for k in (i.label, i.description)}
    assert used <= set(catalogs["fr"]), used - set(catalogs["fr"])
    assert i18n.negotiate(account_locale=None, cookie=None, accept_language="de-DE,en;q=0.5") == "en"
    assert i18n.negotiate(account_locale=None, cookie=None, accept_language=None) == "fr"
    assert i18n.negotiate(account_locale="en", cookie="fr", accept_language="fr") == "en"


async def test_proxy_admin_and_staff_land_in_their_spaces(web: Web, client) -> None:
    from tests.accounts_helpers import create_resource

    pid = await new_patient(client)
    rp = await create_resource(client, {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{pid}"},
                                        "name": [{"family": "Lefèvre", "given": ["Marc"]}],
                                        "relationship": [{"text": "Fils"}]})
    proxy = await new_account(web.platform, "proxy", f"RelatedPerson/{rp}")
    async with web.client() as c:
        r = await sign_in(c, proxy.email)
        assert r.headers["location"] == "/portal"
        assert "Bonjour Marc Lefèvre" in (await c.get("/portal")).text
    secret = totp_codes.new_secret()
    admin = await new_account(web.platform, "admin", None, totp_secret=secret, display_name="ARS Occitanie")
    staff_secret = totp_codes.new_secret()
    staff = await new_account(web.platform, "staff", None, totp_secret=staff_secret)
    async with web.client() as c:
        await sign_in(c, admin.email)
        await post_form(c, "/signin/totp", "/signin/totp", code=totp_now(secret, web.platform.clock.now()))
        home = await c.get("/workspace")
        assert "Bonjour ARS Occitanie" in home.text and "/workspace/administration" in home.text
        assert (await c.get("/workspace/administration")).status_code == 200
    async with web.client() as c:
        r = await sign_in(c, staff.email)
        assert r.headers["location"] == "/signin/totp"  # staff too need the second factor
        assert (await c.get("/workspace/administration")).status_code == 303
        await post_form(c, "/signin/totp", "/signin/totp", code=totp_now(staff_secret, web.platform.clock.now()))
        assert (await c.get("/workspace")).status_code == 200
        assert (await c.get("/workspace/administration")).status_code == 403  # administrators only
