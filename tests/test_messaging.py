"""Secure messaging through the services and the FHIR API: who may write to whom, threads,
read receipts and unread counts, muting, search, attachments, access of non-participants,
and the migration against the store's tables.

Expected results are written from the rules of ``services.messaging.rule`` and of the
access policy (participants only), never copied from the server's answers.
"""

from __future__ import annotations

import base64
import io

import pytest
import pytest_asyncio
import sqlalchemy as sa

from parcours.core.errors import Forbidden, NotFound, TooLarge, UnsupportedMedia, Unprocessable, UploadRejected
from parcours.services.messaging import attachments, model, service
from parcours.services.messaging.service import Upload
from parcours.services.platform import Platform
from parcours.store import messaging as store
from tests.messaging_helpers import JSON, MAX, World, make_world


@pytest_asyncio.fixture(scope="module")
async def world(client, platform: Platform) -> World:
    return await make_world(client, platform)


async def start(platform: Platform, who, to: list[str], topic: str = "Suivi", text: str = "Bonjour", **kw):  # type: ignore[no-untyped-def]
    async with platform.transaction(who.caller) as repo:
        return await service.start_conversation(repo, to=to, topic=topic, text=text, max_attachment_bytes=MAX, **kw)


async def send(platform: Platform, who, cid: str, text: str, **kw):  # type: ignore[no-untyped-def]
    async with platform.transaction(who.caller) as repo:
        return await service.send(repo, cid, text=text, max_attachment_bytes=MAX, **kw)


def png(width: int = 4) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, width), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def pdf(text: str = "Compte rendu de consultation") -> bytes:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.drawString(72, 720, text)
    c.showPage()
    c.save()
    return buf.getvalue()


PDF = pdf()


# -- who may write to whom ------------------------------------------------------------------------

async def test_patient_writes_to_her_professionals_and_to_those_who_accept_patients(platform, world: World) -> None:
    w = world
    started = await start(platform, w.patient, [w.gp.ref], topic="Renouvellement")
    header = started.conversation.resource()
    assert model.kind_of(header) == model.CONVERSATION
    assert set(model.participants(header)) == {w.patient.ref, w.gp.ref}
    assert model.subject(header) == w.patient.ref
    assert started.message is not None and model.conversation_of(started.message.resource()) == started.conversation.id
    # No relationship, but he accepts messages from patients.
    await start(platform, w.patient, [w.open.ref], topic="Premier contact")
    # No relationship and he does not: refused, nothing stored.
    with pytest.raises(Forbidden):
        await start(platform, w.patient, [w.stranger.ref], topic="Bonjour docteur")
    # The proxy writes for her mother, to the care team (expanded to its professionals).
    async with platform.transaction(w.patient.caller) as repo:
        team = (await repo.search(repo.parse_search("CareTeam", [("patient", w.patient.ref)]))).matches[0]
    with pytest.raises(Forbidden):  # the care team holds the blocked professional
        await start(platform, w.proxy, [f"CareTeam/{team.id}"], topic="Pour maman")
    started = await start(platform, w.proxy, [w.gp.ref, w.nurse.ref], topic="Pour maman")
    h = started.conversation.resource()
    assert set(model.participants(h)) == {w.patient.ref, w.gp.ref, w.nurse.ref}
    assert model.sender(started.message.resource()) == w.proxy.ref


async def test_a_blocked_professional_cannot_write_to_or_about_the_patient(platform, world: World) -> None:
    w = world
    with pytest.raises(Forbidden):
        await start(platform, w.blocked, [w.patient.ref], topic="Résultats")
    with pytest.raises(Forbidden):  # about her, to a colleague
        await start(platform, w.blocked, [w.gp.ref], topic="Avis", about=w.patient.ref)
    # Nor can the patient write to him.
    with pytest.raises(Forbidden):
        await start(platform, w.patient, [w.blocked.ref], topic="Question")
    # And in a conversation he was in before she blocked him... there is none: he was blocked
    # from the start. Professionals among themselves are free.
    await start(platform, w.blocked, [w.stranger.ref], topic="Garde du week-end")


