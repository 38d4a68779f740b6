"""The access policy as a table: every kind of caller x resource type x interaction, through the FHIR API.

The expected decisions below are written from the rules of ``security.policy`` (its
docstring) and from the access-control issue, never copied from the server:

* a patient (and an active proxy) reads their own compartment and writes only what
  patients write (questionnaire answers, their own documents, messages, appointment
  requests); they change or delete only what they wrote, except their demographics,
  their appointments, questionnaires and tasks addressed to them;
* a professional reaches a patient's data only through a care relationship (CareTeam,
  Appointment, Encounter, referral, task) while it lasts, or an emergency access; never
  when the patient blocked them; professionals do not delete clinical records;
* restricted items (confidentiality R, the patient's ``masked`` label) are seen by
  their author and the patient only (not by a proxy);
* staff: scheduling only (and finding the patient); administrators: directory,
  accounts and the audit trail; the directory and free slots are read by everyone;
* AuditEvents are written by the platform only; Subscriptions are set up by system clients;
* searches, includes, counts, ``_has``, chains, ``$everything``, history and ``$export``
  are narrowed by the same policy: a search never reveals that a forbidden resource exists;
* every interaction, sign-in (and failed attempt), sign-out and emergency access is in the audit log.

The fixture (two patients, their records, every kind of relationship) is built once
per module with the system client; each caller gets a token as
``services.accounts.caller_for`` would give (kind = role, fhirUser, the role's session scopes).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import psycopg
import pytest
import pytest_asyncio

from parcours.fhir import fr_core
from parcours.security import roles, tokens
from parcours.security.policy import CONFIDENTIALITY, PARCOURS_SECURITY
from parcours.services import audit_trail, export
from parcours.services.platform import Platform
from tests.conftest import BASE, uniq

JSON = {"Content-Type": "application/fhir+json"}
TYPES = ("Patient", "Observation", "Condition", "DocumentReference", "Appointment", "Slot", "Practitioner",
         "Organization", "AuditEvent", "Subscription", "QuestionnaireResponse", "Communication")
COMPARTMENT = ("Patient", "Observation", "Condition", "DocumentReference", "Appointment", "AuditEvent",
               "QuestionnaireResponse", "Communication")


def table(text: str) -> dict[str, dict[str, str]]:
    """Rows of one letter per type (in TYPES order) -> {role: {type: letter}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.strip().splitlines():
        role, *cells = line.split()
        if role == "Pat":  # the header
            continue
        assert len(cells) == len(TYPES), line
        out[role] = dict(zip(TYPES, cells))
    return out


# Y = allowed. n = refused for this resource (instance rule: not their record, no care
# relationship, blocked, not the author): 403 on a read, absent from searches.
# x = refused for the whole type (role matrix or token scopes): 403, searches included.
#
# Reads, searches and instance history of the fixture's resources of patient P (and of a
# Slot, a Practitioner, an Organization, a Subscription, an AuditEvent about P).
READ = table("""
                    Pat Obs Con Doc App Slo Pra Org Aud Sub QR  Com
patient              Y   Y   Y   Y   Y   Y   Y   Y   Y   n   Y   Y
proxy                Y   Y   Y   Y   Y   Y   Y   Y   Y   n   Y   Y
proxy_inactive       n   n   n   n   n   Y   Y   Y   n   n   n   n
pract_care           Y   Y   Y   Y   Y   Y   Y   Y   x   n   Y   Y
pract_none           n   n   n   n   n   Y   Y   Y   x   n   n   n
pract_emergency      Y   Y   Y   Y   Y   Y   Y   Y   x   n   Y   Y
pract_blocked        n   n   n   n   n   Y   Y   Y   x   n   n   n
staff                Y   x   x   x   Y   Y   Y   Y   x   x   x   x
admin                Y   x   x   x   x   x   Y   Y   Y   x   x   x
system               Y   Y   Y   Y   Y   Y   Y   Y   Y   Y   Y   Y
system_patient_rs    Y   x   x   x   x   x   x   x   x   x   x   x
""")

# Creating a new resource of that type (for P when it belongs to a patient; a new Patient).
CREATE = table("""
                    Pat Obs Con Doc App Slo Pra Org Aud Sub QR  Com
patient              x   Y   x   Y   Y   x   x   x   x   x   Y   Y
proxy                x   Y   x   Y   Y   x   x   x   x   x   Y   Y
proxy_inactive       x   n   x   n   n   x   x   x   x   x   n   n
pract_care           Y   Y   Y   Y   Y   Y   x   x   x   x   Y   Y
pract_none           Y   n   n   n   n   Y   x   x   x   x   n   n
pract_emergency      Y   Y   Y   Y   Y   Y   x   x   x   x   Y   Y
pract_blocked        Y   n   n   n   n   Y   x   x   x   x   n   n
staff                Y   x   x   x   Y   Y   x   x   x   x   x   x
admin                Y   x   x   x   x   x   Y   Y   x   x   x   x
system               Y   Y   Y   Y   Y   Y   Y   Y   x   Y   Y   Y
system_patient_rs    x   x   x   x   x   x   x   x   x   x   x   x
""")

# Updating: P itself for Patient; otherwise a resource of P written by the system (so not
# by the caller), another professional's directory entry, a Slot, a Subscription, an AuditEvent.
UPDATE = table("""
                    Pat Obs Con Doc App Slo Pra Org Aud Sub QR  Com
patient              Y   n   x   n   Y   x   x   x   x   x   Y   n
proxy                Y   n   x   n   Y   x   x   x   x   x   Y   n
proxy_inactive       n   n   x   n   n   x   x   x   x   x   n   n
pract_care           Y   Y   Y   Y   Y   Y   n   x   x   x   Y   Y
pract_none           n   n   n   n   n   Y   n   x   x   x   n   n
pract_emergency      Y   Y   Y   Y   Y   Y   n   x   x   x   Y   Y
pract_blocked        n   n   n   n   n   Y   n   x   x   x   n   n
staff                x   x   x   x   Y   Y   x   x   x   x   x   x
admin                Y   x   x   x   x   x   Y   Y   x   x   x   x
system               Y   Y   Y   Y   Y   Y   Y   Y   x   Y   Y   Y
system_patient_rs    x   x   x   x   x   x   x   x   x   x   x   x
""")

# Deleting: a fresh resource of each type (of P, written by the system; a fresh Patient).
DELETE = table("""
                    Pat Obs Con Doc App Slo Pra Org Aud Sub QR  Com
patient              x   n   x   n   n   x   x   x   x   x   n   n
proxy                x   n   x   n   n   x   x   x   x   x   n   n
proxy_inactive       x   n   x   n   n   x   x   x   x   x   n   n
pract_care           x   x   x   x   Y   Y   x   x   x   x   x   x
pract_none           x   x   x   x   n   Y   x   x   x   x   x   x
pract_emergency      x   x   x   x   Y   Y   x   x   x   x   x   x
pract_blocked        x   x   x   x   n   Y   x   x   x   x   x   x
staff                x   x   x   x   Y   Y   x   x   x   x   x   x
admin                Y   x   x   x   x   x   Y   Y   x   x   x   x
system               Y   Y   Y   Y   Y   Y   Y   Y   x   Y   Y   Y
system_patient_rs    x   x   x   x   x   x   x   x   x   x   x   x
""")

# Patient/P/$everything: 200 (with what READ allows of P's compartment) or 403.
EVERYTHING = {"patient": 200, "proxy": 200, "proxy_inactive": 403, "pract_care": 200, "pract_none": 403,
              "pract_emergency": 200, "pract_blocked": 403, "staff": 200, "admin": 200, "system": 200,
              "system_patient_rs": 200}
# Patient/$export kick-off: 202 (the files hold what READ allows) or 403. Professionals
# reach one patient at a time; staff and administrators have no records to export.
EXPORT = {"patient": 202, "proxy": 202, "proxy_inactive": 202, "pract_care": 403, "pract_none": 403,
          "pract_emergency": 403, "pract_blocked": 403, "staff": 403, "admin": 403, "system": 202,
          "system_patient_rs": 202}
ROLES = tuple(READ)

# Restricted items of P: who sees them (their author and the patient, nobody else but system).
RESTRICTED_SEEN = {
    "obs_r_care": {"patient", "pract_care", "system"},  # confidentiality R, written by pract_care
    "obs_r_emergency": {"patient", "pract_emergency", "system"},  # confidentiality R, written by pract_emergency
    "doc_masked": {"patient", "system"},  # a letter written by the system, hidden by the patient with $hide
}


def status_of(letter: str, ok: int) -> int:
    return ok if letter == "Y" else 403


# -- fixture ------------------------------------------------------------------------------------

@dataclass
class Actor:
    role: str
    subject: str
    headers: dict[str, str]
    fhir_user: str | None = None


@dataclass
class World:
    start: datetime
    p: str
    q: str
    actors: dict[str, Actor]
    read: dict[str, str]  # type -> id of P's resource (read, search, history)
    q_read: dict[str, str]  # type -> id of Q's resource
    bodies: dict[str, dict]  # "update/<role>/<type>" -> body with id, "delete/<role>/<type>" -> id
    restricted: dict[str, str] = field(default_factory=dict)  # name -> "Type/id"
    practitioners: dict[str, str] = field(default_factory=dict)  # name -> Practitioner id
    rel_patient: str = ""
    rel_obs: str = ""
    sr_restricted_code: str = ""
    obs_r_emergency_code: str = ""
    schedule: str = ""


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def ref(rtype: str, rid: str) -> dict:
    return {"reference": f"{rtype}/{rid}"}


def bodies_for(rtype: str, pid: str, tag: str, *, schedule: str, practitioner: str) -> dict:
    now = datetime.now(UTC)
    subject = ref("Patient", pid)
    meta = {"tag": [{"system": "urn:authz", "code": tag}]}
    return {
        "Patient": {"resourceType": "Patient", "meta": meta, "name": [{"family": f"Nouveau-{tag}", "given": ["Test"]}],
                    "birthDate": "1990-01-01"},
        "Observation": {"resourceType": "Observation", "meta": meta, "status": "final", "subject": subject,
                        "code": {"coding": [{"system": "urn:authz", "code": tag}]}, "valueString": "ok"},
        "Condition": {"resourceType": "Condition", "meta": meta, "subject": subject, "code": {"text": tag},
                      "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                     "code": "active"}]}},
        "DocumentReference": {"resourceType": "DocumentReference", "meta": meta, "status": "current", "subject": subject,
                              "description": f"Lettre {tag}",
                              "content": [{"attachment": {"contentType": "text/plain", "title": f"Lettre {tag}",
                                                          "data": base64.b64encode(b"Bonjour").decode()}}]},
        "Appointment": {"resourceType": "Appointment", "meta": meta, "status": "booked",
                        "start": _iso(now + timedelta(days=3)), "end": _iso(now + timedelta(days=3, minutes=30)),
                        "participant": [{"actor": subject, "status": "accepted"},
                                        {"actor": ref("Practitioner", practitioner), "status": "accepted"}]},
        "Slot": {"resourceType": "Slot", "meta": meta, "schedule": ref("Schedule", schedule), "status": "free",
                 "start": _iso(now + timedelta(days=5)), "end": _iso(now + timedelta(days=5, minutes=20))},
        "Practitioner": {"resourceType": "Practitioner", "meta": meta, "name": [{"family": f"Dr-{tag}"}],
                         "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("9")}]},
        "Organization": {"resourceType": "Organization", "meta": meta, "name": f"Cabinet {tag}"},
        "AuditEvent": {"resourceType": "AuditEvent", "meta": meta, "type": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                                            "code": "110110"},
                       "recorded": _iso(now), "agent": [{"requestor": True, "who": {"display": "forger"}}],
                       "source": {"observer": {"display": "forger"}}, "entity": [{"what": subject}]},
        "Subscription": {"resourceType": "Subscription", "meta": meta, "status": "off", "reason": "authz matrix",
                         "criteria": f"Observation?code=urn:authz|{tag}",
                         "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "payload": "application/fhir+json"}},
        "QuestionnaireResponse": {"resourceType": "QuestionnaireResponse", "meta": meta, "status": "completed", "subject": subject,
                                  "item": [{"linkId": "1", "text": tag, "answer": [{"valueString": "oui"}]}]},
        "Communication": {"resourceType": "Communication", "meta": meta, "status": "completed", "subject": subject,
                          "payload": [{"contentString": f"Message {tag}"}]},
    }[rtype]


async def transaction(client: httpx.AsyncClient, bodies: list[dict]) -> list[str]:
    """Create ``bodies`` in one transaction Bundle; their ids, in order."""
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": b, "request": {"method": "POST", "url": b["resourceType"]}} for b in bodies]}
    r = await client.post("/fhir", json=bundle, headers=JSON)
    assert r.status_code == 200, r.text
    return [e["response"]["location"].split("/")[1] for e in r.json()["entry"]]


async def create(client: httpx.AsyncClient, body: dict, headers: dict[str, str] | None = None) -> str:
    r = await client.post(f"/fhir/{body['resourceType']}", json=body, headers={**JSON, **(headers or {})})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def token(platform: Platform, role: str, kind: str, fhir_user: str | None, scopes: list[str] | None = None) -> Actor:
    subject = uniq(f"authz-{role}")
    granted = list(roles.role(kind).session_scopes) if scopes is None else scopes
    tok = tokens.issue(platform.token_key, subject=subject, kind=kind, scopes=granted, fhir_user=fhir_user)
    return Actor(role, subject, {"Authorization": f"Bearer {tok}"}, fhir_user)


@pytest_asyncio.fixture(scope="module")
async def world(client: httpx.AsyncClient, platform: Platform) -> AsyncIterator[World]:
    start = datetime.now(UTC) - timedelta(seconds=1)
    now = datetime.now(UTC)
    # Directory: the professionals of every relationship, the organisation, staff and admin.
    names = ["care", "none", "emergency", "blocked", "staff", "admin", "ct", "ct_inactive", "appt", "appt_old",
             "appt_cancelled", "enc", "enc_old", "enc_cancelled", "sr", "sr_revoked", "task", "task_cancelled", "other"]
    ids = await transaction(client, [
        {"resourceType": "Practitioner", "name": [{"family": f"Authz-{n}", "given": ["Dr"]}],
         "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("7")}]} for n in names])
    pr = dict(zip(names, ids))
    p_ins, q_ins = "2" + uniq("")[1:13].replace("-", "0"), "1" + uniq("")[1:13].replace("-", "0")
    p, q, rel = await transaction(client, [
        {"resourceType": "Patient", "name": [{"family": "Authz-Patiente", "given": ["Paule"]}], "birthDate": "1970-05-06",
         "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": p_ins}]},
        {"resourceType": "Patient", "name": [{"family": "Authz-Autre", "given": ["Quentin"]}], "birthDate": "1960-01-02",
         "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": q_ins}]},
        {"resourceType": "Patient", "name": [{"family": "Authz-Relations", "given": ["Rose"]}], "birthDate": "1950-03-04"},
    ])
    org, schedule = await transaction(client, [
        {"resourceType": "Organization", "name": "Authz clinic"},
        {"resourceType": "Schedule", "actor": [ref("Practitioner", pr["care"])]},
    ])
    rp_active, rp_inactive = await transaction(client, [
        {"resourceType": "RelatedPerson", "active": True, "patient": ref("Patient", p), "name": [{"family": "Proxy-Actif"}]},
        {"resourceType": "RelatedPerson", "active": False, "patient": ref("Patient", p), "name": [{"family": "Proxy-Inactif"}]},
    ])
    # P's care relationships: pract_care and pract_blocked in the CareTeam (the patient
    # blocks the latter below); Q's: only "other", so pract_care has nothing with Q.
    await transaction(client, [
        {"resourceType": "CareTeam", "status": "active", "subject": ref("Patient", p),
         "participant": [{"member": ref("Practitioner", pr["care"])}, {"member": ref("Practitioner", pr["blocked"])}]},
        {"resourceType": "CareTeam", "status": "active", "subject": ref("Patient", q),
         "participant": [{"member": ref("Practitioner", pr["other"])}]},
    ])
    # Every kind of relationship with patient "rel", live or ended.
    days = timedelta(days=1)

    def appt(who: str, status: str, start: datetime) -> dict:
        return {"resourceType": "Appointment", "status": status, "start": _iso(start), "end": _iso(start + timedelta(minutes=20)),
                "participant": [{"actor": ref("Patient", rel), "status": "accepted"},
                                {"actor": ref("Practitioner", pr[who]), "status": "accepted"}]}

    def enc(who: str, status: str, start: datetime, end: datetime | None) -> dict:
        period = {"start": _iso(start), **({"end": _iso(end)} if end else {})}
        return {"resourceType": "Encounter", "status": status, "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                                          "code": "AMB"},
                "subject": ref("Patient", rel), "participant": [{"individual": ref("Practitioner", pr[who])}], "period": period}

    def sr(who: str, status: str) -> dict:
        return {"resourceType": "ServiceRequest", "status": status, "intent": "order", "subject": ref("Patient", rel),
                "code": {"text": "Avis spécialisé"}, "performer": [ref("Practitioner", pr[who])]}

    def task(who: str, status: str) -> dict:
        return {"resourceType": "Task", "status": status, "intent": "order", "for": ref("Patient", rel),
                "description": "Télé-expertise", "owner": ref("Practitioner", pr[who])}

    await transaction(client, [
        {"resourceType": "CareTeam", "status": "active", "subject": ref("Patient", rel), "participant": [{"member": ref("Practitioner", pr["ct"])}]},
        {"resourceType": "CareTeam", "status": "inactive", "subject": ref("Patient", rel),
         "participant": [{"member": ref("Practitioner", pr["ct_inactive"])}]},
        appt("appt", "booked", now + 2 * days), appt("appt_old", "fulfilled", now - 100 * days),
        appt("appt_cancelled", "cancelled", now + 2 * days),
        enc("enc", "in-progress", now - days, None), enc("enc_old", "finished", now - 120 * days, now - 100 * days),
        enc("enc_cancelled", "cancelled", now - days, None),
        sr("sr", "active"), sr("sr_revoked", "revoked"), task("task", "requested"), task("task_cancelled", "cancelled"),
    ])
    rel_obs = (await transaction(client, [bodies_for("Observation", rel, uniq("rel"), schedule=schedule, practitioner=pr["care"])]))[0]

    actors = {
        "patient": token(platform, "patient", "patient", f"Patient/{p}"),
        "proxy": token(platform, "proxy", "proxy", f"RelatedPerson/{rp_active}"),
        "proxy_inactive": token(platform, "proxy_inactive", "proxy", f"RelatedPerson/{rp_inactive}"),
        "pract_care": token(platform, "pract_care", "practitioner", f"Practitioner/{pr['care']}"),
        "pract_none": token(platform, "pract_none", "practitioner", f"Practitioner/{pr['none']}"),
        "pract_emergency": token(platform, "pract_emergency", "practitioner", f"Practitioner/{pr['emergency']}"),
        "pract_blocked": token(platform, "pract_blocked", "practitioner", f"Practitioner/{pr['blocked']}"),
        "staff": token(platform, "staff", "staff", f"Practitioner/{pr['staff']}"),
        "admin": token(platform, "admin", "admin", f"Practitioner/{pr['admin']}"),
        "system": token(platform, "system", "system", None, ["system/*.*"]),
        "system_patient_rs": token(platform, "system_patient_rs", "system", None, ["system/Patient.rs"]),
    }
    for name in names:
        if f"pract_{name}" not in actors and name not in ("staff", "admin"):
            actors[f"rel_{name}"] = token(platform, f"rel_{name}", "practitioner", f"Practitioner/{pr[name]}")

    # The patient blocks pract_blocked (a Consent that denies them, written by the patient).
    r = await client.post("/fhir/Consent", headers={**JSON, **actors["patient"].headers}, json={
        "resourceType": "Consent", "status": "active", "patient": ref("Patient", p),
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                                                        "code": "PRCP"}]},
                                                 "reference": ref("Practitioner", pr["blocked"])}]}})
    assert r.status_code == 201, r.text
    # pract_emergency breaks the glass on P.
    r = await client.post(f"/fhir/Patient/{p}/$emergency-access", headers={**JSON, **actors["pract_emergency"].headers},
                          json={"resourceType": "Parameters", "parameter": [
                              {"name": "reason", "valueString": "Patiente inconsciente aux urgences"},
                              {"name": "minutes", "valueInteger": 120}]})
    assert r.status_code == 200, r.text

    # The resources every read/search/history cell looks at, for P and for Q.
    tag = uniq("read")
    read_types = [t for t in TYPES if t not in ("Patient", "AuditEvent")]
    made = await transaction(client, [bodies_for(t, p, tag, schedule=schedule, practitioner=pr["care"]) for t in read_types])
    q_types = [t for t in COMPARTMENT if t not in ("Patient", "AuditEvent")]
    q_made = await transaction(client, [bodies_for(t, q, tag, schedule=schedule, practitioner=pr["other"]) for t in q_types])
    read = {"Patient": p, **dict(zip(read_types, made))}
    q_read = {"Patient": q, **dict(zip(q_types, q_made))}
    read["Practitioner"] = pr["other"]
    read["Organization"] = org

    # Restricted items: written by pract_care and by pract_emergency (R), and a letter
    # the patient hid from professionals.
    restricted: dict[str, str] = {}
    r_label = {"security": [{"system": CONFIDENTIALITY, "code": "R"}]}
    for name, role in (("obs_r_care", "pract_care"), ("obs_r_emergency", "pract_emergency")):
        body = bodies_for("Observation", p, uniq(name), schedule=schedule, practitioner=pr["care"])
        body["meta"] = {**body["meta"], **r_label}
        restricted[name] = f"Observation/{await create(client, body, actors[role].headers)}"
    obs_r_emergency_code = body["code"]["coding"][0]["code"]
    doc = await create(client, bodies_for("DocumentReference", p, uniq("masked"), schedule=schedule, practitioner=pr["care"]))
    r = await client.post(f"/fhir/DocumentReference/{doc}/$hide", headers=actors["patient"].headers)
    assert r.status_code == 200, r.text
    assert {"system": PARCOURS_SECURITY, "code": "masked"} in [
        {k: v for k, v in x.items() if k != "display"} for x in r.json()["meta"]["security"]]
    restricted["doc_masked"] = f"DocumentReference/{doc}"
    # A restricted referral, and an Observation based on it (for the chain test).
    sr_code = uniq("sr-r")
    sr_r = await create(client, {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": ref("Patient", p),
                                 "meta": r_label, "code": {"coding": [{"system": "urn:authz", "code": sr_code}]}})
    based = bodies_for("Observation", p, uniq("based"), schedule=schedule, practitioner=pr["care"])
    based["basedOn"] = [ref("ServiceRequest", sr_r)]
    restricted["obs_based_on_r"] = f"Observation/{await create(client, based)}"

    # The targets of updates and deletes: fresh resources per role and type.
    bodies: dict[str, dict] = {}
    plan: list[tuple[str, dict]] = []
    for role in ROLES:
        for t in TYPES:
            if t == "AuditEvent":
                continue
            for what in ("update", "delete"):
                if what == "update" and t == "Patient":
                    continue
                plan.append((f"{what}/{role}/{t}", bodies_for(t, p, uniq(what), schedule=schedule, practitioner=pr["care"])))
    made = await transaction(client, [b for _, b in plan])
    for (key, body), rid in zip(plan, made):
        bodies[key] = {**body, "id": rid}
    # Whom the Practitioner updates and deletes target: other professionals, never the caller.
    # An AuditEvent about P: a read of P, turned into AuditEvents.
    assert (await client.get(f"/fhir/Patient/{p}")).status_code == 200
    await audit_trail.materialize(platform)
    r = await client.get("/fhir/AuditEvent", params={"patient": f"Patient/{p}", "_count": "1"})
    read["AuditEvent"] = r.json()["entry"][0]["resource"]["id"]
    w = World(start, p, q, actors, read, q_read, bodies, restricted, pr, rel, rel_obs, sr_code, obs_r_emergency_code, schedule)
    yield w


