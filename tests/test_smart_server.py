"""The SMART on FHIR authorization server over ASGI: discovery, authorization code with PKCE,
scopes, refresh rotation, revocation, introspection, confidential clients and Backend Services.

The platform here has a loopback public URL (``http://localhost``): the OAuth
endpoints, like Authlib, refuse plain http anywhere else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import create_engine, inspect

from parcours.core.settings import Settings
from parcours.security import scopes
from parcours.services.platform import Platform
from parcours.store import oauth as oauth_store
from parcours.store.db import sqlalchemy_url
from tests.accounts_helpers import FHIR_JSON, create_resource, new_account, new_patient, new_practitioner
from tests.smart_helpers import (
    CALLBACK,
    Browser,
    authorize_params,
    backend_form,
    browser_client,
    client_assertion,
    ec_key,
    exchange,
    pkce,
    public_jwks,
    query_of,
    register,
    rsa_key,
)

BASE = "http://localhost"
FHIR = BASE + "/fhir"
TOKEN_URL = BASE + "/oauth/token"


class Smart:
    def __init__(self, platform: Platform, app) -> None:  # type: ignore[no-untyped-def]
        self.platform, self.app = platform, app

    def client(self, **headers: str) -> httpx.AsyncClient:
        c = browser_client(self.app, BASE)
        c.headers.update(headers)
        return c

    def api(self, token: str) -> httpx.AsyncClient:
        return self.client(Authorization=f"Bearer {token}")


@pytest_asyncio.fixture(scope="module")
async def srv(settings: Settings) -> AsyncIterator[Smart]:
    from parcours.web.app import create_app

    p = await Platform.start(settings.model_copy(update={"base_url": BASE, "db_pool_size": 4}), run_migrations=False)
    yield Smart(p, create_app(p.settings, platform=p))
    await p.close()


async def patient_with_data(client: httpx.AsyncClient, platform: Platform) -> tuple[str, str, str]:
    """A patient account, its Patient and one Observation: (email, patient id, observation id)."""
    pid = await new_patient(client, family="Roux", given="Alice")
    obs = await create_resource(client, {"resourceType": "Observation", "status": "final",
                                         "code": {"text": "Poids"}, "subject": {"reference": f"Patient/{pid}"},
                                         "valueQuantity": {"value": 61, "unit": "kg"}})
    acct = await new_account(platform, "patient", f"Patient/{pid}")
    return acct.email, pid, obs


async def launch(srv: Smart, c: httpx.AsyncClient, client_id: str, email: str, scope: str, **fields: str) -> tuple[httpx.Response, str]:
    """A whole standalone launch: (token response, code verifier)."""
    verifier, challenge = pkce()
    params = authorize_params(client_id, FHIR, scope=scope, challenge=challenge)
    location = await Browser(c).authorize(params, email, **fields)
    got = query_of(location)
    assert location.startswith(CALLBACK) and got["state"] == params["state"], location
    return await exchange(c, client_id, got["code"], verifier), verifier


# -- discovery ------------------------------------------------------------------------------------

async def test_discovery_documents_and_capability_statement(srv: Smart) -> None:
    async with srv.client() as c:
        for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
            conf = (await c.get(path)).json()
            assert conf["authorization_endpoint"] == BASE + "/oauth/authorize"
            assert conf["token_endpoint"] == TOKEN_URL
            assert conf["code_challenge_methods_supported"] == ["S256"]
            assert {"authorization_code", "refresh_token", "client_credentials"} <= set(conf["grant_types_supported"])
            assert {"client_secret_basic", "private_key_jwt", "none"} <= set(conf["token_endpoint_auth_methods_supported"])
            assert {"launch-standalone", "client-public", "client-confidential-asymmetric", "permission-v1",
                    "permission-v2", "sso-openid-connect", "context-standalone-patient"} <= set(conf["capabilities"])
        oidc = (await c.get("/fhir/.well-known/openid-configuration")).json()
        assert oidc["issuer"] == FHIR and oidc["jwks_uri"] == BASE + "/oauth/jwks"
        keys = (await c.get("/oauth/jwks")).json()["keys"]
        assert keys and all("d" not in k for k in keys) and keys[0]["alg"] == "RS256"
        meta = (await c.get("/fhir/metadata")).json()
        sec = meta["rest"][0]["security"]
        uris = {e["url"]: e["valueUri"] for e in sec["extension"][0]["extension"]}
        assert sec["extension"][0]["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        assert uris["authorize"] == BASE + "/oauth/authorize" and uris["token"] == TOKEN_URL


def test_schema_matches_migration(pg_uri: str) -> None:
    engine = create_engine(sqlalchemy_url(pg_uri))
    try:
        insp = inspect(engine)
        for table in oauth_store.metadata.sorted_tables:
            live = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
            assert live == {c.name: c.nullable for c in table.columns}, table.name
    finally:
        engine.dispose()


def test_scope_algebra() -> None:
    patient_role = ["openid", "fhirUser", "patient/*.*"]
    user_role = ["openid", "fhirUser", "user/*.*"]
    allowed = ["offline_access", "patient/*.cruds", "user/*.rs"]
    # v1 stays v1 when it can; narrowed permissions fall back to v2 letters.
    assert scopes.grant("patient/*.read", client_allowed=allowed, role_allowed=patient_role) == ["patient/*.read"]
    assert scopes.grant("user/*.*", client_allowed=allowed, role_allowed=patient_role) == ["patient/*.*"]
    assert scopes.grant("user/*.*", client_allowed=["user/*.rs"], role_allowed=patient_role) == ["patient/*.read"]
    assert scopes.grant("user/Observation.cruds", client_allowed=allowed, role_allowed=user_role) == ["user/Observation.rs"]
    assert scopes.grant("patient/*.rs", client_allowed=["patient/Observation.rs", "patient/Patient.r"],
                        role_allowed=patient_role) == ["patient/Observation.rs", "patient/Patient.r"]
    # Malformed v2 (letters out of order), system scopes for users, offline_access not registered.
    assert scopes.grant("patient/*.sr system/*.rs offline_access", client_allowed=["patient/*.rs"], role_allowed=patient_role) == []
    assert scopes.grant("system/Patient.rs user/*.rs", client_allowed=["system/Patient.rs", "system/Observation.rs"],
                        role_allowed=None) == ["system/Patient.rs"]
    assert scopes.patient_only(["patient/*.rs", "user/Practitioner.rs"], "Observation", "r")
    assert not scopes.patient_only(["patient/*.rs", "user/Practitioner.rs"], "Practitioner", "r")


# -- authorization code + PKCE ----------------------------------------------------------------------

async def test_patient_standalone_launch_reads_own_record(srv: Smart, client) -> None:
    email, pid, obs = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        r, _ = await launch(srv, c, client_id, email, "launch/patient openid fhirUser patient/*.rs")
        assert r.status_code == 200, r.text
        tok = r.json()
        assert tok["token_type"] == "Bearer" and tok["patient"] == pid
        assert set(tok["scope"].split()) == {"launch/patient", "openid", "fhirUser", "patient/*.rs"}
        assert "refresh_token" not in tok  # no offline_access asked
        assert r.headers["cache-control"] == "no-store"
        # The id_token is signed with the published key, for this client, naming the FHIR user.
        keys = KeySet.import_key_set((await c.get("/oauth/jwks")).json())
        idt = jwt.decode(tok["id_token"], keys, algorithms=["RS256"]).claims
        assert idt["iss"] == FHIR and idt["aud"] == [client_id] and idt["fhirUser"] == f"{FHIR}/Patient/{pid}"
    async with srv.api(tok["access_token"]) as api:
        assert (await api.get(f"/fhir/Patient/{pid}")).json()["id"] == pid
        found = (await api.get("/fhir/Observation", params={"subject": f"Patient/{pid}"})).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [obs]
        # The scopes are read-only.
        r = await api.post("/fhir/Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                                      "subject": {"reference": f"Patient/{pid}"}}, headers=FHIR_JSON)
        assert r.status_code == 403


async def test_pkce_is_enforced(srv: Smart, client) -> None:
    email, _, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        b = Browser(c)
        # A public client without a code challenge, or with "plain", gets an error redirect.
        for extra in ({}, {"code_challenge": "x" * 43, "code_challenge_method": "plain"}):
            params = authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=None, **extra)
            r = await b.consent_page(params, email)
            assert r.status_code == 302, r.text[:300]
            assert query_of(r.headers["location"])["error"] == "invalid_request"
        # Missing, then wrong verifier: invalid_grant (and the code is spent).
        for verifier in (None, "w" * 50):
            _, challenge = pkce()
            params = authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=challenge)
            code = query_of(await b.authorize(params, email))["code"]
            r = await exchange(c, client_id, code, verifier)
            assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text


async def test_redirect_uri_must_be_registered(srv: Smart, client) -> None:
    email, _, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform, redirect_uris=[CALLBACK, "http://127.0.0.1:9/other"])
    async with srv.client() as c:
        b = Browser(c)
        verifier, challenge = pkce()
        bad = authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=challenge, redirect_uri="https://evil.example/cb")
        r = await b.consent_page(bad, email)
        assert r.status_code == 400 and "evil.example" not in r.headers.get("location", "")
        # The token request must name the same redirect URI as the authorization request.
        code = query_of(await b.authorize(authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=challenge), email))["code"]
        r = await exchange(c, client_id, code, verifier, redirect_uri="http://127.0.0.1:9/other")
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        # Wrong audience: an error for the app.
        r = await b.consent_page(authorize_params(client_id, "https://other.example/fhir", scope="patient/*.rs", challenge=challenge))
        assert r.status_code == 302 and query_of(r.headers["location"])["error"] == "invalid_request"


async def test_scopes_are_narrowed_to_role_and_client(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform, scope="openid fhirUser patient/*.rs user/*.rs")
    async with srv.client() as c:
        r, _ = await launch(srv, c, client_id, email, "user/*.* system/*.* offline_access")
        assert r.status_code == 200, r.text
        # A patient asking user/*.* gets their own record, read-only as registered, no system scope,
        # and no refresh token: the client was not registered for offline_access.
        assert r.json()["scope"] == "patient/*.read" and r.json()["patient"] == pid
        assert "refresh_token" not in r.json()
        # v2 syntax kept as asked.
        r, _ = await launch(srv, c, client_id, email, "patient/Observation.rs patient/Patient.r")
        assert r.json()["scope"] == "patient/Observation.rs patient/Patient.r"


async def test_consent_denied(srv: Smart, client) -> None:
    email, _, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        _, challenge = pkce()
        params = authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=challenge)
        got = query_of(await Browser(c).authorize(params, email, approve=False))
        assert got["error"] == "access_denied" and got["state"] == params["state"] and "code" not in got


async def test_refresh_rotation_and_reuse_detection(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        r, _ = await launch(srv, c, client_id, email, "patient/*.rs offline_access")
        first = r.json()
        assert first["refresh_token"]
        refresh = {"grant_type": "refresh_token", "client_id": client_id}
        r = await c.post("/oauth/token", data={**refresh, "refresh_token": first["refresh_token"]})
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["refresh_token"] != first["refresh_token"] and second["patient"] == pid
        assert second["scope"] == first["scope"]
        # Narrower scope on refresh is allowed, wider is not.
        r = await c.post("/oauth/token", data={**refresh, "refresh_token": second["refresh_token"], "scope": "patient/*.rs offline_access user/*.rs"})
        assert r.json()["error"] == "invalid_scope"
        # The rotated token presented again: refused, and the whole grant is revoked.
        r = await c.post("/oauth/token", data={**refresh, "refresh_token": first["refresh_token"]})
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        r = await c.post("/oauth/token", data={**refresh, "refresh_token": second["refresh_token"]})
        assert r.json()["error"] == "invalid_grant"
    for access in (first["access_token"], second["access_token"]):
        async with srv.api(access) as api:
            assert (await api.get(f"/fhir/Patient/{pid}")).status_code == 401


async def test_revocation_and_introspection(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    other_id, _ = await register(srv.platform)
    async with srv.client() as c:
        r, _ = await launch(srv, c, client_id, email, "patient/*.rs offline_access fhirUser")
        tok = r.json()
        intro = (await c.post("/oauth/introspect", data={"token": tok["access_token"], "client_id": client_id})).json()
        assert intro["active"] is True and intro["patient"] == pid and intro["client_id"] == client_id
        assert set(intro["scope"].split()) == {"patient/*.rs", "offline_access", "fhirUser"}
        assert intro["fhirUser"] == f"Patient/{pid}"
        intro = (await c.post("/oauth/introspect", data={"token": tok["refresh_token"], "client_id": client_id})).json()
        assert intro["active"] is True and intro["token_type"] == "refresh_token"
        # Another client learns nothing about this one's tokens; junk is inactive.
        assert (await c.post("/oauth/introspect", data={"token": tok["access_token"], "client_id": other_id})).json() == {"active": False}
        assert (await c.post("/oauth/introspect", data={"token": "junk", "client_id": client_id})).json() == {"active": False}

        # Revoking the access token: the FHIR API refuses it at once, introspection says inactive.
        async with srv.api(tok["access_token"]) as api:
            assert (await api.get(f"/fhir/Patient/{pid}")).status_code == 200
            r = await c.post("/oauth/revoke", data={"token": tok["access_token"], "client_id": client_id,
                                                    "token_type_hint": "access_token"})
            assert r.status_code == 200
            assert (await api.get(f"/fhir/Patient/{pid}")).status_code == 401
        assert (await c.post("/oauth/introspect", data={"token": tok["access_token"], "client_id": client_id})).json() == {"active": False}
        # Revoking the refresh token ends the grant.
        assert (await c.post("/oauth/revoke", data={"token": tok["refresh_token"], "client_id": client_id})).status_code == 200
        r = await c.post("/oauth/token", data={"grant_type": "refresh_token", "client_id": client_id, "refresh_token": tok["refresh_token"]})
        assert r.json()["error"] == "invalid_grant"
        assert (await c.post("/oauth/introspect", data={"token": tok["refresh_token"], "client_id": client_id})).json() == {"active": False}


async def test_code_replay_revokes_what_it_gave(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        verifier, challenge = pkce()
        code = query_of(await Browser(c).authorize(authorize_params(client_id, FHIR, scope="patient/*.rs", challenge=challenge), email))["code"]
        first = await exchange(c, client_id, code, verifier)
        assert first.status_code == 200
        again = await exchange(c, client_id, code, verifier)
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    async with srv.api(first.json()["access_token"]) as api:
        assert (await api.get(f"/fhir/Patient/{pid}")).status_code == 401


async def test_confidential_client_with_client_secret_basic(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    client_id, secret = await register(srv.platform, client_type="confidential")
    assert secret
    async with srv.client() as c:
        # A confidential client may skip PKCE, but must authenticate.
        params = authorize_params(client_id, FHIR, scope="patient/*.rs openid fhirUser", challenge=None)
        code = query_of(await Browser(c).authorize(params, email))["code"]
        r = await exchange(c, client_id, code, None)  # no secret
        assert r.status_code in (400, 401) and r.json()["error"] == "invalid_client"
        code = query_of(await Browser(c).authorize(params, email))["code"]
        r = await exchange(c, client_id, code, None, auth=(client_id, "wrong"))
        assert r.status_code == 401 and r.json()["error"] == "invalid_client"
        code = query_of(await Browser(c).authorize(params, email))["code"]
        r = await exchange(c, client_id, code, None, auth=(client_id, secret))
        assert r.status_code == 200, r.text
        assert r.json()["patient"] == pid and "id_token" in r.json()


async def test_practitioner_chooses_the_patient(srv: Smart, client) -> None:
    email, pid, _ = await patient_with_data(client, srv.platform)
    pract = await new_practitioner(client)
    from parcours.security import totp as totp_codes

    acct = await new_account(srv.platform, "practitioner", f"Practitioner/{pract}", totp_secret=totp_codes.new_secret())
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        # Professionals sign in with their second factor: open the session directly here.
        from parcours.services import signin
        from parcours.web.session import cookie_name

        async with srv.platform.pool.connection() as conn, conn.transaction():
            cookie, _ = await signin.open_session(srv.platform, conn, acct, "full", ip=None, user_agent="test")
        c.cookies.set(cookie_name(srv.platform.settings), cookie)
        verifier, challenge = pkce()
        params = authorize_params(client_id, FHIR, scope="launch/patient patient/*.rs", challenge=challenge)
        b = Browser(c)
        consent = await b.consent_page(params)
        assert consent.status_code == 200 and 'name="patient_id"' in consent.text
        r = await b.answer(consent)  # no patient chosen
        assert r.status_code == 400 and 'role="alert"' in r.text
        # A patient the professional does not care for cannot be the launch context.
        r = await b.answer(consent, patient_id=pid)
        assert r.status_code == 403, r.text[:300]
        # Once a care team links them, the patient is offered and can be chosen.
        await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                                       "participant": [{"member": {"reference": f"Practitioner/{pract}"}}]})
        consent = await b.consent_page(params)
        assert f'value="{pid}"' in consent.text and "Alice Roux" in consent.text
        r = await b.answer(consent, patient=pid)
        assert r.status_code == 302, r.text[:300]
        tok = (await exchange(c, client_id, query_of(r.headers["location"])["code"], verifier)).json()
        assert tok["patient"] == pid and tok["scope"] == "launch/patient patient/*.rs"
    # patient/ scopes keep the app within the launch context, even among the professional's patients.
    other = await new_patient(client, family="Autre", given="Paul")
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{other}"},
                                   "participant": [{"member": {"reference": f"Practitioner/{pract}"}}]})
    async with srv.api(tok["access_token"]) as api:
        assert (await api.get(f"/fhir/Patient/{pid}")).status_code == 200
        assert (await api.get(f"/fhir/Patient/{other}")).status_code in (403, 404)
        found = (await api.get("/fhir/Patient", params={"_id": f"{pid},{other}"})).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid]
    # The professional's own session still reaches both.
    from parcours.services import accounts

    async with srv.platform.transaction(accounts.caller_for(acct)) as repo:
        assert (await repo.read("Patient", other)).id == other


async def test_proxy_chooses_among_represented_patients(srv: Smart, client) -> None:
    child = await new_patient(client, family="Petit", given="Léon")
    await new_patient(client, family="Étranger", given="Marc")  # someone the proxy does not represent
    rp = await create_resource(client, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{child}"},
                                        "name": [{"family": "Petit", "given": ["Anne"]}]})
    proxy = await new_account(srv.platform, "proxy", f"RelatedPerson/{rp}")
    client_id, _ = await register(srv.platform)
    async with srv.client() as c:
        b = Browser(c)
        verifier, challenge = pkce()
        consent = await b.consent_page(authorize_params(client_id, FHIR, scope="user/*.rs", challenge=challenge), proxy.email)
        assert consent.status_code == 200
        # One represented patient: offered (and ticked); no free entry for proxies.
        assert f'value="{child}"' in consent.text and "Léon Petit" in consent.text and 'name="patient_id"' not in consent.text
        r = await b.answer(consent, patient=child)
        assert r.status_code == 302, r.text[:300]
        tok = (await exchange(c, client_id, query_of(r.headers["location"])["code"], verifier)).json()
        assert tok["patient"] == child and tok["scope"] == "patient/*.rs"


# -- Backend Services ----------------------------------------------------------------------------------

async def test_backend_services_with_private_key_jwt(srv: Smart, client) -> None:
    key, ec = rsa_key(), ec_key()
    client_id, secret = await register(srv.platform, client_type="backend", scope="system/Patient.rs system/Observation.rs",
                                       jwks=public_jwks(key, ec))
    assert secret is None
    pid = await new_patient(client, family="Système")
    async with srv.client() as c:
        assertion = client_assertion(key, client_id, TOKEN_URL)
        r = await c.post("/oauth/token", data=backend_form(assertion, "system/Patient.rs system/Practitioner.rs"))
        assert r.status_code == 200, r.text
        tok = r.json()
        assert tok["scope"] == "system/Patient.rs" and "refresh_token" not in tok
        async with srv.api(tok["access_token"]) as api:
            found = (await api.get("/fhir/Patient", params={"_id": pid})).json()
            assert [e["resource"]["id"] for e in found["entry"]] == [pid]
            assert (await api.get("/fhir/Practitioner")).status_code == 403
        # The same assertion again (same jti): refused.
        r = await c.post("/oauth/token", data=backend_form(assertion, "system/Patient.rs"))
        assert r.status_code in (400, 401) and r.json()["error"] == "invalid_client"
        # ES384 works too.
        r = await c.post("/oauth/token", data=backend_form(client_assertion(ec, client_id, TOKEN_URL, alg="ES384"), "system/Observation.rs"))
        assert r.status_code == 200, r.text
        refused = [
            client_assertion(key, client_id, "https://elsewhere.example/token"),  # audience
            client_assertion(key, client_id, TOKEN_URL, lifetime=600),  # more than five minutes
            client_assertion(key, client_id, TOKEN_URL, lifetime=-30),  # expired
            client_assertion(key, client_id, TOKEN_URL, alg="RS256"),  # algorithm SMART does not list
            client_assertion(rsa_key(key.kid), client_id, TOKEN_URL),  # another key, same kid
            client_assertion(key, client_id, TOKEN_URL, iss="someone-else"),  # iss != sub
        ]
        for bad in refused:
            r = await c.post("/oauth/token", data=backend_form(bad, "system/Patient.rs"))
            assert r.status_code in (400, 401) and r.json()["error"] == "invalid_client", r.text
        r = await c.post("/oauth/token", data=backend_form(client_assertion(key, client_id, TOKEN_URL), "system/Practitioner.rs"))
        assert r.json()["error"] == "invalid_scope"
        # A backend service cannot use the authorization code flow; a public client cannot use client credentials.
        _, challenge = pkce()
        r = await c.get("/oauth/authorize", params=authorize_params(client_id, FHIR, scope="system/Patient.rs", challenge=challenge))
        assert r.status_code == 400
        public_id, _ = await register(srv.platform)
        r = await c.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": public_id, "scope": "system/Patient.rs"})
        assert r.json()["error"] in ("invalid_client", "unauthorized_client")


async def test_client_registration_rules(srv: Smart) -> None:
    from parcours.core.errors import BadRequest
    from parcours.services import smart

    key = rsa_key()
    bad = [
        smart.NewClient("x", "public", ["https://app.example/cb"], "system/*.rs"),
        smart.NewClient("x", "public", ["http://app.example/cb"], "patient/*.rs"),
        smart.NewClient("x", "public", ["https://app.example/cb#frag"], "patient/*.rs"),
        smart.NewClient("x", "backend", [], "system/*.rs"),  # no keys
        smart.NewClient("x", "backend", [], "patient/*.rs", jwks=public_jwks(key)),
        smart.NewClient("x", "backend", [], "system/*.rs", jwks={"keys": [key.as_dict(private=True)]}),
        smart.NewClient("x", "confidential", [], "patient/*.rs"),
        smart.NewClient("x", "public", ["https://app.example/cb"], "patient/*.sr"),
        smart.NewClient("", "public", ["https://app.example/cb"], "patient/*.rs"),
    ]
    for new in bad:
        with pytest.raises(BadRequest):
            smart.check_new_client(new)
    smart.check_new_client(smart.NewClient("x", "public", ["fr.example.app:/callback"], "patient/*.rs launch/patient"))


def test_cli_client_create(pg_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from parcours.cli.main import app

    monkeypatch.setenv("DATABASE_URL", pg_uri)
    runner = CliRunner()
    r = runner.invoke(app, ["client", "create", "--name", "Dossier mobile", "--type", "confidential", "--redirect-uri",
                            "https://app.example/cb", "--scope", "openid fhirUser patient/*.rs"])
    assert r.exit_code == 0, r.output
    lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
    assert lines["client_id"] and len(lines["client_secret"]) > 30
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(rsa_key())))
    r = runner.invoke(app, ["client", "create", "--name", "Entrepôt", "--type", "backend", "--scope", "system/*.rs",
                            "--jwks-file", str(jwks)])
    assert r.exit_code == 0, r.output
    assert "client_secret" not in r.stdout
    r = runner.invoke(app, ["client", "create", "--name", "X", "--type", "backend", "--scope", "system/*.rs"])
    assert r.exit_code == 2

