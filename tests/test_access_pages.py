"""The pages of access control over ASGI: a professional's emergency access (patient lookup,
reason, grant), the patient's access history, hidden documents and blocked professionals.

Each page is checked for what it shows and for what it changes, through the FHIR API
with the same people's tokens: a page is one more door to the same Repository.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest_asyncio

from parcours.fhir import fr_core
from parcours.security import tokens
from parcours.security import totp as totp_codes
from parcours.services.platform import Platform
from tests.accounts_helpers import PASSWORD, create_resource, new_account, random_ip, totp_now
from tests.conftest import BASE, uniq

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "no CSRF token in the page"
    return m.group(1)


@dataclass
class Person:
    email: str
    fhir_user: str
    token: dict[str, str]
    totp: str | None = None


@dataclass
class Scene:
    patient: Person
    proxy: Person
    doctor: Person  # in the patient's care team
    urgentist: Person  # no relationship with the patient
    ins: str
    family: str
    document: str
    doctor_rpps: str


def bearer(platform: Platform, kind: str, fhir_user: str) -> dict[str, str]:
    scopes = ["openid", "fhirUser", "patient/*.*" if kind in ("patient", "proxy") else "user/*.*"]
    return {"Authorization": "Bearer " + tokens.issue(platform.token_key, subject=uniq(kind), kind=kind, scopes=scopes,
                                                      fhir_user=fhir_user)}


@pytest_asyncio.fixture(scope="module")
async def scene(client: httpx.AsyncClient, platform: Platform) -> AsyncIterator[Scene]:
    family = "Pages" + uniq("")[1:9].upper()
    ins = "2" + "".join(ch for ch in uniq("") if ch.isdigit()).ljust(14, "7")[:14]
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": family, "given": ["Alice"]}],
                                         "birthDate": "1984-07-08", "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": ins}]})
    rpps = "8" + "".join(ch for ch in uniq("") if ch.isdigit()).ljust(10, "3")[:10]
    doctor = await create_resource(client, {"resourceType": "Practitioner", "name": [{"family": "Médecin", "given": ["Marc"]}],
                                            "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": rpps}]})
    urgentist = await create_resource(client, {"resourceType": "Practitioner", "name": [{"family": "Urgentiste", "given": ["Ulysse"]}],
                                               "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("4")}]})
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                                   "participant": [{"member": {"reference": f"Practitioner/{doctor}"}}]})
    rp = await create_resource(client, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{pid}"},
                                        "name": [{"family": family, "given": ["Paul"]}]})
    doc = await create_resource(client, {
        "resourceType": "DocumentReference", "status": "current", "subject": {"reference": f"Patient/{pid}"},
        "description": "Compte rendu de consultation", "date": "2026-01-05T10:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"CR").decode()}}]})
    people = {}
    for key, role, ref in (("patient", "patient", f"Patient/{pid}"), ("proxy", "proxy", f"RelatedPerson/{rp}")):
        acct = await new_account(platform, role, ref)
        people[key] = Person(acct.email, ref, bearer(platform, role, ref))
    for key, ref in (("doctor", f"Practitioner/{doctor}"), ("urgentist", f"Practitioner/{urgentist}")):
        people[key] = Person("", ref, bearer(platform, "practitioner", ref))  # accounts: see professional()
    yield Scene(people["patient"], people["proxy"], people["doctor"], people["urgentist"], ins, family, doc, rpps)


@asynccontextmanager
async def signed_in(app, platform: Platform, who: Person, lang: str = "fr") -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(random_ip(), 40000)), base_url=BASE,
                                 headers={"Accept-Language": lang}) as c:
        page = await c.get("/signin")
        r = await c.post("/signin", data={"email": who.email, "password": PASSWORD, "csrf_token": csrf_of(page.text)})
        assert r.status_code == 303, r.text
        if who.totp:
            page = await c.get("/signin/totp")
            r = await c.post("/signin/totp", data={"code": totp_now(who.totp, platform.clock.now()), "csrf_token": csrf_of(page.text)})
            assert r.status_code == 303, r.text
        yield c


@asynccontextmanager
async def professional(app, platform: Platform, who: Person, lang: str = "fr") -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """A professional signed in with a fresh account of their own (a TOTP code is good for one sign-in)."""
    secret = totp_codes.new_secret()
    acct = await new_account(platform, "practitioner", who.fhir_user, totp_secret=secret)
    async with signed_in(app, platform, Person(acct.email, who.fhir_user, who.token, secret), lang) as c:
        yield c


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#39;", "'")


async def test_emergency_access_from_the_workspace_shows_in_the_patient_access_history(app, platform, client, scene: Scene) -> None:
    pid = scene.patient.fhir_user.split("/")[1]
    obs = await create_resource(client, {"resourceType": "Observation", "status": "final", "code": {"text": "Glycémie"},
                                         "subject": {"reference": scene.patient.fhir_user}})
    assert (await client.get(f"/fhir/Observation/{obs}", headers=scene.urgentist.token)).status_code == 403
    async with professional(app, platform, scene.urgentist) as c:
        home = await c.get("/workspace")
        assert 'href="/workspace/emergency-access"' in home.text
        # Lookup by INS: one patient, no relationship, the emergency form.
        page = await c.get("/workspace/emergency-access", params={"q": scene.ins})
        assert page.status_code == 200
        text = text_of(page.text)
        assert f"Alice {scene.family}" in text and "Pas de relation de soins — accès d'urgence" in text
        # Lookup by name finds the same patient.
        by_name = await c.get("/workspace/emergency-access", params={"q": scene.family})
        assert f"Alice {scene.family}" in text_of(by_name.text)
        # A reason is required.
        r = await c.post("/workspace/emergency-access", data={"csrf_token": csrf_of(page.text), "patient": pid, "reason": "vite",
                                                              "minutes": "60", "q": scene.ins})
        assert r.status_code == 400 and "au moins 10 caractères" in r.text
        reason = "Malaise grave en consultation " + uniq("")
        r = await c.post("/workspace/emergency-access", data={"csrf_token": csrf_of(page.text), "patient": pid, "reason": reason,
                                                              "minutes": "60", "q": scene.ins})
        assert r.status_code == 303
        after = await c.get(r.headers["location"])
        text = text_of(after.text)
        assert "L'accès d'urgence est ouvert" in text and "Accès d'urgence en cours" in text
        # The session's FHIR access now reaches the record (same Caller as the page).
        r = await c.get(f"/fhir/Observation/{obs}")
        assert r.status_code == 200
    # The patient sees it, with its reason, in French and in English.
    async with signed_in(app, platform, scene.patient) as c:
        portal = await c.get("/portal")
        assert 'href="/portal/access-history"' in portal.text and 'href="/portal/privacy"' in portal.text
        page = await c.get("/portal/access-history")
        assert page.status_code == 200
        text = text_of(page.text)
        assert "Ulysse Urgentiste" in text and "Accès d'urgence" in text and reason in text
        assert "A ouvert un accès d'urgence à votre dossier" in text and "Professionnel de santé" in text
        assert "A consulté · résultat ou mesure" in text  # the read that followed
        # The patient's own actions are not listed.
        assert f"Alice {scene.family}" not in text.split("Qui a consulté mon dossier ?")[-1]
        page = await c.get("/portal/access-history", headers={"Accept-Language": "en"})
        assert "Opened an emergency access to your record" in text_of(page.text)
    # The proxy sees the same history; the privacy choices stay the patient's.
    async with signed_in(app, platform, scene.proxy) as c:
        page = await c.get("/portal/access-history")
        assert page.status_code == 200 and reason in text_of(page.text)
        assert (await c.get("/portal/privacy")).status_code == 403
    # Professionals see none of it.
    async with professional(app, platform, scene.doctor) as c:
        assert (await c.get("/portal/access-history")).status_code == 403
        page = await c.get("/workspace/emergency-access", params={"q": scene.ins})
        assert "Vous suivez ce patient" in text_of(page.text)


async def test_patient_hides_a_document_and_blocks_a_professional(app, platform, client, scene: Scene) -> None:
    doc = f"/fhir/DocumentReference/{scene.document}"
    obs = await create_resource(client, {"resourceType": "Observation", "status": "final", "code": {"text": "Tension"},
                                         "subject": {"reference": scene.patient.fhir_user}})
    assert (await client.get(doc, headers=scene.doctor.token)).status_code == 200
    async with signed_in(app, platform, scene.patient, "en") as c:
        page = await c.get("/portal/privacy")
        assert page.status_code == 200
        assert "Compte rendu de consultation" in page.text
        r = await c.post(f"/portal/privacy/documents/{scene.document}", data={"csrf_token": csrf_of(page.text), "hidden": "1"})
        assert r.status_code == 303
        page = await c.get(r.headers["location"])
        assert "The document is hidden from professionals" in text_of(page.text) and "Hidden" in text_of(page.text)
        assert (await client.get(doc, headers=scene.doctor.token)).status_code == 403
        assert (await client.get(doc, headers=scene.patient.token)).status_code == 200
        r = await c.post(f"/portal/privacy/documents/{scene.document}", data={"csrf_token": csrf_of(page.text), "hidden": "0"})
        assert r.status_code == 303
        assert (await client.get(doc, headers=scene.doctor.token)).status_code == 200

        # Block the doctor by RPPS number: no access at all, not even in an emergency.
        assert (await client.get(f"/fhir/Observation/{obs}", headers=scene.doctor.token)).status_code == 200
        r = await c.post("/portal/privacy/block", data={"csrf_token": csrf_of(page.text), "rpps": "00000000000"})
        assert r.status_code == 404 and "No professional has this RPPS number" in r.text
        r = await c.post("/portal/privacy/block", data={"csrf_token": csrf_of(page.text), "rpps": scene.doctor_rpps})
        assert r.status_code == 303
        page = await c.get(r.headers["location"])
        text = text_of(page.text)
        assert "This professional no longer has access to your record" in text
        assert "Marc Médecin" in text and "Lift the block" in text
        assert (await client.get(f"/fhir/Observation/{obs}", headers=scene.doctor.token)).status_code == 403
        pid = scene.patient.fhir_user.split("/")[1]
        r = await client.post(f"/fhir/Patient/{pid}/$emergency-access", headers=scene.doctor.token,
                              json={"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "Urgence vitale ce soir"}]})
        assert r.status_code == 403
        # Blocking twice changes nothing; unblocking gives the relationship back.
        consents = (await client.get("/fhir/Consent", params={"patient": scene.patient.fhir_user, "status": "active"})).json()
        blocks = [e["resource"]["id"] for e in consents.get("entry", [])]
        assert len(blocks) == 1
        r = await c.post("/portal/privacy/block", data={"csrf_token": csrf_of(page.text), "practitioner": scene.doctor.fhir_user})
        assert r.status_code == 303
        consents = (await client.get("/fhir/Consent", params={"patient": scene.patient.fhir_user, "status": "active"})).json()
        assert [e["resource"]["id"] for e in consents.get("entry", [])] == blocks
        r = await c.post(f"/portal/privacy/blocks/{blocks[0]}/end", data={"csrf_token": csrf_of(page.text)})
        assert r.status_code == 303
        assert (await client.get(f"/fhir/Observation/{obs}", headers=scene.doctor.token)).status_code == 200
        # Forms need the session's CSRF token.
        assert (await c.post("/portal/privacy/block", data={"rpps": scene.doctor_rpps})).status_code == 403


async def test_who_may_open_the_pages(app, platform, scene: Scene) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as anon:
        for path in ("/portal/access-history", "/portal/privacy", "/workspace/emergency-access"):
            r = await anon.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/signin"), path
    async with signed_in(app, platform, scene.patient) as c:
        assert (await c.get("/workspace/emergency-access")).status_code == 403
    async with professional(app, platform, scene.doctor) as c:
        assert (await c.get("/portal/privacy")).status_code == 403
