"""Lab results over HL7 v2 (HTTP and MLLP): the French CI-SIS ORU samples and a numeric one,
INS matching, ACK codes, idempotent re-delivery, the reconciliation queue."""

from __future__ import annotations

import base64
import re

import httpx
import pytest

from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.services.records import hl7v2, labs, mllp
from parcours.store import records as record_store
from tests.accounts_helpers import create_resource
from tests.conftest import uniq
from tests.record_helpers import bearer, fixture, new_ins, people

HL7 = {"Content-Type": "application/hl7-v2"}


def with_identity(message: bytes, ins: str, birth: str, oid: str = "1.2.250.1.213.1.4.8") -> bytes:
    """The message with its PID-3 replaced by ``ins`` under ``oid`` and PID-7 by ``birth`` (YYYYMMDD)."""
    text = message.decode("utf-8-sig")
    lines = re.split(r"\r\n|\r|\n", text)
    out = []
    for line in lines:
        if line.startswith("PID|"):
            f = line.split("|")
            while len(f) < 9:
                f.append("")
            f[3] = f"{ins}^^^ASIP-SANTE-INS-NIR&{oid}&ISO^INS"
            f[7] = birth
            line = "|".join(f)
        elif line.startswith("MSH|"):
            f = line.split("|")
            f[2] = f[2] or "LAB"  # MSH-3
            f[9] = uniq("MSG")  # MSH-10: a control id of its own
            line = "|".join(f)
        out.append(line)
    return "\r".join(out).encode()


def msa(ack: str) -> list[str]:
    seg = next(s for s in ack.split("\r") if s.startswith("MSA"))
    return seg.split("|")


async def search(client: httpx.AsyncClient, rtype: str, **params: str) -> list[dict]:
    r = await client.get(f"/fhir/{rtype}", params={**params, "_count": "200"})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


async def test_numeric_results_are_mapped_and_redelivery_is_idempotent(client, platform) -> None:
    p = await people(client, platform, birth="1961-06-15", gender="male")
    msg = with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19610615")
    r = await client.post("/api/hl7v2", content=msg, headers=HL7)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/hl7-v2")
    code = msa(r.text)
    assert code[1] == "AA", r.text
    reports = await search(client, "DiagnosticReport", subject=f"Patient/{p.patient_id}")
    assert len(reports) == 1
    rep = reports[0]
    assert rep["code"]["coding"][0] == {"system": "http://loinc.org", "code": "57021-8", "display": "CBC W Auto Differential panel in Blood"}
    assert rep["status"] == "final" and rep["category"][0]["coding"][0]["code"] == "LAB"
    obs = await search(client, "Observation", subject=f"Patient/{p.patient_id}")
    by_code = {o["code"]["coding"][0]["code"]: o for o in obs}
    assert len(rep["result"]) == len(obs) >= 20
    hb = by_code["718-7"]
    assert hb["valueQuantity"] == {"value": 12.5, "unit": "g/mL", "system": "http://unitsofmeasure.org", "code": "g/mL"}
    assert hb["referenceRange"][0]["low"]["value"] == 13 and hb["referenceRange"][0]["high"]["value"] == 18
    assert hb["interpretation"][0]["coding"][0]["code"] == "L"
    assert by_code["26464-8"]["interpretation"][0]["coding"][0]["code"] == "HH"
    assert hb["category"][0]["coding"][0]["code"] == "laboratory" and hb["effectiveDateTime"].startswith("2011-01-03")
    # The same message again: acknowledged, nothing duplicated.
    again = await client.post("/api/hl7v2", content=msg, headers=HL7)
    assert msa(again.text)[1] == "AA"
    assert len(await search(client, "Observation", subject=f"Patient/{p.patient_id}")) == len(obs)
    assert len(await search(client, "DiagnosticReport", subject=f"Patient/{p.patient_id}")) == 1
    # The patient sees them and got a notice.
    mine = await client.get("/fhir/Observation", params={"code": "718-7"}, headers=p.patient)
    assert [e["resource"]["id"] for e in mine.json()["entry"]] == [hb["id"]]
    async with platform.pool.connection() as conn:
        notices = await record_store.notices_of(conn, f"Patient/{p.patient_id}")
    assert [n.kind for n in notices] == ["result", "result"]


async def test_cisis_oru_with_ins_nir_stores_the_report_and_its_document(client, platform) -> None:
    p = await people(client, platform, birth="2010-08-07", gender="male")
    msg = with_identity(fixture("ORU_CISIS_V1.2.hl7"), p.ins, "20100807")
    r = await client.post("/api/hl7v2", content=msg, headers=HL7)
    assert msa(r.text)[1] == "AA", r.text
    reports = await search(client, "DiagnosticReport", subject=f"Patient/{p.patient_id}")
    assert [x["code"]["coding"][0]["code"] for x in reports] == ["34555-3"]
    docs = await search(client, "DocumentReference", subject=f"Patient/{p.patient_id}")
    assert len(docs) == 1 and docs[0]["type"]["coding"][0]["code"] == "11502-2"
    assert reports[0]["presentedForm"][0]["url"] == docs[0]["content"][0]["attachment"]["url"]
    # The routing rows (MetaDMPMSS) are not results.
    assert await search(client, "Observation", subject=f"Patient/{p.patient_id}") == []


