"""Tele-expertise through its API: request, workflow (illegal transitions refused), thread, opinion, lists."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import httpx

from parcours.security import tokens
from tests.accounts_helpers import new_patient, new_practitioner
from tests.conftest import BASE
from tests.record_helpers import make_png

API = "/api/telehealth/expertise"


def _as(app, platform, who: str) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    token = tokens.issue(platform.token_key, subject=who, kind="practitioner", scopes=["user/*.*"], fhir_user=who)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers={"Authorization": f"Bearer {token}"})


async def test_the_expertise_workflow(app, client, platform) -> None:
    gp = f"Practitioner/{await new_practitioner(client, family='Giraud', given='Hugo')}"
    expert = f"Practitioner/{await new_practitioner(client, family='Noël', given='Sarah')}"
    intruder = f"Practitioner/{await new_practitioner(client, family='Perrin', given='Luc')}"
    patient = await new_patient(client)
    # The GP follows the patient (a CareTeam), so may ask about them.
    r = await client.post("/fhir/CareTeam", json={"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient}"},
                                                 "participant": [{"member": {"reference": gp}}]})
    assert r.status_code == 201, r.text
    due = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    photo = base64.b64encode(make_png()).decode()
    body = {"patient": patient, "expert": expert, "question": "Lésion pigmentée du dos : avis ?", "priority": "urgent",
            "due": due, "consent": True, "attachments": [{"contentType": "image/png", "title": "Dos", "data": photo}]}
    async with _as(app, platform, gp) as g, _as(app, platform, expert) as e, _as(app, platform, intruder) as x:
        r = await g.post(API, json={**body, "consent": False})
        assert r.status_code == 422 and r.json()["resourceType"] == "OperationOutcome"
        # A "photo" that is really a web page is refused, whatever type it claims.
        fake = base64.b64encode(b"<html><script>alert(1)</script></html>").decode()
        r = await g.post(API, json={**body, "attachments": [{"contentType": "image/png", "title": "Dos", "data": fake}]})
        assert r.status_code in (415, 422) and r.json()["resourceType"] == "OperationOutcome", r.text
        r = await g.post(API, json=body)
        assert r.status_code == 201, r.text
        task = r.json()["task"]

        r = await client.get(f"/fhir/Task/{task}")
        t = r.json()
        assert t["status"] == "requested" and t["owner"]["reference"] == expert and t["restriction"]["period"]["end"] == due
        sr = (await client.get(f"/fhir/{t['focus']['reference']}")).json()
        assert sr["extension"][0]["valueBoolean"] is True and sr["priority"] == "urgent"
        doc = (await client.get(f"/fhir/{sr['supportingInfo'][0]['reference']}")).json()
        # The photo went to the record's encrypted blob store, not inline in the resource.
        att = doc["content"][0]["attachment"]
        assert "data" not in att and att["contentType"] == "image/png" and att["size"] == len(make_png())
        assert doc["type"]["coding"][0]["code"] == "75496-0" and doc["subject"]["reference"] == f"Patient/{patient}"
        r = await g.get(att["url"].removeprefix(BASE))
        assert r.status_code == 200 and r.content == make_png()

        # Illegal transitions: 409; the wrong party: 403; a stranger cannot even read it.
        assert (await e.post(f"{API}/{task}/status", json={"status": "completed"})).status_code == 409
        assert (await g.post(f"{API}/{task}/status", json={"status": "accepted"})).status_code == 403
        assert (await x.post(f"{API}/{task}/status", json={"status": "accepted"})).status_code in (403, 404)
        assert (await e.post(f"{API}/{task}/status", json={"status": "accepted"})).json() == {"status": "accepted"}
        # The expert, now owner of the Task, reaches the patient's record.
        assert (await e.get(f"/fhir/Patient/{patient}")).status_code == 200

        r = await e.post(f"{API}/{task}/messages", json={"text": "Évolution depuis quand ?"})
        assert r.status_code == 201
        await g.post(f"{API}/{task}/messages", json={"text": "Trois mois."})
        thread = (await g.get(f"{API}/{task}/messages")).json()["messages"]
        assert [m["payload"][0]["contentString"] for m in thread] == ["Évolution depuis quand ?", "Trois mois."]
        assert thread[0]["recipient"][0]["reference"] == gp

        assert (await e.post(f"{API}/{task}/opinion", json={"opinion": "Exérèse."})).status_code == 409
        await e.post(f"{API}/{task}/status", json={"status": "in-progress"})
        r = await e.post(f"{API}/{task}/opinion", json={"opinion": "Exérèse conseillée sous un mois."})
        assert r.status_code == 201, r.text
        opinion = r.json()["opinion"]
        t = (await client.get(f"/fhir/Task/{task}")).json()
        assert t["status"] == "completed" and t["output"][0]["valueReference"]["reference"] == opinion
        assert (await client.get(f"/fhir/{t['focus']['reference']}")).json()["status"] == "completed"
        assert (await g.post(f"{API}/{task}/status", json={"status": "cancelled"})).status_code == 409

        sent = (await g.get(API)).json()["sent"]
        received = (await e.get(API)).json()["received"]
        assert [t["id"] for t in sent["tasks"]] == [task] and sent["counters"] == {"completed": 1}
        assert [t["id"] for t in received["tasks"]] == [task]
