"""Documents of the shared record through the API: upload with national metadata, encrypted
content, download under the access policy, duplicates, versions, hiding, retraction, erasure,
full-text search of the content, hostile files, the malware scan, key rotation."""

from __future__ import annotations

import base64
import hashlib
import zipfile
import io
from pathlib import Path

import httpx
import pytest

from parcours.services.platform import Platform
from parcours.services.records import documents, uploads
from parcours.store import blobs as blob_store
from tests.record_helpers import EICAR, FakeClamd, People, fixture, make_pdf, make_png, people, png_bomb

API = "/api/record/patients/{}/documents"


async def upload(client: httpx.AsyncClient, who: dict[str, str], pid: str, data: bytes, filename: str, **fields: str) -> httpx.Response:
    return await client.post(API.format(pid), headers=who, files={"file": (filename, data, "application/octet-stream")},
                             data=fields)


async def blob_count(platform: Platform, pid: str) -> int:
    async with platform.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM record_blob WHERE patient = %s", (f"Patient/{pid}",))
        return (await cur.fetchone())[0]


def blob_of(doc: dict) -> str:
    return doc["content"][0]["attachment"]["url"].rsplit("/", 1)[1]


@pytest.fixture
async def scene(client, platform) -> People:  # type: ignore[no-untyped-def]
    return await people(client, platform)


async def test_professional_adds_a_pdf_with_national_metadata_stored_encrypted(client, platform, scene: People) -> None:
    pdf = make_pdf("Compte rendu de consultation", "Glycémies stables, HbA1c à 6,8 %.", "Poursuite de la metformine.")
    r = await upload(client, scene.doctor, scene.patient_id, pdf, "consultation.pdf", type="11488-4", care_date="2026-03-14",
                     practice_setting="AMBULATOIRE", organization=f"Organization/{scene.org_id}", title="Consultation de suivi")
    assert r.status_code == 201, r.text
    body = r.json()
    doc = body["document"]
    assert body["duplicate"] is False
    assert doc["type"]["coding"][0] == {"system": "http://loinc.org", "code": "11488-4", "display": "CR de consultation"}
    assert doc["category"][0]["coding"][0]["code"] == "10"
    assert doc["context"]["period"]["start"] == "2026-03-14"
    assert doc["context"]["practiceSetting"]["coding"][0]["code"] == "AMBULATOIRE"
    assert {a.get("reference") for a in doc["author"]} == {f"Practitioner/{scene.doctor_id}", f"Organization/{scene.org_id}"}
    assert doc["securityLabel"][0]["coding"][0]["code"] == "N"
    att = doc["content"][0]["attachment"]
    assert att["contentType"] == "application/pdf" and att["size"] == len(pdf)
    assert att["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    assert doc["content"][0]["format"]["code"] == "urn:ihe:iti:xds-sd:pdf:2008"
    # On disk: encrypted, not the PDF.
    bid = blob_of(doc)
    path = platform.blobs.backend._path(bid)  # type: ignore[union-attr]
    raw = Path(path).read_bytes()
    assert raw.startswith(blob_store.MAGIC) and b"%PDF" not in raw and b"metformine" not in raw
    async with platform.pool.connection() as conn:
        row = await (await conn.execute("SELECT sha256, size, owner FROM record_blob WHERE id = %s", (bid,))).fetchone()
    assert row == (hashlib.sha256(pdf).hexdigest(), len(pdf), f"DocumentReference/{body['id']}")

    # Download: the doctor and the patient; not a professional without a care relationship.
    url = att["url"].replace("http://testserver", "")
    got = await client.get(url, headers=scene.doctor)
    assert got.status_code == 200 and got.content == pdf and got.headers["content-type"] == "application/pdf"
    assert "attachment" in got.headers["content-disposition"] and got.headers["x-content-type-options"] == "nosniff"
    assert (await client.get(url, headers=scene.patient)).content == pdf
    denied = await client.get(url, headers=scene.outsider)
    assert denied.status_code == 403
    async with platform.pool.connection() as conn:
        audited = await (await conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'read' AND resource_type = 'DocumentReference' AND resource_id = %s",
            (body["id"],))).fetchone()
    assert audited[0] >= 2

    # Full text, French-aware: "glycémie" finds "Glycémies"; the FHIR API and the record API agree.
    found = await client.get("/fhir/DocumentReference", params={"_content": "glycémie", "subject": f"Patient/{scene.patient_id}"},
                             headers=scene.doctor)
    assert [e["resource"]["id"] for e in found.json().get("entry", [])] == [body["id"]]
    listed = await client.get(API.format(scene.patient_id), params={"q": "metformine"}, headers=scene.patient)
    assert [d["id"] for d in listed.json()["documents"]] == [body["id"]]

    # The same file again: the existing document, said so.
    again = await upload(client, scene.doctor, scene.patient_id, pdf, "copie.pdf", type="11488-4")
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["id"] == body["id"]
    assert await blob_count(platform, scene.patient_id) == 1


