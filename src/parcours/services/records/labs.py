"""Lab results received as HL7 v2.5 ORU^R01 (MLLP or HTTP), stored as FHIR.

One message is handled in one database transaction:

1. it is parsed (:mod:`.hl7v2`); unreadable -> ACK ``AR``; not an ORU^R01 -> ``AR``;
2. the patient is matched by INS only: PID-3 with the INS-NIR/NIA OID (``1.2.250.1.213.1.4.8``
   / ``.9``; the test OIDs ``.10``/``.11`` too when ``hl7_accept_test_ins`` is on). One
   Patient with that identifier and, when both are known, the same birth date: matched.
   Anything else (no INS, unknown INS, several patients, another birth date) goes to the
   reconciliation queue (``record_lab_inbox``, the message itself encrypted in the blob
   store) and is acknowledged ``AA``: it is held, never lost. An operator assigns it to a
   patient from the queue's page; the results are then stored as if matched;
3. each OBR becomes a ``DiagnosticReport`` and each OBX with a value an ``Observation``
   (LOINC code, UCUM quantity, reference range, interpretation from the abnormal flags);
   an OBX of type ED carrying a document (the CI-SIS way: a CDA R2 CR-BIO in base64)
   becomes a ``DocumentReference`` with its content in the blob store, and the level-3
   results of a CDA lab report become Observations too. Writes are conditional on the
   sender's identifiers (filler order number, OBX set id and code), so a message sent
   twice does not duplicate anything and a correction (status C) updates in place;
4. the patient gets a notice (no clinical detail).

A failure while storing rolls everything back and is acknowledged ``AE`` with the reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from parcours.core.errors import BadRequest, Forbidden, NotFound, ParcoursError
from parcours.core.ids import new_id
from parcours.fhir import fr_core
from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.services.records import cda as cda_mod
from parcours.services.records import codes, documents, hl7v2, uploads
from parcours.store import audit
from parcours.store import records as record_store
from parcours.store.repository import Repository

log = logging.getLogger(__name__)

OBS_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "D": "entered-in-error", "X": "cancelled", "R": "registered",
              "I": "registered", "S": "preliminary", "A": "amended", "W": "entered-in-error"}
REPORT_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "X": "cancelled", "I": "registered", "R": "registered",
                 "S": "partial", "A": "partial"}
FLAGS = {"N": "N", "L": "L", "H": "H", "LL": "LL", "HH": "HH", "A": "A", "AA": "AA", "<": "L", ">": "H", "POS": "POS", "NEG": "NEG"}
LOINC_RE = re.compile(r"^\d{1,7}-\d$")
RANGE_RE = re.compile(r"^\s*([-+]?\d+(?:[.,]\d+)?)\s*(?:-|to|à|a)\s*([-+]?\d+(?:[.,]\d+)?)\s*$")
BOUND_RE = re.compile(r"^\s*([<>]=?)\s*([-+]?\d+(?:[.,]\d+)?)\s*$")


@dataclass
class Outcome:
    status: str  # stored | queued
    patient: str | None = None
    references: list[str] = field(default_factory=list)
    inbox_id: int | None = None
    text: str = ""


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-") or "x"


def _ns(facility: str) -> str:
    """The URI namespace of a sender's identifiers: no spaces, nothing a URI may not hold."""
    return f"urn:parcours:hl7v2:{_slug(facility or 'lab')}"


def _num(v: str) -> float:
    return float(v.replace(",", "."))


def reference_range(text: str, unit: str | None) -> list[dict]:
    if not text:
        return []
    m = RANGE_RE.match(text)
    q = (lambda v: {"value": v, "unit": unit, "system": codes.UCUM, "code": unit} if unit else {"value": v})
    if m:
        return [{"low": q(_num(m.group(1))), "high": q(_num(m.group(2))), "text": text}]
    m = BOUND_RE.match(text)
    if m:
        key = "high" if m.group(1).startswith("<") else "low"
        return [{key: q(_num(m.group(2))), "text": text}]
    return [{"text": text}]


