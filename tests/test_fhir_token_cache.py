"""Bearer tokens verified once per process are served from a cache until their own expiry;
revocation is still checked on every request."""

from __future__ import annotations

import time

import httpx
import pytest

from parcours.core.errors import Unauthorized
from parcours.security import tokens
from parcours.web import auth
from tests.conftest import BASE, uniq


async def _get(app, token: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        return await c.get("/fhir/Patient", params={"_count": "1"})


async def test_a_cached_token_still_stops_working_when_revoked(app, client, platform) -> None:
    jti = uniq("jti")
    token = tokens.issue(platform.token_key, subject=uniq("app"), kind="system", scopes=["system/*.*"], extra={"jti": jti})
    assert (await _get(app, token)).status_code == 200
    assert (platform.token_key, token) in auth._VERIFIED
    assert (await _get(app, token)).status_code == 200
    app.state.smart.revoked.add(jti)
    r = await _get(app, token)
    assert r.status_code == 401 and "revoked" in r.text


async def test_the_cache_keeps_the_caller_of_each_token(app, client, platform) -> None:
    a = tokens.issue(platform.token_key, subject=uniq("a"), kind="system", scopes=["system/Patient.read"])
    b = tokens.issue(platform.token_key, subject=uniq("b"), kind="system", scopes=["system/Observation.read"])
    for _ in range(2):
        assert (await _get(app, a)).status_code == 200
        assert (await _get(app, b)).status_code == 403  # its own scopes, not the other token's


def test_an_entry_is_not_served_after_the_token_expired(platform) -> None:
    token = tokens.issue(platform.token_key, subject=uniq("old"), kind="system", scopes=["system/*.*"], lifetime_s=60,
                         now=time.time() - 120)
    # As if it had been verified while it was valid.
    caller = tokens.verify(platform.token_key, token, now=time.time() - 100)
    auth._VERIFIED[(platform.token_key, token)] = (caller, int(time.time()) - 60, None)
    with pytest.raises(Unauthorized):
        auth._verified(platform.token_key, token, set())
    assert (platform.token_key, token) not in auth._VERIFIED


def test_a_bad_signature_is_never_cached(platform) -> None:
    token = tokens.issue("another-key-entirely-0123456789abcdef", subject=uniq("x"), kind="system", scopes=["system/*.*"])
    for _ in range(2):
        with pytest.raises(Unauthorized):
            auth._verified(platform.token_key, token, set())
    assert (platform.token_key, token) not in auth._VERIFIED
