"""Tele-expertise: a professional asks a named specialist, or a specialty pool, for an opinion about a patient.

Pools: a request may name a specialty (TRE_R38, ``performerType`` of the Task and the
ServiceRequest; optionally restricted to one Organization, the ``POOL_ORG_EXT`` extension
of the Task) instead of an expert. It has no ``owner`` until a practitioner whose
PractitionerRole has that specialty (and that organization) accepts it: the accept runs
under the Task's row lock, so of two claimers exactly one becomes the owner; the other
gets a 409 that says the request was taken.

FHIR shape: a ``ServiceRequest`` (the clinical question, urgency, the patient's consent
as an extension, attachments as ``DocumentReference`` in ``supportingInfo``) and a
``Task`` that carries the workflow (``focus`` = the request, ``owner`` = the expert,
``restriction.period.end`` = the due date). Only the transitions of ``TRANSITIONS``
are allowed; the update is conditional on the version read, so two concurrent
transitions cannot both win. The expert's opinion is a ``DocumentReference`` of the
patient's record, put in ``Task.output``; questions back and forth are
``Communication`` resources ``partOf`` the Task. Every read and write goes through
the caller's Repository (the Task owner gets access to the patient, ``store.care``),
except the Task itself: R4 puts Task outside the patient compartment, and the access
policy lets only a clinical resource's author reach such resources, which a new Task
never counts as. So ``access_task`` is the one door to a Task: it reads it with the
platform's Repository and lets only its requester and its owner through; Task writes
are audited as the platform's, after the caller's own reads of the patient.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from parcours.core.errors import Conflict, Forbidden, NotFound, Unprocessable
from parcours.services.directory.nomenclatures import SPECIALTY_SYSTEM, nomenclatures
from parcours.services.platform import Platform
from parcours.services.records import documents, uploads
from parcours.store.repository import Repository

CONSENT_EXT = "https://parcours.example/fhir/StructureDefinition/patient-consent-recorded"
KIND = {"text": "Téléexpertise"}
PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})
TERMINAL = frozenset({"completed", "rejected", "cancelled"})
# status -> {next status: who may do it}
TRANSITIONS: dict[str, dict[str, str]] = {
    "requested": {"accepted": "expert", "rejected": "expert", "cancelled": "requester"},
    "accepted": {"in-progress": "expert", "rejected": "expert", "cancelled": "requester"},
    "in-progress": {"completed": "expert", "cancelled": "requester"},
}
POOL_ORG_EXT = "https://parcours.example/fhir/StructureDefinition/expertise-pool-organization"
TELEHEALTH_REQUEST_DOC = "75496-0"  # LOINC, "Demande d'acte de télémédecine" (records.codes)
REMINDER_EXT = "https://parcours.example/fhir/StructureDefinition/expertise-reminder-sent"
REQUEST_STATUS = {"completed": "completed", "rejected": "revoked", "cancelled": "revoked"}


@dataclass(frozen=True)
class Attachment:
    """A photo or document sent with a request, already through the record's upload checks
    (``records.documents.check``: real type sniffed, size, structure, malware scan)."""

    title: str
    data: bytes
    checked: uploads.Inspected

    @property
    def content_type(self) -> str:
        return self.checked.content_type


def _ref(resource: dict, key: str) -> str | None:
    return (resource.get(key) or {}).get("reference")


def pool_specialty(task: dict) -> str | None:
    """The TRE_R38 code a pool request is addressed to (None for a named expert)."""
    for cc in task.get("performerType") or []:
        for c in cc.get("coding") or []:
            if c.get("system") == SPECIALTY_SYSTEM and c.get("code"):
                return str(c["code"])
    return None


def pool_organization(task: dict) -> str | None:
    for e in task.get("extension") or []:
        if e.get("url") == POOL_ORG_EXT:
            return (e.get("valueReference") or {}).get("reference")
    return None


async def my_roles(repo: Repository) -> list[tuple[str, str | None]]:
    """(specialty code, organization reference) of the caller's active PractitionerRoles."""
    me = repo.caller.fhir_user
    if repo.caller.kind != "practitioner" or not me or not me.startswith("Practitioner/"):
        return []
    req = repo.parse_search("PractitionerRole", [("practitioner", me), ("_count", "100")])
    out: list[tuple[str, str | None]] = []
    # The platform reads the caller's own roles (the directory is public anyway).
    for s in (await repo.as_platform().search(req)).matches:
        role = s.resource()
        if role.get("active") is False:
            continue
        org = _ref(role, "organization")
        for cc in role.get("specialty") or []:
            for c in cc.get("coding") or []:
                if c.get("system") == SPECIALTY_SYSTEM and c.get("code"):
                    out.append((str(c["code"]), org))
    return out


