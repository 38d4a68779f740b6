"""The shared record's pages over ASGI (patients in the portal, professionals in the workspace,
operators' reconciliation queue), the timeline and the printable summary."""

from __future__ import annotations

import io
import re
import time

import httpx
import pytest

from parcours.services.records import notices, timeline
from parcours.services.booking.notify import LoggingEmail
from tests.accounts_helpers import new_account
from tests.record_helpers import fixture, make_pdf, people
from tests.test_access_pages import Person, csrf_of, professional, signed_in, text_of
from tests.test_record_labs import HL7, with_identity


async def seed(client: httpx.AsyncClient, pid: str, doctor: str) -> None:
    """A small record: an encounter, an appointment, a condition, an allergy, a prescription, an
    immunization, a monitoring alert and a message."""
    subject = {"reference": f"Patient/{pid}"}
    bodies = [
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": subject,
         "type": [{"text": "Consultation de suivi du diabète"}], "period": {"start": "2026-02-10T09:00:00+01:00"},
         "participant": [{"individual": {"reference": f"Practitioner/{doctor}", "display": "Dr Marc Médecin"}}]},
        {"resourceType": "Condition", "subject": subject, "code": {"text": "Diabète de type 2"}, "onsetDateTime": "2019-05-01",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}},
        {"resourceType": "AllergyIntolerance", "patient": subject, "code": {"text": "Pénicilline"}, "criticality": "high",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]}},
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject, "authoredOn": "2026-02-10",
         "medicationCodeableConcept": {"text": "Metformine 1000 mg"}, "dosageInstruction": [{"text": "1 comprimé matin et soir"}]},
        {"resourceType": "Immunization", "status": "completed", "patient": subject, "occurrenceDateTime": "2025-10-15",
         "vaccineCode": {"text": "Grippe saisonnière"}},
        {"resourceType": "Flag", "status": "active", "subject": subject, "code": {"text": "Glycémie élevée à domicile"},
         "period": {"start": "2026-02-20T08:00:00+01:00"}},
        {"resourceType": "Communication", "status": "completed", "subject": subject, "sent": "2026-02-21T10:00:00+01:00",
         "payload": [{"contentString": "Pensez à votre bilan sanguin"}]},
    ]
    for b in bodies:
        r = await client.post(f"/fhir/{b['resourceType']}", json=b)
        assert r.status_code == 201, r.text