async def test_unmatched_message_is_held_then_assigned_by_an_operator(client, platform, app) -> None:
    # The Ségur sample uses the INS *test* OID: not an identity in production, so it is held.
    msg = with_identity(fixture("ORU_CISIS_SEGUR_N3.hl7"), new_ins(), "19790328", oid="1.2.250.1.213.1.4.10")
    r = await client.post("/api/hl7v2", content=msg, headers=HL7)
    code = msa(r.text)
    assert code[1] == "AA" and "reconciliation" in code[3], r.text
    staff = bearer(platform, "staff", None)
    async with platform.transaction(Caller(kind="staff", user_id="op-1", scopes=frozenset({"user/*.*"}))) as repo:
        pending = await labs.inbox(repo)
    held = [i for i in pending if i.control_id == hl7v2.field(hl7v2.parse(msg).segments[0], 10)]
    assert len(held) == 1 and held[0].patient_name == "PAT-TROIS DOMINIQUE" and held[0].birth_date == "1979-03-28"
    assert "no INS" in held[0].reason and "1 document" in (held[0].summary or "")
    # A practitioner may not work the queue; an operator assigns it.
    p = await people(client, platform)
    doctor = await client.post(f"/api/record/lab-inbox/{held[0].id}/assign", data={"patient": p.patient_id}, headers=p.doctor)
    assert doctor.status_code == 403
    done = await client.post(f"/api/record/lab-inbox/{held[0].id}/assign", data={"patient": p.patient_id}, headers=staff)
    assert done.status_code == 200, done.text
    again = await client.post(f"/api/record/lab-inbox/{held[0].id}/assign", data={"patient": p.patient_id}, headers=staff)
    assert again.status_code == 409
    reports = await search(client, "DiagnosticReport", subject=f"Patient/{p.patient_id}")
    assert len(reports) == 1 and reports[0]["code"]["coding"][0]["code"] == "11502-2"
    docs = await search(client, "DocumentReference", subject=f"Patient/{p.patient_id}")
    assert docs[0]["content"][0]["attachment"]["contentType"] == "application/hl7-cda+xml"
    obs = await search(client, "Observation", subject=f"Patient/{p.patient_id}")
    prot = [o for o in obs if o["code"]["coding"][0]["code"] == "2885-2"]
    assert prot and prot[0]["valueQuantity"]["value"] == 75 and prot[0]["valueQuantity"]["unit"] == "g/L"
    assert prot[0]["referenceRange"][0]["low"]["value"] == 63 and prot[0]["referenceRange"][0]["high"]["value"] == 83
    assert len(reports[0]["result"]) == len(obs) > 20
    # The doctor in the care team reads the lab's document; the text is searchable.
    found = await client.get("/fhir/DocumentReference", params={"_content": "électrophorèse", "subject": f"Patient/{p.patient_id}"},
                             headers=p.doctor)
    assert len(found.json()["entry"]) == 1
    async with platform.pool.connection() as conn:
        row = await (await conn.execute("SELECT status, assigned_patient FROM record_lab_inbox WHERE id = %s", (held[0].id,))).fetchone()
        audit = await (await conn.execute("SELECT agent FROM audit_log WHERE action = 'lab-reconcile' AND resource_id = %s",
                                          (p.patient_id,))).fetchone()
    assert row == ("assigned", f"Patient/{p.patient_id}") and audit is not None


async def test_identity_mismatch_and_unknown_ins_are_held(client, platform) -> None:
    p = await people(client, platform, birth="1961-06-15")
    wrong_birth = with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19700101")
    r = await client.post("/api/hl7v2", content=wrong_birth, headers=HL7)
    assert msa(r.text)[1] == "AA" and "another date" in msa(r.text)[3]
    unknown = with_identity(fixture("ORU_LRI_CBC.hl7"), new_ins(), "19610615")
    assert "no patient has this INS" in msa((await client.post("/api/hl7v2", content=unknown, headers=HL7)).text)[3]
    assert await search(client, "Observation", subject=f"Patient/{p.patient_id}") == []


async def test_rejections_and_application_errors(client, platform) -> None:
    r = await client.post("/api/hl7v2", content=b"hello, not HL7", headers=HL7)
    assert r.status_code == 400 and msa(r.text)[1] == "AR"
    adt = b"MSH|^~\\&|SGL|HOSP|||20260101||ADT^A01|X1|P|2.5\rPID|||123^^^HOSP^PI||DOE^JOHN\r"
    r = await client.post("/api/hl7v2", content=adt, headers=HL7)
    assert msa(r.text)[1] == "AR" and "Only ORU\\S\\R01" in msa(r.text)[3]
    # A readable message whose document is broken: AE, and nothing of it is stored.
    p = await people(client, platform, birth="1961-06-15")
    broken = base64.b64encode(b"%PDF-1.4 this is not a PDF %%EOF").decode()
    msg = with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19610615").decode()
    msg = msg.replace("\rOBX|2|", f"\rOBX|99|ED|11502-2^CR^LN||^AP^PDF^Base64^{broken}||||||F\rOBX|2|", 1)
    r = await client.post("/api/hl7v2", content=msg.encode(), headers=HL7)
    assert r.status_code == 200 and msa(r.text)[1] == "AE" and "PDF" in msa(r.text)[3]
    assert await search(client, "Observation", subject=f"Patient/{p.patient_id}") == []
    # Only systems send results.
    r = await client.post("/api/hl7v2", content=msg.encode(), headers={**HL7, **p.doctor})
    assert msa(r.text)[1] in ("AE", "AR")


