"""SMART and external sign-in pages in a real browser (Debian's Chromium driven by Playwright):
the consent page and the client registration page in French and English with no serious or
critical axe-core violation, and a Pro Santé Connect sign-in from the sign-in page to the
workspace, against an identity provider served by the test."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from parcours.core.settings import Settings
from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, create_resource, new_account, new_patient, new_practitioner, totp_now
from tests.conftest import FAST_SUBSCRIPTIONS, free_port, uniq
from tests.oidc_provider import ETAB_CLIENT, FC_CLIENT, PSC_CLIENT, IdentityProvider, providers_for, serve
from tests.smart_helpers import CALLBACK, authorize_params, pkce, register
from tests.test_pages_browser import axe_violations, browser, new_page  # noqa: F401 - the browser fixture


class Live:
    def __init__(self, base: str, idp: IdentityProvider) -> None:
        self.base, self.idp = base, idp


@pytest.fixture(scope="module")
def live(pg_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """An identity provider, then the platform over HTTP configured to use it."""
    from parcours.web.app import create_app

    idp_port, port = free_port(), free_port()
    idp = IdentityProvider(idp_port)
    idp.clients = {PSC_CLIENT: uniq("psc"), FC_CLIENT: uniq("fc"), ETAB_CLIENT: uniq("etab")}
    base = f"http://127.0.0.1:{port}"
    settings = Settings(database_url=pg_uri, base_url=base, home=tmp_path_factory.mktemp("smart-live"),
                        oidc_providers=providers_for(idp), **FAST_SUBSCRIPTIONS)
    with serve(idp.app, idp_port), serve(create_app(settings), port):
        yield Live(base, idp)


async def _ignore_callback(context) -> None:  # type: ignore[no-untyped-def]
    # The app's redirect URI is not served: the test reads the URL the browser is sent to.
    await context.route(CALLBACK.rsplit("/", 1)[0] + "/**", lambda route: route.fulfill(status=200, body="app", content_type="text/plain"))


async def test_consent_page_in_french_and_english(browser, live: Live, client, platform) -> None:  # noqa: F811
    pid = await new_patient(client, family="Faure", given="Nina")
    await create_resource(client, {"resourceType": "Observation", "status": "final", "code": {"text": "Tension"},
                                   "subject": {"reference": f"Patient/{pid}"}})
    acct = await new_account(platform, "patient", f"Patient/{pid}")
    client_id, _ = await register(platform, name="Carnet de tension")
    _, challenge = pkce()
    params = authorize_params(client_id, live.base + "/fhir", scope="launch/patient openid fhirUser offline_access patient/*.rs",
                              challenge=challenge)
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await _ignore_callback(context)
        await page.goto(live.base + "/oauth/authorize?" + urlencode(params))
        await page.wait_for_url("**/signin?next=*")
        await page.get_by_label("Adresse e-mail").fill(acct.email)
        await page.get_by_label("Mot de passe").fill(PASSWORD)
        await page.get_by_role("button", name="Se connecter").click()
        await page.get_by_role("heading", level=1, name="Autoriser une application").wait_for()
        main = await page.locator("main").inner_text()
        assert "Carnet de tension" in main and "Dossier concerné : le vôtre (Nina Faure)" in main
        assert "Toutes les données de votre dossier : lire, rechercher" in main
        assert await axe_violations(page) == []

        await page.get_by_role("button", name="English").click()
        await page.get_by_role("heading", level=1, name="Authorise an application").wait_for()
        assert await page.locator("html").get_attribute("lang") == "en"
        assert "All data of your record: read, search" in await page.locator("main").inner_text()
        assert await axe_violations(page) == []

        await page.get_by_role("button", name="Authorise").click()
        await page.wait_for_url(CALLBACK + "?*")
        got = parse_qs(urlsplit(page.url).query)
        assert got["state"] == [params["state"]] and got["code"][0]
        assert errors == [], errors
    finally:
        await context.close()


async def test_client_registration_page(browser, live: Live, platform) -> None:  # noqa: F811
    secret = totp_codes.new_secret()
    admin = await new_account(platform, "admin", None, totp_secret=secret, display_name="Agnès Admin")
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await page.goto(live.base + "/signin")
        await page.get_by_label("Adresse e-mail").fill(admin.email)
        await page.get_by_label("Mot de passe").fill(PASSWORD)
        await page.get_by_role("button", name="Se connecter").click()
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification").fill(totp_now(secret, platform.clock.now()))
        await page.get_by_role("button", name="Vérifier").click()
        await page.wait_for_url("**/workspace")
        await page.get_by_role("navigation").get_by_role("link", name="Administration").click()
        await page.get_by_role("link", name="Applications connectées (SMART on FHIR)").click()
        await page.get_by_role("heading", level=1, name="Applications connectées").wait_for()
        assert await axe_violations(page) == []

        name = uniq("Agenda partagé")
        await page.get_by_label("Nom", exact=True).fill(name)
        await page.get_by_label("Confidentielle (serveur de l'éditeur, avec secret)").check()
        await page.get_by_label("Adresses de retour (redirect_uri)").fill("https://agenda.example/callback")
        await page.get_by_label("Portées autorisées").fill("openid fhirUser launch/patient patient/*.rs")
        await page.get_by_role("button", name="Enregistrer", exact=True).click()
        await page.get_by_role("heading", level=2, name=f"Application « {name} » enregistrée").wait_for()
        facts = await page.locator(".created").inner_text()
        assert "Secret" in facts and "client_id" in facts
        assert name in await page.get_by_role("table").inner_text()
        assert await axe_violations(page) == []

        # A mistake is explained next to the form, in English too.
        await page.get_by_role("button", name="English").click()
        await page.get_by_role("heading", level=1, name="Connected applications").wait_for()
        await page.get_by_label("Name", exact=True).fill("Broken")
        await page.get_by_label("Allowed scopes").fill("system/*.rs")
        await page.get_by_label("Redirect addresses (redirect_uri)").fill("https://x.example/cb")
        await page.get_by_role("button", name="Register", exact=True).click()
        await page.get_by_role("alert").wait_for()
        assert "The application was not registered" in await page.get_by_role("alert").inner_text()
        assert await axe_violations(page) == []
        assert [e for e in errors if "400" not in e] == [], errors  # the refused form answers 400
    finally:
        await context.close()


async def test_pro_sante_connect_sign_in_in_the_browser(browser, live: Live, client, platform) -> None:  # noqa: F811
    pract = await new_practitioner(client, family="Girard", given="Paul")
    rpps = (await client.get(f"/fhir/Practitioner/{pract}")).json()["identifier"][0]["value"]
    await new_account(platform, "practitioner", f"Practitioner/{pract}", totp_secret=totp_codes.new_secret())
    live.idp.identity = {"sub": uniq("psc-sub")}
    live.idp.userinfo_extra = {"SubjectNameID": rpps}
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await page.goto(live.base + "/signin")
        assert await axe_violations(page) == []
        await page.get_by_role("link", name="Se connecter avec Pro Santé Connect").click()
        await page.wait_for_url("**/workspace")
        await page.get_by_role("heading", level=1, name="Bonjour Paul Girard").wait_for()
        assert errors == [], errors
        # An identity nobody linked: the error page says so.
        await page.get_by_role("button", name="Se déconnecter").click()
        await page.wait_for_url("**/signin?done=signed_out")
        live.idp.identity = {"sub": uniq("psc-sub")}
        live.idp.userinfo_extra = {"SubjectNameID": "8" + "7" * 11}
        await page.get_by_role("link", name="Se connecter avec Pro Santé Connect").click()
        await page.get_by_role("heading", level=1, name="Connexion impossible").wait_for()
        assert "Aucun compte Parcours" in await page.get_by_role("alert").inner_text()
        assert await axe_violations(page) == []
    finally:
        await context.close()


