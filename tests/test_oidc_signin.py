"""Sign-in through external OpenID Connect providers, end to end: an identity provider served
over HTTP in the test (``tests/oidc_provider.py``), the platform over ASGI, and an httpx
user agent going from one to the other, as a browser would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from html import unescape
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio

from parcours.core.settings import Settings
from parcours.security import totp as totp_codes
from parcours.services.platform import Platform
from tests.accounts_helpers import new_account, new_patient, new_practitioner, random_ip
from tests.conftest import BASE, free_port, uniq
from tests.oidc_provider import ETAB_CLIENT, FC_CLIENT, PSC_CLIENT, IdentityProvider, providers_for, serve

@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    port = free_port()
    provider = IdentityProvider(port)
    provider.clients = {PSC_CLIENT: "psc-secret-" + uniq(), FC_CLIENT: "fc-secret-" + uniq(), ETAB_CLIENT: "etab-" + uniq()}
    with serve(provider.app, port):
        yield provider


class Web:
    def __init__(self, platform: Platform, app) -> None:  # type: ignore[no-untyped-def]
        self.platform, self.app = platform, app

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, client=(random_ip(), 40000)), base_url=BASE)


@pytest_asyncio.fixture(scope="module")
async def web(settings: Settings, idp: IdentityProvider) -> AsyncIterator[Web]:
    from parcours.web.app import create_app

    p = await Platform.start(settings.model_copy(update={"oidc_providers": providers_for(idp), "db_pool_size": 4}),
                             run_migrations=False)
    yield Web(p, create_app(p.settings, platform=p))
    await p.close()


async def through_provider(c: httpx.AsyncClient, provider: str, next_: str = "") -> httpx.Response:
    """Click "Sign in with ...", let the provider vouch, come back: the callback's answer."""
    r = await c.get(f"/signin/oidc/{provider}" + (f"?next={next_}" if next_ else ""))
    assert r.status_code == 303, r.text[:300]
    async with httpx.AsyncClient() as net:
        at_provider = await net.get(r.headers["location"])
    assert at_provider.status_code == 302, at_provider.text
    back = urlsplit(at_provider.headers["location"])
    assert f"{back.scheme}://{back.netloc}" == BASE and back.path == f"/signin/oidc/{provider}/callback"
    return await c.get(f"{back.path}?{back.query}")


async def professional(client, platform: Platform, *, with_account: bool = True, totp: bool = True):  # type: ignore[no-untyped-def]
    pract = await new_practitioner(client, family="Lambert", given="Chloé")
    rpps = (await client.get(f"/fhir/Practitioner/{pract}")).json()["identifier"][0]["value"]
    acct = None
    if with_account:
        acct = await new_account(platform, "practitioner", f"Practitioner/{pract}",
                                 totp_secret=totp_codes.new_secret() if totp else None)
    return pract, rpps, acct


def signed_out(c: httpx.AsyncClient) -> bool:
    return not any(name.endswith("parcours_session") for name in c.cookies.keys())


async def test_sign_in_page_offers_the_providers(web: Web) -> None:
    async with web.client() as c:
        page = (await c.get("/signin", params={"next": "/workspace"})).text
        assert "Se connecter avec Pro Santé Connect" in page and "Se connecter avec FranceConnect" in page
        assert 'href="/signin/oidc/psc?next=/workspace"' in page
        page = (await c.get("/signin", headers={"Accept-Language": "en"})).text
        assert "Sign in with Pro Santé Connect" in page


async def test_professional_with_pro_sante_connect(web: Web, idp: IdentityProvider, client) -> None:
    pract, rpps, acct = await professional(client, web.platform)
    sub = uniq("psc-sub")
    idp.identity = {"sub": sub}
    idp.userinfo_extra = {"SubjectNameID": rpps, "given_name": "Chloé", "family_name": "Lambert"}
    async with web.client() as c:
        r = await through_provider(c, "psc", "/workspace")
        # PSC stands for the second factor: straight to the workspace, fully signed in.
        assert r.status_code == 303 and r.headers["location"] == "/workspace", r.text[:500]
        home = await c.get("/workspace")
        assert home.status_code == 200 and "Chloé Lambert" in home.text
        # The platform asked for what PSC wants, with nonce and PKCE.
        asked = idp.seen[-1]
        assert asked["acr_values"] == "eidas1" and asked["scope"] == "openid scope_all"
        assert asked["nonce"] and asked["code_challenge_method"] == "S256" and asked["state"]
        # The FHIR API takes the session like a password sign-in.
        assert (await c.get(f"/fhir/Practitioner/{pract}")).status_code == 200
    # Next time the link (provider + sub) finds the account even if the RPPS claim is missing.
    idp.userinfo_extra = {}
    async with web.client() as c:
        r = await through_provider(c, "psc")
        assert r.status_code == 303 and r.headers["location"] == "/workspace"