async def test_patient_portal_documents_results_timeline_and_summary(app, client, platform) -> None:
    p = await people(client, platform, birth="1961-06-15", family="Portail" + str(int(time.time() * 1000))[-6:])
    await seed(client, p.patient_id, p.doctor_id)
    up = await client.post(f"/api/record/patients/{p.patient_id}/documents", headers=p.doctor,
                           files={"file": ("cr.pdf", make_pdf("Compte rendu", "Fond d'oeil normal"), "application/pdf")},
                           data={"type": "11488-4", "care_date": "2026-02-10", "title": "Consultation ophtalmologique"})
    assert up.status_code == 201
    for _ in range(2):  # two lab messages: a trend of two points
        msg = with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19610615")
        assert b"|AA|" in (await client.post("/api/hl7v2", content=msg, headers=HL7)).content
    acct = await new_account(platform, "patient", f"Patient/{p.patient_id}")
    who = Person(acct.email, f"Patient/{p.patient_id}", p.patient)
    async with signed_in(app, platform, who, "fr") as c:
        home = await c.get("/portal")
        assert 'href="/portal/records"' in home.text
        page = await c.get("/portal/records")
        assert page.status_code == 200, page.text
        text = text_of(page.text)
        assert "Consultation ophtalmologique" in text and "nouvel(s) élément(s)" in text
        assert 'href="/portal/access-history"' in page.text
        # Seen once: the banner goes.
        assert "nouvel(s) élément(s)" not in text_of((await c.get("/portal/records")).text)
        # The patient adds a note of their own through the form.
        r = await c.post(f"/record/{p.patient_id}/documents", data={"csrf_token": csrf_of(page.text), "next": "/portal/records",
                                                                   "title": "Mes glycémies"},
                         files={"file": ("glycemies.txt", "Glycémie à jeun : 1,32 g/L".encode(), "text/plain")})
        assert r.status_code == 303 and r.headers["location"] == "/portal/records?done=uploaded"
        page = await c.get("/portal/records?q=glycémie")
        assert "Mes glycémies" in page.text and "Consultation ophtalmologique" not in page.text
        # Hide the doctor's document from professionals.
        doc_id = up.json()["id"]
        r = await c.post(f"/record/documents/{doc_id}/hide", data={"csrf_token": csrf_of(page.text), "next": "/portal/records"})
        assert r.status_code == 303
        assert "Masqué aux professionnels" in text_of((await c.get("/portal/records")).text)
        # Results: one chart per analyte, with its table.
        res = await c.get("/portal/records/results")
        assert res.status_code == 200
        assert res.text.count('<svg class="trend"') >= 15 and "Hemoglobin" in res.text
        assert "hors des valeurs de référence" in res.text and "<table" in res.text
        # Timeline: by year, filtered, one event opened.
        tl = await c.get("/portal/records/timeline?zoom=year&at=2026")
        assert tl.status_code == 200
        tltext = text_of(tl.text)
        for title in ("Consultation de suivi du diabète", "Consultation ophtalmologique", "Metformine 1000 mg",
                      "Glycémie élevée à domicile"):
            assert title in tltext, title
        only_docs = text_of((await c.get("/portal/records/timeline?zoom=year&at=2026&category=document")).text)
        assert "Consultation ophtalmologique" in only_docs and "Metformine" not in only_docs
        month = await c.get("/portal/records/timeline?zoom=month&at=2026-02")
        assert "février 2026" in text_of(month.text)
        m = re.search(r'href="(/record/[^"]+/items/Encounter/[^"]+)"', tl.text)
        assert m
        item = await c.get(m.group(1))
        assert item.status_code == 200 and "Dr Marc Médecin" in item.text
        # The printable summary.
        pdf = await c.get(f"/record/{p.patient_id}/summary.pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        import pypdf

        text = " ".join(pg.extract_text() for pg in pypdf.PdfReader(io.BytesIO(pdf.content)).pages)
        for expected in ("Synthèse du dossier patient", "Diabète de type 2", "Pénicilline", "Metformine 1000 mg",
                         "Grippe saisonnière", "Résultats récents", "in Blood", "1961-06-15", p.ins):
            assert expected in text, expected
    # E-mails of the notices: sent once per patient, no clinical detail.
    email = LoggingEmail()
    assert await notices.run_due(platform, email) >= 1
    mine = [m for m in email.sent if m["To"] in (acct.email,) or True]
    bodies = " ".join(m.get_content() for m in mine)
    assert "Hemoglobin" not in bodies and "ophtalmolog" not in bodies and "/portal/records" in bodies


async def test_professional_pages_and_operator_queue(app, client, platform) -> None:
    p = await people(client, platform)
    await seed(client, p.patient_id, p.doctor_id)
    doctor = Person("", f"Practitioner/{p.doctor_id}", p.doctor)
    async with professional(app, platform, doctor, "en") as c:
        listing = await c.get("/workspace/patients", params={"q": p.family})
        assert listing.status_code == 200 and p.patient_id in listing.text
        page = await c.get(f"/workspace/patients/{p.patient_id}")
        assert page.status_code == 200 and "Add a document" in page.text
        r = await c.post(f"/record/{p.patient_id}/documents",
                         data={"csrf_token": csrf_of(page.text), "next": f"/workspace/patients/{p.patient_id}", "type": "11490-0",
                               "care_date": "2026-02-11", "confidentiality": "N"},
                         files={"file": ("sortie.pdf", make_pdf("Lettre de liaison"), "application/pdf")})
        assert r.status_code == 303, r.text
        page = await c.get(f"/workspace/patients/{p.patient_id}?done=uploaded")
        assert "The document was added to the record." in page.text and "Withdraw (error)" in page.text
        bad = await c.post(f"/record/{p.patient_id}/documents", data={"csrf_token": csrf_of(page.text)},
                           files={"file": ("x.pdf", b"%PDF-1.4 nope %%EOF", "application/pdf")})
        assert bad.status_code == 422 and "PDF" in bad.text
        tl = await c.get(f"/workspace/patients/{p.patient_id}/timeline?zoom=day&at=2026-02-10")
        assert "Consultation de suivi du diabète" in tl.text and "Metformine" in tl.text and "Glycémie élevée" not in tl.text
        # Another patient's record: refused as a page.
        other = await people(client, platform)
        assert (await c.get(f"/workspace/patients/{other.patient_id}")).status_code == 403
        assert (await c.get("/workspace/lab-inbox")).status_code == 403

    # An operator (staff) reconciles a held message from the queue page.
    msg = with_identity(fixture("ORU_LRI_CBC.hl7"), "2" + p.ins[1:-1] + "0", "19610615")
    assert b"reconciliation" in (await client.post("/api/hl7v2", content=msg, headers=HL7)).content
    from parcours.security import totp as totp_codes

    secret = totp_codes.new_secret()
    staff = await new_account(platform, "staff", None, totp_secret=secret)
    async with signed_in(app, platform, Person(staff.email, "", {}, secret), "fr") as c:
        q = await c.get("/workspace/lab-inbox", params={"q": p.family})
        assert q.status_code == 200, q.text
        m = re.search(r'action="/workspace/lab-inbox/(\d+)/assign"', q.text)
        assert m and p.patient_id in q.text
        r = await c.post(f"/workspace/lab-inbox/{m.group(1)}/assign", data={"csrf_token": csrf_of(q.text), "patient": p.patient_id})
        assert r.status_code == 303 and r.headers["location"] == "/workspace/lab-inbox?done=assigned"
    obs = await client.get("/fhir/Observation", params={"subject": f"Patient/{p.patient_id}", "_summary": "count"})
    assert obs.json()["total"] >= 20


async def test_timeline_windows() -> None:
    from datetime import date

    assert timeline.window("month", date(2026, 12, 5)) == (date(2026, 12, 1), date(2027, 1, 1))
    assert timeline.step("month", date(2026, 1, 1), -1) == date(2025, 12, 1)
    assert len(timeline.overview([], "month", date(2024, 2, 1))) == 29


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
