"""Accounts: password hashing, creation rules and FR identity vigilance, throttling, TOTP, CLI."""

from __future__ import annotations

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from parcours.core.errors import BadRequest, Conflict, Unprocessable
from parcours.fhir import fr_core
from parcours.security import passwords, tokens
from parcours.security import totp as totp_codes
from parcours.services import accounts, signin
from parcours.store import accounts as store
from parcours.store.db import sqlalchemy_url
from tests.accounts_helpers import (
    PASSWORD,
    new_account,
    new_patient,
    new_practitioner,
    random_ip,
    start_clocked_platform,
    totp_now,
)
from tests.conftest import uniq


@pytest_asyncio.fixture(scope="module")
async def clocked(settings):  # type: ignore[no-untyped-def]
    p = await start_clocked_platform(settings, signin_max_failures_account=5, signin_max_failures_ip=8,
                                     signin_window_minutes=15, signin_lockout_minutes=15)
    yield p
    await p.close()


def test_password_hashing() -> None:
    h = passwords.hash_password(PASSWORD)
    assert h.startswith("$argon2id$")
    assert PASSWORD not in h
    assert passwords.verify_password(h, PASSWORD)
    assert not passwords.verify_password(h, PASSWORD + "!")
    assert not passwords.verify_password(None, PASSWORD)  # unknown account: same work, always false
    assert not passwords.verify_password(h, "x" * (passwords.MAX_LENGTH + 1))
    assert passwords.hash_password(PASSWORD) != h  # salted
    assert not passwords.needs_rehash(h)
    assert passwords.password_problems("short", min_length=12) == ["password.too_short"]
    assert "password.is_email" in passwords.password_problems("someone@example.org", min_length=12, email="someone@example.org")
    assert passwords.password_problems("aaaaaaaaaaaaaaaa", min_length=12) == ["password.too_simple"]
    assert passwords.password_problems(PASSWORD, min_length=12) == []


def test_schema_matches_migration(pg_uri: str) -> None:
    engine = create_engine(sqlalchemy_url(pg_uri))
    try:
        insp = inspect(engine)
        for table in store.metadata.sorted_tables:
            live = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
            declared = {c.name: c.nullable for c in table.columns}
            assert live == declared, table.name
    finally:
        engine.dispose()


async def test_patient_account_links_patient_and_records_identity_status(client, platform) -> None:
    pid = await new_patient(client)
    acct = await new_account(platform, "patient", f"Patient/{pid}", identity_status="qualified")
    assert acct.identity_status == "qualified" and acct.fhir_user == f"Patient/{pid}"
    assert acct.display_name == "Hélène Lefèvre"
    patient = (await client.get(f"/fhir/Patient/{pid}")).json()
    assert fr_core.identity_status(patient) == "qualified"
    ext = next(e for e in patient["extension"] if e["url"] == fr_core.RELIABILITY_URL)
    assert ext["extension"][0]["valueCoding"] == {"system": fr_core.STATUS_SYSTEM, "code": "QUAL", "display": "Identité qualifiée"}
    ins = next(i for i in patient["identifier"] if i["system"] == fr_core.INS_NIR_SYSTEM)
    assert ins["type"]["coding"][0]["code"] == "INS-NIR"

    # A patient account without a status gets the Patient's own, else "provisional".
    other = await new_account(platform, "patient", f"Patient/{await new_patient(client)}")
    assert other.identity_status == "provisional"

    # Identity vigilance: a recovered/qualified identity needs the INS from INSi.
    no_ins = await new_patient(client, ins=False)
    with pytest.raises(Unprocessable):
        await new_account(platform, "patient", f"Patient/{no_ins}", identity_status="recovered")
    # Changing the status later updates the Patient and every account linked to it.
    async with platform.pool.connection() as conn, conn.transaction():
        await accounts.set_identity_status(platform, conn, f"Patient/{pid}", "validated")
        assert (await store.get(conn, acct.id)).identity_status == "validated"  # type: ignore[union-attr]
    assert fr_core.identity_status((await client.get(f"/fhir/Patient/{pid}")).json()) == "validated"


