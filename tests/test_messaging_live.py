"""Real-time messaging: delivery across server processes, catch-up after a reconnection or a
worker's restart, access checked again before each delivery, the websocket protocol over
real HTTP, and e-mail notices for people who are offline (a real SMTP server, aiosmtpd).

Two ``Platform`` instances on the test database stand for two worker processes (or two
nodes): each runs its own change feed and messaging hub, and nothing passes between them
but PostgreSQL. Every wait is for a condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
import pytest_asyncio

from parcours.core.errors import ParcoursError
from parcours.events.bus import ChangeFeed
from parcours.security.caller import Caller
from parcours.services.booking.notify import SmtpEmail
from parcours.services.messaging import hub as hubs
from parcours.services.messaging import notify, service
from parcours.services.platform import Platform
from parcours.store import messaging as store
from tests.messaging_helpers import JSON, MAX, Person, World, make_world

TIMEOUT = 15.0


class FakeSocket:
    """A socket as the hub sees it, collecting what it is sent."""

    def __init__(self, person: Person, key: str | None = None) -> None:
        self.person = person
        self.key = key or f"test:{person.user_id}"
        self.account_id = person.user_id
        self.events: list[dict] = []
        self.arrived = asyncio.Event()
        self.closed: str | None = None

    def caller(self) -> Caller:
        if self.closed:
            raise ParcoursError("closed", status=401)
        return self.person.caller

    async def still_valid(self) -> bool:
        return self.closed is None

    async def deliver(self, event: dict[str, Any], view: Any = None) -> None:
        self.events.append(event)
        self.arrived.set()

    async def close(self, reason: str) -> None:
        self.closed = reason

    def messages(self, conversation: str | None = None) -> list[dict]:
        return [e for e in self.events if e["type"] == "message" and conversation in (None, e["conversation"])]

    async def wait_for(self, predicate, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.arrived.clear()
                await self.arrived.wait()


def has_ids(*ids: str):  # type: ignore[no-untyped-def]
    return lambda s: set(ids) <= {e["id"] for e in s.messages()}


@pytest_asyncio.fixture(scope="module")
async def world(client, platform: Platform) -> World:
    return await make_world(client, platform)


@pytest_asyncio.fixture(scope="module")
async def two_nodes(platform: Platform) -> AsyncIterator[tuple[hubs.Hub, hubs.Hub, Platform]]:
    """Hub A on the session's platform, hub B on a second platform: two processes."""
    other = await Platform.start(platform.settings.model_copy(update={"db_pool_size": 4}), run_migrations=False)
    feed_a, feed_b = ChangeFeed(platform.uri, platform.pool), ChangeFeed(other.uri, other.pool)
    await feed_a.start()
    await feed_b.start()
    hub_a = await hubs.Hub.start(platform, feed_a, node="node-a")
    hub_b = await hubs.Hub.start(other, feed_b, node="node-b")
    yield hub_a, hub_b, other
    await hub_a.close()
    await hub_b.close()
    await feed_a.close()
    await feed_b.close()
    await other.close()


async def start(platform: Platform, who: Person, to: list[str], topic: str, text: str, **kw: Any):  # type: ignore[no-untyped-def]
    async with platform.transaction(who.caller) as repo:
        return await service.start_conversation(repo, to=to, topic=topic, text=text, max_attachment_bytes=MAX, **kw)


async def send(platform: Platform, who: Person, cid: str, text: str) -> str:
    async with platform.transaction(who.caller) as repo:
        return (await service.send(repo, cid, text=text, max_attachment_bytes=MAX)).id