def audit_rows(pg_uri: str, subject: str, action: str) -> list[tuple]:
    with psycopg.connect(pg_uri) as conn:
        return conn.execute("SELECT resource_type, resource_id, outcome FROM audit_log WHERE agent = %s AND action = %s "
                            "ORDER BY seq", (subject, action)).fetchall()


def check_audited(pg_uri: str, actor: Actor, action: str, expected: dict[str, str], ids: dict[str, str] | None = None) -> None:
    """One audit entry per cell, as a success (Y) or a failure (n, x)."""
    rows = audit_rows(pg_uri, actor.subject, action)
    problems = []
    for rtype, letter in expected.items():
        outcome = "0" if letter == "Y" else "4"
        rid = ids.get(rtype) if ids else None
        found = [r for r in rows if r[0] == rtype and r[2] == outcome and (rid is None or r[1] in (rid, None))]
        if not found:
            problems.append(f"{action} {rtype}: no audit entry with outcome {outcome} (have {[r for r in rows if r[0] == rtype]})")
    assert not problems, problems


# -- the matrix ---------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
async def test_read(world: World, client, pg_uri, role: str) -> None:
    actor = world.actors[role]
    got = {}
    for t in TYPES:
        r = await client.get(f"/fhir/{t}/{world.read[t]}", headers=actor.headers)
        got[t] = r.status_code
    expected = {t: status_of(READ[role][t], 200) for t in TYPES}
    assert got == expected
    check_audited(pg_uri, actor, "read", READ[role], world.read)