async def test_professionals_write_to_any_professional_and_to_their_patients_only(platform, world: World) -> None:
    w = world
    await start(platform, w.stranger, [w.gp.ref, w.open.ref], topic="Réunion de secteur")
    with pytest.raises(Forbidden):  # no care relationship with the patient
        await start(platform, w.stranger, [w.patient.ref], topic="Bonjour")
    with pytest.raises(Forbidden):
        await start(platform, w.stranger, [w.gp.ref], topic="Avis", about=w.patient.ref)
    about = await start(platform, w.gp, [w.nurse.ref], topic="Pansement", about=w.patient.ref)
    assert model.subject(about.conversation.resource()) == w.patient.ref
    assert w.patient.ref not in model.participants(about.conversation.resource())
    # A patient-opened conversation: the practice that accepts patients answers, without a relationship.
    opened = await start(platform, w.patient, [w.open.ref], topic="Rendez-vous ?")
    await send(platform, w.open, opened.conversation.id, "Bonjour, appelez le secrétariat.")
    # ...but it cannot open one with her.
    with pytest.raises(Forbidden):
        await start(platform, w.open, [w.patient.ref], topic="Relance")


async def test_forged_or_inconsistent_messages_are_refused(platform, world: World, client) -> None:
    w = world
    conv = await start(platform, w.gp, [w.nurse.ref], topic="Tournée")
    header = conv.conversation.resource()
    good = model.build_message(conv.conversation.id, header, sender={"reference": w.gp.ref}, text="x", attachments=[],
                               in_reply_to=None, now=platform.clock.now())
    cases = {
        "someone else as sender": ({**good, "sender": {"reference": w.nurse.ref}}, 403),
        "a recipient left out": ({**good, "recipient": [{"reference": w.gp.ref}]}, 422),
        "an outsider added": ({**good, "recipient": good["recipient"] + [{"reference": w.open.ref}]}, 422),
        "no category": ({k: v for k, v in good.items() if k != "category"}, 422),
        "reply to another conversation": ({**good, "inResponseTo": [{"reference": f"Communication/{conv.message.id}x"}]}, 422),
    }
    for name, (body, status) in cases.items():
        r = await client.post("/fhir/Communication", json=body, headers={**JSON, **w.gp.headers(platform)})
        assert r.status_code == status, (name, r.text)
    # The same message through the FHIR API is fine, and numbered like any other.
    r = await client.post("/fhir/Communication", json=good, headers={**JSON, **w.gp.headers(platform)})
    assert r.status_code == 201, r.text
    async with platform.pool.connection() as conn:
        rows = await store.messages_by_id(conn, [r.json()["id"]])
    assert [x.seq for x in rows] == [2]
    # Sent messages are not changed, not even by their author.
    sent = r.json()
    r = await client.put(f"/fhir/Communication/{sent['id']}", json={**sent, "payload": [{"contentString": "autre"}]},
                         headers={**JSON, **w.gp.headers(platform)})
    assert r.status_code == 403


# -- threads, receipts, unread counts, muting -------------------------------------------------------

