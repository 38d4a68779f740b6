"""The audit trail as FHIR AuditEvents, and its background upkeep.

``store.audit`` keeps the append-only log written in every transaction; here the
sealed entries are turned into AuditEvent resources (DICOM/FHIR audit codes),
searchable through the FHIR API and shown to patients as their access history,
whose patient compartment they belong to. Entries are materialized in the
seal order, on demand before an AuditEvent search and every few seconds in the
background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from parcours.security.caller import PLATFORM
from parcours.services.platform import Platform
from parcours.store import audit
from parcours.store.bulk import BatchBuilder

log = logging.getLogger(__name__)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"

# action -> (FHIR AuditEvent.action code, subtype)
_ACTIONS = {
    "create": ("C", (RESTFUL, "create")), "read": ("R", (RESTFUL, "read")), "vread": ("R", (RESTFUL, "vread")),
    "update": ("U", (RESTFUL, "update")), "patch": ("U", (RESTFUL, "patch")), "delete": ("D", (RESTFUL, "delete")),
    "search": ("E", (RESTFUL, "search-type")), "history": ("R", (RESTFUL, "history-instance")),
    "everything": ("E", (RESTFUL, "operation")), "export": ("E", (RESTFUL, "operation")),
    "login": ("E", (DCM, "110122")), "logout": ("E", (DCM, "110123")), "emergency-access": ("E", (RESTFUL, "operation")),
    "mask": ("U", (RESTFUL, "patch")),  # the patient hid (or showed again) a document
}
_OUTCOMES = {"0", "4", "8", "12"}


def to_audit_event(row: tuple) -> dict:
    """One audit_log row (fields in ``store.audit._FIELDS`` order) as an AuditEvent."""
    (_seq, _xid, recorded, action, outcome, agent, agent_kind, fhir_user, address, rtype, rid, version,
     patients, query, purpose, detail) = row
    code, (sub_system, sub_code) = _ACTIONS.get(action, ("E", (RESTFUL, "operation")))
    is_auth = action in ("login", "logout")
    who: dict = {"reference": fhir_user} if fhir_user and "/" in fhir_user else {"display": agent or "unknown"}
    if fhir_user and agent:
        who["display"] = agent
    agent_entry: dict = {"who": who, "requestor": True, "type": {"coding": [{"system": PARTICIPATION, "code": "humanuser" if agent_kind not in ("system", "platform") else "dataprocessor"}]}}
    if address:
        agent_entry["network"] = {"address": address, "type": "2"}
    if agent_kind:
        agent_entry["role"] = [{"text": agent_kind}]
    event: dict = {
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110114", "display": "User Authentication"} if is_auth
        else {"system": AUDIT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": sub_system, "code": sub_code}],
        "action": code,
        "recorded": recorded.isoformat() if isinstance(recorded, datetime) else str(recorded),
        "outcome": outcome if outcome in _OUTCOMES else "4",
        "agent": [agent_entry],
        "source": {"site": "Parcours", "observer": {"display": "Parcours"}, "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}]},
    }
    if outcome != audit.SUCCESS and isinstance(detail, dict) and detail.get("message"):
        event["outcomeDesc"] = str(detail["message"])[:500]
    if purpose:
        event["purposeOfEvent"] = [{"coding": [{"system": PURPOSE, "code": purpose}], "text": (detail or {}).get("reason", purpose)}]
    entities = []
    if rtype:
        what = f"{rtype}/{rid}" + (f"/_history/{version}" if version else "") if rid else None
        ent: dict = {"what": {"reference": what}} if what else {"type": {"system": "http://hl7.org/fhir/resource-types", "code": rtype}}
        if query:
            ent["query"] = _b64(query)
        entities.append(ent)
    for p in patients or ():
        entities.append({"what": {"reference": p}, "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}})
    if entities:
        event["entity"] = entities
    return event


def audit_events(row: tuple) -> list[tuple[str, dict]]:
    """The AuditEvents of one entry, with their ids: one per patient when the entry touched
    several (a search). Each patient sees in their access history what concerned them,
    never which other patients were in the same result."""
    patients = row[12] or ()
    if len(patients) <= 1:
        return [(f"audit-{row[0]}", to_audit_event(row))]
    return [(f"audit-{row[0]}-{n}", to_audit_event((*row[:12], [p], *row[13:]))) for n, p in enumerate(patients, 1)]


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def materialize(platform: Platform, *, batch: int = 2000) -> int:
    """Seal what can be sealed, then turn sealed entries into AuditEvents; returns how many."""
    async with platform.pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            await audit.seal(conn)
        finally:
            await conn.set_autocommit(False)
    total = 0
    while True:
        async with platform.pool.connection() as conn:
            async with conn.transaction():
                rows = await audit.pending(conn, batch)
                if not rows:
                    return total
                repo = platform.repository(conn, PLATFORM)
                repo.audit_enabled = False  # recording the audit trail is not itself audited
                builder = BatchBuilder(platform.registry, platform.settings.fhir_base, platform.clock.now())
                for position, row in rows:
                    for event_id, event in audit_events(row):
                        builder.add("AuditEvent", event_id, event, "PUT")
                writer = repo.bulk_writer()
                for b in builder.batches():
                    await writer.add(b)
                await writer.flush()
                await audit.advance(conn, rows[-1][0])
                total += len(rows)
        if len(rows) < batch:
            return total


def start_in_background(platform: Platform, interval_s: float = 5.0) -> Callable[[], Awaitable[None]]:
    """Seal and materialize every ``interval_s`` seconds in this process; returns a stopper."""
    stopping = asyncio.Event()

    async def loop() -> None:
        while not stopping.is_set():
            try:
                # Small batches: building AuditEvents is CPU on this event loop (~130 µs each,
                # one per patient of a search result); 2000 entries at once stalled the
                # requests of this worker for seconds (bench/PROFILE.md).
                await materialize(platform, batch=20)
            except Exception:  # keep the loop alive; the next round retries
                log.exception("audit trail upkeep failed")
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval_s)
            except TimeoutError:
                pass

    task = asyncio.create_task(loop(), name="parcours-audit-trail")

    async def stop() -> None:
        stopping.set()
        await task

    return stop