async def test_every_tab_of_every_participant_gets_each_message_whichever_process_serves_it(platform, world: World, two_nodes) -> None:
    hub_a, hub_b, other = two_nodes
    w = world
    patient_phone = FakeSocket(w.patient, key="patient-phone")  # on node A
    gp_desk = FakeSocket(w.gp, key="gp-desk")  # on node B
    gp_laptop = FakeSocket(w.gp, key="gp-laptop")  # on node A
    stranger = FakeSocket(w.stranger)  # not in the conversation, on node B
    await hub_a.attach(patient_phone)
    await hub_b.attach(gp_desk)
    await hub_a.attach(gp_laptop)
    await hub_b.attach(stranger)
    try:
        conv = await start(platform, w.patient, [w.gp.ref], "Douleur au genou", "J'ai mal au genou depuis hier")
        cid, first = conv.conversation.id, conv.message.id
        # Written through node B's platform this time: it reaches node A's sockets the same way.
        answer = await send(other, w.gp, cid, "Venez demain à 9 h")
        for sock in (patient_phone, gp_desk, gp_laptop):
            await sock.wait_for(has_ids(first, answer))
            got = sock.messages(cid)
            assert [m["seq"] for m in got] == [1, 2]  # in order, each once
            assert got[1]["texts"] == ["Venez demain à 9 h"] and got[1]["sender"] == w.gp.ref
        assert [e["conversation"] for e in gp_desk.events if e["type"] == "conversation"] == [cid]
        assert patient_phone.messages()[0]["mine"] and not patient_phone.messages()[1]["mine"]
        # The one outside the conversation hears nothing of it: a message of his own comes first.
        marker = await start(platform, w.gp, [w.stranger.ref], "Garde", "Qui prend la garde ?")
        await stranger.wait_for(has_ids(marker.message.id))
        assert cid not in {e.get("conversation") for e in stranger.events}
        # Each delivery was a read through the recipient's Repository: audited as theirs.
        async with platform.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM audit_log WHERE action = 'read' AND resource_id = %s AND agent = %s",
                                     (answer, w.patient.user_id))
            assert (await cur.fetchone())[0] >= 1
    finally:
        for h, s in ((hub_a, patient_phone), (hub_b, gp_desk), (hub_a, gp_laptop), (hub_b, stranger)):
            h.detach(s)


async def test_read_receipts_reach_the_other_process(platform, world: World, two_nodes) -> None:
    hub_a, hub_b, other = two_nodes
    w = world
    conv = await start(platform, w.nurse, [w.patient.ref], "Pansement", "Je passe jeudi")
    nurse = FakeSocket(w.nurse, key="nurse-tablet")
    await hub_b.attach(nurse)
    try:
        async with other.transaction(w.patient.caller) as repo:
            await service.mark_read(repo, conv.conversation.id, 1)
        await nurse.wait_for(lambda s: any(e["type"] == "read" and e["participant"] == w.patient.ref and e["seq"] == 1
                                           for e in s.events))
    finally:
        hub_b.detach(nurse)


async def test_a_client_that_reconnects_gets_what_it_missed_even_after_a_worker_restart(platform, world: World, client) -> None:
    w = world
    conv = await start(platform, w.patient, [w.nurse.ref], "Ordonnance", "Pouvez-vous renouveler ?")
    cid = conv.conversation.id
    # A worker with a socket: it gets message 1, then the worker dies.
    node = await Platform.start(platform.settings.model_copy(update={"db_pool_size": 3}), run_migrations=False)
    feed = ChangeFeed(node.uri, node.pool)
    await feed.start()
    hub = await hubs.Hub.start(node, feed, node="dying")
    sock = FakeSocket(w.patient, key="patient-tab")
    await hub.attach(sock)
    await hub.catch_up(sock, {cid: 0})
    await sock.wait_for(has_ids(conv.message.id))
    cursor = max(m["seq"] for m in sock.messages(cid))
    await hub.close()
    await feed.close()
    await node.close()
    # Meanwhile, on other processes, the conversation goes on (one message over the FHIR API).
    missed = [await send(platform, w.nurse, cid, f"Réponse {i}") for i in range(3)]
    async with platform.transaction(w.patient.caller) as repo:
        header = (await repo.read("Communication", cid)).resource()
    from parcours.services.messaging import model

    body = model.build_message(cid, header, sender={"reference": w.nurse.ref}, text="Par l'API FHIR", attachments=[],
                               in_reply_to=None, now=platform.clock.now())
    r = await client.post("/fhir/Communication", json=body, headers={**JSON, **w.nurse.headers(platform)})
    assert r.status_code == 201, r.text
    missed.append(r.json()["id"])
    # The tab reconnects to another worker with its cursor: everything after it, in order, nothing twice.
    feed2 = ChangeFeed(platform.uri, platform.pool)
    await feed2.start()
    hub2 = await hubs.Hub.start(platform, feed2, node="survivor")
    again = FakeSocket(w.patient, key="patient-tab")
    try:
        await hub2.attach(again)
        await hub2.catch_up(again, {cid: cursor})
        await again.wait_for(lambda s: any(e["type"] == "ready" for e in s.events))
        got = again.messages(cid)
        assert [m["id"] for m in got] == missed
        assert [m["seq"] for m in got] == [2, 3, 4, 5]
        # Live again: the next one arrives without asking.
        nxt = await send(platform, w.nurse, cid, "Et une de plus")
        await again.wait_for(has_ids(nxt))
    finally:
        hub2.detach(again)
        await hub2.close()
        await feed2.close()