async def test_threads_replies_read_receipts_and_unread_counts(platform, world: World) -> None:
    w = world
    conv = await start(platform, w.patient, [w.gp.ref, w.nurse.ref], topic="Tension", text="Ma tension est à 15")
    cid = conv.conversation.id
    first = conv.message
    reply = await send(platform, w.gp, cid, "Reprenez-la demain matin", in_reply_to=first.id)
    assert model.refs(reply.resource().get("inResponseTo")) == [f"Communication/{first.id}"]
    await send(platform, w.nurse, cid, "Je passe à 9 h")
    with pytest.raises(Unprocessable):  # a reply answers a message of its own conversation
        other = await start(platform, w.gp, [w.nurse.ref], topic="Autre")
        await send(platform, w.gp, cid, "x", in_reply_to=other.message.id)

    async def unread(who) -> int:  # type: ignore[no-untyped-def]
        async with platform.transaction(who.caller) as repo:
            items = [i for i in await service.inbox(repo) if i.id == cid]
        assert len(items) == 1
        return items[0].unread

    assert await unread(w.patient) == 2  # the two answers, not her own message
    # Writing in a conversation reads it up to one's own message: the GP has the nurse's
    # message to read, the nurse nothing.
    assert await unread(w.gp) == 1
    assert await unread(w.nurse) == 0
    # The proxy sees her mother's conversations, with her mother's read marks.
    assert await unread(w.proxy) == 2
    async with platform.transaction(w.gp.caller) as repo:
        view = await service.conversation(repo, cid)
        assert [m.texts for m in view.messages] == [["Ma tension est à 15"], ["Reprenez-la demain matin"], ["Je passe à 9 h"]]
        assert [m.seq for m in view.messages] == [1, 2, 3]
        assert view.messages[1].in_reply_to == [first.id]
        assert await service.mark_read(repo, cid, view.last_seq) == 3
        assert await service.mark_read(repo, cid, 1) == 3  # never back
        assert await service.mark_read(repo, cid, 99) == 3  # never past the last message
    assert await unread(w.gp) == 0
    async with platform.transaction(w.patient.caller) as repo:
        marks = (await service.conversation(repo, cid)).read_marks
    assert (marks[w.gp.ref], marks[w.patient.ref], marks[w.nurse.ref]) == (3, 1, 3)  # receipts: who read up to what

    async with platform.transaction(w.nurse.caller) as repo:
        await service.mute(repo, cid, True)
        assert [i.muted for i in await service.inbox(repo) if i.id == cid] == [True]
        total = await service.unread_total(repo)
    await send(platform, w.patient, cid, "Merci")
    async with platform.transaction(w.nurse.caller) as repo:
        assert await service.unread_total(repo) == total  # muted: not in the total
    async with platform.pool.connection() as conn:
        queued = await conn.execute("SELECT participant FROM messaging_pending WHERE conversation_id = %s", (cid,))
        assert {r[0] for r in await queued.fetchall()} == {w.gp.ref}  # no e-mail notice for the muted nurse
    with pytest.raises(NotFound):
        async with platform.transaction(w.stranger.caller) as repo:
            await service.mark_read(repo, cid, 1)


async def test_conversations_about_a_patient_are_listed_for_their_participants_only(platform, world: World) -> None:
    w = world
    conv = await start(platform, w.gp, [w.open.ref], topic="Avis dermatologique", about=w.patient.ref)
    async with platform.transaction(w.gp.caller) as repo:
        assert conv.conversation.id in [i.id for i in await service.inbox(repo, patient=w.patient.ref)]
    async with platform.transaction(w.nurse.caller) as repo:  # cares for her, not in the conversation
        assert conv.conversation.id not in [i.id for i in await service.inbox(repo, patient=w.patient.ref)]
    async with platform.transaction(w.patient.caller) as repo:  # about her, between professionals: not hers
        assert conv.conversation.id not in [i.id for i in await service.inbox(repo)]


# -- search ------------------------------------------------------------------------------------------

async def test_search_finds_words_in_ones_own_conversations_only(platform, world: World) -> None:
    w = world
    word = "hémoglobine" + "".join(chr(97 + int(c, 16) % 26) for c in w.tag[-6:])  # letters only: one French word
    conv = await start(platform, w.gp, [w.nurse.ref], topic="Bilan", text=f"L'{word} glyquée est élevée")
    await start(platform, w.open, [w.stranger.ref], topic="Autre bilan", text=f"{word} normale")
    async with platform.transaction(w.nurse.caller) as repo:
        hits = await service.search(repo, word.replace("é", "e").upper())  # French-aware: accents and case
    assert [(h.conversation_id, h.topic) for h in hits] == [(conv.conversation.id, "Bilan")]
    async with platform.transaction(w.patient.caller) as repo:
        assert await service.search(repo, word) == []


# -- attachments -------------------------------------------------------------------------------------

