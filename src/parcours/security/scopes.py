"""SMART on FHIR scopes (App Launch 1.0 ``read``/``write``/``*`` and 2.0 ``cruds``) as pure functions.

What a SMART app gets is the intersection of three sets: what it asked for, what
its registration allows, and what the user's role allows (``security.roles``).
Intersections work per resource scope: ``patient/*.rs`` asked against an
allowed ``patient/Observation.cruds`` gives ``patient/Observation.rs``. A
``user/`` ceiling also covers ``patient/`` requests (one patient is narrower
than all the user's patients); for roles that reach one record only (patients,
proxies) a ``user/`` request is read as ``patient/``. Granted scopes keep the
syntax they were asked in (v1 stays v1 when it can be said in v1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

LETTERS = "cruds"
V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(LETTERS)}
_RESOURCE_RE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.(read|write|\*|[cruds]+)(\?\S*)?$")

# Scopes that are not about resources. Identity and launch scopes give no data by
# themselves; offline_access is a privilege the client registration must list.
OPENID, FHIR_USER, PROFILE, OFFLINE, ONLINE = "openid", "fhirUser", "profile", "offline_access", "online_access"
LAUNCH, LAUNCH_PATIENT = "launch", "launch/patient"
IDENTITY_SCOPES = frozenset({OPENID, FHIR_USER, PROFILE})
SUPPORTED_OTHER = frozenset({OPENID, FHIR_USER, PROFILE, OFFLINE, LAUNCH_PATIENT})


@dataclass(frozen=True)
class ResourceScope:
    context: str  # patient | user | system
    rtype: str  # a resource type or "*"
    perms: frozenset[str]  # letters of "cruds"
    query: str | None = None  # SMART v2 granular scope ("?category=...")
    v1: bool = False  # asked in the v1 syntax

    def text(self) -> str:
        perm = "".join(ch for ch in LETTERS if ch in self.perms)
        if self.v1:
            for word, letters in V1.items():
                if self.perms == letters:
                    perm = word
                    break
        return f"{self.context}/{self.rtype}.{perm}{self.query or ''}"


def parse(scope: str) -> ResourceScope | None:
    """A resource scope, or None (not a resource scope, or malformed: v2 letters out of order)."""
    m = _RESOURCE_RE.match(scope)
    if not m:
        return None
    context, rtype, perm, query = m.groups()
    if perm in V1:
        return ResourceScope(context, rtype, V1[perm], query, v1=True)
    if "".join(ch for ch in LETTERS if ch in perm) != perm:  # SMART 2: letters once each, in this order
        return None
    return ResourceScope(context, rtype, frozenset(perm), query)


def split(scope: str | Iterable[str] | None) -> list[str]:
    if scope is None:
        return []
    items = scope.split() if isinstance(scope, str) else list(scope)
    return list(dict.fromkeys(s for s in items if s))


def _covers_context(ceiling: str, asked: str) -> bool:
    return ceiling == asked or (ceiling == "user" and asked == "patient")


def intersect(asked: ResourceScope, ceiling: ResourceScope) -> ResourceScope | None:
    if not _covers_context(ceiling.context, asked.context):
        return None
    if ceiling.rtype == "*":
        rtype = asked.rtype
    elif asked.rtype in ("*", ceiling.rtype):
        rtype = ceiling.rtype
    else:
        return None
    perms = asked.perms & ceiling.perms
    if not perms:
        return None
    if ceiling.query is None:
        query = asked.query
    elif asked.query in (None, ceiling.query):
        query = ceiling.query
    else:
        return None
    return ResourceScope(asked.context, rtype, perms, query, asked.v1)


def narrow(asked: Iterable[ResourceScope], ceiling: Iterable[str]) -> list[ResourceScope]:
    """Each asked scope cut down to what ``ceiling`` allows (possibly into several scopes)."""
    limits = [c for c in (parse(s) for s in ceiling) if c is not None]
    out: dict[str, ResourceScope] = {}
    for a in asked:
        for c in limits:
            got = intersect(a, c)
            if got is not None:
                out.setdefault(got.text(), got)
    found = list(out.values())
    # Two ceilings may give overlapping pieces: keep only those no other one contains.
    return [r for r in found if not any(o is not r and _contains(o, r) for o in found)]


def _contains(big: ResourceScope, small: ResourceScope) -> bool:
    return (big.context == small.context and big.rtype in ("*", small.rtype) and small.perms <= big.perms
            and big.query in (None, small.query) and (big.perms, big.rtype, big.query) != (small.perms, small.rtype, small.query))


def grant(asked: str | Iterable[str] | None, *, client_allowed: Iterable[str], role_allowed: Iterable[str] | None) -> list[str]:
    """The scopes to grant a SMART app (resource and other scopes, in the order asked).

    ``role_allowed`` is None for backend services (no user: ``system/`` scopes
    within the client's registration); for a user it is the role's session
    scopes, and ``system/`` scopes are never granted.
    """
    names = split(asked)
    allowed = set(split(client_allowed))
    resources = [r for r in (parse(s) for s in names) if r is not None]
    if role_allowed is None:
        resources = [r for r in resources if r.context == "system"]
    else:
        role = split(role_allowed)
        role_contexts = {r.context for r in (parse(s) for s in role) if r is not None}
        resources = [r for r in resources if r.context != "system"]
        if "user" not in role_contexts:
            # One record only (patients, proxies): "user/" means the same thing as "patient/".
            resources = [replace(r, context="patient") if r.context == "user" else r for r in resources]
        resources = narrow(resources, role)
    granted_resources = {r.text() for r in narrow(resources, allowed)}
    out: list[str] = []
    if role_allowed is not None:
        for name in names:
            if name in IDENTITY_SCOPES or name == LAUNCH_PATIENT or (name == OFFLINE and OFFLINE in allowed):
                out.append(name)
    # Resource scopes in the order of the request, then the ones a request expanded.
    out += [s for s in names if s in granted_resources]
    out += sorted(granted_resources - set(out))
    return out


def resource_scopes(scopes: Iterable[str]) -> list[ResourceScope]:
    return [r for r in (parse(s) for s in scopes) if r is not None]


def has_patient_scopes(scopes: Iterable[str]) -> bool:
    return any(r.context == "patient" for r in resource_scopes(scopes))


def grants(scopes: Iterable[str], context: str, rtype: str, letter: str) -> bool:
    """Does one of ``scopes`` of this context allow ``letter`` (c r u d s) on ``rtype``?"""
    return any(r.context == context and r.rtype in ("*", rtype) and letter in r.perms for r in resource_scopes(scopes))


def patient_only(scopes: Iterable[str], rtype: str, letter: str) -> bool:
    """True when only ``patient/`` scopes allow this: the access policy must then keep
    the caller within its patient context (``Caller.patient_context``)."""
    scopes = list(scopes)
    return grants(scopes, "patient", rtype, letter) and not (
        grants(scopes, "user", rtype, letter) or grants(scopes, "system", rtype, letter))


def valid_registration_scope(scope: str) -> bool:
    """A scope a client registration may list."""
    return parse(scope) is not None or scope in SUPPORTED_OTHER or scope == ONLINE or scope == LAUNCH