async def test_directory_professional_gets_an_account(web: Web, idp: IdentityProvider, client) -> None:
    pract, rpps, _ = await professional(client, web.platform, with_account=False)
    idp.identity = {"sub": uniq("psc-sub")}
    idp.userinfo_extra = {"SubjectNameID": rpps}
    async with web.client() as c:
        r = await through_provider(c, "psc")
        assert r.status_code == 303 and r.headers["location"] == "/workspace", r.text[:500]
        assert "Chloé Lambert" in (await c.get("/workspace")).text


async def test_unknown_identities_get_a_clear_error(web: Web, idp: IdentityProvider, client) -> None:
    idp.identity = {"sub": uniq("psc-sub")}
    idp.userinfo_extra = {"SubjectNameID": "8" + "9" * 11}
    async with web.client() as c:
        r = await through_provider(c, "psc")
        assert r.status_code == 403 and "Aucun compte Parcours n'est associé à votre identité Pro Santé Connect" in unescape(r.text)
        assert signed_out(c)
    idp.identity = {"sub": uniq("fc-sub"), "email": f"{uniq('nobody')}@example.org", "email_verified": True}
    async with web.client() as c:
        r = await through_provider(c, "fc")
        assert r.status_code == 403 and "FranceConnect" in r.text and signed_out(c)
        assert (await c.get("/portal")).status_code == 303


async def test_patient_with_franceconnect_and_the_rules_of_linking(web: Web, idp: IdentityProvider, client) -> None:
    pid = await new_patient(client, family="Mercier", given="Jeanne")
    acct = await new_account(web.platform, "patient", f"Patient/{pid}")
    idp.identity = {"sub": uniq("fc-sub"), "email": acct.email.upper(), "email_verified": True}
    async with web.client() as c:
        r = await through_provider(c, "fc", "/portal")
        assert r.status_code == 303 and r.headers["location"] == "/portal"
        assert "Jeanne Mercier" in (await c.get("/portal")).text
    # An unverified e-mail links nothing.
    other = await new_account(web.platform, "patient", f"Patient/{await new_patient(client)}")
    idp.identity = {"sub": uniq("fc-sub"), "email": other.email, "email_verified": False}
    async with web.client() as c:
        assert (await through_provider(c, "fc")).status_code == 403
    # FranceConnect does not sign professionals in.
    _, _, pro = await professional(client, web.platform)
    idp.identity = {"sub": uniq("fc-sub"), "email": pro.email, "email_verified": True}
    async with web.client() as c:
        r = await through_provider(c, "fc")
        assert r.status_code == 403 and "ce type de compte" in r.text and signed_out(c)


async def test_provider_without_second_factor_leads_to_totp(web: Web, idp: IdentityProvider, client) -> None:
    _, _, pro = await professional(client, web.platform)
    idp.identity = {"sub": uniq("etab"), "email": pro.email}
    async with web.client() as c:
        r = await through_provider(c, "etab", "/workspace")
        assert r.status_code == 303 and r.headers["location"] == "/signin/totp?next=%2Fworkspace"
        assert (await c.get("/workspace")).status_code == 303  # not signed in yet


@pytest.mark.parametrize("tamper", ["signature", "nonce", "audience", "expired"])
async def test_tampered_id_tokens_are_refused(web: Web, idp: IdentityProvider, client, tamper: str) -> None:
    _, rpps, _ = await professional(client, web.platform)
    idp.identity = {"sub": uniq("psc-sub")}
    idp.userinfo_extra = {"SubjectNameID": rpps}
    idp.tamper = tamper
    async with web.client() as c:
        r = await through_provider(c, "psc")
        assert r.status_code == 400 and "par sécurité, la connexion est refusée" in r.text, r.text[:800]
        assert signed_out(c) and (await c.get("/workspace")).status_code == 303


async def test_callback_is_bound_to_the_browser_and_used_once(web: Web, idp: IdentityProvider, client) -> None:
    _, rpps, _ = await professional(client, web.platform)
    idp.identity = {"sub": uniq("psc-sub")}
    idp.userinfo_extra = {"SubjectNameID": rpps}
    async with web.client() as victim, web.client() as attacker:
        r = await attacker.get("/signin/oidc/psc")
        async with httpx.AsyncClient() as net:
            back = urlsplit((await net.get(r.headers["location"])).headers["location"])
        # The attacker's callback URL opened in another browser: refused.
        r = await victim.get(f"{back.path}?{back.query}")
        assert r.status_code == 400 and signed_out(victim)
        # In the right browser it works once; the same state again is refused.
        assert (await attacker.get(f"{back.path}?{back.query}")).status_code == 303
        r = await attacker.get(f"{back.path}?{back.query}")
        assert r.status_code == 400
        # An error from the provider, and an unknown provider.
        state = parse_qs(back.query)["state"][0]
        r = await attacker.get("/signin/oidc/psc/callback", params={"error": "access_denied", "state": state})
        assert r.status_code == 400
        assert (await attacker.get("/signin/oidc/nope")).status_code == 404