def _coding_of(code: str, display: str, system: str, facility: str) -> dict:
    if system in ("LN", "LOINC") or (not system and LOINC_RE.match(code)):
        return codes.coding(codes.LOINC, code, display or None)
    return codes.coding(f"{_ns(facility)}:{_slug(system or 'code')}", code, display or None)


def _quantity(value: float, unit: str, comparator: str | None = None) -> dict:
    q: dict[str, Any] = {"value": value}
    if comparator:
        q["comparator"] = comparator
    if unit:
        q.update({"unit": unit, "system": codes.UCUM, "code": unit})
    return q


def _base_observation(patient_ref: str, ident: dict, code: dict, status: str, when: str | None, facility: str,
                      now: datetime, security: list[dict]) -> dict:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "identifier": [ident], "status": status,
        "category": [{"coding": [codes.coding(codes.OBSERVATION_CATEGORY, "laboratory", "Laboratory")]}],
        "code": {"coding": [code], "text": code.get("display") or code["code"]}, "subject": {"reference": patient_ref},
        "issued": _instant(now),
    }
    if when:
        obs["effectiveDateTime"] = when
    if facility:
        obs["performer"] = [{"display": facility}]
    if security:
        obs["meta"] = {"security": security}
    return obs


def _instant(dt: datetime) -> str:
    from datetime import UTC

    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def observation_of(r: hl7v2.Result, order: hl7v2.Order, lab: hl7v2.LabMessage, patient_ref: str, now: datetime,
                   security: list[dict]) -> dict | None:
    if not r.code or r.value_type in ("ED", "RP"):
        return None
    facility = lab.sending_facility or lab.sending_app
    ident = {"system": f"{_ns(facility)}:obx", "value": f"{order.filler or order.placer}-{r.set_id}-{r.code}"}
    obs = _base_observation(patient_ref, ident, _coding_of(r.code, r.display, r.system, facility), OBS_STATUS.get(r.status, "final"),
                            r.observed or order.observed, facility, now, security)
    unit = r.units if r.units_system in ("", "UCUM", "ucum") or r.units else ""
    if r.numeric is not None:
        obs["valueQuantity"] = _quantity(r.numeric, unit, r.comparator)
    elif r.value.strip():
        obs["valueString"] = r.value.strip()[:2000]
    else:
        return None
    rr = reference_range(r.reference_range, unit or None)
    if rr:
        obs["referenceRange"] = rr
    flags = [FLAGS[f] for f in r.flags if f in FLAGS]
    if flags:
        obs["interpretation"] = [{"coding": [codes.coding(codes.INTERPRETATION, f, codes.INTERPRETATIONS.get(f))]} for f in flags]
    return obs


def observation_of_cda(v: cda_mod.LabValue, i: int, order: hl7v2.Order, lab: hl7v2.LabMessage, patient_ref: str,
                       when: str | None, now: datetime, security: list[dict]) -> dict | None:
    facility = lab.sending_facility or lab.sending_app
    ident = {"system": f"{_ns(facility)}:cda", "value": f"{order.filler or order.placer}-{i}-{v.code}"}
    obs = _base_observation(patient_ref, ident, codes.coding(codes.LOINC, v.code, v.display), "final", v.effective or when,
                            facility, now, security)
    if v.value is not None:
        obs["valueQuantity"] = _quantity(v.value, v.unit or "")
    elif v.coded and v.coded[1]:
        obs["valueCodeableConcept"] = {"coding": [{"system": f"urn:oid:{v.coded[0]}", "code": v.coded[1], "display": v.coded[2]}],
                                       "text": v.coded[2] or v.coded[1]}
    elif v.text:
        obs["valueString"] = v.text[:2000]
    else:
        return None
    if v.low is not None or v.high is not None:
        rng: dict[str, Any] = {}
        if v.low is not None:
            rng["low"] = _quantity(v.low, v.unit or "")
        if v.high is not None:
            rng["high"] = _quantity(v.high, v.unit or "")
        obs["referenceRange"] = [rng]
    if v.interpretation in codes.INTERPRETATIONS:
        obs["interpretation"] = [{"coding": [codes.coding(codes.INTERPRETATION, v.interpretation,
                                                          codes.INTERPRETATIONS[v.interpretation])]}]
    return obs


