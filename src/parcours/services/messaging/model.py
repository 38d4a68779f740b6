"""How conversations and messages are written in FHIR R4, in one place.

A **conversation** is a "thread header" Communication (as Medplum models threads):

* ``category`` = ``messaging#conversation``; ``status`` ``in-progress``;
* ``topic.text``: its subject line; ``subject``: the patient it is with or about (optional
  between professionals);
* ``sender``: who opened it; ``recipient``: every participant, the sender included, each
  a ``Practitioner`` or the one ``Patient`` (with ``display``, so that participants see
  names without reading each other's records); a proxy writes for the patient, as
  ``RelatedPerson``, and the patient is the participant;
* ``sent``: when it was opened. It has no ``partOf``.

A **message** is a Communication with ``category`` = ``messaging#message``, ``status``
``completed``, ``partOf`` = the conversation header, ``inResponseTo`` = the message it
answers (a reply), the conversation's ``topic``, ``subject`` and ``recipient`` (so the
access policy, which lets the participants of a Communication see it and nobody else,
decides on each message by itself), its ``sender``, ``sent``, and a ``payload``: the
text (``contentString``) and attachments (``contentAttachment`` with the file in
``data``, its sniffed ``contentType``, ``size``, SHA-1 ``hash`` and ``title``).

Why not a CommunicationRequest for the conversation: a request asks for something to be
communicated and ends when it is; a thread is a conversation that goes on, and R4's
``Communication.partOf`` (any resource) with the header as a Communication lets one
search serve both (``Communication?part-of=Communication/{id}``, ``?category=...``).

Professionals and practices say they accept messages from patients who are not (yet)
their patients with the extension ``ACCEPTS_PATIENT_MESSAGES`` (valueBoolean) on a
PractitionerRole or its Organization.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

PARCOURS = "https://parcours.example/fhir"
SYSTEM = f"{PARCOURS}/CodeSystem/messaging"
CONVERSATION, MESSAGE = "conversation", "message"
ACCEPTS_PATIENT_MESSAGES = f"{PARCOURS}/StructureDefinition/accepts-patient-messages"
PARTICIPANT_TYPES = ("Practitioner", "Patient")
MAX_PARTICIPANTS = 50


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def category(code: str) -> list[dict]:
    display = {"conversation": "Conversation", "message": "Message"}[code]
    return [{"coding": [{"system": SYSTEM, "code": code, "display": display}]}]


def kind_of(resource: dict | None) -> str | None:
    """``conversation``, ``message`` or None (a Communication that is no part of messaging)."""
    if not resource:
        return None
    for concept in resource.get("category") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("system") == SYSTEM and coding.get("code") in (CONVERSATION, MESSAGE):
                return str(coding["code"])
    return None


def ref_of(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return value["reference"]
    return None


def refs(values: Any) -> list[str]:
    return [r for r in (ref_of(v) for v in values or []) if r]


def part_of(resource: dict) -> list[str]:
    return refs(resource.get("partOf"))


def conversation_of(resource: dict) -> str | None:
    """The id of the conversation header a message belongs to."""
    for r in part_of(resource):
        if r.startswith("Communication/"):
            return r.split("/", 1)[1]
    return None


def participants(resource: dict) -> list[str]:
    return list(dict.fromkeys(refs(resource.get("recipient"))))


def names(resource: dict) -> dict[str, str]:
    """Participant reference -> display name, as the header or message gives them."""
    out = {}
    for r in list(resource.get("recipient") or []) + [resource.get("sender")]:
        if isinstance(r, dict) and r.get("reference") and r.get("display"):
            out[r["reference"]] = str(r["display"])
    return out


def sender(resource: dict) -> str | None:
    return ref_of(resource.get("sender"))


def subject(resource: dict) -> str | None:
    return ref_of(resource.get("subject"))


def topic(resource: dict) -> str:
    return str((resource.get("topic") or {}).get("text") or "")


def patient_of(participant_refs: list[str]) -> list[str]:
    return [r for r in participant_refs if r.startswith("Patient/")]


def texts(resource: dict) -> list[str]:
    return [str(p["contentString"]) for p in resource.get("payload") or [] if isinstance(p, dict) and "contentString" in p]


def attachments(resource: dict) -> list[dict]:
    return [p["contentAttachment"] for p in resource.get("payload") or []
            if isinstance(p, dict) and isinstance(p.get("contentAttachment"), dict)]


def build_conversation(*, sender: dict, recipients: list[dict], topic: str, subject: dict | None, now: datetime) -> dict:
    res: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "in-progress",
        "category": category(CONVERSATION),
        "topic": {"text": topic},
        "sender": sender,
        "recipient": recipients,
        "sent": iso(now),
    }
    if subject:
        res["subject"] = subject
    return res


def build_message(header_id: str, header: dict, *, sender: dict, text: str, attachments: list[dict], in_reply_to: str | None,
                  now: datetime) -> dict:
    payload: list[dict] = []
    if text:
        payload.append({"contentString": text})
    payload += [{"contentAttachment": a} for a in attachments]
    res: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "category": category(MESSAGE),
        "partOf": [{"reference": f"Communication/{header_id}"}],
        "topic": header.get("topic") or {"text": ""},
        "sender": sender,
        "recipient": header.get("recipient") or [],
        "sent": iso(now),
        "payload": payload,
    }
    if header.get("subject"):
        res["subject"] = header["subject"]
    if in_reply_to:
        res["inResponseTo"] = [{"reference": f"Communication/{in_reply_to}"}]
    return res


def accepts_patient_messages(resource: dict | None) -> bool:
    for ext in (resource or {}).get("extension") or []:
        if ext.get("url") == ACCEPTS_PATIENT_MESSAGES and ext.get("valueBoolean") is True:
            return True
    return False


def with_accepts_patient_messages(resource: dict, accepts: bool) -> dict:
    exts = [e for e in resource.get("extension") or [] if e.get("url") != ACCEPTS_PATIENT_MESSAGES]
    exts.append({"url": ACCEPTS_PATIENT_MESSAGES, "valueBoolean": accepts})
    return {**resource, "extension": exts}
