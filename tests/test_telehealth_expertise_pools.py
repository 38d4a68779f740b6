"""Tele-expertise: specialty pools (the claim race), structured opinions and due-date reminders
by e-mail through a real SMTP server (aiosmtpd, started here)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx

from parcours.security import tokens
from parcours.security.caller import PLATFORM
from parcours.services.booking import notify
from parcours.services.directory.nomenclatures import SPECIALTY_SYSTEM
from parcours.services.telehealth import expertise_reminders
from tests.accounts_helpers import (
    create_resource,
    new_account,
    new_patient,
    new_practitioner,
)
from tests.conftest import BASE, uniq, wait_for_lock_waiters

API = "/api/telehealth/expertise"
DERMATO = "SM15"


def _as(app, platform, who: str) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    token = tokens.issue(platform.token_key, subject=who, kind="practitioner", scopes=["user/*.*"], fhir_user=who)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers={"Authorization": f"Bearer {token}"})




async def dermatologist(client: httpx.AsyncClient, org: str, family: str) -> str:
    pid = await new_practitioner(client, family=family, given="Anne", with_role=False)
    await create_resource(client, {
        "resourceType": "PractitionerRole", "active": True, "practitioner": {"reference": f"Practitioner/{pid}"},
        "organization": {"reference": f"Organization/{org}"},
        "specialty": [{"coding": [{"system": SPECIALTY_SYSTEM, "code": DERMATO}]}],
    })
    return f"Practitioner/{pid}"


async def setup_case(client: httpx.AsyncClient) -> tuple[str, str, str]:
    """A GP who follows a patient, and a hospital with a dermatology pool; returns (gp, patient, org)."""
    gp = f"Practitioner/{await new_practitioner(client, family='Giraud', given='Hugo')}"
    patient = await new_patient(client)
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient}"},
                                   "participant": [{"member": {"reference": gp}}]})
    org = await create_resource(client, {"resourceType": "Organization", "name": uniq("CHU dermatologie ")})
    return gp, patient, org


def _body(patient: str, **kw: object) -> dict:
    return {"patient": patient, "question": "Lésion pigmentée du dos : avis ?", "priority": "routine",
            "due": (datetime.now(UTC) + timedelta(days=4)).isoformat(), "consent": True, **kw}


async def test_a_pool_request_is_seen_by_the_specialty_and_claimed_by_exactly_one(app, client, platform) -> None:
    gp, patient, org = await setup_case(client)
    d1 = await dermatologist(client, org, "Roux")
    d2 = await dermatologist(client, org, "Blanc")
    other_org = await create_resource(client, {"resourceType": "Organization", "name": "Clinique du Parc"})
    elsewhere = await dermatologist(client, other_org, "Faure")
    gp2 = f"Practitioner/{await new_practitioner(client, family='Morel', given='Paul')}"
    async with _as(app, platform, gp) as g, _as(app, platform, d1) as a, _as(app, platform, d2) as b, \
            _as(app, platform, elsewhere) as x, _as(app, platform, gp2) as y:
        r = await g.post(API, json=_body(patient, specialty="SM99999"))
        assert r.status_code == 422 and "SM99999" in r.text
        r = await g.post(API, json=_body(patient, specialty=DERMATO, expert=d1))
        assert r.status_code == 422
        r = await g.post(API, json=_body(patient, specialty=DERMATO, organization=f"Organization/{org}"))
        assert r.status_code == 201, r.text
        task = r.json()["task"]
        t = (await client.get(f"/fhir/Task/{task}")).json()
        assert "owner" not in t and t["performerType"][0]["coding"][0]["code"] == DERMATO

        # Both dermatologists of that hospital see it in their pool; not one of another place, nor a GP.
        for c in (a, b):
            pool = (await c.get(API)).json()["pool"]
            assert task in [p["id"] for p in pool["tasks"]] and pool["counters"].get("requested", 0) >= 1
        assert task not in [p["id"] for p in (await x.get(API)).json()["pool"]["tasks"]]
        assert (await y.get(API)).json()["pool"]["tasks"] == []
        assert (await x.post(f"{API}/{task}/status", json={"status": "accepted"})).status_code == 404
        # Nobody took it: no thread yet.
        assert (await g.post(f"{API}/{task}/messages", json={"text": "?"})).status_code == 409

        # The race: both claims wait on the Task's row, held here; released, exactly one wins.
        async with platform.transaction(PLATFORM) as holder:
            assert await holder.lock("Task", task) is not None
            claims = [asyncio.create_task(c.post(f"{API}/{task}/status", json={"status": "accepted"})) for c in (a, b)]
            await wait_for_lock_waiters(holder.conn, 2, "two claims")
        results = await asyncio.gather(*claims)
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 409], [r.text for r in results]
        loser = next(r for r in results if r.status_code == 409)
        assert "already taken" in loser.text
        t = (await client.get(f"/fhir/Task/{task}")).json()
        winner = d1 if results[0].status_code == 200 else d2
        assert t["status"] == "accepted" and t["owner"]["reference"] == winner

        # Out of both pools now; in the winner's received list; the loser cannot see it.
        for c in (a, b):
            assert task not in [p["id"] for p in (await c.get(API)).json()["pool"]["tasks"]]
        w, lo = (a, b) if winner == d1 else (b, a)
        assert task in [p["id"] for p in (await w.get(API)).json()["received"]["tasks"]]
        assert (await lo.get(f"{API}/{task}/messages")).status_code == 404
        # The winner reaches the patient and talks with the GP.
        assert (await w.get(f"/fhir/Patient/{patient}")).status_code == 200
        assert (await w.post(f"{API}/{task}/messages", json={"text": "Photo de près ?"})).status_code == 201
        thread = (await g.get(f"{API}/{task}/messages")).json()["messages"]
        assert thread[0]["recipient"][0]["reference"] == gp


async def test_a_structured_opinion_goes_to_the_record(app, client, platform) -> None:
    gp, patient, org = await setup_case(client)
    derm = await dermatologist(client, org, "Lemoine")
    async with _as(app, platform, gp) as g, _as(app, platform, derm) as d:
        task = (await g.post(API, json=_body(patient, expert=derm))).json()["task"]
        await d.post(f"{API}/{task}/status", json={"status": "accepted"})
        await d.post(f"{API}/{task}/status", json={"status": "in-progress"})
        r = await d.post(f"{API}/{task}/opinion", json={"conclusion": "   "})
        assert r.status_code == 422 and "conclusion" in r.text
        r = await d.post(f"{API}/{task}/opinion", json={
            "conclusion": "Naevus atypique.", "recommendations": "Exérèse avec marges de 2 mm.",
            "consultationNeeded": True, "followUp": "Contrôle dermatoscopique à 6 mois."})
        assert r.status_code == 201, r.text
        doc = (await client.get(f"/fhir/{r.json()['opinion']}")).json()
        text = __import__("base64").b64decode(doc["content"][0]["attachment"]["data"]).decode()
        assert "Naevus atypique." in text and "Exérèse avec marges de 2 mm." in text
        assert "Consultation spécialisée nécessaire : oui" in text and "Contrôle dermatoscopique à 6 mois." in text
        fields = {e["url"]: e for e in doc["extension"][0]["extension"]}
        assert fields["consultationNeeded"]["valueBoolean"] is True
        assert doc["subject"]["reference"] == f"Patient/{patient}" and doc["type"]["coding"][0]["code"] == "11488-4"
        # The GP finds it in the patient's record.
        found = (await g.get(f"/fhir/DocumentReference?subject=Patient/{patient}&type=http://loinc.org|11488-4")).json()
        assert doc["id"] in [e["resource"]["id"] for e in found.get("entry", [])]


async def test_reminders_near_and_after_the_due_date_once_per_stage(app, client, platform, smtp) -> None:
    inbox, port = smtp
    settings = platform.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port})
    channel = notify.SmtpEmail(settings)
    gp, patient, org = await setup_case(client)
    private = await create_resource(client, {"resourceType": "Organization", "name": uniq("Cabinet ")})
    named = await dermatologist(client, private, "Perrot")  # outside the pool
    p1 = await dermatologist(client, org, "Caron")
    p2 = await dermatologist(client, org, "Vidal")
    mails = {}
    for who in (named, p1, p2):
        mails[who] = uniq("derm") + "@example.org"
        await new_account(platform, "practitioner", who, email=mails[who])
    due = datetime.now(UTC) + timedelta(days=4)
    async with _as(app, platform, gp) as g:
        t_named = (await g.post(API, json=_body(patient, expert=named, due=due.isoformat()))).json()["task"]
        t_pool = (await g.post(API, json=_body(patient, specialty=DERMATO, organization=f"Organization/{org}",
                                               due=due.isoformat()))).json()["task"]
        assert t_named and t_pool

    # Well before the due date: nothing.
    await expertise_reminders.run_due(platform, channel, now=due - timedelta(days=3))
    assert all(inbox.to(m) == [] for m in mails.values())
    # A quarter of the time left (one day of four): "due soon", once, to the expert and to each pool member.
    for _ in range(2):
        await expertise_reminders.run_due(platform, channel, now=due - timedelta(hours=20))
    for who in (named, p1, p2):
        got = inbox.to(mails[who])
        assert len(got) == 1 and got[0]["Subject"] == "Demande de téléexpertise à rendre bientôt"
    # Past the due date: "overdue", once.
    for _ in range(2):
        await expertise_reminders.run_due(platform, channel, now=due + timedelta(hours=1))
    for who in (named, p1, p2):
        got = inbox.to(mails[who])
        assert [m["Subject"] for m in got] == ["Demande de téléexpertise à rendre bientôt", "Demande de téléexpertise en retard"]
    body = inbox.to(mails[named])[1].get_content()
    assert f"/workspace/expertise/{t_named}" in body
    for word in ("Lésion", "dos", "Dermato", "Giraud", "Lefèvre"):  # no clinical content, nobody named
        assert all(word not in m.as_string() for m in inbox.messages if m["To"] in mails.values())
    t = (await client.get(f"/fhir/Task/{t_pool}")).json()
    assert sorted(e["valueCode"] for e in t["extension"] if e["url"].endswith("expertise-reminder-sent")) == ["due-soon", "overdue"]