def test_attachments_are_sniffed_and_limited() -> None:
    assert attachments.inspect(png(), "photo.png", max_bytes=MAX).content_type == attachments.PNG
    assert attachments.inspect(PDF, "ordonnance.pdf", max_bytes=MAX).content_type == attachments.PDF
    assert attachments.inspect("Tension 13/8 ce matin".encode(), None, max_bytes=MAX).content_type == attachments.TEXT
    with pytest.raises(UnsupportedMedia):  # a PNG named .pdf
        attachments.inspect(png(), "resultats.pdf", max_bytes=MAX)
    with pytest.raises(UnsupportedMedia):  # a program, whatever its name
        attachments.inspect(b"MZ\x90\x00" + b"\x00" * 200, "photo.jpg", max_bytes=MAX)
    with pytest.raises(UnsupportedMedia):  # HTML is not text here
        attachments.inspect(b"<html><script>alert(1)</script></html>", "note.txt", max_bytes=MAX)
    with pytest.raises(UnsupportedMedia):
        attachments.inspect(b"PK\x03\x04" + b"\x00" * 100, "archive.zip", max_bytes=MAX)
    with pytest.raises(TooLarge):
        attachments.inspect(b"%PDF-" + b"0" * 2000, "gros.pdf", max_bytes=1000)
    with pytest.raises(UploadRejected):
        attachments.inspect(b"", "vide.txt", max_bytes=MAX)
    assert attachments.clean_title("../../etc/passwd\x00.png", attachments.PNG) == "passwd.png"


async def test_attachments_travel_in_the_message_and_are_checked_on_every_path(platform, world: World, client) -> None:
    w = world
    image = png(8)
    conv = await start(platform, w.patient, [w.gp.ref], topic="Photo", text="Voici la plaie",
                       uploads=[Upload(image, "plaie.png")])
    files = model.attachments(conv.message.resource())
    assert [(f["contentType"], f["size"], f["title"]) for f in files] == [("image/png", len(image), "plaie.png")]
    async with platform.transaction(w.gp.caller) as repo:
        got = await service.attachment(repo, conv.message.id, 0)
    assert got.data == image and got.content_type == "image/png"
    with pytest.raises(Forbidden):
        async with platform.transaction(w.nurse.caller) as repo:  # not in this conversation
            await service.attachment(repo, conv.message.id, 0)
    with pytest.raises(UnsupportedMedia):
        await send(platform, w.patient, conv.conversation.id, "", uploads=[Upload(b"MZ\x90\x00" * 64, "scan.pdf")])
    # A FHIR client cannot disguise a file either.
    body = model.build_message(conv.conversation.id, conv.conversation.resource(), sender={"reference": w.gp.ref}, text="",
                               attachments=[{"contentType": "image/png", "data": base64.b64encode(PDF).decode(), "title": "x.png"}],
                               in_reply_to=None, now=platform.clock.now())
    r = await client.post("/fhir/Communication", json=body, headers={**JSON, **w.gp.headers(platform)})
    assert r.status_code == 415, r.text


async def test_a_professional_files_an_attachment_into_the_patients_record(platform, world: World) -> None:
    w = world
    conv = await start(platform, w.patient, [w.gp.ref], topic="Compte rendu", text="Le compte rendu de l'hôpital",
                       uploads=[Upload(PDF, "compte-rendu.pdf")])
    with pytest.raises(Forbidden):
        async with platform.transaction(w.patient.caller) as repo:
            await service.file_into_record(platform, repo, conv.message.id, 0)
    async with platform.transaction(w.gp.caller) as repo:
        doc = await service.file_into_record(platform, repo, conv.message.id, 0)
    res = doc.resource()
    assert res["resourceType"] == "DocumentReference" and res["subject"]["reference"] == w.patient.ref
    assert res["content"][0]["attachment"]["contentType"] == "application/pdf"
    async with platform.transaction(w.patient.caller) as repo:  # in her record now
        assert (await repo.read("DocumentReference", doc.id)).id == doc.id


# -- the FHIR API: participants only ---------------------------------------------------------------------