@pytest.mark.parametrize("role", ROLES)
async def test_search(world: World, client, pg_uri, role: str) -> None:
    """``Type?_id=`` of P's resource: found (total 1), absent (an empty Bundle, total 0), or 403."""
    actor = world.actors[role]
    problems = []
    for t in TYPES:
        r = await client.get(f"/fhir/{t}", params={"_id": world.read[t], "_total": "accurate"}, headers=actor.headers)
        letter = READ[role][t]
        if letter == "x":
            if r.status_code != 403:
                problems.append(f"{t}: {r.status_code}, expected 403")
            continue
        if r.status_code != 200:
            problems.append(f"{t}: {r.status_code} {r.text[:200]}")
            continue
        b = r.json()
        ids = [e["resource"]["id"] for e in b.get("entry", []) if e["search"]["mode"] == "match"]
        want = [world.read[t]] if letter == "Y" else []
        if ids != want or b.get("total") != len(want):
            problems.append(f"{t}: got {ids} total {b.get('total')}, expected {want}")
    assert not problems, problems
    # A search that finds nothing still succeeded: only a refused type is a failure.
    check_audited(pg_uri, actor, "search", {t: "x" if v == "x" else "Y" for t, v in READ[role].items()})


@pytest.mark.parametrize("role", ROLES)
async def test_history(world: World, client, role: str) -> None:
    actor = world.actors[role]
    got = {t: (await client.get(f"/fhir/{t}/{world.read[t]}/_history", headers=actor.headers)).status_code for t in TYPES}
    assert got == {t: status_of(READ[role][t], 200) for t in TYPES}


