"""Tele-expertise: a professional asks a named specialist for an opinion about a patient.

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
REQUEST_STATUS = {"completed": "completed", "rejected": "revoked", "cancelled": "revoked"}


@dataclass(frozen=True)
class Attachment:
    content_type: str
    title: str
    data: bytes


def _ref(resource: dict, key: str) -> str | None:
    return (resource.get(key) or {}).get("reference")


async def access_task(repo: Repository, task_id: str, *, lock: bool = False) -> tuple[dict, str]:
    """The Task of a tele-expertise and the caller's side in it ("requester" or "expert")."""
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


async def request_opinion(repo: Repository, *, patient: str, expert: str, question: str, priority: str, due: datetime,
                          consent: bool, now: datetime, attachments: list[Attachment] = []) -> str:
    """Returns the Task id."""
    me = repo.caller.fhir_user
    if repo.caller.kind != "practitioner" or not me:
        raise Forbidden("Only professionals ask for a tele-expertise")
    if not consent:
        raise Unprocessable("The patient's consent to the tele-expertise must be recorded first")
    if priority not in PRIORITIES:
        raise Unprocessable(f"Unknown urgency {priority!r}")
    if not question.strip():
        raise Unprocessable("The clinical question is empty")
    if not expert.startswith(("Practitioner/", "PractitionerRole/")):
        raise Unprocessable("The expert is a Practitioner or PractitionerRole reference")
    if due <= now:
        raise Unprocessable("The due date must be in the future")
    patient = patient if patient.startswith("Patient/") else f"Patient/{patient}"
    await repo.read("Patient", patient.split("/", 1)[1])  # the requester must reach the patient
    await repo.read(*expert.split("/", 1))
    docs = [(await repo.create("DocumentReference", _doc(patient, me, a.title, a.content_type, a.data, now))).stored.id
            for a in attachments]
    sr = (await repo.create("ServiceRequest", {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": priority,
        "code": KIND, "subject": {"reference": patient}, "requester": {"reference": me},
        "performer": [{"reference": expert}], "authoredOn": now.isoformat(), "note": [{"text": question.strip()}],
        "supportingInfo": [{"reference": f"DocumentReference/{d}"} for d in docs],
        "extension": [{"url": CONSENT_EXT, "valueBoolean": True}],
    })).stored.id
    return (await repo.as_platform().create("Task", {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": priority, "code": KIND,
        "description": question.strip(), "focus": {"reference": f"ServiceRequest/{sr}"}, "for": {"reference": patient},
        "requester": {"reference": me}, "owner": {"reference": expert}, "authoredOn": now.isoformat(),
        "lastModified": now.isoformat(), "restriction": {"period": {"end": due.isoformat()}},
    })).stored.id


async def transition(repo: Repository, task_id: str, to: str, now: datetime, *, reason: str | None = None,
                     output: str | None = None) -> dict:
    task, party = await access_task(repo, task_id, lock=True)  # row lock: concurrent transitions queue here
    current = task.get("status", "")
    allowed = TRANSITIONS.get(current, {})
    if to not in allowed:
        raise Conflict(f"A tele-expertise cannot go from {current!r} to {to!r}")
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


async def answer(repo: Repository, task_id: str, opinion: str, now: datetime) -> str:
    """The expert's opinion: a DocumentReference of the patient's record; the Task is completed."""
    task, party = await access_task(repo, task_id)
    if party != "expert":
        raise Forbidden("Only the expert gives the opinion")
    if not opinion.strip():
        raise Unprocessable("The opinion is empty")
    if task.get("status") != "in-progress":
        raise Conflict("Start the tele-expertise (in-progress) before giving the opinion")
    me = repo.caller.fhir_user or ""
    doc = (await repo.create("DocumentReference", _doc(_ref(task, "for") or "", me, "Avis de téléexpertise", "text/plain; charset=utf-8",
                                                         opinion.strip().encode(), now, loinc="11488-4"))).stored.id
    await transition(repo, task_id, "completed", now, output=f"DocumentReference/{doc}")
    return doc


async def ask(repo: Repository, task_id: str, text: str, now: datetime) -> str:
    """A message of the thread (either side), as a Communication partOf the Task."""
    task, party = await access_task(repo, task_id)
    requester, owner = _ref(task, "requester"), _ref(task, "owner")
    if task.get("status") in TERMINAL:
        raise Conflict("This tele-expertise is closed")
    if not text.strip():
        raise Unprocessable("The message is empty")
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


async def lists(repo: Repository) -> dict[str, list[dict]]:
    """The caller's requests (``sent``) and the requests addressed to them (``received``)."""
    mine = sorted(await _me(repo))
    out: dict[str, list[dict]] = {}
    for side, param in (("sent", "requester"), ("received", "owner")):
        req = repo.parse_search("Task", [(param, ",".join(mine)), ("code:text", KIND["text"]), ("_sort", "-_lastUpdated"), ("_count", "200")])
        # The platform searches, but only among the Tasks that name the caller on that side.
        out[side] = [s.resource() for s in (await repo.as_platform().search(req)).matches]
    return out


def counters(tasks: list[dict], now: datetime) -> dict[str, int]:
    c: dict[str, int] = {}
    for t in tasks:
        c[t.get("status", "")] = c.get(t.get("status", ""), 0) + 1
        due = ((t.get("restriction") or {}).get("period") or {}).get("end")
        if due and t.get("status") not in TERMINAL and datetime.fromisoformat(due) < now:
            c["overdue"] = c.get("overdue", 0) + 1
    return c
