"""A SMART standalone launch completed by ``fhirclient`` (the SMART Python client from PyPI)
against the platform over real HTTP: discovery through the CapabilityStatement, PKCE,
sign-in and consent (driven here by an httpx user agent), the code exchange, reads with
the token, and a token refresh."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.accounts_helpers import PASSWORD, create_resource, new_account, new_patient
from tests.smart_helpers import CALLBACK, CSRF_RE, hidden_fields, register


def _user_agent_approves(live: str, authorize_url: str, email: str) -> str:
    """What a person does in the browser; returns the URL the app is sent back to."""
    with httpx.Client(base_url=live, follow_redirects=False, timeout=30) as b:
        r = b.get(authorize_url)
        assert r.status_code == 303 and r.headers["location"].startswith("/signin?next=")
        nxt = parse_qs(urlsplit(r.headers["location"]).query)["next"][0]
        page = b.get("/signin")
        csrf = CSRF_RE.search(page.text)
        assert csrf
        r = b.post("/signin", data={"email": email, "password": PASSWORD, "csrf_token": csrf.group(1), "next": nxt})
        assert r.status_code == 303 and r.headers["location"] == nxt
        consent = b.get(nxt)
        assert consent.status_code == 200 and "Appli de test" in consent.text
        r = b.post("/oauth/authorize/decision", data={**hidden_fields(consent.text), "decision": "approve"})
        assert r.status_code == 302, r.text[:500]
        return r.headers["location"]


def _fhirclient_flow(live: str, client_id: str, email: str, pid: str, obs_ids: set[str]) -> None:
    from fhirclient import client
    from fhirclient.models.observation import Observation

    smart = client.FHIRClient(settings={
        "app_id": client_id, "api_base": f"{live}/fhir/", "redirect_uri": CALLBACK,
        "scope": "launch/patient openid fhirUser offline_access patient/*.rs",
    })
    assert not smart.ready
    url = smart.authorize_url  # reads the oauth-uris extension of the CapabilityStatement
    assert url.startswith(f"{live}/oauth/authorize?") and "code_challenge_method=S256" in url
    callback = _user_agent_approves(live, url, email)
    assert callback.startswith(CALLBACK + "?code=")
    smart.handle_callback(callback)
    assert smart.ready and smart.patient_id == pid
    first_access = smart.server.auth.access_token
    assert smart.server.auth.refresh_token

    patient = smart.patient  # Patient/{pid} read with the token, parsed by the strict R4 models
    assert patient is not None and patient.id == pid and patient.name[0].family == "Bernard"
    found = Observation.where(struct={"subject": f"Patient/{pid}"}).perform_resources_iter(smart.server)
    assert {o.id for o in found} == obs_ids

    # Refresh: a new access token (and a new refresh token) that works as well.
    old_refresh = smart.server.auth.refresh_token
    ctx = smart.reauthorize()
    assert ctx and smart.patient_id == pid
    assert smart.server.auth.access_token != first_access and smart.server.auth.refresh_token != old_refresh
    again = Observation.where(struct={"subject": f"Patient/{pid}"}).perform_resources_iter(smart.server)
    assert {o.id for o in again} == obs_ids


async def test_fhirclient_standalone_launch_and_refresh(live_server: str, client, platform) -> None:
    pid = await new_patient(client, family="Bernard", given="Louise")
    obs_ids = set()
    for value in (61, 62):
        obs_ids.add(await create_resource(client, {
            "resourceType": "Observation", "status": "final", "code": {"text": "Poids"},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": value, "unit": "kg"}}))
    acct = await new_account(platform, "patient", f"Patient/{pid}")
    client_id, _ = await register(platform)
    # fhirclient and the user agent are synchronous: run them off the event loop.
    await asyncio.to_thread(_fhirclient_flow, live_server, client_id, acct.email, pid, obs_ids)