async def test_access_is_checked_again_before_each_delivery(platform, client, two_nodes) -> None:
    hub_a, _, _ = two_nodes
    w = await make_world(client, platform)  # its own people: the patient blocks the nurse here
    conv = await start(platform, w.gp, [w.nurse.ref], "Au sujet de Mme Durand", "Elle sort demain", about=w.patient.ref)
    cid = conv.conversation.id
    nurse = FakeSocket(w.nurse)
    await hub_a.attach(nurse)
    try:
        first = await send(platform, w.gp, cid, "Prévoir les soins")
        await nurse.wait_for(has_ids(first))
        # The patient blocks the nurse: the conversation is about her, so he sees no more of it.
        r = await client.post("/fhir/Consent", headers={**JSON, **w.patient.headers(platform)}, json={
            "resourceType": "Consent", "status": "active", "patient": {"reference": w.patient.ref},
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "provision": {"type": "deny", "actor": [{"role": {"text": "professional"}, "reference": {"reference": w.nurse.ref}}]}})
        assert r.status_code == 201, r.text
        hidden = await send(platform, w.gp, cid, "Le traitement change")
        marker = await start(platform, w.gp, [w.nurse.ref], "Autre chose", "Réunion à 14 h")
        await nurse.wait_for(has_ids(marker.message.id))
        assert hidden not in {m["id"] for m in nurse.messages()}
        # A catch-up steps over it without showing it.
        gap = FakeSocket(w.nurse, key="nurse-other")
        await hub_a.catch_up(gap, {cid: 0})
        assert [e["type"] for e in gap.events if e["type"] in ("message", "gap", "error")] == ["error"]
        # Credentials that no longer hold close the socket.
        nurse.closed = "signed out"
        await send(platform, w.gp, marker.conversation.id, "Vous êtes là ?")
        async with asyncio.timeout(TIMEOUT):
            while hub_a._clients.get(nurse.key):  # noqa: SLF001 - the hub dropped it
                await asyncio.sleep(0.02)
    finally:
        hub_a.detach(nurse)


# -- the websocket over real HTTP ------------------------------------------------------------------------

async def test_the_websocket_protocol_over_http(live_server: str, platform, world: World) -> None:
    import websockets

    w = world
    conv = await start(platform, w.patient, [w.open.ref], "Question", "Bonjour docteur")
    cid = conv.conversation.id
    url = live_server.replace("http://", "ws://") + "/messages/ws"
    async with asyncio.timeout(30):
        async with websockets.connect(f"{url}?access_token={w.open.token(platform)}&lang=en") as ws:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
            await ws.send(orjson.dumps({"type": "hello", "cursors": {cid: 0}, "html": True}).decode())
            seen: list[dict] = []
            while not seen or seen[-1]["type"] != "ready":
                seen.append(orjson.loads(await ws.recv()))
            [first] = [e for e in seen if e["type"] == "message"]
            assert first["id"] == conv.message.id and 'id="msg-' in first["html"] and "Bonjour docteur" in first["html"]
            assert "Reply" in first["html"]  # rendered in the socket's language
            live = await send(platform, w.patient, cid, "Êtes-vous disponible ?")
            while True:
                e = orjson.loads(await ws.recv())
                if e["type"] == "message":
                    assert e["id"] == live and e["seq"] == 2
                    break
            await ws.send(orjson.dumps({"type": "read", "conversation": cid, "seq": 2}).decode())
            while True:
                e = orjson.loads(await ws.recv())
                if e["type"] == "read" and e["participant"] == w.open.ref:
                    assert e["seq"] == 2
                    break
        # No credentials, or a foreign page riding the cookie: refused before the upgrade.
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with websockets.connect(url):
                pass