@pytest.mark.parametrize("role", ROLES)
async def test_create(world: World, client, pg_uri, role: str) -> None:
    actor = world.actors[role]
    got = {}
    for t in TYPES:
        body = bodies_for(t, world.p, uniq("create"), schedule=world.schedule, practitioner=world.practitioners["care"])
        r = await client.post(f"/fhir/{t}", json=body, headers={**JSON, **actor.headers})
        got[t] = r.status_code
    assert got == {t: status_of(CREATE[role][t], 201) for t in TYPES}
    check_audited(pg_uri, actor, "create", CREATE[role])


@pytest.mark.parametrize("role", ROLES)
async def test_update(world: World, client, pg_uri, role: str) -> None:
    actor = world.actors[role]
    got = {}
    for t in TYPES:
        if t == "Patient":
            body = (await client.get(f"/fhir/Patient/{world.p}")).json()
        elif t == "AuditEvent":
            body = (await client.get(f"/fhir/AuditEvent/{world.read['AuditEvent']}")).json()
        else:
            body = dict(world.bodies[f"update/{role}/{t}"])
        r = await client.put(f"/fhir/{t}/{body['id']}", json=body, headers={**JSON, **actor.headers})
        got[t] = r.status_code
    assert got == {t: status_of(UPDATE[role][t], 200) for t in TYPES}
    check_audited(pg_uri, actor, "update", UPDATE[role])


@pytest.mark.parametrize("role", ROLES)
async def test_delete(world: World, client, pg_uri, role: str) -> None:
    actor = world.actors[role]
    got = {}
    for t in TYPES:
        rid = world.read["AuditEvent"] if t == "AuditEvent" else world.bodies[f"delete/{role}/{t}"]["id"]
        r = await client.delete(f"/fhir/{t}/{rid}", headers=actor.headers)
        got[t] = r.status_code
    assert got == {t: status_of(DELETE[role][t], 200) for t in TYPES}
    check_audited(pg_uri, actor, "delete", DELETE[role])


def expected_of_p(world: World, role: str) -> set[str]:
    """What of P's fixture a caller reaches: the READ table, and the restricted items' rule."""
    out = {f"{t}/{world.read[t]}" for t in COMPARTMENT if READ[role][t] == "Y"}
    out |= {world.restricted[name] for name, seen in RESTRICTED_SEEN.items() if role in seen}
    return out


def fixture_of(world: World) -> set[str]:
    return ({f"{t}/{world.read[t]}" for t in COMPARTMENT} | {world.restricted[n] for n in RESTRICTED_SEEN}
            | {f"{t}/{i}" for t, i in world.q_read.items()})


