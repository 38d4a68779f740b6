"""The pages in a real browser (Debian's Chromium driven by Playwright), with axe-core checks.

A professional signs in with password and TOTP, a patient with a password; each
lands on their own home page, in French and in English. axe-core (from
node_modules, installed by ``make assets``) must find no serious or critical
accessibility violation on the sign-in page and on both home pages, and the
pages must run under their Content-Security-Policy without a console error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, new_account, new_patient, new_practitioner, totp_now

ROOT = Path(__file__).resolve().parents[1]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run `make browsers` (Debian's chromium package)")
    if not AXE.exists():
        pytest.fail("axe-core is missing: run `make assets` (npm ci)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        await b.close()


async def axe_violations(page) -> list[dict]:  # type: ignore[no-untyped-def]
    """Serious and critical axe-core violations of the page (WCAG 2.1 A/AA and best practices)."""
    # Evaluated through the DevTools protocol, so the page's CSP (no inline script) stays on.
    await page.evaluate(AXE.read_text(encoding="utf-8"))
    found = await page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(' '))}));
    }""")
    return [v for v in found if v["impact"] in ("serious", "critical")]


async def new_page(browser, locale: str, errors: list[str], **kw: object):  # type: ignore[no-untyped-def]
    context = await browser.new_context(locale=locale, **kw)
    page = await context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return context, page


async def test_professional_signs_in_with_totp_and_sees_the_workspace(browser, live_server: str, client, platform) -> None:
    secret = totp_codes.new_secret()
    pract = await new_practitioner(client, family="Petit", given="Jeanne")
    acct = await new_account(platform, "practitioner", f"Practitioner/{pract}", totp_secret=secret)
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await page.goto(live_server + "/")
        assert page.url.endswith("/signin")
        assert await page.locator("html").get_attribute("lang") == "fr"
        assert await axe_violations(page) == []
        await page.get_by_label("Adresse e-mail").fill(acct.email)
        await page.get_by_label("Mot de passe").fill(PASSWORD)
        await page.get_by_role("button", name="Se connecter").click()
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification").fill(totp_now(secret, platform.clock.now()))
        await page.get_by_role("button", name="Vérifier").click()
        await page.wait_for_url("**/workspace")
        await page.get_by_role("heading", level=1, name="Bonjour Jeanne Petit").wait_for()
        nav = page.get_by_role("navigation", name="Navigation de l'espace professionnel")
        assert await nav.get_by_role("link", name="Agenda").count() == 1
        assert "Bientôt disponible" in await nav.inner_text()
        assert await axe_violations(page) == []
        # The skip link is the first stop of the keyboard and leads to the main content.
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.getAttribute('href')") == "#main"

        await page.get_by_role("button", name="English").click()
        await page.get_by_role("heading", level=1, name="Hello Jeanne Petit").wait_for()
        assert await page.locator("html").get_attribute("lang") == "en"
        assert await axe_violations(page) == []
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url("**/signin?done=signed_out")
        assert errors == [], errors
    finally:
        await context.close()


async def test_patient_signs_in_and_sees_the_portal_on_a_phone(browser, live_server: str, client, platform) -> None:
    pid = await new_patient(client, family="Garcia", given="Inès")
    acct = await new_account(platform, "patient", f"Patient/{pid}", identity_status="validated")
    errors: list[str] = []
    context, page = await new_page(browser, "en-GB", errors, viewport={"width": 375, "height": 740}, is_mobile=True,
                                   has_touch=True)
    try:
        await page.goto(live_server + "/signin")
        assert await page.locator("html").get_attribute("lang") == "en"
        assert await axe_violations(page) == []
        await page.get_by_label("E-mail address").fill(acct.email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url("**/portal")
        await page.get_by_role("heading", level=1, name="Hello Inès Garcia").wait_for()
        assert "Validated identity" in await page.locator("main").inner_text()
        assert await axe_violations(page) == []
        # Usable on a phone: nothing wider than the screen.
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")

        await page.get_by_role("link", name="Appointments").first.click()
        await page.wait_for_url("**/portal/appointments")
        await page.get_by_role("heading", level=1, name="My appointments").wait_for()  # booking's page

        await page.get_by_role("button", name="Français").click()
        await page.goto(live_server + "/portal")
        await page.get_by_role("heading", level=1, name="Bonjour Inès Garcia").wait_for()
        assert await axe_violations(page) == []
        assert errors == [], errors
    finally:
        await context.close()


async def test_sessions_list_ends_a_session_with_htmx(browser, live_server: str, client, platform) -> None:
    acct = await new_account(platform, "patient", f"Patient/{await new_patient(client)}")
    errors: list[str] = []
    other_ctx, other = await new_page(browser, "fr-FR", errors, user_agent="Autre appareil")
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        for p in (other, page):
            await p.goto(live_server + "/signin")
            await p.get_by_label("Adresse e-mail").fill(acct.email)
            await p.get_by_label("Mot de passe").fill(PASSWORD)
            await p.get_by_role("button", name="Se connecter").click()
            await p.wait_for_url("**/portal")
        await page.goto(live_server + "/account")
        row = page.locator("#sessions tr", has_text="Autre appareil")
        await row.get_by_role("button", name="Fermer cette session").click()
        await page.get_by_text("La session a été fermée.").wait_for()  # swapped in by htmx: no page load
        assert page.url.endswith("/account")
        await other.goto(live_server + "/portal")
        assert "/signin" in other.url
        assert errors == [], errors
    finally:
        await context.close()
        await other_ctx.close()

