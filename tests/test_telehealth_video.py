"""Teleconsultation video: real Chromium instances meet in a room over WebRTC.

Each participant is its own headless Chromium (fake camera and microphone), signed in
through the pages; signaling goes through the platform's websocket and PostgreSQL
NOTIFY. Two and then three participants must reach ``connected`` with decoded video
frames; ending the call records a virtual Encounter and the report joins the record.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from parcours.security import totp as totp_codes
from tests.accounts_helpers import PASSWORD, create_resource, new_account, new_patient, new_practitioner, totp_now
from tests.test_pages_browser import CHROMIUM, axe_violations

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream", "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required"]


@pytest_asyncio.fixture(scope="module")
async def chromiums() -> AsyncIterator[list[object]]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run `make browsers`")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browsers = [await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS) for _ in range(3)]
        yield browsers
        for b in browsers:
            await b.close()


async def signed_in(browser, base: str, email: str, platform, secret: str | None = None):  # type: ignore[no-untyped-def]
    context = await browser.new_context(locale="fr-FR")
    page = await context.new_page()
    page.on("pageerror", lambda e: print("pageerror", e))
    await page.goto(base + "/signin")
    await page.get_by_label("Adresse e-mail").fill(email)
    await page.get_by_label("Mot de passe").fill(PASSWORD)
    await page.get_by_role("button", name="Se connecter").click()
    if secret:
        await page.wait_for_url("**/signin/totp")
        await page.get_by_label("Code de vérification").fill(totp_now(secret, datetime.now(UTC)))
        await page.get_by_role("button", name="Vérifier").click()
        await page.wait_for_url("**/workspace")
    else:
        await page.wait_for_url("**/portal")
    return context, page


async def wait_media(page, peers: int, timeout: float = 40.0) -> list[dict]:  # type: ignore[no-untyped-def]
    """Until the page has ``peers`` connections, all connected and decoding video."""
    deadline = time.monotonic() + timeout
    stats: list[dict] = []
    while time.monotonic() < deadline:
        stats = await page.evaluate("window.parcoursTele ? window.parcoursTele.stats() : []")
        if len(stats) == peers and all(s["state"] == "connected" and s["framesDecoded"] > 0 for s in stats):
            return stats
        await asyncio.sleep(0.5)
    raise AssertionError(f"media not flowing: {stats}")


async def test_two_then_three_participants_meet_then_the_encounter_is_recorded(chromiums, live_server: str, client, platform) -> None:
    secret1, secret2 = totp_codes.new_secret(), totp_codes.new_secret()
    pract1 = await new_practitioner(client, family="Roux", given="Anne")
    pract2 = await new_practitioner(client, family="Blanc", given="Marc", with_role=False)
    patient = await new_patient(client, family="Morel", given="Lucie")
    pro1 = await new_account(platform, "practitioner", f"Practitioner/{pract1}", totp_secret=secret1)
    pro2 = await new_account(platform, "practitioner", f"Practitioner/{pract2}", totp_secret=secret2)
    pat = await new_account(platform, "patient", f"Patient/{patient}", identity_status="validated")
    now = datetime.now(UTC)
    appt = await create_resource(client, {
        "resourceType": "Appointment", "status": "booked", "serviceType": [{"text": "Téléconsultation"}],
        "start": (now + timedelta(minutes=5)).isoformat(), "end": (now + timedelta(minutes=25)).isoformat(),
        "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                        {"actor": {"reference": f"Practitioner/{pract1}"}, "status": "accepted"},
                        {"actor": {"reference": f"Practitioner/{pract2}"}, "status": "accepted"}]})
    room = f"{live_server}/telehealth/rooms/{appt}"
    ctx1, host = await signed_in(chromiums[0], live_server, pro1.email, platform, secret1)
    ctx2, patient_page = await signed_in(chromiums[1], live_server, pat.email, platform)
    ctx3 = None
    try:
        # The list shows the consultation; the device check page is accessible.
        await patient_page.goto(live_server + "/portal/telehealth")
        await patient_page.get_by_role("link", name="Tester mon matériel").click()
        await patient_page.get_by_role("button", name="Tester mon matériel").click()
        await patient_page.get_by_text("La caméra et le micro fonctionnent.").wait_for()
        assert await axe_violations(patient_page) == []

        await host.goto(room)
        await host.get_by_role("button", name="Rejoindre").click()
        await patient_page.goto(room)
        assert await axe_violations(patient_page) == []
        await patient_page.get_by_role("button", name="Rejoindre").click()
        await patient_page.get_by_text("Vous êtes en salle d'attente").wait_for()
        await host.get_by_role("button", name="Faire entrer").click()  # the waiting room
        await wait_media(host, 1)
        await wait_media(patient_page, 1)

        # In-call chat.
        await patient_page.get_by_label("Message", exact=True).fill("Bonjour docteur")
        await patient_page.get_by_role("button", name="Envoyer").click()
        await host.locator("#tele-chat-log").get_by_text("Bonjour docteur").wait_for()

        # A third participant: a mesh of three.
        ctx3, third = await signed_in(chromiums[2], live_server, pro2.email, platform, secret2)
        await third.goto(room)
        await third.get_by_role("button", name="Rejoindre").click()
        for p in (host, patient_page, third):
            await wait_media(p, 2)
        await host.locator(".tele-quality-good, .tele-quality-fair, .tele-quality-poor").first.wait_for()

        await host.get_by_role("button", name="Terminer la consultation").click()
        await host.wait_for_url("**/report?encounter=*")
        await patient_page.get_by_text("La consultation est terminée.").wait_for()
        encounter = host.url.rsplit("encounter=", 1)[1]
        r = await client.get(f"/fhir/Encounter/{encounter}")
        enc = r.json()
        assert enc["class"]["code"] == "VR" and enc["status"] == "finished"
        assert enc["subject"]["reference"] == f"Patient/{patient}"
        assert enc["appointment"][0]["reference"] == f"Appointment/{appt}"
        assert {p["individual"]["reference"] for p in enc["participant"]} == {f"Practitioner/{pract1}", f"Practitioner/{pract2}"}
        assert enc["period"]["start"] <= enc["period"]["end"]

        await host.get_by_label("Compte rendu").fill("Examen rassurant, contrôle dans un mois.")
        await host.get_by_role("button", name="Enregistrer dans le dossier partagé").click()
        await host.wait_for_load_state()
        assert "Le compte rendu a été ajouté" in await host.locator("main").inner_text(), await host.locator("main").inner_text()
        r = await client.get("/fhir/DocumentReference", params={"encounter": f"Encounter/{encounter}"})
        docs = [e["resource"] for e in r.json().get("entry", [])]
        assert len(docs) == 1
        assert base64.b64decode(docs[0]["content"][0]["attachment"]["data"]).decode() == "Examen rassurant, contrôle dans un mois."
    finally:
        for c in (ctx1, ctx2, ctx3):
            if c is not None:
                await c.close()