async def find_patient(repo: Repository, lab: hl7v2.LabMessage, *, accept_test: bool) -> tuple[str | None, str]:
    """The one Patient this message is about, or None and why."""
    ins = lab.patient.ins(accept_test=accept_test)
    if ins is None:
        return None, "no INS in PID-3 (identity must be an INS-NIR or INS-NIA)"
    systems = [f"urn:oid:{ins.oid}"]
    prod = {"1.2.250.1.213.1.4.10": fr_core.INS_NIR_SYSTEM, "1.2.250.1.213.1.4.11": fr_core.INS_NIA_SYSTEM}.get(ins.oid)
    if prod:
        systems.append(prod)
    values = ",".join(f"{s}|{ins.value}" for s in systems)
    res = await repo.search(repo.parse_search("Patient", [("identifier", values), ("_count", "3")]))
    if not res.matches:
        return None, f"no patient has this INS ({hl7v2.INS_OIDS.get(ins.oid) or hl7v2.TEST_INS_OIDS.get(ins.oid)})"
    if len(res.matches) > 1:
        return None, "several patients have this INS"
    patient = res.matches[0].resource()
    if lab.patient.birth_date and patient.get("birthDate") and patient["birthDate"] != lab.patient.birth_date:
        return None, "the INS matches a patient born on another date (identity check failed)"
    return res.matches[0].id, "INS"


async def store_results(platform: Platform, repo: Repository, lab: hl7v2.LabMessage, patient_id: str) -> list[str]:
    """Write the message's reports, results and documents in ``patient_id``'s record."""
    now = platform.clock.now()
    patient_ref = f"Patient/{patient_id}"
    facility = lab.sending_facility or lab.sending_app
    refs: list[str] = []
    scanner = uploads.scanner_for(platform.settings.record_clamd_socket)
    from parcours.store.repository import MASKED

    for order in lab.orders:
        masked = order.metadata.get("MASQUE_PS") == "Y"
        security = [codes.coding(MASKED[0], MASKED[1], "masked")] if masked else []
        results: list[str] = []
        forms: list[dict] = []
        care_when = order.observed
        for r in order.results:
            if r.document is not None:
                added = await _store_document(platform, repo, lab, order, r, patient_id, scanner, masked)
                if added is None:
                    continue
                refs.append(f"DocumentReference/{added.stored.id}")
                doc = added.resource()
                att = doc["content"][0]["attachment"]
                forms.append({k: att[k] for k in ("contentType", "url", "size", "hash", "title") if k in att})
                care_when = care_when or (doc.get("context") or {}).get("period", {}).get("start")
                if added.extra.get("cda") is not None:
                    for i, v in enumerate(added.extra["cda"].results):
                        obs = observation_of_cda(v, i, order, lab, patient_ref, care_when, now, security)
                        if obs is not None:
                            results.append(await _upsert(repo, "Observation", obs))
                continue
            obs = observation_of(r, order, lab, patient_ref, now, security)
            if obs is not None:
                results.append(await _upsert(repo, "Observation", obs))
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": f"{_ns(facility)}:filler", "value": order.filler or order.placer or new_id()}],
            "status": REPORT_STATUS.get(order.status, "final"),
            "category": [{"coding": [codes.coding(codes.DIAGNOSTIC_SERVICE, "LAB", "Laboratory")]}],
            "code": {"coding": [_coding_of(order.code, order.display, order.system, facility)], "text": order.display or order.code},
            "subject": {"reference": patient_ref}, "issued": _instant(now),
        }
        if care_when:
            report["effectiveDateTime"] = care_when
        if facility:
            report["performer"] = [{"display": facility}]
        if results:
            report["result"] = [{"reference": ref} for ref in results]
        if forms:
            report["presentedForm"] = forms
        if security:
            report["meta"] = {"security": security}
        refs.extend(results)
        refs.append(await _upsert(repo, "DiagnosticReport", report))
        await record_store.notice_add(repo.conn, patient_ref, "result", refs[-1], now)
    return refs


