"""The care context of a caller: which patients it may reach, and why.

Read once per request from the resources themselves (no second copy that could
drift): a professional reaches a patient through an active CareTeam, a recent
or coming Appointment, a recent Encounter, an open referral (ServiceRequest
performer) or task (Task owner, e.g. a tele-expertise request), or an unexpired
emergency access; a Consent that denies the professional blocks all of these.
A patient reaches their own compartment; a proxy the patients of their
RelatedPerson links.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache
from typing import Any

import orjson
from psycopg import AsyncConnection
from sqlalchemy import Text, and_, bindparam, literal, not_, or_, select
from sqlalchemy.dialects.postgresql import ARRAY

from parcours.fhir.indexing import SEP
from parcours.security.caller import Caller
from parcours.security.policy import CareContext
from parcours.store.audit import emergency_access
from parcours.store.schema import tables
from parcours.store.sql import compile_stmt

# How long a finished appointment or encounter keeps the relationship open.
RECENT = timedelta(days=90)

# (resource type, reference parameters naming the professional, parameters naming the
# patient, statuses that end the relationship, date parameter that must be recent)
RELATIONSHIPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], str | None], ...] = (
    ("CareTeam", ("participant",), ("subject", "patient"), ("inactive", "entered-in-error", "suspended"), None),
    ("Appointment", ("actor", "practitioner"), ("actor", "patient"), ("cancelled", "entered-in-error", "noshow"), "date"),
    ("Encounter", ("participant", "practitioner"), ("subject", "patient"), ("entered-in-error", "cancelled"), "date"),
    ("ServiceRequest", ("performer",), ("subject", "patient"), ("revoked", "entered-in-error", "completed"), None),
    ("Task", ("owner",), ("patient", "subject"), ("cancelled", "rejected", "failed", "entered-in-error", "completed"), None),
)


def _arr(values: list[str]) -> object:
    return literal(values, ARRAY(Text))


@cache
def _statements() -> dict[str, Any]:
    """The lookups of ``load``, built and compiled once: every request of a professional runs
    them, and building them anew cost more than running them. Values are bound per call
    (``keys``, ``since``, ``agent``, ``now``, ``actors``, ``practitioner``)."""
    arr = ARRAY(Text)
    relationships = []
    for rtype, who_params, patient_params, ended, date_param in RELATIONSHIPS:
        t = tables(rtype)
        m = t.main
        cond = [m.c.deleted.is_(False), m.c.refs.overlap(bindparam("keys", type_=arr)),
                not_(m.c.tokens.overlap(_arr([f"status{SEP}*|{s}" for s in ended])))]
        if date_param:
            idx = t.idx
            recent = select(literal(1)).select_from(idx).where(
                idx.c.resource_id == m.c.id, idx.c.code == date_param, idx.c.hi >= bindparam("since")).exists()
            cond.append(or_(recent, not_(m.c.tokens.contains(_arr(["\x1e" + date_param])))))
        relationships.append((who_params, patient_params, compile_stmt(select(m.c.refs).where(and_(*cond)))))
    e = emergency_access
    c = tables("Consent").main
    r = tables("PractitionerRole").main
    return {
        "relationships": relationships,
        "emergency": compile_stmt(select(e.c.patient).where(e.c.agent == bindparam("agent"), e.c.until > bindparam("now"))),
        "consents": compile_stmt(select(c.c.content).where(
            c.c.deleted.is_(False), c.c.tokens.contains(_arr([f"status{SEP}*|active"])),
            c.c.refs.overlap(bindparam("actors", type_=arr)))),
        "roles": compile_stmt(select(r.c.id).where(r.c.deleted.is_(False), r.c.refs.contains(bindparam("practitioner", type_=arr)))),
    }


async def _identities(conn: AsyncConnection, caller: Caller) -> list[str]:
    """The caller's own references: its Practitioner and that practitioner's roles."""
    if not caller.fhir_user:
        return []
    out = [caller.fhir_user]
    if caller.fhir_user.startswith("Practitioner/"):
        sql, params = _statements()["roles"]
        params = {**params, "practitioner": [f"practitioner{SEP}{caller.fhir_user}"]}
        out += [f"PractitionerRole/{r[0]}" for r in await (await conn.execute(sql, params)).fetchall()]
    return out


async def load(conn: AsyncConnection, caller: Caller, now: datetime) -> CareContext:
    identities = await _identities(conn, caller)
    if caller.kind == "patient":
        own = {caller.fhir_user} if caller.fhir_user and caller.fhir_user.startswith("Patient/") else set()
        return CareContext(patients=frozenset(own), identities=frozenset(identities))
    if caller.kind == "proxy":
        patients: set[str] = set()
        if caller.fhir_user and caller.fhir_user.startswith("RelatedPerson/"):
            t = tables("RelatedPerson").main
            sql, params = compile_stmt(select(t.c.refs, t.c.tokens).where(t.c.id == caller.fhir_user.split("/", 1)[1], t.c.deleted.is_(False)))
            row = await (await conn.execute(sql, params)).fetchone()
            # An inactive RelatedPerson no longer holds the delegation.
            if row and f"active{SEP}*|false" not in row[1]:
                patients = {r.split(SEP, 1)[1] for r in row[0] if r.startswith(f"patient{SEP}Patient/")}
        return CareContext(patients=frozenset(patients), identities=frozenset(identities))
    if caller.kind != "practitioner" or not identities:
        return CareContext(identities=frozenset(identities))
    patients = set()
    # The lookups below are independent: sent together in one pipeline (one round trip).
    stmts = _statements()
    async with conn.pipeline():
        found = []
        for who_params, patient_params, (sql, params) in stmts["relationships"]:
            keys = [f"{p}{SEP}{ident}" for p in who_params for ident in identities]
            found.append((patient_params, await conn.execute(sql, {**params, "keys": keys, "since": now - RECENT})))
        sql, params = stmts["emergency"]
        emergency_cur = await conn.execute(sql, {**params, "agent": caller.fhir_user, "now": now})
        # A patient can block a named professional with a Consent that denies them.
        sql, params = stmts["consents"]
        consent_cur = await conn.execute(sql, {**params, "actors": [f"actor{SEP}{ident}" for ident in identities]})
        for patient_params, cur in found:
            for (refs,) in await cur.fetchall():
                for r in refs:
                    code, _, ref = r.partition(SEP)
                    if code in patient_params and ref.startswith("Patient/"):
                        patients.add(ref)
        emergency = {r[0] for r in await emergency_cur.fetchall()}
        consents = await consent_cur.fetchall()
    blocked: set[str] = set()
    for (content,) in consents:
        consent = orjson.loads(content)
        provision = consent.get("provision") or {}
        patient = (consent.get("patient") or {}).get("reference")
        if provision.get("type") == "deny" and patient:
            actors = {(a.get("reference") or {}).get("reference") for a in provision.get("actor") or []}
            if actors & set(identities):
                blocked.add(patient)
    return CareContext(patients=frozenset(patients - blocked), emergency=frozenset(emergency - blocked),
                       blocked_by=frozenset(blocked), identities=frozenset(identities))


async def grant_emergency(conn: AsyncConnection, agent: str, patient: str, reason: str, now: datetime, minutes: int) -> datetime:
    until = now + timedelta(minutes=minutes)
    await conn.execute(
        "INSERT INTO emergency_access (agent, patient, reason, granted, until) VALUES (%s, %s, %s, %s, %s)",
        (agent, patient, reason, now, until),
    )
    return until
