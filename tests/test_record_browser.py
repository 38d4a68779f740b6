"""The shared record's pages in Chromium: axe-core finds no serious or critical violation,
nothing overflows a phone's screen, no console error under the Content-Security-Policy;
a patient on a phone, a professional who uploads through the form, an operator's queue."""

from __future__ import annotations

import os

import pytest

from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, new_account, totp_now
from tests.record_helpers import fixture, make_pdf, people
from tests.test_pages_browser import axe_violations, browser, new_page  # noqa: F401 - the browser fixture
from tests.test_record_labs import HL7, with_identity
from tests.test_record_pages import seed

PHONE = {"viewport": {"width": 375, "height": 740}, "is_mobile": True, "has_touch": True}


async def sign_in(page, base: str, email: str, secret: str | None = None, *, fr: bool = True, now=None) -> None:  # type: ignore[no-untyped-def]
    await page.goto(base + "/signin")
    await page.get_by_label("Adresse e-mail" if fr else "E-mail address").fill(email)
    await page.get_by_label("Mot de passe" if fr else "Password").fill(PASSWORD)
    await page.get_by_role("button", name="Se connecter" if fr else "Sign in").click()
    if secret:
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification" if fr else "Verification code").fill(totp_now(secret, now))
        await page.get_by_role("button", name="Vérifier" if fr else "Verify").click()


async def check(page) -> None:  # type: ignore[no-untyped-def]
    shots = os.environ.get("RECORD_SCREENSHOTS")  # a folder: look at the pages as a person would
    if shots:
        name = page.url.split("//", 1)[1].split("/", 1)[1].replace("/", "_").replace("?", "_")[:80]
        await page.screenshot(path=f"{shots}/{name}.png", full_page=True)
    assert await axe_violations(page) == [], page.url
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), page.url


async def test_patient_record_on_a_phone(browser, live_server: str, client, platform) -> None:  # noqa: F811
    p = await people(client, platform, birth="1961-06-15")
    await seed(client, p.patient_id, p.doctor_id)
    await client.post(f"/api/record/patients/{p.patient_id}/documents", headers=p.doctor,
                      files={"file": ("cr.pdf", make_pdf("Compte rendu de consultation"), "application/pdf")},
                      data={"type": "11488-4", "care_date": "2026-02-10", "title": "Consultation de suivi"})
    for _ in range(2):
        await client.post("/api/hl7v2", content=with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19610615"), headers=HL7)
    acct = await new_account(platform, "patient", f"Patient/{p.patient_id}")
    errors: list[str] = []
    for lang, texts in (("fr-FR", ("Mon dossier", "Résultats", "Ligne de vie")), ("en-GB", ("My record", "Results", "Timeline"))):
        context, page = await new_page(browser, lang, errors, **PHONE)
        try:
            await sign_in(page, live_server, acct.email, fr=lang.startswith("fr"))
            await page.wait_for_url("**/portal")
            await page.get_by_role("link", name=texts[0]).first.click()
            await page.wait_for_url("**/portal/records")
            await page.get_by_role("heading", level=1, name=texts[0]).wait_for()
            await page.get_by_role("link", name="Consultation de suivi").wait_for()
            await check(page)
            await page.get_by_role("link", name=texts[1], exact=True).click()
            await page.wait_for_url("**/portal/records/results")
            assert await page.locator("svg.trend").count() >= 15
            await check(page)
            await page.get_by_role("link", name=texts[2], exact=True).click()
            await page.wait_for_url("**/portal/records/timeline")
            await page.goto(live_server + "/portal/records/timeline?zoom=month&at=2026-02")
            await page.get_by_role("link", name="Consultation de suivi du diabète").wait_for()
            await check(page)
            await page.get_by_role("link", name="Consultation de suivi du diabète").click()
            await page.wait_for_url("**/items/Encounter/**")
            await check(page)
        finally:
            await context.close()
    assert errors == [], errors


async def test_professional_adds_a_document_through_the_form(browser, live_server: str, client, platform,  # noqa: F811
                                                             tmp_path) -> None:
    p = await people(client, platform)
    secret = totp_codes.new_secret()
    acct = await new_account(platform, "practitioner", f"Practitioner/{p.doctor_id}", totp_secret=secret)
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors)
    try:
        await sign_in(page, live_server, acct.email, secret, now=platform.clock.now())
        await page.wait_for_url("**/workspace")
        await page.get_by_role("link", name="Patients").first.click()
        await page.wait_for_url("**/workspace/patients")
        await check(page)
        await page.goto(f"{live_server}/workspace/patients/{p.patient_id}")
        await check(page)
        pdf = tmp_path / "lettre.pdf"
        pdf.write_bytes(make_pdf("Lettre de liaison à la sortie", "Retour à domicile"))
        await page.get_by_label("Fichier").set_input_files(str(pdf))
        await page.get_by_label("Type de document").select_option("11490-0")
        await page.get_by_label("Date de l'acte ou des soins").fill("2026-02-12")
        await page.get_by_role("button", name="Ajouter au dossier").click()
        await page.get_by_text("Le document a été ajouté au dossier.").wait_for()
        await page.get_by_role("link", name="Lettre de liaison à la sortie d'un établissement de soins").wait_for()
        await check(page)
    finally:
        await context.close()
    assert errors == [], errors


async def test_operator_queue_is_accessible(browser, live_server: str, client, platform) -> None:  # noqa: F811
    await client.post("/api/hl7v2", content=fixture("ORU_CISIS_SEGUR_N3.hl7"), headers=HL7)
    secret = totp_codes.new_secret()
    acct = await new_account(platform, "staff", None, totp_secret=secret)
    errors: list[str] = []
    context, page = await new_page(browser, "fr-FR", errors, **PHONE)
    try:
        await sign_in(page, live_server, acct.email, secret, now=platform.clock.now())
        await page.wait_for_url("**/workspace")
        await page.goto(live_server + "/workspace/lab-inbox?q=PAT-TROIS")
        await page.get_by_role("heading", level=1, name="Résultats à rapprocher").wait_for()
        await check(page)
    finally:
        await context.close()
    assert errors == [], errors


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