def in_pool(task: dict, roles: list[tuple[str, str | None]]) -> bool:
    code, org = pool_specialty(task), pool_organization(task)
    return code is not None and any(c == code and (org is None or o == org) for c, o in roles)


async def access_task(repo: Repository, task_id: str, *, lock: bool = False) -> tuple[dict, str]:
    """The Task of a tele-expertise and the caller's side in it ("requester", "expert", or "pool"
    for a member of the specialty pool of a request nobody has taken yet)."""
    platform = repo.as_platform()
    if lock:
        task = await platform.lock("Task", task_id)
    else:
        try:
            task = (await platform.read("Task", task_id)).resource()
        except NotFound:
            task = None
    mine = await _me(repo)
    if task is None or task.get("code") != KIND:
        raise NotFound(f"No tele-expertise {task_id}")
    if _ref(task, "owner") in mine:
        return task, "expert"
    if _ref(task, "requester") in mine:
        return task, "requester"
    if pool_specialty(task) and in_pool(task, await my_roles(repo)):
        if _ref(task, "owner") is None and task.get("status") == "requested":
            return task, "pool"
        if lock:  # the loser of a claim: say so rather than pretend the request vanished
            raise Conflict("Another specialist has already taken this tele-expertise request")
    raise NotFound(f"No tele-expertise {task_id}")  # not even its existence for others


async def _me(repo: Repository) -> set[str]:
    ctx = await repo.care()
    return set(ctx.identities) | ({repo.caller.fhir_user} if repo.caller.fhir_user else set())


def _doc(patient: str, author: str, title: str, content_type: str, data: bytes, now: datetime, loinc: str | None = None) -> dict:
    body: dict = {"resourceType": "DocumentReference", "status": "current", "subject": {"reference": patient},
                  "date": now.isoformat(), "author": [{"reference": author}], "description": title,
                  "content": [{"attachment": {"contentType": content_type, "title": title, "data": base64.b64encode(data).decode()}}]}
    if loinc:
        body["type"] = {"coding": [{"system": "http://loinc.org", "code": loinc}]}
    return body


async def request_opinion(platform: Platform, repo: Repository, *, patient: str, expert: str | None = None, question: str, priority: str, due: datetime,
                          consent: bool, now: datetime, attachments: list[Attachment] = [], specialty: str | None = None,
                          organization: str | None = None) -> str:
    """To a named ``expert`` (Practitioner or PractitionerRole) or to the pool of a ``specialty``
    (TRE_R38 code), optionally only its members working for ``organization``. Returns the Task id."""
    me = repo.caller.fhir_user
    if repo.caller.kind != "practitioner" or not me:
        raise Forbidden("Only professionals ask for a tele-expertise")
    if not consent:
        raise Unprocessable("The patient's consent to the tele-expertise must be recorded first")
    if priority not in PRIORITIES:
        raise Unprocessable(f"Unknown urgency {priority!r}")
    if not question.strip():
        raise Unprocessable("The clinical question is empty")
    if bool(expert) == bool(specialty):
        raise Unprocessable("Address the request either to a named expert or to a specialty pool")
    if expert and not expert.startswith(("Practitioner/", "PractitionerRole/")):
        raise Unprocessable("The expert is a Practitioner or PractitionerRole reference")
    concept = nomenclatures().specialties.get(specialty) if specialty else None
    if specialty and concept is None:
        raise Unprocessable(f"Unknown specialty {specialty!r} (TRE_R38)")
    if organization and not organization.startswith("Organization/"):
        raise Unprocessable("The pool's organization is an Organization reference")
    if due <= now:
        raise Unprocessable("The due date must be in the future")
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    await repo.read("Patient", patient.split("/", 1)[1])  # the requester must reach the patient
    if expert:
        await repo.read(*expert.split("/", 1))
    if organization:
        await repo.read(*organization.split("/", 1))
    performer_type = [{"coding": [concept.coding()], "text": concept.label("fr")}] if concept else None
    # Attachments go to the patient's record like any upload: content encrypted in the blob
    # store, checksum kept, exact duplicates recognised, text searchable.
    docs = [(await documents.add(platform, repo, documents.NewDocument(
        patient_id=patient.split("/", 1)[1], data=a.data, filename=a.title, title=a.title, type_code=TELEHEALTH_REQUEST_DOC),
        scanner=uploads.NoScanner(), checked=a.checked, notify=False)).stored.id for a in attachments]
    sr = (await repo.create("ServiceRequest", {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": priority,
        "code": KIND, "subject": {"reference": patient}, "requester": {"reference": me},
        "authoredOn": now.isoformat(), "note": [{"text": question.strip()}],
        **({"supportingInfo": [{"reference": f"DocumentReference/{d}"} for d in docs]} if docs else {}),
        "extension": [{"url": CONSENT_EXT, "valueBoolean": True}],
        **({"performer": [{"reference": expert}]} if expert else {}),
        **({"performer": [{"reference": organization}]} if organization else {}),
        **({"performerType": performer_type[0]} if performer_type else {}),
    })).stored.id
    task: dict = {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": priority, "code": KIND,
        "description": question.strip(), "focus": {"reference": f"ServiceRequest/{sr}"}, "for": {"reference": patient},
        "requester": {"reference": me}, "authoredOn": now.isoformat(),
        "lastModified": now.isoformat(), "restriction": {"period": {"end": due.isoformat()}},
    }
    if expert:
        task["owner"] = {"reference": expert}
    else:
        task["performerType"] = performer_type
        if organization:
            task["extension"] = [{"url": POOL_ORG_EXT, "valueReference": {"reference": organization}}]
    return (await repo.as_platform().create("Task", task)).stored.id