async def test_mllp_listener(client, platform: Platform) -> None:
    p = await people(client, platform, birth="1961-06-15")
    server = await mllp.MllpServer(platform, "127.0.0.1", 0).start()
    try:
        ack = (await mllp.send("127.0.0.1", server.port, with_identity(fixture("ORU_LRI_CBC.hl7"), p.ins, "19610615"))).decode()
        assert msa(ack)[1] == "AA" and ack.startswith("MSH|^~\\&|")
        assert "ACK^R01" in ack.split("\r")[0]
        ack = (await mllp.send("127.0.0.1", server.port, b"garbage")).decode()
        assert msa(ack)[1] == "AR"
    finally:
        await server.close()
    assert len(await search(client, "Observation", subject=f"Patient/{p.patient_id}")) >= 20


def test_parser_reads_escapes_and_separators() -> None:
    m = hl7v2.parse(b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5\nPID|||1^^^X&1.2.250.1.213.1.4.8&ISO^INS||O\\S\\BRIEN^ANNE\\T\\CO")
    pid = m.first("PID")
    assert m.comp(hl7v2.field(pid, 5), 1) == "O^BRIEN" and m.comp(hl7v2.field(pid, 5), 2) == "ANNE&CO"
    assert hl7v2.field(m.segments[0], 9) == "ORU^R01" and hl7v2.field(m.segments[0], 10) == "1"
    with pytest.raises(hl7v2.HL7Error):
        hl7v2.parse(b"PID|||x")
    assert labs.reference_range("4.3 to 6.2", "g/L")[0]["low"]["value"] == 4.3
    assert labs.reference_range("<5", None)[0]["high"] == {"value": 5.0}


__all__ = ["create_resource"]


async def test_the_app_lifespan_starts_the_mllp_listener(client, platform, monkeypatch) -> None:
    from parcours.services.booking.notify import LoggingEmail
    from parcours.services.records import runtime
    from tests.conftest import free_port

    port = free_port()
    monkeypatch.setattr(platform, "settings", platform.settings.model_copy(update={"mllp_port": port, "mllp_host": "127.0.0.1"}))
    stop = await runtime.start(platform, LoggingEmail())
    try:
        ack = (await mllp.send("127.0.0.1", port, b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|Z1|P|2.5\rPID|||1\r")).decode()
        assert msa(ack)[1] == "AR" and msa(ack)[2] == "Z1"
    finally:
        await stop()


async def test_a_corrected_report_replaces_the_document_and_updates_results(client, platform) -> None:
    p = await people(client, platform, birth="1979-03-28")
    first = with_identity(fixture("ORU_CISIS_SEGUR_N3.hl7"), p.ins, "19790328").decode()
    assert msa((await client.post("/api/hl7v2", content=first.encode(), headers=HL7)).text)[1] == "AA"
    seg = next(s for s in first.split("\r") if s.startswith("OBX|1|ED|"))
    fields = seg.split("|")
    comps = fields[5].split("^")
    cda = base64.b64decode(comps[4]).replace(b"<value xsi:type=\"PQ\" value=\"75.0\"", b"<value xsi:type=\"PQ\" value=\"77.0\"", 1)
    assert cda != base64.b64decode(comps[4])
    comps[4] = base64.b64encode(cda).decode()
    fields[5] = "^".join(comps)
    fields[11] = "C"
    corrected = first.replace(seg, "|".join(fields)).replace("|F|||||||L07", "|C|||||||L07")
    r = await client.post("/api/hl7v2", content=corrected.encode(), headers=HL7)
    assert msa(r.text)[1] == "AA", r.text
    docs = await search(client, "DocumentReference", subject=f"Patient/{p.patient_id}")
    by_status = {d["status"]: d for d in docs}
    assert set(by_status) == {"current", "superseded"}
    assert by_status["current"]["relatesTo"][0]["target"]["reference"] == f"DocumentReference/{by_status['superseded']['id']}"
    prot = [o for o in await search(client, "Observation", subject=f"Patient/{p.patient_id}", code="2885-2")]
    assert len(prot) == 1 and prot[0]["valueQuantity"]["value"] == 77  # updated in place, not duplicated
    reports = await search(client, "DiagnosticReport", subject=f"Patient/{p.patient_id}")
    assert len(reports) == 1 and reports[0]["status"] == "corrected"
