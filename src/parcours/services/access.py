"""Access control as the people concerned see it: emergency access for professionals, and for
patients their access history, the documents they hide from professionals and the
professionals they block.

Every function works through a Repository (the policy and the audit trail live there):
the caller's own one, or, for the professionals' patient lookup, a caller that may only
search Patients and is audited under the professional's name. ``do_*`` functions change
state in the caller's transaction; nothing here commits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from parcours.core.errors import BadRequest, Forbidden, NotFound
from parcours.fhir import fr_core
from parcours.security.caller import Caller
from parcours.security.policy import PARCOURS_SECURITY
from parcours.services import audit_trail
from parcours.services.platform import Platform
from parcours.store.repository import Repository, Stored

DEFAULT_MINUTES = 240
MINUTES_CHOICES = (60, 240, 720, 1440)
MAX_LOOKUP = 20
HISTORY_SIZE = 200
# The platform's own identity service reads the Patient to show who is signed in: not an access to the record.
INTERNAL_AGENTS = frozenset({"parcours-identity"})
BTG = "BTG"  # v3-ActReason: break the glass
CONSENT_SCOPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]}
CONSENT_CATEGORY = [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}]
CONSENT_POLICY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]}
# Marks the Consents written by the "block a professional" action, so the page lists only those.
BLOCK_TAG = {"system": PARCOURS_SECURITY, "code": "block-professional"}
_INS_RE = re.compile(r"^[12][0-9AB]{12}([0-9]{2})?$")


# -- emergency access ("break the glass") ------------------------------------------------------

def parse_emergency_parameters(body: Any) -> tuple[str, int]:
    """``reason`` (string, required) and ``minutes`` (integer) of a ``$emergency-access`` Parameters."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("$emergency-access needs a Parameters resource with a 'reason'")
    reason, minutes = None, DEFAULT_MINUTES
    for p in body.get("parameter") or []:
        if not isinstance(p, dict):
            continue
        if p.get("name") == "reason":
            reason = p.get("valueString")
        elif p.get("name") == "minutes":
            value = p.get("valueInteger", p.get("valuePositiveInt"))
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BadRequest("minutes must be a positive integer (valueInteger)")
            minutes = value
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest("State the reason for the emergency access (parameter 'reason', valueString)")
    return reason, minutes


async def do_emergency_access(repo: Repository, patient_id: str, reason: str, minutes: int = DEFAULT_MINUTES) -> datetime:
    """Open a time-limited access to a patient's record without a care relationship."""
    return await repo.break_glass(patient_id, reason, minutes)


def emergency_parameters(patient_id: str, reason: str, until: datetime) -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": f"Patient/{patient_id}"}},
        {"name": "reason", "valueString": reason.strip()},
        {"name": "until", "valueDateTime": until.isoformat()},
    ]}


@dataclass(frozen=True)
class PatientMatch:
    id: str
    name: str
    birth_date: str | None
    ins: str | None
    access: str  # care | emergency | blocked | none


def _lookup_caller(caller: Caller) -> Caller:
    """Finds patients by identity only; audited under the professional's name."""
    return replace(caller, kind="system", scopes=frozenset({"system/Patient.s"}), patient_context=None, client_id=None)


async def find_patients(platform: Platform, repo: Repository, query: str) -> list[PatientMatch]:
    """Patients matching an INS (exactly) or a name, for a professional who needs to reach one,
    each with what gives (or would give) this professional access to the record."""
    caller = repo.caller
    if caller.kind != "practitioner" or not caller.fhir_user:
        raise Forbidden("The patient lookup for emergency access is for professionals")
    q = " ".join(query.split())
    if len(q) < 2:
        return []
    compact = q.replace(" ", "").upper()
    if _INS_RE.match(compact):
        criteria = [("identifier", f"{fr_core.INS_NIR_SYSTEM}|{compact}")]
    else:
        criteria = [("name", q)]
    lookup = platform.repository(repo.conn, _lookup_caller(caller))
    found = await lookup.search(lookup.parse_search("Patient", [*criteria, ("_count", str(MAX_LOOKUP)), ("_sort", "family")]))
    ctx = await repo.care()
    out = []
    for s in found.matches:
        res = s.resource()
        ref = f"Patient/{s.id}"
        access = ("blocked" if ref in ctx.blocked_by else "care" if ref in ctx.patients
                  else "emergency" if ref in ctx.emergency else "none")
        out.append(PatientMatch(s.id, fr_core.display_name(res) or s.id, res.get("birthDate"), fr_core.ins(res), access))
    return out


