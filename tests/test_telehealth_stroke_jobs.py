"""Tele-stroke job loop: escalation on a fixed clock across the deadline, two concurrent runners
escalate once, and the alerts leave by e-mail through a real SMTP server (aiosmtpd, started here)
and by SMS (the development channel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time

import pytest_asyncio

from parcours.core.clock import FixedClock
from parcours.fhir import fr_core
from parcours.security.caller import PLATFORM, Caller
from parcours.services.booking import notify
from parcours.services.platform import Platform
from parcours.services.telehealth import stroke, stroke_jobs
from tests.accounts_helpers import (
    create_resource,
    new_account,
    new_patient,
    new_practitioner,
    start_clocked_platform,
)
from tests.conftest import uniq, wait_for_lock_waiters

# A Wednesday, 23:30 in Paris: inside the Wednesday night shift.
NIGHT = datetime(2026, 11, 25, 22, 30, tzinfo=UTC)




@pytest_asyncio.fixture
async def clocked(settings) -> AsyncIterator[Platform]:  # type: ignore[no-untyped-def]
    p = await start_clocked_platform(settings)
    try:
        yield p
    finally:
        await p.close()


def _pro(who: str) -> Caller:
    return Caller(kind="practitioner", user_id=who, fhir_user=who, scopes=frozenset({"user/*.*"}))


async def _case(client, platform: Platform) -> tuple[str, str, str, str, str, str, str]:  # type: ignore[no-untyped-def]
    """An emergency physician, two neurologists on the Wednesday night roster (the second with a mobile),
    their accounts, and a patient; returns (er, neuro1, neuro2, mail1, mail2, roster, patient)."""
    er = f"Practitioner/{await new_practitioner(client, family='Urgences', given='Inès')}"
    neuro1 = f"Practitioner/{await new_practitioner(client, family='Neuro', given='Un')}"
    mobile = "+3361" + uniq("")[-7:].rjust(7, "0")
    neuro2 = "Practitioner/" + await create_resource(client, {
        "resourceType": "Practitioner", "name": [{"family": "Neuro", "given": ["Deux"]}],
        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}],
        "telecom": [{"system": "phone", "use": "mobile", "value": mobile}]})
    mail1, mail2 = f"{uniq('n1')}@example.org", f"{uniq('n2')}@example.org"
    await new_account(platform, "practitioner", neuro1, email=mail1)
    await new_account(platform, "practitioner", neuro2, email=mail2, locale="en")
    patient = await new_patient(client)
    site = await create_resource(client, {"resourceType": "Location", "name": "CH de Saint-Quentin, urgences"})
    roster = await create_resource(client, stroke.roster_resource("Neurologie vasculaire", f"Location/{site}", [
        stroke.Shift("wed", time(20), time(8), (neuro1, neuro2))]))
    await create_resource(client, {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "EMER"},
                                   "subject": {"reference": f"Patient/{patient}"}, "period": {"start": NIGHT.isoformat()},
                                   "participant": [{"individual": {"reference": er}}]})
    return er, neuro1, neuro2, mail1, mail2, roster, patient, mobile  # type: ignore[return-value]


async def test_the_job_alerts_then_escalates_at_the_deadline_once(client, settings, clocked, smtp) -> None:
    inbox, port = smtp
    clock = clocked.clock
    assert isinstance(clock, FixedClock)
    clock.at = NIGHT
    er, neuro1, neuro2, mail1, mail2, roster, patient, mobile = await _case(client, clocked)
    notifier = notify.Notifier(clocked.settings, notify.SmtpEmail(settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port})),
                               notify.LoggingSms())
    async with clocked.transaction(_pro(er)) as repo:
        sent = await stroke.send_request(repo, roster, patient, clock.now(), ack_minutes=settings.stroke_ack_minutes,
                                         note="NIHSS 14, H0 21:50")
    assert sent.owner == neuro1

    # First round: nothing is due, the first on call is alerted (once, however many rounds).
    assert sent.task not in await stroke_jobs.run_due(clocked, notifier)
    assert sent.task not in await stroke_jobs.run_due(clocked, notifier)
    [first] = inbox.to(mail1)
    body = first.get_content()
    assert f"/workspace/stroke/{sent.task}" in body and "URGENT" in first["Subject"]
    assert "NIHSS" not in body and "Neurologie" not in body  # no clinical content by e-mail
    assert inbox.to(mail2) == []

    clock.advance(minutes=settings.stroke_ack_minutes, seconds=-1)  # just before the deadline
    assert sent.task not in await stroke_jobs.run_due(clocked, notifier)
    clock.advance(seconds=1)  # the deadline

    # Two runners at once, both held on the Task's row: exactly one escalates.
    async with clocked.transaction(PLATFORM) as holder:
        assert await holder.lock("Task", sent.task) is not None
        runs = [asyncio.create_task(stroke_jobs.run_due(clocked, notifier)) for _ in range(2)]
        await wait_for_lock_waiters(holder.conn, 2, "two runners")
    results = await asyncio.gather(*runs)
    assert sorted(sent.task in r for r in results) == [False, True]
    async with clocked.transaction(PLATFORM) as repo:
        task = (await repo.read("Task", sent.task)).resource()
    assert task["owner"]["reference"] == neuro2
    assert [(e["event"], e["who"]) for e in stroke.timeline(task)] == [("requested", er), ("escalated", neuro2)]
    [second] = inbox.to(mail2)  # the next on call: one e-mail (in English, their language) and one SMS
    assert second["Subject"].startswith("URGENT: tele-stroke")
    assert [t for (to, t) in notifier.sms.sent if to == mobile] == [
        f"Parcours: URGENT tele-stroke request to acknowledge. {clocked.settings.base_url.rstrip('/')}/workspace/stroke/{sent.task}"]
    assert len(inbox.to(mail1)) == 1

    # Acknowledged: no more escalation however late.
    async with clocked.transaction(_pro(neuro2)) as repo:
        await stroke.acknowledge(repo, sent.task, clock.now())
    clock.advance(hours=1)
    assert sent.task not in await stroke_jobs.run_due(clocked, notifier)
    assert len(inbox.to(mail2)) == 1
