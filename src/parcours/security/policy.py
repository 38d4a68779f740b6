"""Access decisions: pure functions of the caller, what it asks for, and its care context.

The Repository asks these functions before every interaction and applies the
returned search scope to every query; nothing else decides. Three layers:

1. SMART scopes carried by the token (v1 ``read``/``write``/``*`` and v2 ``cruds``)
   bound what any caller may do per resource type;
2. the role matrix says what each kind of user may do per family of types
   (directory, scheduling, clinical, audit);
3. instance rules: a patient or proxy reaches only their own compartment and
   changes or deletes only what they wrote (except ``PATIENT_UPDATABLE``); a
   professional reaches a patient's data only through a care relationship or
   an emergency access, never when the patient blocked them (not even what they
   wrote), and sees a patient's appointments only so, or as their participant;
   professionals change their own directory entry only; restricted items
   (confidentiality R/V) and items the patient masked are seen only by their
   author and the patient (not by a proxy); messages (Communications naming a sender
   or recipients) are seen by their participants only, not by the whole care team.

Searches, includes, chains, ``_has``, counts, history, ``$everything`` and
``$export`` all go through ``search_scope``, so they show exactly what reads may.
``tests/test_authorization_matrix.py`` holds the resulting table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from parcours.security.caller import Caller
from parcours.security.scopes import patient_only

ACTION_LETTER = {
    "create": "c", "read": "r", "vread": "r", "history": "r", "search": "s", "update": "u",
    "patch": "u", "delete": "d", "everything": "r", "export": "r",
}

DIRECTORY = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "HealthcareService", "Endpoint"})
SCHEDULING = frozenset({"Schedule", "Slot", "Appointment", "AppointmentResponse"})
# Opening hours and free slots hold no patient data: every signed-in user reads them, as the directory.
OPEN_AGENDA = frozenset({"Schedule", "Slot"})
ACCOUNTS = frozenset({"Patient", "RelatedPerson", "Practitioner", "PractitionerRole"})
PLATFORM_ONLY = frozenset({"AuditEvent"})  # written by the platform alone
# Rest-hook notifications are sent with the platform's rights: only system clients
# (integrations registered by the operator) may set them up.
SYSTEM_WRITE_ONLY = frozenset({"Subscription"})
# What patients (and their proxies) may write about themselves.
PATIENT_WRITABLE = frozenset({"QuestionnaireResponse", "DocumentReference", "Communication", "Appointment",
                              "Task", "ServiceRequest", "Consent", "Observation", "Binary", "Media"})
# What they may change without having written it: their demographics, their appointments
# (confirm, cancel), the questionnaires and tasks addressed to them. Anything else they
# change or delete only if they wrote it (not their doctor's letter).
PATIENT_UPDATABLE = frozenset({"Patient", "Appointment", "QuestionnaireResponse", "Task"})
# What a patient may hide from professionals (the ``masked`` label), whoever wrote it.
MASKABLE = frozenset({"DocumentReference"})
# Scheduling data of a patient: a professional sees it through a care relationship, or
# when named as a participant (their own agenda), not for every patient.
PARTICIPATION = {"Appointment": ("actor",), "AppointmentResponse": ("actor",)}
# Messages: a Communication that names its sender or recipients is for them (and for whoever
# acts for them: a proxy for their patient), not for everyone who reaches the patient's record;
# one that names neither stays an item of the record like any other. The sender's parameter
# comes first: a new message counts as the caller's only when it names them as its sender.
# What a professional may write to a patient beyond this is the messaging rule's business
# (``services.messaging.rule``: a care relationship, or a conversation the patient opened).
ADDRESSED = {"Communication": ("sender", "recipient")}

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
    restricted_visible_to_patients: bool = True  # the patient sees the restricted items of their record
    authored_anywhere: bool = False  # a professional's own writings, whichever the patient
    blocked: frozenset[str] = frozenset()  # compartments where even authorship gives nothing
    participant_params: tuple[str, ...] = ()  # rows naming the caller in these parameters are in scope too
    addressed_params: tuple[str, ...] = ()  # rows with a value in one of these are for their participants only
    acting_for: frozenset[str] = frozenset()  # references that count as the caller's for participation (a proxy's patients)


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
    scope = _role_scope(caller, rtype, ctx)
    # SMART: what only patient/ scopes allow stays within the patient the app was launched for.
    if caller.patient_context is not None and scope.patients and patient_only(caller.scopes, rtype, "r"):
        patients = scope.patients & {caller.patient_context}
        return replace(scope, patients=patients) if patients else NOTHING
    return scope


def _role_scope(caller: Caller, rtype: str, ctx: CareContext) -> Scope:
    if caller.is_system:
        return ALL
    if rtype in DIRECTORY or rtype in OPEN_AGENDA:
        return ALL
    own = frozenset(ctx.identities)
    if caller.kind in ("patient", "proxy"):
        if not ctx.patients:
            return NOTHING
        # Restricted items are for the patient and their author: not for a proxy (a minor's
        # confidential care stays hidden from their parents).
        addressed = ADDRESSED.get(rtype, ())
        return Scope(patients=ctx.patients, hide_restricted_except=own, restricted_visible_to_patients=caller.kind == "patient",
                     participant_params=addressed, addressed_params=addressed,
                     acting_for=ctx.patients if caller.kind == "proxy" else frozenset())
    if caller.kind == "admin":
        if rtype in ACCOUNTS or rtype in PLATFORM_ONLY:
            return ALL
        return NOTHING
    if caller.kind == "staff":
        if rtype in SCHEDULING or rtype == "Patient":
            return ALL
        return NOTHING
    if caller.kind == "practitioner":
        reachable = (ctx.patients | ctx.emergency) - ctx.blocked_by
        if not reachable and not own:
            return NOTHING
        return Scope(patients=frozenset(reachable), hide_restricted_except=own, restricted_visible_to_patients=False,
                     authored_anywhere=True, blocked=ctx.blocked_by,
                     participant_params=PARTICIPATION.get(rtype, ()) + ADDRESSED.get(rtype, ()),
                     addressed_params=ADDRESSED.get(rtype, ()))
    return NOTHING


def may_access(caller: Caller, rtype: str, compartments: list[str] | tuple[str, ...], labels: list[tuple[str, str]],
               author: str | None, ctx: CareContext, *, action: str = "read", target: str | None = None,
               participates: bool = False, addressed: bool = False) -> Decision:
    """Instance-level decision for one stored resource (reads, updates, deletes; ``create``
    for where new content lands). ``target`` is the resource's own reference;
    ``participates``: the caller is named in its ``Scope.participant_params``;
    ``addressed``: it has a value in ``Scope.addressed_params`` (a message)."""
    scope = search_scope(caller, rtype, ctx)
    letter = ACTION_LETTER.get(action, "r")
    mine = author is not None and author in ctx.identities
    if rtype in DIRECTORY and letter in "ud" and not caller.is_system and caller.kind != "admin" and target not in ctx.identities:
        return Decision(False, f"Professionals change their own directory entry only, not {target or rtype}")
    if caller.kind in ("patient", "proxy") and not mine:
        if action == "mask" and rtype not in MASKABLE:
            return Decision(False, f"Only documents can be hidden, not {rtype}")
        if letter == "d" or (letter == "u" and action != "mask" and rtype not in PATIENT_UPDATABLE):
            return Decision(False, f"Patients change or delete only what they wrote themselves ({rtype})")
    if set(compartments) & scope.blocked:
        return Decision(False, "The patient has blocked your access to their record")
    if (mine or participates) and not scope.everything:
        return Decision(True, "author" if mine else "participant")
    if addressed and not scope.everything:
        return Decision(False, f"This {rtype} is for its sender and recipients only")
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
        if scope.restricted_visible_to_patients:
            return Decision(True, "the patient sees their restricted items")
        if author is not None and author in ctx.identities:
            return Decision(True, "author of a restricted item")
        return Decision(False, f"This {rtype} is restricted to its author and the patient")
    return Decision(True, "care relationship")


def may_export(caller: Caller, level: str) -> Decision:
    """Bulk ``$export``: system clients at every level; a patient or proxy exports their own
    record (``Patient/$export``, narrowed to it like every read). Professionals reach one
    patient at a time (``$everything``): bulk extraction is no part of a care relationship."""
    if caller.is_system:
        return Decision(True, "system client")
    if caller.kind in ("patient", "proxy") and level == "patient":
        return Decision(True, "own record")
    return Decision(False, "Bulk $export is for system clients; a patient exports their own record with Patient/$export")