# -- the patient's access history -----------------------------------------------------------------

@dataclass(frozen=True)
class AccessEntry:
    recorded: str
    who: str
    who_ref: str | None  # Practitioner/123, RelatedPerson/..., or None (a system client)
    role: str  # practitioner, staff, admin, proxy, system...
    action: str  # read, search-type, create, update, delete, emergency-access...
    what: str  # a resource type, or "" for a sign-in
    emergency: bool
    reason: str | None
    failed: bool


def _agent(event: dict) -> tuple[str | None, str, str]:
    agent = (event.get("agent") or [{}])[0]
    who = agent.get("who") or {}
    role = ((agent.get("role") or [{}])[0] or {}).get("text") or ""
    return who.get("reference"), str(who.get("display") or ""), role


def _what(event: dict) -> str:
    for ent in event.get("entity") or []:
        if (ent.get("role") or {}).get("code") == "1":
            continue  # the patient concerned, not what was done
        ref = (ent.get("what") or {}).get("reference")
        if ref:
            return str(ref).split("/", 1)[0]
        code = (ent.get("type") or {}).get("code")
        if code:
            return str(code)
    return "Patient" if any((e.get("role") or {}).get("code") == "1" for e in event.get("entity") or []) else ""


async def access_history(platform: Platform, repo: Repository, limit: int = HISTORY_SIZE) -> list[AccessEntry]:
    """Who did what in the caller's record (patients and proxies), newest first, the caller's
    own actions left out. Read as AuditEvents through the caller's Repository, after the
    latest audit entries were turned into AuditEvents."""
    caller = repo.caller
    if caller.kind not in ("patient", "proxy"):
        raise Forbidden("The access history is shown to the patient and their proxies")
    await audit_trail.materialize(platform)
    ctx = await repo.care()
    criteria = [("patient", ",".join(sorted(ctx.patients)))] if ctx.patients else []
    found = await repo.search(repo.parse_search("AuditEvent", [*criteria, ("_sort", "-date"), ("_count", str(limit))]))
    events = [s.resource() for s in found.matches]
    own = set(ctx.identities)
    names = await _names(repo, {ref for e in events if (ref := _agent(e)[0]) and ref not in own})
    out = []
    for e in events:
        ref, display, role = _agent(e)
        if (ref and ref in own) or display in INTERNAL_AGENTS:
            continue
        if role == "system" and ref and ref.startswith("Practitioner/"):
            role = "practitioner"  # a professional's patient lookup runs with a system scope on their behalf
        subtype = ((e.get("subtype") or [{}])[0] or {}).get("code") or ""
        purpose = (e.get("purposeOfEvent") or [{}])[0] or {}
        emergency = any(c.get("code") == BTG for c in purpose.get("coding") or [])
        action = "emergency-access" if emergency else {"110122": "login", "110123": "logout"}.get(subtype, subtype)
        out.append(AccessEntry(
            recorded=str(e.get("recorded") or ""), who=names.get(ref or "", "") or display or ref or "?", who_ref=ref, role=role,
            action=action, what=_what(e), emergency=emergency, reason=purpose.get("text") if emergency else None,
            failed=str(e.get("outcome") or "0") != "0"))
    return out


async def _names(repo: Repository, refs: set[str]) -> dict[str, str]:
    """Display names of the people named in the history, one search per type."""
    by_type: dict[str, list[str]] = {}
    for ref in refs:
        rtype, _, rid = ref.partition("/")
        if rtype in ("Practitioner", "PractitionerRole", "RelatedPerson", "Organization") and rid:
            by_type.setdefault(rtype, []).append(rid)
    out: dict[str, str] = {}
    for rtype, ids in by_type.items():
        params = [("_id", ",".join(sorted(ids))), ("_count", str(len(ids)))]
        if rtype == "PractitionerRole":
            params.append(("_include", "PractitionerRole:practitioner"))
        found = await repo.search(repo.parse_search(rtype, params))
        people = {f"{s.resource_type}/{s.id}": s.resource() for s in found.matches + found.includes}
        for ref, res in people.items():
            if ref.startswith("PractitionerRole/"):
                pract = people.get(((res.get("practitioner") or {}).get("reference")) or "")
                out[ref] = (fr_core.display_name(pract) if pract else "") or str((res.get("practitioner") or {}).get("display") or "")
            else:
                out[ref] = fr_core.display_name(res) or str(res.get("name") or "")
    return out


