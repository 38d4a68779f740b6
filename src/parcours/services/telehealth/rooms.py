"""Teleconsultation rooms: one per video Appointment.

``access_room`` is the only way to reach a room: the caller's Repository must let
it read the Appointment (policy + audit live there) and its own identity must be
one of the Appointment's participants (a patient, their proxy through the policy,
or a professional / role named on it). Professionals host: they are admitted at
once and admit the others from the waiting room. Ending the call records a
virtual Encounter (class VR) through the same Repository; the consultation report
is a DocumentReference with its text, which joins the patient's shared record.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta

from parcours.core.errors import BadRequest, Forbidden
from parcours.store.repository import Repository

VR = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR", "display": "virtual"}
LONGEST_CALL = timedelta(hours=12)


@dataclass(frozen=True)
class Room:
    appointment_id: str
    patient: str | None  # "Patient/<id>"
    practitioners: tuple[str, ...]  # Practitioner / PractitionerRole references named on the appointment
    me: str  # the caller's identity in this room
    host: bool  # a professional of the appointment: admitted at once, admits the others


def _actors(appointment: dict) -> list[str]:
    return [ref for p in appointment.get("participant") or []
            if (ref := (p.get("actor") or {}).get("reference")) and p.get("status") != "declined"]


async def access_room(repo: Repository, appointment_id: str) -> Room:
    appointment = (await repo.read("Appointment", appointment_id)).resource()  # policy + audit
    if appointment.get("status") in ("cancelled", "entered-in-error", "noshow"):
        raise Forbidden("This appointment was cancelled: its consultation room is closed")
    actors = _actors(appointment)
    patient = next((a for a in actors if a.startswith("Patient/")), None)
    practitioners = tuple(a for a in actors if a.startswith(("Practitioner/", "PractitionerRole/")))
    ctx = await repo.care()
    mine = set(ctx.identities) | ({repo.caller.fhir_user} if repo.caller.fhir_user else set())
    me = next((a for a in actors if a in mine), None)
    if me is None and repo.caller.kind == "proxy" and patient in ctx.patients:
        me = repo.caller.fhir_user  # a proxy joins for the patient they represent
    if me is None or not repo.caller.fhir_user:
        raise Forbidden("Only the participants of this appointment may join its consultation room")
    host = repo.caller.kind == "practitioner" and me in practitioners
    return Room(appointment_id, patient, practitioners, repo.caller.fhir_user if host else me, host)


async def open_ad_hoc(repo: Repository, patient_id: str, now: datetime) -> str:
    """A professional opens a room now for a patient they care for: a booked video Appointment."""
    if repo.caller.kind != "practitioner" or not repo.caller.fhir_user:
        raise Forbidden("Only professionals open a consultation room")
    await repo.read("Patient", patient_id)  # a care relationship (or another access) is required
    body = {
        "resourceType": "Appointment", "status": "booked",
        "serviceType": [{"text": "Téléconsultation"}],
        "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "WALKIN"}]},
        "start": now.isoformat(), "end": (now + timedelta(minutes=30)).isoformat(),
        "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"},
                        {"actor": {"reference": repo.caller.fhir_user}, "status": "accepted"}],
    }
    return (await repo.create("Appointment", body)).stored.id


async def end_call(repo: Repository, room: Room, started: datetime, now: datetime, attended: list[str]) -> str:
    """Record the call as a finished virtual Encounter; returns its id."""
    if not room.host:
        raise Forbidden("Only the professional of the consultation ends it")
    if started.tzinfo is None or started > now or now - started > LONGEST_CALL:
        raise BadRequest("The start of the call must be a time within the last 12 hours")
    participants = [p for p in dict.fromkeys([room.me, *attended]) if p.startswith(("Practitioner/", "PractitionerRole/", "RelatedPerson/"))]
    body: dict = {
        "resourceType": "Encounter", "status": "finished", "class": VR,
        "type": [{"text": "Téléconsultation"}],
        "period": {"start": started.isoformat(), "end": now.isoformat()},
        "appointment": [{"reference": f"Appointment/{room.appointment_id}"}],
        "participant": [{"individual": {"reference": p}} for p in participants],
    }
    if room.patient:
        body["subject"] = {"reference": room.patient}
    return (await repo.create("Encounter", body)).stored.id


async def write_report(repo: Repository, room: Room, encounter_id: str, text: str, now: datetime) -> str:
    """The consultation report (plain text) as a DocumentReference of the shared record."""
    if not room.host:
        raise Forbidden("Only the professional of the consultation writes its report")
    text = text.strip()
    if not text:
        raise BadRequest("The report is empty")
    body: dict = {
        "resourceType": "DocumentReference", "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}]},
        "description": "Compte rendu de téléconsultation",
        "date": now.isoformat(), "author": [{"reference": room.me}],
        "context": {"encounter": [{"reference": f"Encounter/{encounter_id}"}]},
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "title": "Compte rendu de téléconsultation",
                                    "data": base64.b64encode(text.encode()).decode()}}],
    }
    if room.patient:
        body["subject"] = {"reference": room.patient}
    return (await repo.create("DocumentReference", body)).stored.id
