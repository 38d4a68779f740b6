"""The kinds of user accounts, what FHIR resource each is linked to, and what a session grants.

One table for the whole platform, so the CLI, the sign-in pages and the token
issuer agree on what a role means.
"""

from __future__ import annotations

from dataclasses import dataclass

PATIENT, PRACTITIONER, STAFF, ADMIN, PROXY = "patient", "practitioner", "staff", "admin", "proxy"


@dataclass(frozen=True)
class Role:
    name: str
    link_types: tuple[str, ...]  # FHIR types the account may be linked to
    link_required: bool  # the account means nothing without its FHIR resource
    second_factor_required: bool  # TOTP at every sign-in (professionals and operators)
    space: str  # "portal" (patients, proxies) or "workspace" (professionals, staff, admins)
    session_scopes: tuple[str, ...]  # SMART scopes of a first-party web session


# Session scopes are the widest a first-party application of that role may hold; the
# access policy (role matrix, care relationships, the patient's own compartment) narrows
# every request within them.
ROLES: dict[str, Role] = {
    PATIENT: Role(PATIENT, ("Patient",), True, False, "portal", ("openid", "fhirUser", "patient/*.*")),
    PROXY: Role(PROXY, ("RelatedPerson",), True, False, "portal", ("openid", "fhirUser", "patient/*.*")),
    PRACTITIONER: Role(PRACTITIONER, ("Practitioner",), True, True, "workspace", ("openid", "fhirUser", "user/*.*")),
    STAFF: Role(STAFF, ("Practitioner", "PractitionerRole"), False, True, "workspace", ("openid", "fhirUser", "user/*.*")),
    ADMIN: Role(ADMIN, ("Practitioner",), False, True, "workspace", ("openid", "fhirUser", "user/*.*")),
}


def role(name: str) -> Role:
    return ROLES[name]


def is_role(name: str) -> bool:
    return name in ROLES
