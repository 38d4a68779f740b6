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
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from parcours.fhir.datatypes import normalize_text, parse_date_range
from parcours.fhir.indexing import _REF_RE, PRESENT, SEP, IndexValues, reference_values, token_values
from parcours.security.caller import PLATFORM
from parcours.services.platform import Platform
from parcours.store import audit
from parcours.store.bulk import write_new
from parcours.store.repository import render_version

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


def index_event(event: dict, base_url: str | None) -> IndexValues:
    """The search-index values of an AuditEvent built by :func:`to_audit_event`, read from the
    places it fills: the same values as the generic indexer (``index_resource``, which evaluates
    every search parameter's path on every resource) at a fraction of its cost. The parts that
    few distinct values share (codes, the agent) are computed once per process."""
    agent = (event.get("agent") or [{}])[0]
    who, role = agent.get("who") or {}, agent.get("role") or [{}]
    t = event["type"]
    sub = (event.get("subtype") or [{}])[0]
    f_tokens, f_rows = _fixed(event["action"], event["outcome"], event["source"]["site"], t.get("system"), t.get("code"),
                              t.get("display"), sub.get("system"), sub.get("code"))
    a_tokens, a_refs, a_rows = _agent(who.get("reference"), role[0].get("text"), (agent.get("network") or {}).get("address"), base_url)
    tokens, refs, rows = [*f_tokens, *a_tokens], list(a_refs), [*f_rows, *a_rows]
    recorded = _instant_range(event["recorded"])
    if recorded:
        rows.append(("date", None, None, recorded[0], recorded[1], None, None, None, None))
        tokens.append(PRESENT + "date")
    iv = IndexValues(tokens, refs, rows)
    for e in event.get("entity") or ():
        what = e.get("what")
        if what is not None and reference_values("entity", what, iv, base_url):
            tokens.append(PRESENT + "entity")
            m = _REF_RE.match(what.get("reference") or "")
            if m and m["type"] == "Patient" and reference_values("patient", what, iv, base_url):
                tokens.append(PRESENT + "patient")
        if "role" in e:
            t_, r_ = _entity_token("entity-role", e["role"])
            tokens += t_
            rows += r_
        if "type" in e:
            t_, r_ = _entity_token("entity-type", e["type"])
            tokens += t_
            rows += r_
    prefix = f"patient{SEP}Patient/"
    iv.compartments = list(dict.fromkeys(r[len("patient" + SEP):] for r in refs if r.startswith(prefix)))
    iv.tokens = list(dict.fromkeys(tokens))
    iv.rows = list(dict.fromkeys(rows))
    iv.refs = list(dict.fromkeys(refs))
    iv.content = " ".join(_texts(event))
    return iv


@lru_cache(maxsize=512)
def _fixed(action: str, outcome: str, site: str, type_system: str | None, type_code: str | None, type_display: str | None,
           sub_system: str | None, sub_code: str | None) -> tuple[tuple[str, ...], tuple]:
    iv = IndexValues()
    for code, value in (("action", action), ("outcome", outcome), ("site", site)):
        if token_values(code, value, iv):
            iv.tokens.append(PRESENT + code)
    for code, system, value, display in (("subtype", sub_system, sub_code, None), ("type", type_system, type_code, type_display)):
        t, r = _coded(code, system, value, display)
        iv.tokens += t
        iv.rows += r
    return tuple(iv.tokens), tuple(iv.rows)


@lru_cache(maxsize=4096)
def _agent(reference: str | None, role: str | None, address: str | None, base_url: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple]:
    iv = IndexValues()
    if isinstance(address, str):
        iv.rows.append(("address", normalize_text(address), address, None, None, None, None, None, None))
        iv.tokens.append(PRESENT + "address")
    if reference is not None and reference_values("agent", {"reference": reference}, iv, base_url):
        iv.tokens.append(PRESENT + "agent")
        m = _REF_RE.match(reference)
        if m and m["type"] == "Patient" and reference_values("patient", {"reference": reference}, iv, base_url):
            iv.tokens.append(PRESENT + "patient")
    if role is not None and token_values("agent-role", {"text": role}, iv):
        iv.tokens.append(PRESENT + "agent-role")
    return tuple(iv.tokens), tuple(iv.refs), tuple(iv.rows)


