"""Tele-expertise pages in real browsers (Debian's Chromium, Playwright): a GP asks a
dermatologist about a lesion with a photo; the consent box left unticked is refused with a
clear message and nothing typed is lost; the dermatologist (in English) accepts, asks a
question, the GP answers, the dermatologist starts and sends a structured opinion; the GP
sees the request completed and the opinion in the patient's record. axe-core finds no
serious or critical violation on the pages, which run under their CSP without console errors.
"""

from __future__ import annotations

from parcours.security import totp as totp_codes
from parcours.services.directory.nomenclatures import SPECIALTY_SYSTEM
from tests.accounts_helpers import create_resource, new_account, new_patient, new_practitioner
from tests.conftest import uniq
from tests.record_helpers import make_png
from tests.test_messaging_browser import sign_in
from tests.test_pages_browser import axe_violations, browser, new_page

__all__ = ["browser"]


async def test_a_gp_asks_a_dermatologist_and_gets_the_opinion(browser, live_server: str, client, platform, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gp_secret, derm_secret = totp_codes.new_secret(), totp_codes.new_secret()
    gp = f"Practitioner/{await new_practitioner(client, family='Giraud', given='Hugo')}"
    derm_family = uniq("Vasseur").replace("-", "")
    derm = f"Practitioner/{await new_practitioner(client, family=derm_family, given='Anne', with_role=False)}"
    org = await create_resource(client, {"resourceType": "Organization", "name": "CHU — dermatologie"})
    await create_resource(client, {"resourceType": "PractitionerRole", "active": True, "practitioner": {"reference": derm},
                                   "organization": {"reference": f"Organization/{org}"},
                                   "specialty": [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "SM15"}]}]})
    patient = await new_patient(client, family="Lefèvre", given="Hélène")
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient}"},
                                   "participant": [{"member": {"reference": gp}}]})
    gp_acct = await new_account(platform, "practitioner", gp, totp_secret=gp_secret, display_name="Dr Hugo Giraud")
    derm_acct = await new_account(platform, "practitioner", derm, totp_secret=derm_secret, display_name="Dr Anne Vasseur")
    photo = tmp_path / "dos.png"
    photo.write_bytes(make_png(64, 48))
    question = "Lésion pigmentée du dos apparue il y a 3 mois : avis ?"

    errors: list[str] = []
    gp_ctx, g = await new_page(browser, "fr-FR", errors)
    derm_ctx, d = await new_page(browser, "en-GB", errors)
    try:
        await sign_in(g, live_server, gp_acct.email, lang="fr", secret=gp_secret, platform=platform)
        await g.get_by_role("navigation").get_by_role("link", name="Téléexpertise").click()
        await g.wait_for_url("**/workspace/expertise")
        await g.get_by_role("heading", level=1, name="Téléexpertise").wait_for()
        assert await axe_violations(g) == []
        await g.get_by_role("link", name="Nouvelle demande de téléexpertise").click()
        await g.get_by_role("heading", level=1, name="Nouvelle demande de téléexpertise").wait_for()
        await g.get_by_label("Patient", exact=True).select_option(label="Hélène Lefèvre")
        await g.get_by_label("Question clinique").fill(question)
        await g.get_by_label("Rechercher un professionnel dans l'annuaire (nom)").fill(derm_family)
        await g.get_by_role("button", name="Rechercher").click()
        await g.get_by_role("radio", name=derm_family).first.check()
        # What was typed came back with the search results.
        assert await g.get_by_label("Question clinique").input_value() == question
        await g.get_by_label("Urgence").select_option("urgent")
        await g.get_by_label("Photos et documents").set_input_files(str(photo))
        assert await axe_violations(g) == []
        await g.get_by_role("button", name="Envoyer la demande").click()
        # No consent: refused, said clearly next to the box, nothing lost.
        alert = g.get_by_role("alert")
        await alert.wait_for()
        assert "consentement du patient doit être recueilli" in await alert.inner_text()
        consent = g.get_by_label("Le patient a été informé et consent")
        assert await consent.get_attribute("aria-invalid") == "true"
        assert await g.get_by_label("Question clinique").input_value() == question
        assert await g.get_by_role("radio", name=derm_family).is_checked()
        assert await g.get_by_label("Urgence").input_value() == "urgent"
        assert await axe_violations(g) == []
        await consent.check()
        await g.get_by_label("Photos et documents").set_input_files(str(photo))
        await g.get_by_role("button", name="Envoyer la demande").click()
        await g.wait_for_url("**/workspace/expertise/*?done=sent")
        request_url = g.url.split("?")[0]
        assert await g.locator("#exp-status").get_attribute("data-status") == "requested"
        assert await g.get_by_role("img", name="dos.png").count() == 1
        assert await axe_violations(g) == []

        # The dermatologist, in English.
        await sign_in(d, live_server, derm_acct.email, lang="en", secret=derm_secret, platform=platform)
        await d.get_by_role("navigation").get_by_role("link", name="Tele-expertise").click()
        await d.get_by_role("heading", level=1, name="Tele-expertise").wait_for()
        received = d.get_by_role("region", name="Received requests")
        assert await received.locator("[data-status='requested']").inner_text() == "Requested : 1"
        assert await axe_violations(d) == []
        await received.get_by_role("link", name=question).click()
        await d.get_by_role("heading", level=1, name="Tele-expertise request").wait_for()
        await d.get_by_role("button", name="Accept the request").click()
        await d.wait_for_url("**?done=accepted")
        await d.get_by_label("Your message").fill("Has it bled or itched?")
        await d.get_by_role("button", name="Send the message").click()
        await d.wait_for_url("**?done=message*")
        assert await axe_violations(d) == []

        await g.goto(request_url)
        assert await g.locator("#exp-status").get_attribute("data-status") == "accepted"
        assert "Has it bled or itched?" in await g.locator(".thread").inner_text()
        await g.get_by_label("Votre message").fill("Non, ni saignement ni prurit.")
        await g.get_by_role("button", name="Envoyer le message").click()
        await g.wait_for_url("**?done=message*")

        await d.goto(request_url)
        assert "Non, ni saignement ni prurit." in await d.locator(".thread").inner_text()
        await d.get_by_role("button", name="Start the expertise").click()
        await d.wait_for_url("**?done=in-progress")
        # An incomplete opinion comes back with what was typed.
        await d.get_by_label("Recommendations").fill("Excision with 2 mm margins.")
        await d.get_by_role("button", name="Send the opinion").click()
        await d.get_by_text("Write the opinion's answer (conclusion).").wait_for()
        assert await d.get_by_label("Recommendations").input_value() == "Excision with 2 mm margins."
        assert await axe_violations(d) == []
        await d.get_by_label("Answer / conclusion").fill("Atypical naevus.")
        await d.get_by_role("radio", name="Yes").check()
        await d.get_by_label("Proposed follow-up").fill("Dermoscopy in 6 months.")
        await d.get_by_role("button", name="Send the opinion").click()
        await d.wait_for_url("**?done=opinion")
        assert await d.locator("#exp-status").get_attribute("data-status") == "completed"

        await g.goto(request_url)
        assert await g.locator("#exp-status").get_attribute("data-status") == "completed"
        opinion = await g.get_by_role("region", name="Avis de l'expert").inner_text()
        assert "Atypical naevus." in opinion and "Excision with 2 mm margins." in opinion and "Oui" in opinion
        assert await axe_violations(g) == []
        await g.get_by_role("link", name="Voir dans le dossier du patient").click()
        await g.wait_for_url(f"**/workspace/patients/{patient}")
        assert "Avis de téléexpertise" in await g.locator("main").inner_text()

        await g.goto(live_server + "/workspace/expertise")
        sent = g.get_by_role("region", name="Demandes envoyées")
        assert await sent.locator("[data-status='completed']").inner_text() == "Terminée : 1"
        # The only console errors are the refused forms' own statuses (422), shown on their pages.
        assert errors and all("422" in e for e in errors), errors
    finally:
        await gp_ctx.close()
        await derm_ctx.close()
