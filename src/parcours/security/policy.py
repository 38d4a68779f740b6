"""Access decisions: pure functions of the caller, what it asks for, and its care context.

The Repository asks these functions before every interaction and applies the
returned search scope to every query; nothing else decides. Three layers:

1. SMART scopes carried by the token (v1 ``read``/``write``/``*`` and v2 ``cruds``)
   bound what any caller may do per resource type;
2. the role matrix says what each kind of user may do per family of types
   (directory, scheduling, clinical, audit);
3. instance rules: a patient or proxy reaches only their own compartment; a
   professional reaches a patient's data only through a care relationship or
   an emergency access, never when the patient blocked them; restricted items
   (confidentiality R/V) and items the patient masked are seen only by their
   author and the patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from parcours.security.caller import Caller

ACTION_LETTER = {
    "create": "c", "read": "r", "vread": "r", "history": "r", "search": "s", "update": "u",
    "patch": "u", "delete": "d", "everything": "r", "export": "r",
}

DIRECTORY = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService", "Endpoint"})
SCHEDULING = frozenset({"Schedule", "Slot", "Appointment", "AppointmentResponse"})
ACCOUNTS = frozenset({"Patient", "RelatedPerson", "Practitioner", "PractitionerRole"})
PLATFORM_ONLY = frozenset({"AuditEvent"})  # written by the platform alone
# Rest-hook notifications are sent with the platform's rights: only system clients
# (integrations registered by the operator) may set them up.
SYSTEM_WRITE_ONLY = frozenset({"Subscription"})
# What patients (and their proxies) may write about themselves.
PATIENT_WRITABLE = frozenset({"QuestionnaireResponse", "DocumentReference", "Communication", "Appointment",
                              "Task", "ServiceRequest", "Consent", "Observation", "Binary", "Media"})

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PARCOURS_SECURITY = "https://parcours.example/fhir/CodeSystem/security-label"
RESTRICTED_LABELS = ((CONFIDENTIALITY, "R"), (CONFIDENTIALITY, "V"), (PARCOURS_SECURITY, "masked"))

_SCOPE_RE = re.compile(r"^(patient|user|system)/([A-Za-z*]+)\.(read|write|\*|[cruds]+)(\?.*)?$")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


@dataclass(frozen=True)
class CareContext:
    """What the store found about the caller's relationships, for one request."""

    patients: frozenset[str] = frozenset()  # "Patient/123" the caller may reach
    emergency: frozenset[str] = frozenset()  # reached through break-the-glass
    blocked_by: frozenset[str] = frozenset()  # patients who blocked this professional
    identities: frozenset[str] = frozenset()  # the caller's own references (authorship)


@dataclass(frozen=True)
class Scope:
    """How a search is narrowed for a caller. ``everything`` = no narrowing."""

    everything: bool = False
    nothing: bool = False
    patients: frozenset[str] = field(default_factory=frozenset)  # compartment filter
    hide_restricted_except: frozenset[str] = frozenset()  # authors who still see restricted items
    restricted_visible_to_patients: bool = True


ALL = Scope(everything=True)
NOTHING = Scope(nothing=True)


def _scope_grants(scope: str, rtype: str, letter: str) -> bool:
    m = _SCOPE_RE.match(scope)
    if not m:
        return False
    _context, stype, perm, _query = m.groups()
    if stype not in ("*", rtype):
        return False
    if perm == "*":
        return True
    if perm == "read":
        return letter in "rs"
    if perm == "write":
        return letter in "cud"
    return letter in perm


def scopes_allow(caller: Caller, action: str, rtype: str) -> bool:
    letter = ACTION_LETTER.get(action, "r")
    return any(_scope_grants(s, rtype, letter) for s in caller.scopes)


def is_clinical(rtype: str) -> bool:
    return rtype not in DIRECTORY and rtype not in SCHEDULING and rtype not in PLATFORM_ONLY