@pytest.mark.parametrize("role", ROLES)
async def test_everything(world: World, client, pg_uri, role: str) -> None:
    actor = world.actors[role]
    r = await client.get(f"/fhir/Patient/{world.p}/$everything", headers=actor.headers)
    assert r.status_code == EVERYTHING[role], r.text[:300]
    if r.status_code == 200:
        got = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json().get("entry", [])}
        assert got & fixture_of(world) == expected_of_p(world, role)
        assert audit_rows(pg_uri, actor.subject, "everything")[-1] == ("Patient", world.p, "0")
    # Q's record: never through P's relationships.
    r = await client.get(f"/fhir/Patient/{world.q}/$everything", headers=actor.headers)
    assert r.status_code == (200 if role in ("system", "system_patient_rs", "staff", "admin") else 403)


async def run_export(platform: Platform, client: httpx.AsyncClient, actor: Actor, query: str) -> tuple[int, dict[str, list[dict]]]:
    """Kick off ``Patient/$export``, run it, download its files: (kick-off status, {type: resources})."""
    r = await client.get(f"/fhir/Patient/$export{query}", headers={**actor.headers, "Prefer": "respond-async"})
    if r.status_code != 202:
        return r.status_code, {}
    status_url = r.headers["Content-Location"].removeprefix(BASE)
    worker = export.Worker(platform)
    for _ in range(200):
        await worker.run_once()
        s = await client.get(status_url, headers=actor.headers)
        if s.status_code == 200:
            break
        await asyncio.sleep(0.05)
    assert s.status_code == 200, s.text
    out: dict[str, list[dict]] = {}
    for f in s.json()["output"] + s.json()["error"]:
        d = await client.get(f["url"].removeprefix(BASE), headers=actor.headers)
        assert d.status_code == 200
        out.setdefault(f["type"], []).extend(orjson.loads(line) for line in d.text.splitlines() if line.strip())
    return 202, out


@pytest.mark.parametrize("role", ROLES)
async def test_export(world: World, client, platform, pg_uri, role: str) -> None:
    actor = world.actors[role]
    since = "_since=" + world.start.isoformat().replace("+00:00", "Z")
    types = "Patient,Observation,Condition,DocumentReference,Appointment,QuestionnaireResponse,Communication"
    status, files = await run_export(platform, client, actor, f"?{since}&_type={types}")
    assert status == EXPORT[role]
    if status != 202:
        assert (await client.get("/fhir/$export", headers={**actor.headers, "Prefer": "respond-async"})).status_code == 403
        return
    got = {f"{t}/{res['id']}" for t, items in files.items() if t != "OperationOutcome" for res in items}
    fixture = fixture_of(world) - {f"AuditEvent/{world.read['AuditEvent']}"}
    want = expected_of_p(world, role) - {f"AuditEvent/{world.read['AuditEvent']}"}
    if role.startswith("system"):
        # Every patient's record (within its scopes): Q's too.
        want |= {f"{t}/{i}" for t, i in world.q_read.items() if role == "system" or t == "Patient"}
    assert got & fixture == want
    if role == "system_patient_rs":
        assert "Observation" not in files and "OperationOutcome" in files  # named, not granted: said so
    assert [r for r in audit_rows(pg_uri, actor.subject, "export") if r[0] == "Patient"], "the export is audited"
    if role in ("patient", "proxy"):
        # Only the system exports the whole server.
        assert (await client.get("/fhir/$export", headers={**actor.headers, "Prefer": "respond-async"})).status_code == 403


# -- searches never reveal what the caller may not see -------------------------------------------------

async def bundle(client: httpx.AsyncClient, actor: Actor, path: str, params: dict | list) -> dict:
    r = await client.get(path, params=params, headers=actor.headers)
    assert r.status_code == 200, r.text
    return r.json()


def refs_of(b: dict, mode: str | None = None) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b.get("entry", [])
            if "resource" in e and e["resource"]["resourceType"] != "OperationOutcome" and (mode is None or e["search"]["mode"] == mode)}


async def test_include_by_a_patient_shows_only_their_own_patient(world: World, client) -> None:
    b = await bundle(client, world.actors["patient"], "/fhir/Observation",
                     {"_include": "Observation:subject", "_count": "1000"})
    assert refs_of(b, "include") == {f"Patient/{world.p}"}
    assert f"Observation/{world.read['Observation']}" in refs_of(b, "match")
    assert f"Observation/{world.q_read['Observation']}" not in refs_of(b)
    # Chasing another patient's resources by id through an include finds nothing either.
    b = await bundle(client, world.actors["patient"], "/fhir/Observation",
                     {"_id": world.q_read["Observation"], "_include": "Observation:subject"})
    assert b["total"] == 0 and refs_of(b) == set()


async def test_revinclude_without_relationship_shows_nothing(world: World, client) -> None:
    for role in ("pract_none", "pract_blocked", "proxy_inactive"):
        b = await bundle(client, world.actors[role], "/fhir/Patient",
                         {"_id": world.p, "_revinclude": "Observation:subject", "_total": "accurate"})
        assert b["total"] == 0 and refs_of(b) == set(), role
    # With a relationship: P's observations, without the restricted one written by someone else.
    b = await bundle(client, world.actors["pract_care"], "/fhir/Patient",
                     {"_id": world.p, "_revinclude": "Observation:subject"})
    inc = refs_of(b, "include")
    assert f"Observation/{world.read['Observation']}" in inc and world.restricted["obs_r_care"] in inc
    assert world.restricted["obs_r_emergency"] not in inc
    # Patient search by a practitioner: only the patients they care for.
    b = await bundle(client, world.actors["pract_care"], "/fhir/Patient", {"_id": f"{world.p},{world.q}"})
    assert refs_of(b) == {f"Patient/{world.p}"}


async def test_counts_equal_what_is_allowed(world: World, client) -> None:
    visible = {
        "patient": {world.read["Observation"], world.restricted["obs_r_care"], world.restricted["obs_r_emergency"],
                    world.restricted["obs_based_on_r"]},
        "proxy": {world.read["Observation"], world.restricted["obs_based_on_r"]},
        "pract_care": {world.read["Observation"], world.restricted["obs_r_care"], world.restricted["obs_based_on_r"]},
        "pract_emergency": {world.read["Observation"], world.restricted["obs_r_emergency"], world.restricted["obs_based_on_r"]},
        "pract_none": set(), "pract_blocked": set(), "proxy_inactive": set(),
    }
    fixture_obs = {f"Observation/{world.read['Observation']}", world.restricted["obs_r_care"],
                   world.restricted["obs_r_emergency"], world.restricted["obs_based_on_r"]}
    tag = bodies_for("Observation", world.p, "x", schedule="", practitioner="")["meta"]["tag"][0]["system"]
    for role, ids in visible.items():
        want = {i if i.startswith("Observation/") else f"Observation/{i}" for i in ids}
        b = await bundle(client, world.actors[role], "/fhir/Observation",
                         {"subject": f"Patient/{world.p}", "_count": "1000", "_tag": f"{tag}|"})
        got = refs_of(b, "match") & fixture_obs
        assert got == want, role
        # _summary=count counts what the caller may see, nothing else.
        everything = {f"Observation/{e['resource']['id']}" for e in b.get("entry", []) if e["search"]["mode"] == "match"}
        c = await bundle(client, world.actors[role], "/fhir/Observation",
                         {"subject": f"Patient/{world.p}", "_summary": "count", "_tag": f"{tag}|"})
        assert c["total"] == len(everything) and "entry" not in c, role
        # ... and the whole-system count as well.
        c = await bundle(client, world.actors[role], "/fhir/Observation", {"_id": ",".join(x.split("/")[1] for x in fixture_obs),
                                                                          "_summary": "count"})
        assert c["total"] == len(want), role