# -- e-mail notices ---------------------------------------------------------------------------------------



async def test_people_offline_get_one_email_without_clinical_content(platform, client, smtp) -> None:
    inbox, port = smtp
    w = await make_world(client, platform, accounts=("patient", "nurse", "open"))
    settings = platform.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port,
                                                    "smtp_from": "Parcours <messagerie@parcours.test>"})
    channel = SmtpEmail(settings)
    topic, words = "Résultats de biopsie", "La biopsie montre un mélanome"
    conv = await start(platform, w.gp, [w.patient.ref, w.nurse.ref, w.open.ref], topic, words)
    await send(platform, w.gp, conv.conversation.id, "Appelez-moi pour en parler")
    now = platform.clock.now()
    later = now + timedelta(minutes=10)
    # The nurse has the page open somewhere (a live socket, seen then); Dr Open muted the conversation.
    async with platform.pool.connection() as conn, conn.transaction():
        await store.set_presence(conn, "some-node", {w.nurse.user_id: 1}, later)
    async with platform.transaction(w.open.caller) as repo:
        await service.mute(repo, conv.conversation.id, True)
    # Not before the delay: whoever is online may read it first.
    assert await notify.run_due(platform, channel, now=now + timedelta(minutes=1)) == 0
    await notify.run_due(platform, channel, now=later)
    [mail] = inbox.to(w.patient.account.email)
    body = mail.get_content()
    assert mail["Subject"] == "Nouveaux messages sur Parcours"
    assert "2 nouveau(x) message(s) dans 1 conversation(s)" in body and "/portal/messages" in body
    for secret in ("biopsie", "mélanome", "Appelez", w.gp.name.split()[-1], "Généraliste"):
        assert secret.lower() not in (body + mail["Subject"]).lower(), secret
    assert inbox.to(w.nurse.account.email) == []  # online
    assert inbox.to(w.open.account.email) == []  # muted
    # Batched: one e-mail per interval, whatever comes next.
    await send(platform, w.gp, conv.conversation.id, "Je vous rappelle demain")
    await notify.run_due(platform, channel, now=later + timedelta(minutes=10))
    assert len(inbox.to(w.patient.account.email)) == 1
    # The nurse leaves without reading: told once she is offline.
    async with platform.pool.connection() as conn, conn.transaction():
        await store.clear_presence(conn, "some-node")
    await notify.run_due(platform, channel, now=later + timedelta(minutes=11))
    [nurse_mail] = inbox.to(w.nurse.account.email)
    assert "3 nouveau(x) message(s)" in nurse_mail.get_content()
    # Read messages are not announced.
    async with platform.transaction(w.patient.caller) as repo:
        await service.mark_read(repo, conv.conversation.id, 99)
    await notify.run_due(platform, channel, now=later + timedelta(hours=3))
    assert len(inbox.to(w.patient.account.email)) == 1


async def test_retention_purges_idle_conversations(platform, client, world: World) -> None:
    w = world
    conv = await start(platform, w.gp, [w.nurse.ref], "Ancienne conversation", "Vieux message")
    cid, mid = conv.conversation.id, conv.message.id
    kept = platform.settings.model_copy(update={"messaging_retention_days": 0})
    assert await notify.purge(Platform(kept, platform.uri, platform.pool, platform.token_key, platform.clock, platform.registry,
                                       rules=platform.rules), now=platform.clock.now() + timedelta(days=5000)) == 0
    short = Platform(platform.settings.model_copy(update={"messaging_retention_days": 30}), platform.uri, platform.pool,
                     platform.token_key, platform.clock, platform.registry, rules=platform.rules)
    await notify.purge(short, now=platform.clock.now() + timedelta(days=31), limit=10_000)
    r = await client.get(f"/fhir/Communication/{mid}")
    assert r.status_code == 410
    r = await client.get(f"/fhir/Communication/{mid}/_history")
    assert [e["request"]["method"] for e in r.json().get("entry", []) if "request" in e] in ([], ["DELETE"])
    assert all("resource" not in e for e in r.json().get("entry", []))
    async with platform.pool.connection() as conn:
        assert await store.get_conversation(conn, cid) is None
