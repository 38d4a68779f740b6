"""Shared helpers of the account and page tests: FHIR resources to link accounts to, and accounts."""

from __future__ import annotations

import random
from datetime import datetime

import httpx
import pyotp

from parcours.fhir import fr_core
from parcours.services import accounts
from parcours.services.accounts import NewAccount
from parcours.services.platform import Platform
from parcours.store.accounts import Account
from tests.conftest import uniq

PASSWORD = "correct horse battery staple"
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def random_ip() -> str:
    """A client address of its own, so one test's failures never throttle another's."""
    return f"10.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def totp_now(secret: str, at: datetime) -> str:
    return pyotp.TOTP(secret).at(at)


async def create_resource(client: httpx.AsyncClient, body: dict) -> str:
    r = await client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def new_patient(client: httpx.AsyncClient, *, family: str = "Lefèvre", given: str = "Hélène", ins: bool = True) -> str:
    body: dict = {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], "gender": "female",
                  "birthDate": "1980-02-03"}
    if ins:
        body["identifier"] = [{"system": fr_core.INS_NIR_SYSTEM, "value": uniq("2800275")}]
    return await create_resource(client, body)


async def new_practitioner(client: httpx.AsyncClient, *, family: str = "Martin", given: str = "Claire",
                           with_role: bool = True) -> str:
    pid = await create_resource(client, {
        "resourceType": "Practitioner", "name": [{"family": family, "given": [given], "prefix": ["Dr"]}],
        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}],
    })
    if with_role:
        org = await create_resource(client, {"resourceType": "Organization", "name": "Maison de santé des Tilleuls"})
        await create_resource(client, {
            "resourceType": "PractitionerRole", "practitioner": {"reference": f"Practitioner/{pid}"},
            "organization": {"reference": f"Organization/{org}"},
            "code": [{"text": "Médecin généraliste"}], "specialty": [{"text": "Médecine générale"}],
        })
    return pid


async def new_account(platform: Platform, role: str, fhir_user: str | None, *, email: str | None = None,
                      totp_secret: str | None = None, password: str = PASSWORD, **kw: object) -> Account:
    async with platform.pool.connection() as conn, conn.transaction():
        return await accounts.create_account(platform, conn, NewAccount(
            email=email or f"{uniq(role)}@example.org", password=password, role=role, fhir_user=fhir_user,
            totp_secret=totp_secret, **kw))  # type: ignore[arg-type]


async def start_clocked_platform(settings, **overrides: object) -> Platform:  # type: ignore[no-untyped-def]
    """A platform of its own on the test database whose clock only moves when a test says so."""
    from datetime import UTC

    from parcours.core.clock import FixedClock

    return await Platform.start(settings.model_copy(update={"db_pool_size": 4, **overrides}),
                                clock=FixedClock(datetime.now(UTC)), run_migrations=False)