async def test_versions_hiding_retraction_and_erasure(client, platform, scene: People) -> None:
    v1 = await upload(client, scene.doctor, scene.patient_id, make_pdf("Lettre de liaison", "Insuffisance cardiaque"), "l1.pdf",
                      type="11490-0")
    first = v1.json()["id"]
    v2 = await upload(client, scene.doctor, scene.patient_id, make_pdf("Lettre de liaison corrigée", "Insuffisance cardiaque stable"),
                      "l2.pdf", type="11490-0", replaces=first)
    assert v2.status_code == 201, v2.text
    second = v2.json()["document"]
    assert second["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{first}"}}]
    old = (await client.get(f"/fhir/DocumentReference/{first}", headers=scene.doctor)).json()
    assert old["status"] == "superseded"
    hist = (await client.get(f"/fhir/DocumentReference/{first}/_history", headers=scene.doctor)).json()
    assert [e["resource"]["status"] for e in hist["entry"]] == ["superseded", "current"]
    # The old content stays searchable after its status changed (the rule re-indexes its text).
    found = await client.get("/fhir/DocumentReference", params={"_content": "cardiaque", "subject": f"Patient/{scene.patient_id}"},
                             headers=scene.doctor)
    assert {e["resource"]["id"] for e in found.json()["entry"]} == {first, v2.json()["id"]}
    current = await client.get(API.format(scene.patient_id), headers=scene.doctor)
    assert [d["id"] for d in current.json()["documents"]] == [v2.json()["id"]]

    # The patient hides the new version: professionals no longer see it, its author included only as author.
    doc_id = v2.json()["id"]
    r = await client.post(f"/api/record/documents/{doc_id}/hide", headers=scene.patient)
    assert r.status_code == 200, r.text
    assert documents.hidden(r.json()["document"])
    colleague = await client.post("/fhir/Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "Collègue"}]})
    cid = colleague.json()["id"]
    await client.post("/fhir/CareTeam", json={"resourceType": "CareTeam", "status": "active",
                                              "subject": {"reference": f"Patient/{scene.patient_id}"},
                                              "participant": [{"member": {"reference": f"Practitioner/{cid}"}}]})
    from tests.record_helpers import bearer

    col = bearer(platform, "practitioner", f"Practitioner/{cid}")
    assert (await client.get(f"/fhir/DocumentReference/{doc_id}", headers=col)).status_code == 403
    url = second["content"][0]["attachment"]["url"].replace("http://testserver", "")
    assert (await client.get(url, headers=col)).status_code == 403
    assert (await client.get(url, headers=scene.patient)).status_code == 200
    mine = await client.get("/fhir/DocumentReference", params={"_content": "stable", "subject": f"Patient/{scene.patient_id}"},
                            headers=scene.patient)
    assert [e["resource"]["id"] for e in mine.json()["entry"]] == [doc_id]
    assert (await client.post(f"/api/record/documents/{doc_id}/show", headers=scene.patient)).status_code == 200
    assert (await client.get(f"/fhir/DocumentReference/{doc_id}", headers=col)).status_code == 200

    # Retraction: the author only; the document stays, entered-in-error. Nobody deletes it.
    assert (await client.post(f"/api/record/documents/{doc_id}/retract", headers=col)).status_code == 403
    r = await client.post(f"/api/record/documents/{doc_id}/retract", headers=scene.doctor)
    assert r.status_code == 200 and r.json()["document"]["status"] == "entered-in-error"
    assert (await client.delete(f"/fhir/DocumentReference/{doc_id}", headers=scene.doctor)).status_code == 403
    assert (await client.delete(f"/api/record/documents/{doc_id}", headers=scene.doctor)).status_code == 403
    assert (await client.delete(f"/api/record/documents/{doc_id}", headers=scene.patient)).status_code == 403

    # The patient's own upload: a plain text note they may erase, content destroyed.
    note = await upload(client, scene.patient, scene.patient_id, "Mes tensions du mois : 13/8, 12/7.".encode(), "tensions.txt")
    assert note.status_code == 201, note.text
    nd = note.json()["document"]
    assert nd["type"]["coding"][0]["code"] == "51855-5" and [a["reference"] for a in nd["author"]] == [f"Patient/{scene.patient_id}"]
    assert nd["author"][0]["display"] == f"Dominique {scene.family}"
    nurl = nd["content"][0]["attachment"]["url"].replace("http://testserver", "")
    assert (await client.delete(f"/api/record/documents/{note.json()['id']}", headers=scene.patient)).status_code == 204
    assert (await client.get(nurl, headers=scene.patient)).status_code == 410
    assert not Path(platform.blobs.backend._path(blob_of(nd))).exists()  # type: ignore[union-attr]


async def test_cda_document_metadata_and_narrative(client, platform, scene: People) -> None:
    cda = fixture("BIO-CR-BIO_2024.01_TSH_1.xml")
    r = await upload(client, scene.doctor, scene.patient_id, cda, "cr-bio.xml")
    assert r.status_code == 201, r.text
    doc = r.json()["document"]
    assert doc["type"]["coding"][0]["code"] == "11502-2"
    assert doc["content"][0]["attachment"]["contentType"] == "application/hl7-cda+xml"
    assert doc["context"]["period"]["start"].startswith("2021-01-04")
    assert doc["context"]["practiceSetting"]["coding"][0]["code"] == "ETABLISSEMENT"
    assert doc["description"] == "Compte rendu d'examens biologiques"
    found = await client.get("/fhir/DocumentReference", params={"_content": "thyréostimuline", "subject": f"Patient/{scene.patient_id}"},
                             headers=scene.doctor)
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [r.json()["id"]]


def _polyglot_pdf() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>")
    return make_pdf("Un PDF") + buf.getvalue()


HOSTILE = [
    ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nthis is not a pdf at all\n%%EOF\n", "cannot be read"),
    ("truncated.pdf", make_pdf("Coupé")[:400], "end marker"),
    ("polyglot.pdf", _polyglot_pdf(), "polyglot"),
    ("js.pdf", make_pdf("Hello").replace(b"/Type /Catalog", b"/Type /Catalog /OpenAction << /S /JavaScript /JS (app.alert(1)) >>"),
     "active content"),
    ("bomb.png", png_bomb(), "decompression bomb"),
    ("image.pdf", make_png(), "named .pdf but its content is a PNG image"),
    ("page.txt", b"<html><body><script>alert(1)</script></body></html>", "HTML page"),
    ("lol.xml", b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
                b"<ClinicalDocument xmlns='urn:hl7-org:v3'>&lol2;</ClinicalDocument>", "DTD or entities"),
    ("other.xml", b"<?xml version='1.0'?><note><to>x</to></note>", "not a CDA R2 document"),
    ("archive.zip", b"PK\x03\x04" + b"\0" * 60, "This file is a ZIP archive"),
    ("program.exe", b"MZ\x90\x00" + b"\0" * 200, "This file is a program"),
    ("binary.txt", b"abc\x00\x01\x02def", "binary data"),
]


@pytest.mark.parametrize("name,data,message", HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_or_broken_files_are_refused_and_not_stored(client, platform, scene: People, name: str, data: bytes,
                                                                  message: str) -> None:
    r = await upload(client, scene.doctor, scene.patient_id, data, name, type="11488-4")
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "PRC-1425" and message in r.json()["message"], r.json()
    assert await blob_count(platform, scene.patient_id) == 0


async def test_size_limit_and_no_care_relationship(client, platform, scene: People, monkeypatch) -> None:
    monkeypatch.setattr(platform, "settings", platform.settings.model_copy(update={"record_max_upload_bytes": 2000}))
    r = await upload(client, scene.doctor, scene.patient_id, b"x" * 5000, "long.txt")
    assert r.status_code == 413
    monkeypatch.undo()
    r = await upload(client, scene.outsider, scene.patient_id, make_pdf("Intrus"), "intrus.pdf", type="11488-4")
    assert r.status_code == 403
    assert await blob_count(platform, scene.patient_id) == 0


async def test_malware_scan_with_clamd(client, platform, scene: People, monkeypatch, tmp_path: Path) -> None:
    sock = tmp_path / "clamd.sock"
    async with FakeClamd(sock) as clamd:
        monkeypatch.setattr(platform, "settings", platform.settings.model_copy(update={"record_clamd_socket": str(sock)}))
        r = await upload(client, scene.doctor, scene.patient_id, b"Note\n" + EICAR + b"\n", "note.txt", type="11488-4")
        assert r.status_code == 422 and r.json()["error"] == "PRC-1426", r.text
        assert "Eicar-Test-Signature" in r.json()["message"]
        ok = await upload(client, scene.doctor, scene.patient_id, b"Une note saine.", "note.txt", type="11488-4")
        assert ok.status_code == 201, ok.text
        assert clamd.scanned == 2
    # The daemon gone: nothing is stored without a scan (fail closed).
    r = await upload(client, scene.doctor, scene.patient_id, b"Une autre note.", "note2.txt", type="11488-4")
    assert r.status_code == 503 and r.json()["error"] == "PRC-1503"
    assert await blob_count(platform, scene.patient_id) == 1


async def test_key_rotation_keeps_everything_readable(client, platform, scene: People, settings) -> None:
    pdf = make_pdf("Avant rotation")
    before = await upload(client, scene.doctor, scene.patient_id, pdf, "avant.pdf", type="11488-4")
    old_key = platform.blobs.keyring.current  # type: ignore[union-attr]
    async with platform.pool.connection() as conn, conn.transaction():
        new_key = await blob_store.rotate_key(conn, settings)
    # Another process (the CLI) rotated: this one follows at its next refresh, and reads both meanwhile.
    async with platform.pool.connection() as conn:
        await platform.blobs.refresh(conn, force=True)  # type: ignore[union-attr]
    assert platform.blobs.keyring.current == new_key != old_key  # type: ignore[union-attr]
    after = await upload(client, scene.doctor, scene.patient_id, make_pdf("Après rotation"), "apres.pdf", type="11488-4")
    for r in (before, after):
        url = r.json()["document"]["content"][0]["attachment"]["url"].replace("http://testserver", "")
        assert (await client.get(url, headers=scene.doctor)).status_code == 200
    # Background re-encryption, batch after batch, until no blob is left under an old key.
    total = 0
    while True:
        async with platform.pool.connection() as conn, conn.transaction():
            n = await platform.blobs.reencrypt_batch(conn, limit=500)  # type: ignore[union-attr]
        total += n
        if n == 0:
            break
    assert total >= 1
    # This test's blobs are under the new key. Other platforms of the session (the live server,
    # other test processes) may still write under the old key until their keyring refresh, as
    # servers do (both stay readable; the next pass re-encrypts those): no global count here.
    ids = [r.json()["document"]["content"][0]["attachment"]["url"].rsplit("/", 1)[1] for r in (before, after)]
    async with platform.pool.connection() as conn:
        rows = await (await conn.execute("SELECT key_id FROM record_blob WHERE id = ANY(%s)", (ids,))).fetchall()
        left = await platform.blobs.pending_rotation(conn)  # type: ignore[union-attr]
    assert len(rows) == 2 and old_key not in {r[0] for r in rows}, (rows, left)
    url = before.json()["document"]["content"][0]["attachment"]["url"].replace("http://testserver", "")
    got = await client.get(url, headers=scene.doctor)
    assert got.content == pdf
    raw = Path(platform.blobs.backend._path(url.rsplit("/", 1)[1])).read_bytes()  # type: ignore[union-attr]
    assert blob_store.Keyring.key_id_of(raw) != old_key
    # The extracted text was re-encrypted too: search still finds the old document.
    found = await client.get("/fhir/DocumentReference", params={"_content": "rotation", "subject": f"Patient/{scene.patient_id}"},
                             headers=scene.doctor)
    assert len(found.json()["entry"]) == 2


def test_inspect_accepts_the_supported_kinds() -> None:
    assert uploads.inspect(make_pdf("Bonjour le monde"), "a.pdf").text == "Bonjour le monde"
    # A PDF that may hide dictionaries in object streams is opened with pypdf, catalog and pages checked.
    slow = make_pdf("Bonjour encore").replace(b"/Type /Catalog", b"/Type /Catalog /Note /ObjStm")
    assert uploads.inspect(slow, "b.pdf").text == "Bonjour encore"
    assert uploads.inspect(make_png(), "a.png").content_type == uploads.PNG
    assert uploads.inspect("Température 38,5 °C".encode(), "t.txt").text == "Température 38,5 °C"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "JPEG")
    assert uploads.inspect(buf.getvalue(), "photo.JPG").content_type == uploads.JPEG
    assert uploads.inspect(fixture("LDL-SES_2022.01.xml"), None).cda["type_code"] == "11490-0"


def test_migration_and_modules_agree() -> None:
    import importlib

    mig = importlib.import_module("parcours.store.migrations.versions.0009_record")
    from parcours.store import records

    src = Path(mig.__file__).read_text()
    for table in (blob_store.record_blob, records.lab_inbox, records.notice):
        assert f'"{table.name}"' in src
        for col in table.columns:
            assert f'"{col.name}"' in src, (table.name, col.name)


def test_cli_rotates_keys_and_receives_hl7_files(pg_uri: str, settings, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from parcours.cli.main import app as cli

    monkeypatch.setenv("DATABASE_URL", pg_uri)
    monkeypatch.setenv("PARCOURS_HOME", str(settings.home))
    monkeypatch.setenv("PARCOURS_BASE_URL", settings.base_url)
    runner = CliRunner()
    r = runner.invoke(cli, ["keys", "rotate", "--batch", "100"])
    assert r.exit_code == 0, r.output
    assert "New current key" in r.output and "blobs re-encrypted" in r.output
    r = runner.invoke(cli, ["keys", "status"])
    assert r.exit_code == 0 and "Current key" in r.output
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"not hl7")
    r = runner.invoke(cli, ["record", "hl7", str(bad)])
    assert r.exit_code == 0 and "AR" in r.output


async def test_uploads_need_a_caller_before_the_body_is_read(anon, scene: People) -> None:
    r = await anon.post(API.format(scene.patient_id), files={"file": ("a.txt", b"x" * 1000, "text/plain")})
    assert r.status_code == 401
    r = await anon.post(f"/record/{scene.patient_id}/documents", files={"file": ("a.txt", b"x", "text/plain")})
    assert r.status_code in (303, 401)  # the page sends anonymous people to the sign-in page
