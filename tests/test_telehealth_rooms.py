"""Consultation rooms without a browser: who may join, signaling across processes, the Encounter."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
import websockets

from parcours.core.errors import BadRequest, Forbidden
from parcours.security import tokens
from parcours.security.caller import Caller
from parcours.services.platform import TOKEN_KEY
from parcours.services.telehealth import rooms
from parcours.services.telehealth.signaling import Peer, Signaling, decode, encode
from parcours.store import secrets
from tests.accounts_helpers import create_resource, new_patient, new_practitioner


async def _appointment(client, patient: str, pract: str) -> str:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    return await create_resource(client, {
        "resourceType": "Appointment", "status": "booked", "start": now.isoformat(), "end": (now + timedelta(minutes=20)).isoformat(),
        "participant": [{"actor": {"reference": f"Patient/{patient}"}, "status": "accepted"},
                        {"actor": {"reference": f"Practitioner/{pract}"}, "status": "accepted"}]})


def _caller(kind: str, who: str) -> Caller:
    scopes = ["patient/*.*"] if kind == "patient" else ["user/*.*"]
    return Caller(kind=kind, user_id=who, scopes=frozenset(scopes), fhir_user=who)


async def test_signaling_crosses_processes_and_keeps_the_waiting_room(platform) -> None:
    a = await Signaling.start(platform.uri, platform.pool)
    b = await Signaling.start(platform.uri, platform.pool)  # another worker process
    got: dict[str, list[dict]] = {"host": [], "patient": []}

    async def sink(name: str, m: dict) -> None:
        got[name].append(m)

    try:
        host = Peer("r1", "h", "Practitioner/1", True, lambda m: sink("host", m), admitted=True)
        patient = Peer("r1", "p", "Patient/1", False, lambda m: sink("patient", m))
        a.join(host)
        b.join(patient)
        await b.publish({"room": "r1", "from": "p", "type": "knock"})
        await a.publish({"room": "r1", "from": "h", "type": "hello"})  # not for the waiting patient
        big = {"room": "r1", "from": "h", "to": "p", "type": "offer", "data": {"sdp": "a=candidate " * 2000}}
        await a.publish({"room": "r1", "from": "h", "to": "p", "type": "admit"})
        await a.publish(big)  # compressed to fit NOTIFY
        for _ in range(100):
            if len(got["patient"]) >= 2 and got["host"]:
                break
            await asyncio.sleep(0.05)
        assert [m["type"] for m in got["host"]] == ["knock"]
        assert [m["type"] for m in got["patient"]] == ["admit", "offer"]
        assert got["patient"][1]["data"] == big["data"]
        assert decode(encode(big)) == big
    finally:
        await a.close()
        await b.close()


async def test_only_participants_enter_and_the_call_becomes_a_virtual_encounter(client, platform) -> None:
    pract = await new_practitioner(client, family="Lemoine", given="Paul")
    other = await new_practitioner(client, family="Faure", given="Zoé")
    patient = await new_patient(client)
    appt = await _appointment(client, patient, pract)
    async with platform.transaction(_caller("practitioner", f"Practitioner/{other}")) as repo:
        with pytest.raises((Forbidden,)) as e:
            await rooms.access_room(repo, appt)
    assert e.value.status in (403, 404)
    async with platform.transaction(_caller("patient", f"Patient/{patient}")) as repo:
        room = await rooms.access_room(repo, appt)
        assert not room.host and room.me == f"Patient/{patient}"
        with pytest.raises(Forbidden):
            await rooms.end_call(repo, room, datetime.now(UTC), datetime.now(UTC), [])
    now = platform.clock.now()
    async with platform.transaction(_caller("practitioner", f"Practitioner/{pract}")) as repo:
        room = await rooms.access_room(repo, appt)
        assert room.host
        with pytest.raises(BadRequest):
            await rooms.end_call(repo, room, now - timedelta(days=1), now, [])
        eid = await rooms.end_call(repo, room, now - timedelta(minutes=12), now, [f"Patient/{patient}"])
        enc = (await repo.read("Encounter", eid)).resource()
    assert enc["class"]["code"] == "VR" and enc["subject"]["reference"] == f"Patient/{patient}"
    assert [p["individual"]["reference"] for p in enc["participant"]] == [f"Practitioner/{pract}"]


async def test_the_websocket_refuses_strangers(live_server: str, pg_uri: str, client) -> None:
    key = secrets.get_or_create(pg_uri, TOKEN_KEY)
    pract = await new_practitioner(client, family="Durand", given="Léa")
    stranger = await new_practitioner(client, family="Bertin", given="Yves")
    patient = await new_patient(client)
    appt = await _appointment(client, patient, pract)
    url = live_server.replace("http", "ws") + f"/telehealth/rooms/{appt}/ws"

    def token(kind: str, who: str) -> str:
        return tokens.issue(key, subject=who, kind=kind, scopes=["user/*.*"] if kind != "patient" else ["patient/*.*"], fhir_user=who)

    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(url):  # no credentials
            pass
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(url + "?access_token=" + token("practitioner", f"Practitioner/{stranger}")):
            pass
    async with websockets.connect(url + "?peer=doc&access_token=" + token("practitioner", f"Practitioner/{pract}")) as doc, \
            websockets.connect(url + "?peer=pat&access_token=" + token("patient", f"Patient/{patient}")) as pat:
        assert json.loads(await doc.recv())["admitted"] is True
        assert json.loads(await pat.recv())["admitted"] is False
        knock = json.loads(await asyncio.wait_for(doc.recv(), 10))
        assert knock["type"] == "knock" and knock["from"] == "pat" and knock["who"] == f"Patient/{patient}"
        await pat.send(json.dumps({"type": "chat", "data": "ignored while waiting"}))
        await pat.send(json.dumps({"type": "knock"}))  # handled after the chat: once seen, the chat was dropped
        assert json.loads(await asyncio.wait_for(doc.recv(), 10))["type"] == "knock"
        await doc.send(json.dumps({"type": "admit", "to": "pat"}))
        assert json.loads(await asyncio.wait_for(pat.recv(), 10))["type"] == "admit"
        await pat.send(json.dumps({"type": "chat", "data": "bonjour"}))
        m = json.loads(await asyncio.wait_for(doc.recv(), 10))
        assert (m["type"], m["data"]) == ("chat", "bonjour")


async def test_a_professional_opens_a_room_for_a_patient_they_care_for(client, platform) -> None:
    pract = await new_practitioner(client, family="Colin", given="Eva")
    patient = await new_patient(client)
    stranger = await new_patient(client)
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{patient}"},
                                   "participant": [{"member": {"reference": f"Practitioner/{pract}"}}]})
    async with platform.transaction(_caller("practitioner", f"Practitioner/{pract}")) as repo:
        appt = await rooms.open_ad_hoc(repo, patient, platform.clock.now())
        room = await rooms.access_room(repo, appt)
    assert room.host and room.patient == f"Patient/{patient}"
    with pytest.raises(Forbidden):
        async with platform.transaction(_caller("practitioner", f"Practitioner/{pract}")) as repo:
            await rooms.open_ad_hoc(repo, stranger, platform.clock.now())