async def test_account_rules(client, platform) -> None:
    pid = await new_patient(client)
    email = f"{uniq('dup')}@example.org"
    await new_account(platform, "patient", f"Patient/{pid}", email=email)
    with pytest.raises(Conflict):
        await new_account(platform, "patient", f"Patient/{pid}", email=email.upper())
    with pytest.raises(BadRequest):  # wrong kind of link
        await new_account(platform, "practitioner", f"Patient/{pid}")
    with pytest.raises(BadRequest):  # a patient account needs its Patient
        await new_account(platform, "patient", None)
    with pytest.raises(Unprocessable):  # the linked resource must exist
        await new_account(platform, "patient", f"Patient/{uniq('missing')}")
    with pytest.raises(BadRequest):
        await new_account(platform, "patient", f"Patient/{pid}", password="short")
    with pytest.raises(BadRequest):
        await new_account(platform, "practitioner", None)
    no_rpps = await create_practitioner_without_rpps(client)
    with pytest.raises(Unprocessable):  # professionals are identified by their RPPS
        await new_account(platform, "practitioner", f"Practitioner/{no_rpps}")
    staff = await new_account(platform, "staff", None, display_name="Secrétariat des Tilleuls")
    assert staff.role == "staff" and staff.fhir_user is None


async def create_practitioner_without_rpps(client) -> str:  # type: ignore[no-untyped-def]
    r = await client.post("/fhir/Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "Sans"}]},
                          headers={"Content-Type": "application/fhir+json"})
    return str(r.json()["id"])


async def test_throttling_locks_the_account_then_lets_it_in_again(client, clocked) -> None:
    acct = await new_account(clocked, "patient", f"Patient/{await new_patient(client)}")
    ip = random_ip()
    async with clocked.pool.connection() as conn, conn.transaction():
        for i in range(4):
            a = await signin.check_password(clocked, conn, acct.email, "wrong password " + str(i), ip)
            assert a.outcome == signin.INVALID
        a = await signin.check_password(clocked, conn, acct.email, "wrong password again", ip)
        assert a.outcome == signin.LOCKED and a.retry_at is not None
        # Locked: even the right password is refused, from any address.
        a = await signin.check_password(clocked, conn, acct.email, PASSWORD, random_ip())
        assert a.outcome == signin.LOCKED
    clocked.clock.advance(minutes=14)
    async with clocked.pool.connection() as conn, conn.transaction():
        assert (await signin.check_password(clocked, conn, acct.email, PASSWORD, ip)).outcome == signin.LOCKED
    clocked.clock.advance(minutes=2)
    async with clocked.pool.connection() as conn, conn.transaction():
        a = await signin.check_password(clocked, conn, acct.email, PASSWORD, ip)
        assert a.outcome == signin.OK and a.account is not None and a.account.id == acct.id


async def test_throttling_per_address_across_accounts(client, clocked) -> None:
    target = await new_account(clocked, "patient", f"Patient/{await new_patient(client)}")
    ip = random_ip()
    async with clocked.pool.connection() as conn, conn.transaction():
        # Password spraying: one guess on each of many addresses (unknown ones count too).
        for _ in range(7):
            assert (await signin.check_password(clocked, conn, f"{uniq('nobody')}@example.org", "guess", ip)).outcome == signin.INVALID
        assert (await signin.check_password(clocked, conn, f"{uniq('nobody')}@example.org", "guess", ip)).outcome == signin.LOCKED
        assert (await signin.check_password(clocked, conn, target.email, PASSWORD, ip)).outcome == signin.LOCKED
        # The account itself is not locked: from elsewhere it signs in.
        assert (await signin.check_password(clocked, conn, target.email, PASSWORD, random_ip())).outcome == signin.OK
    # The counters live in the database: another platform (another worker) sees the lock.
    async with clocked.pool.connection() as conn:
        assert await store.locked_until(conn, [("ip", ip)], clocked.clock.now()) is not None
    assert signin.network_key("2001:db8:1:2:3:4:5:6") == signin.network_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"