async def test_has_and_chains_reveal_nothing(world: World, client) -> None:
    p, q = f"Patient/{world.p}", f"Patient/{world.q}"
    care = world.practitioners["care"]
    # Directory searches are open to all, but _has must not tell who cares for whom.
    for role in ("pract_none", "pract_blocked", "patient", "staff", "admin", "proxy_inactive"):
        # A patient probes the other patient Q and their professional; the others, P and pract_care.
        target, dr = (q, world.practitioners["other"]) if role == "patient" else (p, care)
        b = await bundle(client, world.actors[role], "/fhir/Practitioner",
                         {"_has:CareTeam:participant:patient": target, "_total": "accurate"})
        assert b["total"] == 0, role
        if role != "staff":  # staff see every appointment: scheduling is their job
            b = await bundle(client, world.actors[role], "/fhir/Practitioner", {"_id": dr, "_has:Appointment:actor:actor": target})
            assert refs_of(b) == set(), role
    b = await bundle(client, world.actors["system"], "/fhir/Practitioner",
                     {"_id": world.practitioners["other"], "_has:Appointment:actor:actor": q})
    assert refs_of(b) == {f"Practitioner/{world.practitioners['other']}"}  # the probes above had something to find
    # With the relationship, the same search finds the professional.
    b = await bundle(client, world.actors["pract_care"], "/fhir/Practitioner", {"_has:CareTeam:participant:patient": p})
    assert f"Practitioner/{care}" in refs_of(b)
    # _has does not reveal a restricted item written by someone else.
    code = f"urn:authz|{world.obs_r_emergency_code}"
    for role, seen in (("pract_care", False), ("pract_emergency", True), ("patient", True), ("proxy", False)):
        b = await bundle(client, world.actors[role], "/fhir/Patient", {"_id": world.p, "_has:Observation:subject:code": code})
        assert (refs_of(b) == {p}) is seen, role
    # Nor does a chain through a restricted referral.
    chain = {"based-on:ServiceRequest.code": f"urn:authz|{world.sr_restricted_code}"}
    b = await bundle(client, world.actors["pract_care"], "/fhir/Observation", chain)
    assert refs_of(b) == set()
    b = await bundle(client, world.actors["patient"], "/fhir/Observation", chain)
    assert refs_of(b) == {world.restricted["obs_based_on_r"]}
    # A chain to another patient's identity from a patient finds nothing.
    ins = (await client.get(f"/fhir/Patient/{world.q}")).json()["identifier"][0]["value"]
    b = await bundle(client, world.actors["patient"], "/fhir/Observation", {"subject:Patient.identifier": ins})
    assert refs_of(b) == set()
    b = await bundle(client, world.actors["pract_none"], "/fhir/Observation",
                     {"subject:Patient.identifier": (await client.get(f"/fhir/Patient/{world.p}")).json()["identifier"][0]["value"]})
    assert refs_of(b) == set()


async def test_restricted_items_only_for_their_author_and_the_patient(world: World, client) -> None:
    for name, seen in RESTRICTED_SEEN.items():
        for role in ("patient", "proxy", "pract_care", "pract_emergency", "system"):
            rtype, rid = world.restricted[name].split("/")
            r = await client.get(f"/fhir/{rtype}/{rid}", headers=world.actors[role].headers)
            assert r.status_code == (200 if role in seen else 403), (name, role)
            b = await bundle(client, world.actors[role], f"/fhir/{rtype}", {"_id": rid})
            assert (refs_of(b) == {world.restricted[name]}) is (role in seen), (name, role)
    # The patient shows the letter again: professionals who care for them see it.
    doc = world.restricted["doc_masked"].split("/")[1]
    assert (await client.post(f"/fhir/DocumentReference/{doc}/$unhide", headers=world.actors["patient"].headers)).status_code == 200
    assert (await client.get(f"/fhir/DocumentReference/{doc}", headers=world.actors["pract_care"].headers)).status_code == 200
    assert (await client.post(f"/fhir/DocumentReference/{doc}/$hide", headers=world.actors["patient"].headers)).status_code == 200
    assert (await client.get(f"/fhir/DocumentReference/{doc}", headers=world.actors["pract_care"].headers)).status_code == 403
    # Hiding is the patient's: not a professional's, not for another patient's document, not for other types.
    r = await client.post(f"/fhir/DocumentReference/{doc}/$unhide", headers=world.actors["pract_care"].headers)
    assert r.status_code == 403
    r = await client.post(f"/fhir/DocumentReference/{world.q_read['DocumentReference']}/$hide", headers=world.actors["patient"].headers)
    assert r.status_code == 403
    # A professional may not strip a restricted label through an update of what they cannot see.
    body = (await client.get(f"/fhir/DocumentReference/{doc}")).json()
    body["meta"].pop("security")
    r = await client.put(f"/fhir/DocumentReference/{doc}", json=body, headers={**JSON, **world.actors["pract_care"].headers})
    assert r.status_code == 403


# -- care relationships, proxies, blocks, emergency access ----------------------------------------------------

RELATIONSHIPS = {"ct": 200, "ct_inactive": 403, "appt": 200, "appt_old": 403, "appt_cancelled": 403, "enc": 200,
                 "enc_old": 403, "enc_cancelled": 403, "sr": 200, "sr_revoked": 403, "task": 200, "task_cancelled": 403}


async def test_each_kind_of_care_relationship(world: World, client) -> None:
    got = {}
    for name in RELATIONSHIPS:
        r = await client.get(f"/fhir/Observation/{world.rel_obs}", headers=world.actors[f"rel_{name}"].headers)
        got[name] = r.status_code
    assert got == RELATIONSHIPS
    # The CareTeam member reaches only that patient.
    r = await client.get(f"/fhir/Observation/{world.read['Observation']}", headers=world.actors["rel_ct"].headers)
    assert r.status_code == 403