async def transition(repo: Repository, task_id: str, to: str, now: datetime, *, reason: str | None = None,
                     output: str | None = None) -> dict:
    task, party = await access_task(repo, task_id, lock=True)  # row lock: concurrent transitions queue here
    current = task.get("status", "")
    allowed = TRANSITIONS.get(current, {})
    if to not in allowed:
        raise Conflict(f"A tele-expertise cannot go from {current!r} to {to!r}")
    if party == "pool" and to == "accepted":
        # The claim: the row is locked and the Task had no owner, so this caller wins it.
        task["owner"] = {"reference": repo.caller.fhir_user}
        party = "expert"
    if party != allowed[to]:
        raise Forbidden(f"Only the {allowed[to]} of this tele-expertise may set it {to!r}")
    if to == "completed" and not output:
        raise Unprocessable("A tele-expertise is completed by giving the opinion")
    task["status"] = to
    task["lastModified"] = now.isoformat()
    if reason:
        task["statusReason"] = {"text": str(reason)[:500]}
    if output:
        task.setdefault("output", []).append({"type": {"text": "Avis"}, "valueReference": {"reference": output}})
    await repo.as_platform().update("Task", task_id, task)
    if to in REQUEST_STATUS and (focus := _ref(task, "focus")):
        sr_stored = await repo.read(*focus.split("/", 1))
        sr = sr_stored.resource()
        sr["status"] = REQUEST_STATUS[to]
        await repo.update("ServiceRequest", sr_stored.id, sr, if_match=f'W/"{sr_stored.version_id}"')
    return task


@dataclass(frozen=True)
class Opinion:
    """The expert's structured answer."""
    conclusion: str
    recommendations: str = ""
    consultation_needed: bool = False
    follow_up: str = ""

    def text(self) -> str:
        """The document as it goes to the shared record (French: the record's language)."""
        parts = ["Avis de téléexpertise", "", "Réponse / conclusion :", self.conclusion.strip()]
        if self.recommendations.strip():
            parts += ["", "Recommandations :", self.recommendations.strip()]
        parts += ["", "Consultation spécialisée nécessaire : " + ("oui" if self.consultation_needed else "non")]
        if self.follow_up.strip():
            parts += ["", "Suivi :", self.follow_up.strip()]
        return "\n".join(parts) + "\n"


OPINION_EXT = "https://parcours.example/fhir/StructureDefinition/expertise-opinion"


async def answer(repo: Repository, task_id: str, opinion: Opinion | str, now: datetime) -> str:
    """The expert's opinion: a DocumentReference of the patient's record; the Task is completed."""
    if isinstance(opinion, str):
        opinion = Opinion(conclusion=opinion)
    task, party = await access_task(repo, task_id)
    if party != "expert":
        raise Forbidden("Only the expert gives the opinion")
    if not opinion.conclusion.strip():
        raise Unprocessable("The opinion's answer (conclusion) is empty")
    if task.get("status") != "in-progress":
        raise Conflict("Start the tele-expertise (in-progress) before giving the opinion")
    me = repo.caller.fhir_user or ""
    body = _doc(_ref(task, "for") or "", me, "Avis de téléexpertise", "text/plain",
                opinion.text().encode(), now, loinc="11488-4")
    # The fields again, machine-readable, for the pages and for systems that read the record.
    body["extension"] = [{"url": OPINION_EXT, "extension": [
        {"url": "conclusion", "valueString": opinion.conclusion.strip()},
        *([{"url": "recommendations", "valueString": opinion.recommendations.strip()}] if opinion.recommendations.strip() else []),
        {"url": "consultationNeeded", "valueBoolean": opinion.consultation_needed},
        *([{"url": "followUp", "valueString": opinion.follow_up.strip()}] if opinion.follow_up.strip() else []),
    ]}]
    if focus := _ref(task, "focus"):
        body["context"] = {"related": [{"reference": focus}]}
    doc = (await repo.create("DocumentReference", body)).stored.id
    await transition(repo, task_id, "completed", now, output=f"DocumentReference/{doc}")
    return doc