async def test_totp_codes_are_not_replayed_and_recovery_codes_are_single_use(client, clocked) -> None:
    secret = totp_codes.new_secret()
    acct = await new_account(clocked, "practitioner", f"Practitioner/{await new_practitioner(client, with_role=False)}",
                             totp_secret=secret)
    assert signin.stage_after_password(acct) == "totp"
    ip = random_ip()
    code = totp_now(secret, clocked.clock.now())
    async with clocked.pool.connection() as conn, conn.transaction():
        assert (await signin.check_second_factor(clocked, conn, acct, code, ip)).outcome == signin.OK
        assert (await signin.check_second_factor(clocked, conn, acct, code, ip)).outcome == signin.INVALID  # replay
        codes = await accounts.new_recovery_codes(clocked, conn, acct)
        assert len(codes) == 10 and len(set(codes)) == 10
        first = await signin.check_second_factor(clocked, conn, acct, codes[0].lower().replace("-", " "), ip)
        assert first.outcome == signin.OK and first.used_recovery_code
        assert (await signin.check_second_factor(clocked, conn, acct, codes[0], ip)).outcome == signin.INVALID
        assert await accounts.recovery_codes_left(conn, acct) == 9
    clocked.clock.advance(seconds=60)
    async with clocked.pool.connection() as conn, conn.transaction():
        fresh = totp_now(secret, clocked.clock.now())
        assert (await signin.check_second_factor(clocked, conn, acct, fresh, ip)).outcome == signin.OK


def test_cli_user_create_and_token(live_server: str, live_token: str, pg_uri: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from parcours.cli.main import app

    auth = {"Authorization": f"Bearer {live_token}", "Content-Type": "application/fhir+json"}
    r = httpx.post(f"{live_server}/fhir/Patient", headers=auth, json={
        "resourceType": "Patient", "name": [{"family": "Durand", "given": ["Paul"]}],
        "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": uniq("1790175")}]})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    email = f"{uniq('cli')}@example.org"
    env = {"DATABASE_URL": pg_uri, "PARCOURS_HOME": str(tmp_path)}
    runner = CliRunner()
    res = runner.invoke(app, ["user", "create", "--role", "patient", "--email", email, "--password", PASSWORD,
                              "--fhir", f"Patient/{pid}"], env=env)
    assert res.exit_code == 0, res.output
    user_id = res.stdout.strip()
    assert len(user_id) == 36

    again = runner.invoke(app, ["user", "create", "--role", "patient", "--email", email, "--password", PASSWORD,
                                "--fhir", f"Patient/{pid}"], env=env)
    assert again.exit_code == 2 and "PRC-1490" in again.output

    res = runner.invoke(app, ["token", "--user", email, "--scope", "patient/*.read openid fhirUser"], env=env)
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    key = _token_key(pg_uri)
    claims = tokens.decode(key, token)
    assert claims["sub"] == user_id and claims["kind"] == "patient" and claims["fhirUser"] == f"Patient/{pid}"
    assert claims["scope"] == "patient/*.read openid fhirUser"
    caller = tokens.verify(key, token)
    assert caller.kind == "patient" and caller.fhir_user == f"Patient/{pid}" and caller.user_id == user_id
    # The FHIR API takes the user's token: the patient reads their own record.
    r = httpx.get(f"{live_server}/fhir/Patient/{pid}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text

    refused = runner.invoke(app, ["token", "--user", email, "--scope", "system/*.*"], env=env)
    assert refused.exit_code == 2
    unknown = runner.invoke(app, ["token", "--user", f"{uniq('ghost')}@example.org"], env=env)
    assert unknown.exit_code == 2
    system = runner.invoke(app, ["token", "--scope", "system/*.*"], env=env)
    assert system.exit_code == 0 and tokens.decode(key, system.stdout.strip())["kind"] == "system"

    secret = totp_codes.new_secret()
    prac = httpx.post(f"{live_server}/fhir/Practitioner", headers=auth, json={
        "resourceType": "Practitioner", "name": [{"family": "Roux"}],
        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}]}).json()["id"]
    res = runner.invoke(app, ["user", "create", "--role", "practitioner", "--email", f"{uniq('doc')}@example.org",
                              "--password", PASSWORD, "--fhir", f"Practitioner/{prac}", "--totp-secret", secret], env=env)
    assert res.exit_code == 0, res.output


def _token_key(pg_uri: str) -> str:
    from parcours.services.platform import TOKEN_KEY
    from parcours.store import secrets

    return secrets.get_or_create(pg_uri, TOKEN_KEY)


def test_recovery_code_format() -> None:
    codes = totp_codes.new_recovery_codes()
    assert all(len(c) == 14 and c[4] == c[9] == "-" for c in codes)
    assert totp_codes.recovery_code_hash("a", codes[0]) == totp_codes.recovery_code_hash("a", codes[0].lower().replace("-", ""))
    assert totp_codes.recovery_code_hash("a", codes[0]) != totp_codes.recovery_code_hash("b", codes[0])