async def _upsert(repo: Repository, rtype: str, resource: dict) -> str:
    ident = resource["identifier"][0]
    res = await repo.conditional_update(rtype, f"identifier={_escape(ident['system'])}|{_escape(ident['value'])}", resource)
    return f"{rtype}/{res.stored.id}"


def _escape(v: str) -> str:
    from urllib.parse import quote

    return quote(v.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$"), safe=":/@-._~\\")


async def _store_document(platform: Platform, repo: Repository, lab: hl7v2.LabMessage, order: hl7v2.Order, r: hl7v2.Result,
                          patient_id: str, scanner: Any, masked: bool) -> documents.Added | None:
    data = r.document or b""
    # The sniffed type decides (the sender's ED subtype is a hint only): no file name to check against.
    checked = await documents.check(platform, scanner, data, None)
    facility = lab.sending_facility or lab.sending_app
    ident = {"system": f"{_ns(facility)}:document", "value": f"{order.filler or order.placer}-{r.set_id}"}
    previous = None
    if r.status == "C":
        found = await repo.search(repo.parse_search("DocumentReference", [
            ("identifier", f"{ident['system']}|{ident['value']}"), ("status", "current"), ("subject", f"Patient/{patient_id}")]))
        previous = found.matches[0].id if found.matches else None
    code = r.code if LOINC_RE.match(r.code) else None
    new = documents.NewDocument(patient_id=patient_id, data=data, type_code=None if checked.cda else code,
                                title=None if checked.cda else (r.display or order.display or None), care_date=None,
                                replaces=previous, identifier=ident, masked=masked)
    added = await documents.add(platform, repo, new, scanner=scanner, checked=checked, notify=False)
    if checked.content_type == uploads.CDA and (checked.cda.get("type_code") == codes.LAB_REPORT):
        added.extra["cda"] = cda_mod.parse(data)
    else:
        added.extra["cda"] = None
    return added


async def receive(platform: Platform, caller: Caller, data: bytes, *, source: str) -> tuple[str, Outcome | None]:
    """Handle one message; returns the ACK to send back and what was done."""
    now = platform.clock.now()
    control = "PRC" + new_id().replace("-", "")[:17]
    try:
        msg = hl7v2.parse(data)
    except hl7v2.HL7Error as e:
        return hl7v2.ack(None, "AR", str(e), now=now, control_id=control), None
    try:
        lab = hl7v2.read_oru(msg)
    except hl7v2.Unsupported as e:
        return hl7v2.ack(msg, "AR", str(e), now=now, control_id=control), None
    try:
        async with platform.transaction(caller) as repo:
            outcome = await ingest(platform, repo, lab, data, source=source)
    except ParcoursError as e:
        detail = "; ".join(i.diagnostics for i in e.issues[:3] if getattr(i, "diagnostics", None)) or e.message
        log.warning("HL7 message %s from %s not stored: %s", lab.control_id, source, detail)
        return hl7v2.ack(msg, "AE", detail, now=now, control_id=control), None
    except Exception:
        log.exception("HL7 message %s from %s failed", lab.control_id, source)
        return hl7v2.ack(msg, "AE", "Internal error: the message was not stored, send it again", now=now, control_id=control), None
    return hl7v2.ack(msg, "AA", outcome.text, now=now, control_id=control), outcome


async def ingest(platform: Platform, repo: Repository, lab: hl7v2.LabMessage, raw: bytes, *, source: str) -> Outcome:
    patient_id, why = await find_patient(repo, lab, accept_test=platform.settings.hl7_accept_test_ins)
    if patient_id is not None:
        refs = await store_results(platform, repo, lab, patient_id)
        return Outcome("stored", f"Patient/{patient_id}", refs, text=f"Stored for the patient matched by INS: {lab.summary()}")
    now = platform.clock.now()
    blob = await documents.blobs_of(platform).put(repo.conn, patient="inbox", data=raw, content_type="application/hl7-v2",
                                                   text=None, now=now)
    p = lab.patient
    item = await record_store.inbox_add(
        repo.conn, received_at=now, source=source, control_id=lab.control_id, sender=" / ".join(x for x in (lab.sending_app,
                                                                                                           lab.sending_facility) if x),
        patient_name=p.display(), birth_date=p.birth_date, sex=p.sex,
        identifiers=[f"{i.value} ({i.authority or i.oid or i.type_code})" for i in p.identifiers if i.value], reason=why,
        summary=lab.summary(), blob_id=blob.id)
    await documents.blobs_of(platform).set_owner(repo.conn, blob.id, f"inbox/{item}")
    return Outcome("queued", None, [], item, text=f"Held for identity reconciliation: {why}")


# -- the reconciliation queue -------------------------------------------------------------------------------

def may_reconcile(caller: Caller) -> bool:
    """Identity vigilance is an operator's task (staff, administrators) or the platform's."""
    return caller.is_system or caller.kind in ("staff", "admin")


async def assign(platform: Platform, repo: Repository, item_id: int, patient_id: str) -> list[str]:
    """Store a held message's results in ``patient_id``'s record (the operator checked the identity)."""
    if not may_reconcile(repo.caller):
        raise Forbidden("Only operators reconcile lab messages with patients")
    item = await record_store.inbox_lock(repo.conn, item_id)
    await repo.read("Patient", patient_id)  # exists, and the operator may see it
    blobs = documents.blobs_of(platform)
    raw = await blobs.read(repo.conn, await blobs.info(repo.conn, item.blob_id))
    lab = hl7v2.read_oru(hl7v2.parse(raw))
    # The results are written by the platform (operators do not write clinical data); the
    # assignment itself is recorded in the audit trail under the operator's name.
    refs = await store_results(platform, repo.as_platform(), lab, patient_id)
    now = platform.clock.now()
    await record_store.inbox_close(repo.conn, item_id, status="assigned", patient=f"Patient/{patient_id}",
                                   by=repo.caller.user_id or repo.caller.display or "system", at=now, outcome={"references": refs})
    c = repo.caller
    await audit.record(repo.conn, audit.AuditRecord(
        action="lab-reconcile", outcome=audit.SUCCESS, recorded=now, agent=c.user_id or c.display, agent_kind=c.kind,
        fhir_user=c.fhir_user, address=c.address, resource_type="Patient", resource_id=patient_id,
        patients=(f"Patient/{patient_id}",), detail={"inbox": item_id, "control_id": item.control_id, "created": refs[:50]}))
    return refs


async def reject(platform: Platform, repo: Repository, item_id: int, reason: str) -> None:
    """Set a held message aside (a test message, a duplicate): it stays, marked rejected."""
    if not may_reconcile(repo.caller):
        raise Forbidden("Only operators reconcile lab messages with patients")
    if len(reason.strip()) < 5:
        raise BadRequest("Say why the message is set aside")
    await record_store.inbox_lock(repo.conn, item_id)
    await record_store.inbox_close(repo.conn, item_id, status="rejected", patient=None,
                                   by=repo.caller.user_id or repo.caller.display or "system", at=platform.clock.now(),
                                   outcome={"reason": reason.strip()[:500]})


async def inbox(repo: Repository) -> list[record_store.InboxItem]:
    if not may_reconcile(repo.caller):
        raise Forbidden("Only operators see the lab messages waiting for reconciliation")
    return await record_store.inbox_list(repo.conn)


__all__ = ["Outcome", "assign", "find_patient", "inbox", "ingest", "may_reconcile", "receive", "reject", "store_results",
           "NotFound"]