def opinion_of(doc: dict) -> Opinion | None:
    for e in doc.get("extension") or []:
        if e.get("url") == OPINION_EXT:
            f = {x.get("url"): x for x in e.get("extension") or []}
            return Opinion(conclusion=(f.get("conclusion") or {}).get("valueString", ""),
                           recommendations=(f.get("recommendations") or {}).get("valueString", ""),
                           consultation_needed=bool((f.get("consultationNeeded") or {}).get("valueBoolean")),
                           follow_up=(f.get("followUp") or {}).get("valueString", ""))
    return None


async def ask(repo: Repository, task_id: str, text: str, now: datetime) -> str:
    """A message of the thread (either side), as a Communication partOf the Task."""
    task, party = await access_task(repo, task_id)
    requester, owner = _ref(task, "requester"), _ref(task, "owner")
    if task.get("status") in TERMINAL:
        raise Conflict("This tele-expertise is closed")
    if not text.strip():
        raise Unprocessable("The message is empty")
    if party == "pool" or owner is None:
        raise Conflict("No expert has taken this tele-expertise yet: accept it first")
    to = owner if party == "requester" else requester
    return (await repo.create("Communication", {
        "resourceType": "Communication", "status": "completed", "partOf": [{"reference": f"Task/{task_id}"}],
        "subject": task.get("for"), "sender": {"reference": repo.caller.fhir_user}, "recipient": [{"reference": to}],
        "sent": now.isoformat(), "payload": [{"contentString": text.strip()}],
    })).stored.id


async def thread(repo: Repository, task_id: str) -> list[dict]:
    await access_task(repo, task_id)
    req = repo.parse_search("Communication", [("part-of", f"Task/{task_id}"), ("_sort", "sent"), ("_count", "200")])
    return [s.resource() for s in (await repo.search(req)).matches]


async def pool(repo: Repository) -> list[dict]:
    """Requests waiting in the pools of the caller's specialties (nobody has taken them yet)."""
    roles = await my_roles(repo)
    if not roles:
        return []
    req = repo.parse_search("Task", [("owner:missing", "true"), ("status", "requested"), ("code:text", KIND["text"]),
                                     ("_sort", "-_lastUpdated"), ("_count", "500")])
    # The platform searches; only the pool requests of the caller's specialties come out.
    return [t for s in (await repo.as_platform().search(req)).matches if in_pool(t := s.resource(), roles)]


async def lists(repo: Repository) -> dict[str, list[dict]]:
    """The caller's requests (``sent``), those addressed to them (``received``) and their pools' (``pool``)."""
    mine = sorted(await _me(repo))
    out: dict[str, list[dict]] = {}
    for side, param in (("sent", "requester"), ("received", "owner")):
        req = repo.parse_search("Task", [(param, ",".join(mine)), ("code:text", KIND["text"]), ("_sort", "-_lastUpdated"), ("_count", "200")])
        # The platform searches, but only among the Tasks that name the caller on that side.
        out[side] = [s.resource() for s in (await repo.as_platform().search(req)).matches]
    out["pool"] = await pool(repo)
    return out


def counters(tasks: list[dict], now: datetime) -> dict[str, int]:
    c: dict[str, int] = {}
    for t in tasks:
        c[t.get("status", "")] = c.get(t.get("status", ""), 0) + 1
        due = ((t.get("restriction") or {}).get("period") or {}).get("end")
        if due and t.get("status") not in TERMINAL and datetime.fromisoformat(due) < now:
            c["overdue"] = c.get("overdue", 0) + 1
    return c


async def timeline(repo: Repository, task_id: str) -> list[dict]:
    """The status steps of a tele-expertise, oldest first: ``{"status", "at", "reason"}``."""
    await access_task(repo, task_id)
    versions = await repo.as_platform().history("Task", task_id, since=None, count=100)
    steps: list[dict] = []
    for v in sorted((v.resource() for v in versions if v.resource()), key=lambda t: t.get("lastModified") or ""):
        if not steps or steps[-1]["status"] != v.get("status"):
            steps.append({"status": v.get("status"), "at": v.get("lastModified") or "",
                          "reason": (v.get("statusReason") or {}).get("text", "")})
    return steps
