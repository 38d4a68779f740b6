"""The booking pages in Chromium (Playwright) with axe-core: a patient finds a practitioner
on the search page (list and map), books a slot, sees it in "my appointments" on a phone;
the practitioner sees it in the agenda (day and week views) and blocks a slot."""

from __future__ import annotations

from datetime import timedelta

from parcours.security import totp as totp_codes
from parcours.services.booking import model
from tests.accounts_helpers import PASSWORD, create_resource, new_account, totp_now
from tests.booking_helpers import define, free_slots, monday_after, new_practice
from tests.conftest import uniq
from tests.test_pages_browser import axe_violations, browser, new_page  # noqa: F401 - the browser fixture

AMIENS = (49.8934, 2.2954)  # the commune's point: distance 0 from a search on "80021"


def real_errors(errors: list[str]) -> list[str]:
    # Map tiles come from the network, which the test browser does not have: the list is the page.
    return [e for e in errors if "tile.openstreetmap.org" not in e and "ERR_" not in e and "Failed to load resource" not in e]


async def sign_in(page, base: str, email: str, *, lang: str = "fr") -> None:  # type: ignore[no-untyped-def]
    await page.goto(base + "/signin")
    await page.get_by_label("Adresse e-mail" if lang == "fr" else "E-mail address").fill(email)
    await page.get_by_label("Mot de passe" if lang == "fr" else "Password").fill(PASSWORD)
    await page.get_by_role("button", name="Se connecter" if lang == "fr" else "Sign in").click()


async def test_patient_books_from_the_search_page_and_the_practitioner_sees_it(browser, live_server: str, client, platform) -> None:  # noqa: F811
    family = "Lemaire" + uniq("")[-5:].replace("-", "")
    pr = await new_practice(client, family=family, given="Anne", lat=AMIENS[0], lon=AMIENS[1])
    now = platform.clock.now()
    sid, _ = await define(platform, pr["role"], ["mon-fri 09:00-12:00 consultation 30", "sat 09:00-10:00 teleconsultation 20"],
                          now=monday_after(now))
    first = (await free_slots(client, sid))[0]
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Moreau", "given": ["Inès"]}],
                                         "telecom": [{"system": "email", "value": f"{uniq('ines')}@example.org"}]})
    patient = await new_account(platform, "patient", f"Patient/{pid}", identity_status="validated")
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await sign_in(page, live_server, patient.email)
        await page.wait_for_url("**/portal")
        await page.get_by_role("link", name="Rendez-vous").first.click()
        await page.wait_for_url("**/portal/appointments")
        assert await axe_violations(page) == []
        await page.get_by_role("link", name="Prendre un rendez-vous").click()
        await page.wait_for_url("**/booking/search")
        await page.get_by_label("Commune ou code postal").fill("80021")
        await page.get_by_label("Distance maximale (km)").fill("1")
        await page.get_by_role("button", name="Rechercher").click()
        await page.wait_for_url("**/booking/search?*")
        hit = page.locator(".results > li", has_text=family)
        await hit.wait_for()
        # The map is drawn (Leaflet from static/vendor) with a numbered marker per result.
        await page.locator("#booking-map .map-pin").first.wait_for()
        assert await page.locator("#booking-map").is_visible()
        assert await axe_violations(page) == []
        when = model.slot_start(first).astimezone(model.PARIS)
        await hit.get_by_role("link", name=f"Dr Anne {family}").click()
        await page.wait_for_url(f"**/booking/practitioners/{pr['role']}")
        await page.get_by_role("link", name="Semaine suivante").wait_for()
        await page.goto(live_server + f"/booking/practitioners/{pr['role']}?from={when.date().isoformat()}")
        await page.get_by_role("heading", level=1, name=f"Dr Anne {family}").wait_for()
        assert await axe_violations(page) == []
        await page.locator(f'a[href="/booking/slots/{first["id"]}"]').click()
        await page.wait_for_url(f"**/booking/slots/{first['id']}")
        assert f"{when:%H:%M}" in await page.locator("main").inner_text()
        assert await axe_violations(page) == []
        await page.get_by_role("button", name="Confirmer le rendez-vous").click()
        await page.wait_for_url("**/portal/appointments?done=booked")
        await page.get_by_text("Votre rendez-vous est réservé").wait_for()
        card = page.locator(".appointments > li", has_text=family)
        assert await card.count() == 1
        assert await axe_violations(page) == []
        assert real_errors(errors) == [], errors
    finally:
        await context.close()
    assert (await client.get(f"/fhir/Slot/{first['id']}")).json()["status"] == "busy"

    # The same page on a phone, in English: nothing wider than the screen.
    errors = []
    context, page = await new_page(browser, "en-GB", errors, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        await sign_in(page, live_server, patient.email, lang="en")
        await page.wait_for_url("**/portal")
        await page.goto(live_server + "/portal/appointments")
        await page.get_by_role("heading", level=1, name="My appointments").wait_for()
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        await page.goto(live_server + "/booking/search?place=80021&radius=1")
        await page.locator(".results > li", has_text=family).wait_for()
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert await axe_violations(page) == []
        assert real_errors(errors) == [], errors
    finally:
        await context.close()

    # The practitioner's agenda: the appointment with the patient's name; a slot blocked.
    secret = totp_codes.new_secret()
    doctor = await new_account(platform, "practitioner", f"Practitioner/{pr['practitioner']}", totp_secret=secret)
    errors = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await sign_in(page, live_server, doctor.email)
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification").fill(totp_now(secret, platform.clock.now()))
        await page.get_by_role("button", name="Vérifier").click()
        await page.wait_for_url("**/workspace")
        await page.get_by_role("navigation", name="Navigation de l'espace professionnel").get_by_role("link", name="Agenda").click()
        await page.wait_for_url("**/workspace/agenda")
        await page.goto(live_server + f"/workspace/agenda?date={when.date().isoformat()}")
        row = page.locator("table.agenda tr", has_text=f"{when:%H:%M}")
        assert "Moreau" in await row.inner_text()
        assert await axe_violations(page) == []
        await page.get_by_role("button", name=f"Bloquer le créneau de {when + timedelta(minutes=30):%H:%M}").click()
        await page.get_by_text("Le créneau est bloqué.").wait_for()
        await page.get_by_role("link", name="Vue semaine").click()
        await page.get_by_role("heading", level=2, name="Samedi", exact=False).first.wait_for()
        assert await axe_violations(page) == []
        assert real_errors(errors) == [], errors
    finally:
        await context.close()