def _instant_range(value: str) -> tuple[datetime, datetime] | None:
    """``parse_date_range`` of an ISO instant with its zone (as ``recorded`` is written), in C."""
    try:
        lo = datetime.fromisoformat(value)
    except ValueError:
        return parse_date_range(value)
    if lo.tzinfo is None:
        return parse_date_range(value)
    dot = value.find(".")
    digits = 0 if dot < 0 else len(value[dot + 1:].split("+")[0].split("-")[0].rstrip("Z"))
    step = timedelta(microseconds=10 ** (6 - min(digits, 6))) if digits else timedelta(seconds=1)
    return lo.astimezone(UTC), (lo + step).astimezone(UTC)


def _entity_token(code: str, value: dict) -> tuple[tuple[str, ...], tuple]:
    return _coded(code, value.get("system"), value.get("code"), value.get("display"))


@lru_cache(maxsize=1024)
def _coded(code: str, system: str | None, value: str | None, display: str | None) -> tuple[tuple[str, ...], tuple]:
    iv = IndexValues()
    coding = {k: v for k, v in (("system", system), ("code", value), ("display", display)) if v is not None}
    if token_values(code, coding, iv):
        iv.tokens.append(PRESENT + code)
    return tuple(iv.tokens), tuple(iv.rows)


def _texts(event: dict) -> list[str]:
    """The text ``_content`` searches in an AuditEvent: its strings in document order, less
    references, systems, id and meta (as the generic indexer collects them)."""
    out = ["AuditEvent"]
    t = event["type"]
    out += [t["code"], t["display"]]
    out += [x["code"] for x in event.get("subtype") or ()]
    out += [event["action"], event["recorded"], event["outcome"]]
    for a in event.get("agent") or ():
        who = a.get("who") or {}
        if isinstance(who.get("display"), str):
            out.append(who["display"])
        out += [c["code"] for c in a["type"]["coding"]]
        if "network" in a:
            out += [v for v in a["network"].values() if isinstance(v, str)]
        out += [r["text"] for r in a.get("role") or () if isinstance(r.get("text"), str)]
    out += ["Parcours", "Parcours", "4"]
    if isinstance(event.get("outcomeDesc"), str):
        out.append(event["outcomeDesc"])
    for p in event.get("purposeOfEvent") or ():
        out += [c["code"] for c in p["coding"] if isinstance(c.get("code"), str)]
        if isinstance(p.get("text"), str):
            out.append(p["text"])
    for e in event.get("entity") or ():
        if "type" in e:
            out.append(e["type"]["code"])
        if isinstance(e.get("query"), str):
            out.append(e["query"])
        if "role" in e:
            out += [e["role"]["code"], e["role"]["display"]]
    return out


async def materialize(platform: Platform, *, batch: int = 2000) -> int:
    """Seal what can be sealed, then turn sealed entries into AuditEvents; returns how many."""
    async with platform.pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            await audit.seal(conn)
        finally:
            await conn.set_autocommit(False)
    total = 0
    base = platform.settings.fhir_base
    while True:
        async with platform.pool.connection() as conn:
            async with conn.transaction():
                rows = await audit.pending(conn, batch)
                if not rows:
                    return total
                repo = platform.repository(conn, PLATFORM)
                repo.audit_enabled = False  # recording the audit trail is not itself audited
                now = platform.clock.now()
                items = []
                for position, row in rows:
                    for event_id, event in audit_events(row):
                        ordered, content = render_version("AuditEvent", event_id, event, 1, now)
                        items.append((event_id, content, index_event(ordered, base)))
                await write_new(repo, "AuditEvent", items, now, method="PUT")
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