async def test_relationship_ends_with_its_status(world: World, client, platform) -> None:
    pid = await create(client, {"resourceType": "Patient", "name": [{"family": "Authz-Fin"}]})
    obs = await create(client, bodies_for("Observation", pid, uniq("end"), schedule="", practitioner=""))
    cases = []
    for kind in ("CareTeam", "Appointment", "Encounter", "ServiceRequest", "Task"):
        dr = await create(client, {"resourceType": "Practitioner", "name": [{"family": f"Fin-{kind}"}]})
        who, patient = ref("Practitioner", dr), ref("Patient", pid)
        body = {
            "CareTeam": {"resourceType": "CareTeam", "status": "active", "subject": patient, "participant": [{"member": who}]},
            "Appointment": {"resourceType": "Appointment", "status": "booked", "start": _iso(datetime.now(UTC) + timedelta(days=1)),
                            "end": _iso(datetime.now(UTC) + timedelta(days=1, minutes=15)),
                            "participant": [{"actor": patient, "status": "accepted"}, {"actor": who, "status": "accepted"}]},
            "Encounter": {"resourceType": "Encounter", "status": "in-progress", "subject": patient, "participant": [{"individual": who}],
                          "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}},
            "ServiceRequest": {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": patient,
                               "performer": [who]},
            "Task": {"resourceType": "Task", "status": "requested", "intent": "order", "for": patient, "owner": who},
        }[kind]
        rid = await create(client, body)
        actor = token(platform, f"end-{kind}", "practitioner", f"Practitioner/{dr}")
        cases.append((kind, rid, body, actor))
    ended = {"CareTeam": "inactive", "Appointment": "cancelled", "Encounter": "cancelled", "ServiceRequest": "revoked",
             "Task": "cancelled"}
    for kind, rid, body, actor in cases:
        assert (await client.get(f"/fhir/Observation/{obs}", headers=actor.headers)).status_code == 200, kind
        r = await client.put(f"/fhir/{kind}/{rid}", json={**body, "id": rid, "status": ended[kind]}, headers=JSON)
        assert r.status_code == 200, r.text
        assert (await client.get(f"/fhir/Observation/{obs}", headers=actor.headers)).status_code == 403, kind


async def test_proxies(world: World, client, platform) -> None:
    obs = f"/fhir/Observation/{world.read['Observation']}"
    assert (await client.get(obs, headers=world.actors["proxy"].headers)).status_code == 200
    assert (await client.get(obs, headers=world.actors["proxy_inactive"].headers)).status_code == 403
    # A delegation ends when its RelatedPerson becomes inactive.
    rp = await create(client, {"resourceType": "RelatedPerson", "active": True, "patient": ref("Patient", world.p)})
    actor = token(platform, "proxy-ending", "proxy", f"RelatedPerson/{rp}")
    assert (await client.get(obs, headers=actor.headers)).status_code == 200
    r = await client.put(f"/fhir/RelatedPerson/{rp}", json={"resourceType": "RelatedPerson", "id": rp, "active": False,
                                                            "patient": ref("Patient", world.p)}, headers=JSON)
    assert r.status_code == 200
    assert (await client.get(obs, headers=actor.headers)).status_code == 403
    # The proxy of P does not reach Q.
    r = await client.get(f"/fhir/Observation/{world.q_read['Observation']}", headers=world.actors["proxy"].headers)
    assert r.status_code == 403


async def test_a_blocked_professional_keeps_nothing(world: World, client, platform) -> None:
    actor = world.actors["pract_blocked"]
    # Not even what they wrote themselves before the block, nor an emergency access.
    pid = await create(client, {"resourceType": "Patient", "name": [{"family": "Authz-Bloque"}]})
    dr = world.practitioners["blocked"]
    await create(client, {"resourceType": "CareTeam", "status": "active", "subject": ref("Patient", pid),
                          "participant": [{"member": ref("Practitioner", dr)}]})
    mine = await create(client, bodies_for("Observation", pid, uniq("mine"), schedule="", practitioner=""), actor.headers)
    assert (await client.get(f"/fhir/Observation/{mine}", headers=actor.headers)).status_code == 200
    patient = token(platform, "blocking-patient", "patient", f"Patient/{pid}")
    r = await client.post("/fhir/Consent", headers={**JSON, **patient.headers}, json={
        "resourceType": "Consent", "status": "active", "patient": ref("Patient", pid),
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "actor": [{"role": {"text": "professional"}, "reference": ref("Practitioner", dr)}]}})
    assert r.status_code == 201, r.text
    assert (await client.get(f"/fhir/Observation/{mine}", headers=actor.headers)).status_code == 403
    b = await bundle(client, actor, "/fhir/Observation", {"_id": mine})
    assert refs_of(b) == set()
    r = await client.post(f"/fhir/Patient/{pid}/$emergency-access", headers={**JSON, **actor.headers}, json={
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "Urgence vitale, patient inconscient"}]})
    assert r.status_code == 403


async def test_emergency_access(world: World, client, platform, pg_uri) -> None:
    pid = await create(client, {"resourceType": "Patient", "name": [{"family": "Authz-Urgence"}]})
    obs = await create(client, bodies_for("Observation", pid, uniq("urg"), schedule="", practitioner=""))
    actor = token(platform, "urgentist", "practitioner", f"Practitioner/{world.practitioners['none']}")
    url = f"/fhir/Patient/{pid}/$emergency-access"

    def params(reason: str, minutes: int | None = None) -> dict:
        p = [{"name": "reason", "valueString": reason}]
        if minutes is not None:
            p.append({"name": "minutes", "valueInteger": minutes})
        return {"resourceType": "Parameters", "parameter": p}

    assert (await client.get(f"/fhir/Observation/{obs}", headers=actor.headers)).status_code == 403
    # A reason is required; patients, staff and system clients do not break the glass.
    assert (await client.post(url, json=params("vite"), headers={**JSON, **actor.headers})).status_code == 400
    assert (await client.post(url, json={"resourceType": "Parameters"}, headers={**JSON, **actor.headers})).status_code == 400
    for role in ("patient", "staff", "admin", "system"):
        r = await client.post(url, json=params("Urgence vitale, patient inconscient"), headers={**JSON, **world.actors[role].headers})
        assert r.status_code == 403, role
    r = await client.post(f"/fhir/Patient/{uniq('missing')}/$emergency-access", json=params("Urgence vitale, patient inconscient"),
                          headers={**JSON, **actor.headers})
    assert r.status_code == 404
    reason = "Arrêt cardiaque, dossier nécessaire " + uniq("")
    r = await client.post(url, json=params(reason, 30), headers={**JSON, **actor.headers})
    assert r.status_code == 200, r.text
    out = {p["name"]: p for p in r.json()["parameter"]}
    until = datetime.fromisoformat(out["until"]["valueDateTime"])
    assert timedelta(minutes=29) < until - datetime.now(UTC) <= timedelta(minutes=30)
    assert out["reason"]["valueString"] == reason
    assert (await client.get(f"/fhir/Observation/{obs}", headers=actor.headers)).status_code == 200
    # Audited with its reason, and shown to the patient among the AuditEvents of their record.
    with psycopg.connect(pg_uri) as conn:
        rows = conn.execute("SELECT outcome, purpose, detail->>'reason', patients FROM audit_log WHERE agent = %s "
                            "AND action = 'emergency-access' ORDER BY seq", (actor.subject,)).fetchall()
    assert rows[-1] == ("0", "BTG", reason, [f"Patient/{pid}"])
    assert [r for r in rows if r[0] == "4"], "the refused attempts are audited too"
    patient = token(platform, "urgence-patient", "patient", f"Patient/{pid}")
    b = await bundle(client, patient, "/fhir/AuditEvent", {"patient": f"Patient/{pid}", "_count": "200"})
    btg = [e["resource"] for e in b["entry"] if e["resource"].get("purposeOfEvent")]
    assert btg and btg[0]["purposeOfEvent"][0]["text"] == reason
    assert btg[0]["agent"][0]["who"]["reference"] == f"Practitioner/{world.practitioners['none']}"
    # The patient's AuditEvents name no other patient, even for searches that found several.
    for e in b["entry"]:
        named = {x["what"]["reference"] for x in e["resource"].get("entity", []) if x.get("role", {}).get("code") == "1"}
        assert named <= {f"Patient/{pid}"}
    # Professionals do not read the audit trail.
    r = await client.get("/fhir/AuditEvent", params={"patient": f"Patient/{pid}"}, headers=actor.headers)
    assert r.status_code == 403


