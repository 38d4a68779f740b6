"""Tele-stroke pages in real browsers (Debian's Chromium, Playwright): the emergency physician
(in French) sends an urgent request; the on-call neurologist (in English), whose alert inbox is
already open, sees the alert arrive live (role="alert", through the change feed and the socket),
opens it and acknowledges, then records the decision; the emergency physician's request page, left open, shows
the acknowledgment and the decision in the key-times timeline without a reload. A roster form with a wrong shift is
refused with a clear message, nothing typed lost. axe-core finds no serious or critical
violation; the pages run under their CSP without console errors.
"""

from __future__ import annotations

from datetime import time

from parcours.security import totp as totp_codes
from parcours.services.telehealth import stroke
from tests.accounts_helpers import create_resource, new_account, new_patient, new_practitioner
from tests.test_messaging_browser import sign_in
from tests.test_pages_browser import axe_violations, browser, new_page

__all__ = ["browser"]
LIVE = 15_000  # ms


async def test_an_emergency_physician_alerts_the_on_call_neurologist_live(browser, live_server: str, client, platform) -> None:  # type: ignore[no-untyped-def]
    er_secret, neuro_secret = totp_codes.new_secret(), totp_codes.new_secret()
    er = f"Practitioner/{await new_practitioner(client, family='Urgences', given='Inès')}"
    neuro = f"Practitioner/{await new_practitioner(client, family='Neuro', given='Paul')}"
    backup = f"Practitioner/{await new_practitioner(client, family='Neuro', given='Lise')}"
    patient = await new_patient(client)
    site = await create_resource(client, {"resourceType": "Location", "name": "CH de Saint-Quentin, urgences"})
    always = [stroke.Shift(d, time(0), time(0), (neuro, backup)) for d in stroke.DAYS]  # 24 h shifts every day
    roster = await create_resource(client, stroke.roster_resource("Neurologie vasculaire", f"Location/{site}", always))
    await create_resource(client, {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "EMER"},
                                   "subject": {"reference": f"Patient/{patient}"},
                                   "participant": [{"individual": {"reference": er}}]})
    er_acct = await new_account(platform, "practitioner", er, totp_secret=er_secret, display_name="Dr Inès Urgences")
    neuro_acct = await new_account(platform, "practitioner", neuro, totp_secret=neuro_secret, display_name="Dr Paul Neuro")

    errors: list[str] = []
    er_ctx, e = await new_page(browser, "fr-FR", errors)
    neuro_ctx, n = await new_page(browser, "en-GB", errors)
    try:
        await sign_in(n, live_server, neuro_acct.email, lang="en", secret=neuro_secret, platform=platform)
        await n.get_by_role("navigation").get_by_role("link", name="Tele-stroke").click()
        await n.wait_for_url("**/workspace/stroke")
        await n.get_by_role("heading", level=1, name="Stroke alerts").wait_for()
        await n.locator("[data-stroke-connected]").wait_for(timeout=LIVE)
        assert await axe_violations(n) == []

        await sign_in(e, live_server, er_acct.email, lang="fr", secret=er_secret, platform=platform)
        await e.goto(live_server + "/workspace/stroke/rosters/new")
        await e.get_by_label("Spécialité").fill("Neurologie vasculaire")
        await e.get_by_label("Site (Location)").fill(f"Location/{site}")
        await e.get_by_label("Jour 1").select_option("mon")
        await e.get_by_label("Début").first.fill("08:00")
        await e.get_by_label("Fin").first.fill("20:00")
        await e.get_by_label("Personnes d'astreinte").first.fill("Dr Neuro")  # not a reference
        await e.get_by_role("button", name="Enregistrer").click()
        await e.get_by_role("alert").get_by_text("Chaque créneau a un jour et au moins une personne").wait_for()
        assert await e.get_by_label("Personnes d'astreinte").first.input_value() == "Dr Neuro"  # kept
        assert await e.get_by_label("Spécialité").input_value() == "Neurologie vasculaire"
        assert await axe_violations(e) == []

        await e.goto(live_server + "/workspace/stroke/new")
        await e.get_by_role("heading", level=1, name="Nouvelle demande urgente").wait_for()
        await e.get_by_label("Patient (identifiant)").fill(patient)
        await e.get_by_label("Spécialité et site d'astreinte").select_option(roster)
        await e.get_by_label("Score NIHSS").fill("14")
        await e.get_by_label("Heure de début des symptômes").fill("21:50")
        await e.get_by_label("Résumé clinique").fill("Hémiplégie droite, aphasie")
        assert await axe_violations(e) == []
        await e.get_by_role("button", name="Envoyer la demande urgente").click()
        await e.wait_for_url("**/workspace/stroke/*")
        await e.get_by_role("heading", level=1, name="Demande de téléavis AVC").wait_for()
        await e.get_by_text("en attente d'acquittement").wait_for()
        assert await e.get_by_role("button", name="Rejoindre la vidéo").count() == 1  # the room is open at once
        await e.locator("[data-stroke-connected]").wait_for(timeout=LIVE)
        assert await axe_violations(e) == []

        # The neurologist's page, open all along, shows the alert without a reload.
        alert = n.get_by_role("alert")
        await alert.get_by_text("New urgent tele-stroke request").wait_for(timeout=LIVE)
        await alert.get_by_role("link", name="Open and acknowledge the request").click()
        await n.get_by_role("heading", level=1, name="Tele-stroke request").wait_for()
        assert await axe_violations(n) == []
        await n.get_by_role("button", name="Acknowledge the request").click()
        await n.get_by_text("acknowledged", exact=True).wait_for()

        # The requester's page updates its timeline live.
        ack = e.locator(".stroke-timeline li[data-event='acknowledged']")
        await ack.wait_for(timeout=LIVE)
        assert "Acquittement" in await ack.inner_text()
        assert await e.locator("[data-status='accepted']").count() == 1

        # The decision, seen live by the requester.
        await n.get_by_role("radio", name="Transfer for thrombectomy").check()
        await n.get_by_label("Details").fill("Occlusion M1 gauche")
        assert await axe_violations(n) == []
        await n.get_by_role("button", name="Record the decision").click()
        await n.get_by_text("decision given", exact=True).wait_for()
        decision = e.locator(".stroke-timeline li[data-event='decision']")
        await decision.wait_for(timeout=LIVE)
        assert "thrombectomy-transfer: Occlusion M1 gauche" in await decision.inner_text()
        # Only the refused roster form's 422 (the response and its console line).
        assert [x for x in errors if "422" not in x] == [] and len(errors) <= 2
    finally:
        await er_ctx.close()
        await neuro_ctx.close()
