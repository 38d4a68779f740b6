"""The demo loader: a region, a followed patient, one account per role; idempotent."""

from __future__ import annotations

from parcours.security.caller import SYSTEM
from parcours.services import accounts, demo
from parcours.store import accounts as account_store


async def test_demo_loads_once_and_logins_work(platform, client) -> None:
    logins, counts = await demo.load(platform, roles=40)
    assert counts["PractitionerRole"] >= 40 and counts["Patient"] > 0
    again, counts2 = await demo.load(platform, roles=40)
    assert counts2 == {} and [x.email for x in again] == [x.email for x in logins]
    async with platform.pool.connection() as conn:
        patient = await account_store.by_email(conn, f"patient@{demo.DOMAIN}")
        gp = await account_store.by_email(conn, f"medecin@{demo.DOMAIN}")
        proxy = await account_store.by_email(conn, f"aidant@{demo.DOMAIN}")
    assert patient and gp and proxy and gp.totp_enabled
    # The patient reads their own results; their GP reads them through the CareTeam.
    for account in (patient, gp):
        caller = accounts.caller_for(account)
        async with platform.transaction(caller) as repo:
            res = await repo.search(repo.parse_search("Observation", [("code", "http://loinc.org|4548-4")]))
            assert len(res.matches) == 4
            assert all(m.resource()["subject"]["reference"] == patient.fhir_user for m in res.matches)
    # The proxy sees the patient they represent, not the demo patient.
    async with platform.transaction(accounts.caller_for(proxy)) as repo:
        res = await repo.search(repo.parse_search("Patient", []))
        assert [f"Patient/{m.id}" for m in res.matches] != [patient.fhir_user]
        assert len(res.matches) == 1
    # The GP reaches his CareTeam patient and the patients booked with him; the others stay out of reach.
    async with platform.transaction(SYSTEM) as repo:
        everyone = await repo.search(repo.parse_search("Patient", [("_count", "200")]))
        roles = await repo.search(repo.parse_search("PractitionerRole", [("practitioner", gp.fhir_user)]))
        actors = [gp.fhir_user] + [f"PractitionerRole/{r.id}" for r in roles.matches]
        booked = await repo.search(repo.parse_search("Appointment", [("actor", ",".join(actors)), ("_count", "1000")]))
    expected = {patient.fhir_user}
    for appt in booked.matches:
        a = appt.resource()
        if a["status"] not in ("cancelled", "entered-in-error", "noshow"):
            expected |= {p["actor"]["reference"] for p in a["participant"] if p.get("actor", {}).get("reference", "").startswith("Patient/")}
    async with platform.transaction(accounts.caller_for(gp)) as repo:
        visible = await repo.search(repo.parse_search("Patient", [("_count", "200")]))
    assert {f"Patient/{m.id}" for m in visible.matches} == expected
    assert len(everyone.matches) > len(expected)


async def test_demo_has_telemedicine_to_try(platform, client) -> None:
    from datetime import timedelta

    from parcours.services.telehealth import expertise, stroke

    await demo.load(platform, roles=40)
    async with platform.pool.connection() as conn:
        derm = await account_store.by_email(conn, f"dermatologue@{demo.DOMAIN}")
        neuro = await account_store.by_email(conn, f"neurologue@{demo.DOMAIN}")
        patient = await account_store.by_email(conn, f"patient@{demo.DOMAIN}")
    assert derm and neuro and patient and derm.totp_enabled and neuro.totp_enabled
    # The dermatologist finds the GP's request about the demo patient waiting for them.
    async with platform.transaction(accounts.caller_for(derm)) as repo:
        mine = await expertise.lists(repo)
    waiting = [t for ts in mine.values() for t in ts if t["status"] == "requested"]
    assert len(waiting) == 1 and waiting[0]["for"]["reference"] == patient.fhir_user
    # The neurologist is on call now and all week (24-hour shifts), first to be alerted.
    async with platform.transaction(SYSTEM) as repo:
        rosters = [r for _, r in await stroke.rosters(repo)]
    assert len(rosters) == 1
    now = platform.clock.now()
    for hours in range(0, 24 * 7, 5):
        assert stroke.on_call(rosters[0], now + timedelta(hours=hours))[0] == neuro.fhir_user