async def test_fhir_access_to_messages_is_for_participants_only(platform, world: World, client) -> None:
    w = world
    conv = await start(platform, w.gp, [w.patient.ref], topic="Vaccin", text="Votre rappel est prévu")
    between = await start(platform, w.gp, [w.open.ref], topic="Avis", text="Que pensez-vous de ce grain de beauté ?",
                          about=w.patient.ref)
    mid, cid, pro_mid = conv.message.id, conv.conversation.id, between.message.id
    for who, expected in ((w.gp, 200), (w.patient, 200), (w.proxy, 200), (w.nurse, 403), (w.stranger, 403), (w.blocked, 403)):
        r = await client.get(f"/fhir/Communication/{mid}", headers=who.headers(platform))
        assert r.status_code == expected, (who.name, r.text)
        r = await client.get("/fhir/Communication", params={"part-of": f"Communication/{cid}"}, headers=who.headers(platform))
        assert r.status_code == 200
        assert len(r.json().get("entry", [])) == (1 if expected == 200 else 0), who.name
    # Between professionals about her: the nurse cares for her, the patient is its subject: neither sees it.
    for who, expected in ((w.gp, 200), (w.open, 200), (w.nurse, 403), (w.patient, 403), (w.proxy, 403)):
        r = await client.get(f"/fhir/Communication/{pro_mid}", headers=who.headers(platform))
        assert r.status_code == expected, (who.name, r.text)
    r = await client.get(f"/fhir/Patient/{w.patient.ref.split('/')[1]}/$everything", headers=w.nurse.headers(platform))
    assert r.status_code == 200
    ids = {e["resource"]["id"] for e in r.json().get("entry", [])}
    assert mid not in ids and pro_mid not in ids
    # Every read is audited.
    async with platform.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM audit_log WHERE resource_type = 'Communication' AND resource_id = %s "
                                 "AND action = 'read'", (mid,))
        assert (await cur.fetchone())[0] >= 3


# -- schema ----------------------------------------------------------------------------------------------

def test_the_migration_matches_the_store(pg_uri: str) -> None:
    from parcours.store.db import sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(pg_uri))
    try:
        insp = sa.inspect(engine)
        for table in store._metadata.sorted_tables:  # noqa: SLF001 - the module's own tables
            cols = {c["name"]: c for c in insp.get_columns(table.name)}
            assert set(cols) == {c.name for c in table.columns}, table.name
            for c in table.columns:
                assert cols[c.name]["nullable"] == c.nullable, (table.name, c.name)
            assert set(insp.get_pk_constraint(table.name)["constrained_columns"]) == {c.name for c in table.primary_key.columns}
    finally:
        engine.dispose()


async def test_a_message_is_committed_durably_even_after_a_read_in_its_transaction(platform, world: World) -> None:
    """Reads commit their audit entry asynchronously; a transaction that also writes (a read of
    the conversation, then the message) must not: a crash may lose read entries, never a message."""
    w = world
    conv = await start(platform, w.gp, [w.nurse.ref], topic="Durabilité")

    async def setting(conn) -> str:  # type: ignore[no-untyped-def]
        return str((await (await conn.execute("SELECT current_setting('synchronous_commit')")).fetchone())[0])

    async with platform.transaction(w.gp.caller) as repo:
        await repo.read("Communication", conv.conversation.id)
        assert await setting(repo.conn) == "off"  # a read alone: group commit
        await service.send(repo, conv.conversation.id, text="Écrit", max_attachment_bytes=MAX)
        assert await setting(repo.conn) != "off"
        await repo.read("Communication", conv.conversation.id)  # a read after the write changes nothing
        assert await setting(repo.conn) != "off"


async def test_plain_communications_through_the_fhir_api_follow_the_same_rule(platform, world: World, client) -> None:
    """A Communication outside messaging (no category) that names recipients is seen by them:
    writing it needs what messaging needs."""
    w = world

    def plain(sender: str, to: str) -> dict:
        return {"resourceType": "Communication", "status": "completed", "subject": {"reference": w.patient.ref},
                "sender": {"reference": sender}, "recipient": [{"reference": to}], "payload": [{"contentString": "Bonjour"}]}

    cases = [(w.patient, plain(w.patient.ref, w.stranger.ref), 403),  # no relationship, does not accept patients
             (w.patient, plain(w.patient.ref, w.blocked.ref), 403),  # blocked by her
             (w.patient, plain(w.patient.ref, w.gp.ref), 201),
             (w.stranger, plain(w.stranger.ref, w.patient.ref), 403),  # no relationship with her
             (w.gp, plain(w.gp.ref, w.patient.ref), 201)]
    for who, body, status in cases:
        r = await client.post("/fhir/Communication", json=body, headers={**JSON, **who.headers(platform)})
        assert r.status_code == status, (who.name, body["recipient"], r.text)
    # Seen by its two participants, not by the nurse who also cares for her.
    mid = r.json()["id"]
    assert (await client.get(f"/fhir/Communication/{mid}", headers=w.patient.headers(platform))).status_code == 200
    assert (await client.get(f"/fhir/Communication/{mid}", headers=w.nurse.headers(platform))).status_code == 403
