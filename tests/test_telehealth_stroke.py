"""Tele-stroke: on-call roster, alert, acknowledgment deadline and escalation on a fake clock, timeline."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from parcours.core.errors import Conflict, NotFound
from parcours.security.caller import PLATFORM, Caller
from parcours.services.telehealth import rooms, stroke
from tests.accounts_helpers import create_resource, new_patient, new_practitioner

# A Wednesday, 23:30 in Paris (22:30 UTC in November): inside the Wednesday night shift.
NIGHT = datetime(2026, 11, 25, 22, 30, tzinfo=UTC)


def _pro(who: str) -> Caller:
    return Caller(kind="practitioner", user_id=who, fhir_user=who, scopes=frozenset({"user/*.*"}))


def test_who_is_on_call() -> None:
    a, b = "Practitioner/a", "Practitioner/b"
    roster = stroke.roster_resource("Neurologie", "Location/chu", [
        stroke.Shift("wed", time(8), time(20), (b, a)), stroke.Shift("wed", time(20), time(8), (a, b))])
    assert stroke.on_call(roster, datetime(2026, 11, 25, 9, 0, tzinfo=UTC)) == (b, a)  # Wednesday 10:00 Paris
    assert stroke.on_call(roster, NIGHT) == (a, b)
    assert stroke.on_call(roster, datetime(2026, 11, 26, 5, 0, tzinfo=UTC)) == (a, b)  # Thursday 06:00: the night goes on
    assert stroke.on_call(roster, datetime(2026, 11, 26, 9, 0, tzinfo=UTC)) == ()  # Thursday day: nobody


async def test_request_escalates_then_is_acknowledged_and_decided(client, platform) -> None:
    er = f"Practitioner/{await new_practitioner(client, family='Urgences', given='Inès')}"
    neuro1 = f"Practitioner/{await new_practitioner(client, family='Neuro', given='Un')}"
    neuro2 = f"Practitioner/{await new_practitioner(client, family='Neuro', given='Deux')}"
    patient = await new_patient(client)
    site = await create_resource(client, {"resourceType": "Location", "name": "CH de Saint-Quentin, urgences"})
    roster = await create_resource(client, stroke.roster_resource("Neurologie vasculaire", f"Location/{site}", [
        stroke.Shift("wed", time(20), time(8), (neuro1, neuro2))]))
    # The patient is in the emergency department: an Encounter with the emergency physician.
    await create_resource(client, {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "EMER"},
                                   "subject": {"reference": f"Patient/{patient}"}, "period": {"start": NIGHT.isoformat()},
                                   "participant": [{"individual": {"reference": er}}]})
    now = NIGHT
    async with platform.transaction(_pro(er)) as repo:
        sent = await stroke.send_request(repo, roster, patient, now, ack_minutes=5, note="Hémiplégie droite, H0 21:50")
    assert sent.owner == neuro1
    async with platform.transaction(_pro(neuro1)) as repo:  # the video room is open for the specialist at once
        assert (await rooms.access_room(repo, sent.appointment)).host

    async with platform.transaction(PLATFORM) as repo:
        assert await stroke.escalate_due(repo, now + timedelta(minutes=4)) == []
        assert await stroke.escalate_due(repo, now + timedelta(minutes=5)) == [sent.task]
    async with platform.transaction(_pro(neuro1)) as repo:
        with pytest.raises(NotFound):  # no longer theirs
            await stroke.acknowledge(repo, sent.task, now + timedelta(minutes=6))
    async with platform.transaction(_pro(neuro2)) as repo:
        await stroke.acknowledge(repo, sent.task, now + timedelta(minutes=6))
        with pytest.raises(Conflict):
            await stroke.acknowledge(repo, sent.task, now + timedelta(minutes=6))
        assert (await rooms.access_room(repo, sent.appointment)).host
    async with platform.transaction(PLATFORM) as repo:
        assert await stroke.escalate_due(repo, now + timedelta(minutes=30)) == []  # acknowledged: stays
    async with platform.transaction(_pro(er)) as repo:
        await stroke.record(repo, sent.task, "video-start", now + timedelta(minutes=7))
        with pytest.raises(Conflict):
            await stroke.record(repo, sent.task, "decision", now + timedelta(minutes=8), "Thrombolyse")
    async with platform.transaction(_pro(neuro2)) as repo:
        task = await stroke.record(repo, sent.task, "decision", now + timedelta(minutes=15), "Thrombolyse IV")
    assert task["status"] == "completed"
    note = next(o["valueReference"]["reference"] for o in task["output"] if o["type"]["text"] == "note")
    async with platform.transaction(_pro(er)) as repo:  # the decision is in the shared record, for the requester too
        doc = (await repo.read("DocumentReference", note.split("/", 1)[1])).resource()
    assert doc["subject"] == {"reference": f"Patient/{patient}"} and doc["author"] == [{"reference": neuro2}]
    events = stroke.timeline(task)
    assert [(e["event"], e["who"]) for e in events] == [
        ("requested", er), ("escalated", neuro2), ("acknowledged", neuro2), ("video-start", er), ("decision", neuro2)]
    assert [e["time"] for e in events] == [(now + timedelta(minutes=m)).isoformat() for m in (0, 5, 6, 7, 15)]