def decide(caller: Caller, action: str, rtype: str) -> Decision:
    """Type-level decision: may this caller attempt this interaction on this type at all."""
    if not scopes_allow(caller, action, rtype):
        return Decision(False, f"No granted scope allows {action} on {rtype}")
    letter = ACTION_LETTER.get(action, "r")
    reading = letter in "rs"
    kind = caller.kind
    if kind == "platform":
        return Decision(True, "the platform")
    if rtype in PLATFORM_ONLY and not reading:
        return Decision(False, f"{rtype} is written by the platform only: the audit trail is append-only")
    if kind == "system":
        return Decision(True, "system scope")
    if rtype in SYSTEM_WRITE_ONLY and not reading:
        return Decision(False, f"{rtype} resources are set up by system clients only")
    if rtype in PLATFORM_ONLY:
        return Decision(kind in ("patient", "proxy", "admin") and reading, "access history" if kind != "admin" else "audit review")
    if rtype in DIRECTORY:
        if reading:
            return Decision(True, "directory")
        if kind == "admin":
            return Decision(True, "directory administration")
        if kind == "practitioner" and rtype in ("Practitioner", "PractitionerRole") and letter == "u":
            return Decision(True, "own directory entry")
        return Decision(False, f"Only administrators change the directory ({rtype})")
    if kind == "admin":
        if rtype in ACCOUNTS:
            return Decision(True, "accounts")
        return Decision(False, f"Administrators have no access to clinical data ({rtype})")
    if kind == "staff":
        if rtype in SCHEDULING or (rtype == "Patient" and letter in "rsc"):
            return Decision(True, "scheduling")
        return Decision(False, f"Staff handle scheduling only, not {rtype}")
    if kind == "practitioner":
        if letter == "d" and is_clinical(rtype):
            return Decision(False, "Clinical records are not deleted by professionals; enter a correction instead")
        return Decision(True, "care relationship checked per patient")
    if kind in ("patient", "proxy"):
        if reading:
            return Decision(True, "own record")
        if rtype in PATIENT_WRITABLE or (rtype == "Patient" and letter == "u"):
            return Decision(True, "patient contribution")
        return Decision(False, f"Patients may not write {rtype}")
    return Decision(False, f"Unknown kind of caller {kind!r}")


def search_scope(caller: Caller, rtype: str, ctx: CareContext) -> Scope:
    """How searches (and every other read) on ``rtype`` are narrowed for this caller."""
    if caller.is_system:
        return ALL
    if rtype in DIRECTORY:
        return ALL
    own = frozenset(ctx.identities)
    if caller.kind in ("patient", "proxy"):
        if not ctx.patients:
            return NOTHING
        return Scope(patients=ctx.patients, hide_restricted_except=frozenset({"*patient*"}) | own)
    if caller.kind == "admin":
        if rtype in ACCOUNTS or rtype in PLATFORM_ONLY:
            return ALL
        return NOTHING
    if caller.kind == "staff":
        if rtype in SCHEDULING or rtype == "Patient":
            return ALL
        return NOTHING
    if caller.kind == "practitioner":
        if rtype in SCHEDULING:
            return ALL
        reachable = (ctx.patients | ctx.emergency) - ctx.blocked_by
        if not reachable:
            return NOTHING
        return Scope(patients=frozenset(reachable), hide_restricted_except=own, restricted_visible_to_patients=False)
    return NOTHING


def may_access(caller: Caller, rtype: str, compartments: list[str] | tuple[str, ...], labels: list[tuple[str, str]],
               author: str | None, ctx: CareContext) -> Decision:
    """Instance-level decision for one stored resource (reads, updates, deletes)."""
    scope = search_scope(caller, rtype, ctx)
    if author is not None and author in ctx.identities and not scope.everything:
        return Decision(True, "author")
    if scope.nothing:
        return Decision(False, f"No care relationship gives access to this {rtype}")
    if scope.everything:
        return Decision(True, "in scope")
    if rtype == "Patient" or compartments:
        if not set(compartments) & scope.patients:
            return Decision(False, f"No care relationship gives access to this {rtype}")
    elif is_clinical(rtype):
        # Clinical data outside any patient compartment: only its author.
        if author is None or author not in ctx.identities:
            return Decision(False, f"This {rtype} belongs to no patient you care for")
    restricted = any(lbl in RESTRICTED_LABELS for lbl in labels)
    if restricted:
        if caller.kind in ("patient", "proxy"):
            return Decision(True, "the patient sees their restricted items")
        if author is not None and author in ctx.identities:
            return Decision(True, "author of a restricted item")
        return Decision(False, f"This {rtype} is restricted to its author and the patient")
    return Decision(True, "care relationship")
