"""Emergency access and the access history in a real browser (Debian's Chromium, Playwright).

A professional with no care relationship finds a patient by INS in the workspace and
breaks the glass with a reason; the patient then signs in on a phone and sees that
access, with its reason, on "Who accessed my record". axe-core finds no serious or
critical violation on the new pages, which run under their CSP without console errors.
"""

from __future__ import annotations

import base64

from parcours.fhir import fr_core
from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, create_resource, new_account, totp_now
from tests.conftest import uniq
from tests.test_pages_browser import axe_violations, browser, new_page

__all__ = ["browser"]  # the module-scoped Chromium of the page tests


async def test_emergency_access_is_shown_to_the_patient(browser, live_server: str, client, platform) -> None:  # type: ignore[no-untyped-def]
    family = "Navigateur" + uniq("")[1:7].upper()
    ins = "1" + "".join(ch for ch in uniq("") if ch.isdigit()).ljust(14, "5")[:14]
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": family, "given": ["Nina"]}],
                                         "birthDate": "1991-09-10", "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": ins}]})
    await create_resource(client, {"resourceType": "DocumentReference", "status": "current", "subject": {"reference": f"Patient/{pid}"},
                                   "description": "Lettre de sortie",
                                   "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"x").decode()}}]})
    dr = await create_resource(client, {"resourceType": "Practitioner", "name": [{"family": "Secours", "given": ["Sam"], "prefix": ["Dr"]}],
                                        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("5")}]})
    secret = totp_codes.new_secret()
    pro = await new_account(platform, "practitioner", f"Practitioner/{dr}", totp_secret=secret)
    patient = await new_account(platform, "patient", f"Patient/{pid}", identity_status="validated")
    reason = "Perte de connaissance aux urgences, antécédents inconnus"
    errors: list[str] = []

    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await page.goto(live_server + "/signin")
        await page.get_by_label("Adresse e-mail").fill(pro.email)
        await page.get_by_label("Mot de passe").fill(PASSWORD)
        await page.get_by_role("button", name="Se connecter").click()
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification").fill(totp_now(secret, platform.clock.now()))
        await page.get_by_role("button", name="Vérifier").click()
        await page.wait_for_url("**/workspace")
        await page.get_by_role("navigation").get_by_role("link", name="Accès d'urgence").click()
        await page.wait_for_url("**/workspace/emergency-access")
        await page.get_by_role("heading", level=1, name="Accès d'urgence à un dossier").wait_for()
        assert await axe_violations(page) == []
        await page.get_by_label("INS ou nom du patient").fill(ins)
        await page.get_by_role("button", name="Rechercher").click()
        await page.get_by_role("heading", level=3, name=f"Nina {family}").wait_for()
        assert "Pas de relation de soins — accès d'urgence" in await page.locator("main").inner_text()
        assert await axe_violations(page) == []
        await page.get_by_label("Motif de l'accès d'urgence").fill(reason)
        await page.get_by_label("Durée").select_option("60")
        await page.get_by_role("button", name="Ouvrir l'accès d'urgence").click()
        await page.get_by_text("L'accès d'urgence est ouvert.").wait_for()
        assert "Accès d'urgence en cours" in await page.locator("main").inner_text()
        assert await axe_violations(page) == []
        await page.get_by_role("button", name="Se déconnecter").click()
        await page.wait_for_url("**/signin?done=signed_out")
    finally:
        await context.close()

    context, page = await new_page(browser, "en-GB", errors, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        await page.goto(live_server + "/signin")
        await page.get_by_label("E-mail address").fill(patient.email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url("**/portal")
        await page.get_by_role("navigation").get_by_role("link", name="Who accessed my record").click()
        await page.wait_for_url("**/portal/access-history")
        await page.get_by_role("heading", level=1, name="Who accessed my record").wait_for()
        entry = page.locator("li.access-entry.emergency").first
        text = await entry.inner_text()
        assert "Sam Secours" in text and "Emergency access" in text and reason in text
        assert "Opened an emergency access to your record" in text
        assert await axe_violations(page) == []
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        # The privacy page, where the patient could block that professional from now on.
        await page.get_by_role("link", name="Hide a document or block a professional").click()
        await page.wait_for_url("**/portal/privacy")
        assert "Sam Secours" in await page.get_by_label("A professional who accessed your record").inner_text()
        await page.get_by_role("button", name="Hide from professionals : Lettre de sortie").click()
        await page.get_by_text("The document is hidden from professionals").wait_for()
        assert await axe_violations(page) == []
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert errors == [], errors
    finally:
        await context.close()