async def test_a_multi_patient_search_is_split_per_patient_in_the_trail(world: World, client, platform) -> None:
    # A system search that finds P and Q: P's access history shows it, without naming Q.
    system = world.actors["system"]
    await bundle(client, system, "/fhir/Patient", {"_id": f"{world.p},{world.q}"})
    b = await bundle(client, world.actors["patient"], "/fhir/AuditEvent", {"patient": f"Patient/{world.p}", "_count": "1000"})
    searches = [e["resource"] for e in b["entry"] if e["resource"]["agent"][0]["who"].get("display") == system.subject
                and e["resource"]["subtype"][0]["code"] == "search-type"]
    assert searches
    for e in searches:
        named = {x["what"]["reference"] for x in e.get("entity", []) if x.get("role", {}).get("code") == "1"}
        assert named == {f"Patient/{world.p}"}
    # Q's history has the same search, naming Q only.
    q = token(platform, "patient-q", "patient", f"Patient/{world.q}")
    b = await bundle(client, q, "/fhir/AuditEvent", {"patient": f"Patient/{world.q}", "_count": "1000"})
    named = [{x["what"]["reference"] for x in e["resource"].get("entity", []) if x.get("role", {}).get("code") == "1"}
             for e in b["entry"] if e["resource"]["agent"][0]["who"].get("display") == system.subject]
    assert named and all(n == {f"Patient/{world.q}"} for n in named)


# -- writes of patients, professionals' directory entries -------------------------------------------------------

async def test_patients_change_what_they_wrote(world: World, client) -> None:
    actor = world.actors["patient"]
    body = bodies_for("DocumentReference", world.p, uniq("mine"), schedule="", practitioner="")
    rid = await create(client, body, actor.headers)
    r = await client.put(f"/fhir/DocumentReference/{rid}", json={**body, "id": rid, "description": "Corrigé"},
                         headers={**JSON, **actor.headers})
    assert r.status_code == 200
    # Not into another patient's record.
    r = await client.put(f"/fhir/DocumentReference/{rid}", json={**body, "id": rid, "subject": ref("Patient", world.q)},
                         headers={**JSON, **actor.headers})
    assert r.status_code == 403
    assert (await client.delete(f"/fhir/DocumentReference/{rid}", headers=actor.headers)).status_code == 200
    # A professional moves nothing into the record of a patient they do not care for.
    care = world.actors["pract_care"]
    obs = bodies_for("Observation", world.p, uniq("move"), schedule="", practitioner="")
    oid = await create(client, obs, care.headers)
    r = await client.put(f"/fhir/Observation/{oid}", json={**obs, "id": oid, "subject": ref("Patient", world.q)},
                         headers={**JSON, **care.headers})
    assert r.status_code == 403


async def test_professionals_change_only_their_own_directory_entry(world: World, client) -> None:
    actor = world.actors["pract_care"]
    me = (await client.get(f"/fhir/Practitioner/{world.practitioners['care']}")).json()
    me["telecom"] = [{"system": "phone", "value": "+33 1 23 45 67 89"}]
    r = await client.put(f"/fhir/Practitioner/{me['id']}", json=me, headers={**JSON, **actor.headers})
    assert r.status_code == 200, r.text
    other = (await client.get(f"/fhir/Practitioner/{world.practitioners['other']}")).json()
    r = await client.put(f"/fhir/Practitioner/{other['id']}", json=other, headers={**JSON, **actor.headers})
    assert r.status_code == 403
    # Their PractitionerRole: theirs to update, not to hand to someone else.
    role = await create(client, {"resourceType": "PractitionerRole", "practitioner": ref("Practitioner", world.practitioners["care"])})
    body = {"resourceType": "PractitionerRole", "id": role, "practitioner": ref("Practitioner", world.practitioners["care"]),
            "active": True}
    assert (await client.put(f"/fhir/PractitionerRole/{role}", json=body, headers={**JSON, **actor.headers})).status_code == 200
    body["practitioner"] = ref("Practitioner", world.practitioners["other"])
    assert (await client.put(f"/fhir/PractitionerRole/{role}", json=body, headers={**JSON, **actor.headers})).status_code == 403


async def test_appointments_need_a_relationship_to_be_seen_or_booked_by_a_professional(world: World, client) -> None:
    none = world.actors["pract_none"]
    # Another patient's appointment (with another professional) is no business of theirs.
    assert (await client.get(f"/fhir/Appointment/{world.q_read['Appointment']}", headers=none.headers)).status_code == 403
    b = await bundle(client, none, "/fhir/Appointment", {"patient": f"Patient/{world.q}"})
    assert refs_of(b) == set()
    # A professional cannot open a record by booking themselves an appointment with the patient.
    body = bodies_for("Appointment", world.q, uniq("self"), schedule="", practitioner=world.practitioners["none"])
    r = await client.post("/fhir/Appointment", json=body, headers={**JSON, **none.headers})
    assert r.status_code == 403
    # Their own agenda: an appointment naming them, even cancelled, is theirs to see.
    body["status"] = "cancelled"
    aid = await create(client, body)
    assert (await client.get(f"/fhir/Appointment/{aid}", headers=none.headers)).status_code == 200
    b = await bundle(client, none, "/fhir/Appointment", {"_id": aid})
    assert refs_of(b) == {f"Appointment/{aid}"}
    # ... without opening the patient's record.
    assert (await client.get(f"/fhir/Observation/{world.q_read['Observation']}", headers=none.headers)).status_code == 403


async def test_subscriptions_are_set_up_by_system_clients_only(world: World, client) -> None:
    body = bodies_for("Subscription", world.p, uniq("sub"), schedule="", practitioner="")
    for role in ("patient", "pract_care", "staff", "admin"):
        r = await client.post("/fhir/Subscription", json=body, headers={**JSON, **world.actors[role].headers})
        assert r.status_code == 403, role
        b = await bundle(client, world.actors[role], "/fhir/Subscription", {"_id": world.read["Subscription"]}) \
            if READ[role]["Subscription"] != "x" else None
        assert b is None or refs_of(b) == set()


# -- sign-in and sign-out are audited; user tokens from accounts behave as the matrix says ----------------------

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


async def test_signin_signout_and_failed_attempts_are_audited(world: World, app, platform, pg_uri) -> None:
    from tests.accounts_helpers import PASSWORD, new_account, random_ip

    acct = await new_account(platform, "patient", f"Patient/{world.p}")
    transport = httpx.ASGITransport(app=app, client=(random_ip(), 40000))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        page = await c.get("/signin")
        csrf = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
        r = await c.post("/signin", data={"email": acct.email, "password": "wrong password!", "csrf_token": csrf})
        assert r.status_code == 401
        r = await c.post("/signin", data={"email": acct.email, "password": PASSWORD, "csrf_token": csrf})
        assert r.status_code == 303
        portal = await c.get("/portal")
        assert portal.status_code == 200
        r = await c.post("/signout", data={"csrf_token": CSRF_RE.search(portal.text).group(1)})  # type: ignore[union-attr]
        assert r.status_code == 303
    with psycopg.connect(pg_uri) as conn:
        rows = conn.execute("SELECT action, outcome, agent FROM audit_log WHERE agent IN (%s, %s) AND action IN ('login', 'logout') "
                            "ORDER BY seq", (acct.id, acct.email)).fetchall()
    assert rows == [("login", "4", acct.email), ("login", "0", acct.id), ("logout", "0", acct.id)]


async def test_a_token_from_an_account_gets_the_patient_row(world: World, client, platform) -> None:
    from parcours.services import accounts
    from tests.accounts_helpers import new_account

    acct = await new_account(platform, "patient", f"Patient/{world.p}")
    async with platform.pool.connection() as conn:
        tok = await accounts.issue_user_token(platform, conn, acct.email, None, 600)
    headers = {"Authorization": f"Bearer {tok}"}
    got = {t: (await client.get(f"/fhir/{t}/{world.read[t]}", headers=headers)).status_code for t in TYPES}
    assert got == {t: status_of(READ["patient"][t], 200) for t in TYPES}