# -- documents the patient hides from professionals ---------------------------------------------------

@dataclass(frozen=True)
class DocumentView:
    id: str
    title: str
    date: str | None
    hidden: bool


def is_hidden(resource: dict) -> bool:
    return any(s.get("system") == PARCOURS_SECURITY and s.get("code") == "masked"
               for s in (resource.get("meta") or {}).get("security") or [] if isinstance(s, dict))


async def my_documents(repo: Repository, limit: int = 100) -> list[DocumentView]:
    found = await repo.search(repo.parse_search("DocumentReference", [("_sort", "-date"), ("_count", str(limit))]))
    out = []
    for s in found.matches:
        res = s.resource()
        title = res.get("description") or next(
            (c.get("attachment", {}).get("title") for c in res.get("content") or [] if c.get("attachment", {}).get("title")),
            None) or ((res.get("type") or {}).get("text")) or s.id
        out.append(DocumentView(s.id, str(title), res.get("date"), is_hidden(res)))
    return out


async def do_set_hidden(repo: Repository, document_id: str, hidden: bool) -> Stored:
    """Hide a document from professionals (the ``masked`` label) or show it again."""
    return (await repo.set_masked("DocumentReference", document_id, hidden)).stored


# -- professionals the patient blocks ---------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    consent_id: str
    practitioner: str  # Practitioner/123
    name: str
    since: str | None


def _own_patient(repo: Repository) -> str:
    c = repo.caller
    if c.kind != "patient" or not c.fhir_user or not c.fhir_user.startswith("Patient/"):
        raise Forbidden("Only the patient blocks professionals from their record")
    return c.fhir_user


async def blocks(repo: Repository) -> list[Block]:
    patient = _own_patient(repo)
    found = await repo.search(repo.parse_search("Consent", [
        ("patient", patient), ("status", "active"), ("_tag", f"{BLOCK_TAG['system']}|{BLOCK_TAG['code']}"), ("_count", "100")]))
    out = []
    for s in found.matches:
        res = s.resource()
        for actor in (res.get("provision") or {}).get("actor") or []:
            ref = (actor.get("reference") or {})
            if str(ref.get("reference") or "").startswith("Practitioner/"):
                out.append(Block(s.id, ref["reference"], str(ref.get("display") or ref["reference"]), res.get("dateTime")))
    return out


async def find_practitioner(repo: Repository, rpps: str) -> Stored:
    found = await repo.search(repo.parse_search("Practitioner", [("identifier", f"{fr_core.RPPS_SYSTEM}|{rpps.strip()}"),
                                                                 ("_count", "2")]))
    if len(found.matches) != 1:
        raise NotFound(f"No professional has the RPPS number {rpps.strip()!r}")
    return found.matches[0]


async def do_block(repo: Repository, practitioner: str) -> str:
    """Block a named professional from the caller's record (a Consent that denies them); returns its id.
    Blocking someone already blocked changes nothing."""
    patient = _own_patient(repo)
    rtype, _, rid = practitioner.partition("/")
    if rtype != "Practitioner" or not rid:
        raise BadRequest("Name the professional to block as Practitioner/<id>")
    for b in await blocks(repo):
        if b.practitioner == practitioner:
            return b.consent_id
    name = fr_core.display_name((await repo.read("Practitioner", rid)).resource()) or practitioner
    consent = {
        "resourceType": "Consent", "meta": {"tag": [BLOCK_TAG]}, "status": "active", "scope": CONSENT_SCOPE,
        "category": CONSENT_CATEGORY, "patient": {"reference": patient}, "dateTime": repo.clock.now().isoformat(),
        "policyRule": CONSENT_POLICY,
        "provision": {"type": "deny", "actor": [{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
            "reference": {"reference": practitioner, "display": name}}]},
    }
    return (await repo.create("Consent", consent)).stored.id


async def do_unblock(repo: Repository, consent_id: str) -> None:
    """End a block: its Consent becomes inactive (kept, as the record of what was decided)."""
    _own_patient(repo)
    consent = (await repo.read("Consent", consent_id)).resource()
    if BLOCK_TAG not in ((consent.get("meta") or {}).get("tag") or []):
        raise BadRequest(f"Consent/{consent_id} does not block a professional")
    if consent.get("status") != "inactive":
        consent["status"] = "inactive"
        await repo.update("Consent", consent_id, consent)
