"""People and their accounts: creation, identity status, credentials, profile, user tokens.

Accounts live in ``parcours.store.accounts``; the FHIR resource an account is
linked to (Patient, Practitioner, RelatedPerson) stays in the resource store and
is read and written through a Repository, with the identity service's own
narrowly scoped caller. Every function runs in the caller's transaction.

``check_*`` functions validate, ``do_*``-style functions (``create_account``,
``change_password``...) change state, as elsewhere in the services.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from typing import Any

from psycopg import AsyncConnection
from psycopg.errors import UniqueViolation

from parcours.core.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from parcours.core.ids import is_valid_id, new_id
from parcours.fhir import fr_core
from parcours.security import passwords, roles, tokens
from parcours.security import totp as totp_codes
from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.store import accounts as store
from parcours.store.accounts import Account

# The identity service reads the resources accounts are linked to (to show who is
# signed in) and records identity statuses on Patients; nothing more.
IDENTITY = Caller(
    kind="system", user_id="parcours-identity", display="Parcours identity service",
    scopes=frozenset({"system/Patient.rus", "system/Practitioner.rs", "system/PractitionerRole.rs",
                      "system/RelatedPerson.rs", "system/Organization.rs"}),
)

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class NewAccount:
    email: str
    password: str
    role: str
    fhir_user: str | None = None
    totp_secret: str | None = None
    display_name: str | None = None
    identity_status: str | None = None  # patients: also written on the Patient
    locale: str | None = None


@dataclass(frozen=True)
class Profile:
    """Who an account is, as shown to them: from the account and its FHIR resource."""

    account: Account
    display_name: str
    resource: dict | None
    ins: str | None = None
    rpps: str | None = None
    practitioner_roles: list[dict[str, Any]] = field(default_factory=list)


def parse_reference(reference: str) -> tuple[str, str]:
    rtype, _, rid = reference.partition("/")
    if not rtype or not is_valid_id(rid) or "/" in rid:
        raise BadRequest(f"{reference!r} is not a reference like Patient/123")
    return rtype, rid


def check_new_account(new: NewAccount, *, min_password_length: int) -> None:
    if not roles.is_role(new.role):
        raise BadRequest(f"Unknown role {new.role!r}: one of {', '.join(roles.ROLES)}")
    if not _EMAIL_RE.match(new.email.strip()):
        raise BadRequest(f"{new.email!r} is not an e-mail address")
    role = roles.role(new.role)
    if new.fhir_user is None:
        if role.link_required:
            raise BadRequest(f"A {new.role} account must be linked to a {' or '.join(role.link_types)} (--fhir)")
    else:
        rtype, _ = parse_reference(new.fhir_user)
        if rtype not in role.link_types:
            raise BadRequest(f"A {new.role} account is linked to a {' or '.join(role.link_types)}, not a {rtype}")
    problems = passwords.password_problems(new.password, min_length=min_password_length, email=new.email)
    if problems:
        raise BadRequest("The password is not acceptable: " + ", ".join(problems)
                         + f" (at least {min_password_length} characters, not the e-mail address)")
    if new.totp_secret is not None and not totp_codes.is_valid_secret(new.totp_secret):
        raise BadRequest("The TOTP secret must be base32 with at least 80 bits (16 characters)")
    if new.identity_status is not None:
        if new.role != roles.PATIENT:
            raise BadRequest("Only patient accounts carry an identity status")
        if new.identity_status not in fr_core.STATUS_CODES:
            raise BadRequest(f"Unknown identity status {new.identity_status!r}: one of {', '.join(fr_core.STATUS_CODES)}")


async def _linked(platform: Platform, conn: AsyncConnection, reference: str) -> dict:
    rtype, rid = parse_reference(reference)
    try:
        return (await platform.repository(conn, IDENTITY).read(rtype, rid)).resource()
    except NotFound:
        raise Unprocessable(f"{reference} does not exist: create the resource before its account") from None


async def create_account(platform: Platform, conn: AsyncConnection, new: NewAccount) -> Account:
    settings = platform.settings
    check_new_account(new, min_password_length=settings.password_min_length)
    if await store.email_taken(conn, new.email):
        raise Conflict(f"An account already uses {store.normalize_email(new.email)}")
    resource: dict | None = None
    identity_status: str | None = None
    if new.fhir_user:
        resource = await _linked(platform, conn, new.fhir_user)
        if new.role == roles.PRACTITIONER and not fr_core.rpps(resource):
            raise Unprocessable(f"{new.fhir_user} has no RPPS identifier ({fr_core.RPPS_SYSTEM}): "
                                "a professional account needs one")
    if new.role == roles.PATIENT:
        assert resource is not None and new.fhir_user is not None
        if new.identity_status is not None:
            await set_identity_status(platform, conn, new.fhir_user, new.identity_status, resource=resource)
            identity_status = new.identity_status
        else:
            identity_status = fr_core.identity_status(resource) or "provisional"
    display = (new.display_name or (fr_core.display_name(resource) if resource else "") or new.email).strip()
    password_hash = await asyncio.to_thread(passwords.hash_password, new.password)
    try:
        async with conn.transaction():  # a savepoint: a lost race on the e-mail leaves the outer transaction usable
            return await store.insert_account(
                conn, id=new_id(), email=new.email, role=new.role, fhir_user=new.fhir_user, display_name=display,
                identity_status=identity_status, password_hash=password_hash, totp_secret=new.totp_secret,
                locale=new.locale, now=platform.clock.now(),
            )
    except UniqueViolation:
        raise Conflict(f"An account already uses {store.normalize_email(new.email)}") from None


async def set_identity_status(platform: Platform, conn: AsyncConnection, patient_ref: str, status: str,
                              *, resource: dict | None = None) -> None:
    """Record an RNIV identity status on the Patient (FR Core extension) and on its accounts.

    Identity vigilance: "recovered" and "qualified" identities come from the INSi
    teleservice, so the Patient must carry its INS (INS-NIR) first.
    """
    if status not in fr_core.STATUS_CODES:
        raise BadRequest(f"Unknown identity status {status!r}")
    rtype, rid = parse_reference(patient_ref)
    if rtype != "Patient":
        raise BadRequest("An identity status belongs to a Patient")
    repo = platform.repository(conn, IDENTITY)
    patient = resource if resource is not None else (await repo.read(rtype, rid)).resource()
    if status in fr_core.NEEDS_INS and not fr_core.ins(patient):
        raise Unprocessable(f"A {status} identity needs the patient's INS ({fr_core.INS_NIR_SYSTEM}) on {patient_ref}")
    if fr_core.identity_status(patient) != status:
        await repo.update(rtype, rid, fr_core.with_identity_status(patient, status))
    now = platform.clock.now()
    for acct in await store.by_fhir_user(conn, patient_ref):
        await store.update_fields(conn, acct.id, now, identity_status=status)


async def profile(platform: Platform, conn: AsyncConnection, account: Account) -> Profile:
    if not account.fhir_user:
        return Profile(account, account.display_name, None)
    repo = platform.repository(conn, IDENTITY)
    rtype, rid = parse_reference(account.fhir_user)
    try:
        resource = (await repo.read(rtype, rid)).resource()
    except (NotFound, Forbidden):
        return Profile(account, account.display_name, None)
    out = Profile(account, fr_core.display_name(resource) or account.display_name, resource,
                  ins=fr_core.ins(resource) if rtype == "Patient" else None,
                  rpps=fr_core.rpps(resource) if rtype == "Practitioner" else None)
    if rtype == "Practitioner":
        req = repo.parse_search("PractitionerRole", [("practitioner", account.fhir_user), ("_include", "PractitionerRole:organization"),
                                                     ("_count", "50")])
        found = await repo.search(req)
        orgs = {f"Organization/{s.id}": s.resource() for s in found.includes if s.resource_type == "Organization"}
        prs = []
        for s in found.matches:
            pr = s.resource()
            org_ref = (pr.get("organization") or {}).get("reference")
            org = orgs.get(org_ref or "")
            prs.append({
                "id": s.id,
                "active": pr.get("active", True),
                "organization": (org or {}).get("name") or (pr.get("organization") or {}).get("display") or "",
                "roles": [_concept_text(c) for c in pr.get("code") or []],
                "specialties": [_concept_text(c) for c in pr.get("specialty") or []],
            })
        out = replace(out, practitioner_roles=prs)
    elif account.role == roles.STAFF and rtype == "PractitionerRole":
        out = replace(out, practitioner_roles=[{"id": rid, "active": resource.get("active", True),
                                                "organization": (resource.get("organization") or {}).get("display", ""),
                                                "roles": [_concept_text(c) for c in resource.get("code") or []],
                                                "specialties": []}])
    return out


def _concept_text(concept: dict) -> str:
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding.get("code"))
    return ""


def caller_for(account: Account, *, scopes: list[str] | tuple[str, ...] | None = None, address: str | None = None) -> Caller:
    """The Caller an account acts as (web session or user token): the one door for every feature."""
    granted = roles.role(account.role).session_scopes if scopes is None else scopes
    return Caller(kind=account.role, user_id=account.id, fhir_user=account.fhir_user, scopes=frozenset(granted),
                  display=account.display_name or account.email, address=address)


async def issue_user_token(platform: Platform, conn: AsyncConnection, email: str, scopes: list[str] | None,
                           lifetime_s: int) -> str:
    """A bearer token for a user (operator tooling): sub = account id, kind = role, fhirUser, scopes.

    ``system/`` scopes are refused: they would let a user token act as automation.
    """
    account = await store.by_email(conn, email)
    if account is None:
        raise NotFound(f"No account uses {store.normalize_email(email)}")
    if not account.active:
        raise Forbidden(f"The account {account.email} is disabled")
    granted = list(roles.role(account.role).session_scopes) if not scopes else scopes
    if any(s.startswith("system/") for s in granted):
        raise BadRequest("system/ scopes are for automation tokens, not for a user's token")
    return tokens.issue(platform.token_key, subject=account.id, kind=account.role, scopes=granted,
                        fhir_user=account.fhir_user, lifetime_s=lifetime_s, now=platform.clock.now().timestamp())


async def change_password(platform: Platform, conn: AsyncConnection, account: Account, current: str, new: str) -> list[str]:
    """Message keys of what went wrong (empty = changed)."""
    if not await asyncio.to_thread(passwords.verify_password, account.password_hash, current):
        return ["password.current_wrong"]
    problems = passwords.password_problems(new, min_length=platform.settings.password_min_length, email=account.email)
    if problems:
        return problems
    password_hash = await asyncio.to_thread(passwords.hash_password, new)
    now = platform.clock.now()
    await store.update_fields(conn, account.id, now, password_hash=password_hash, password_changed_at=now)
    return []


async def set_password(platform: Platform, conn: AsyncConnection, account_id: str, new: str) -> None:
    """Operator reset (no current password): the rules still apply."""
    account = await store.get(conn, account_id)
    if account is None:
        raise NotFound("No such account")
    problems = passwords.password_problems(new, min_length=platform.settings.password_min_length, email=account.email)
    if problems:
        raise BadRequest("The password is not acceptable: " + ", ".join(problems))
    now = platform.clock.now()
    await store.update_fields(conn, account_id, now, password_hash=await asyncio.to_thread(passwords.hash_password, new),
                              password_changed_at=now)


async def new_recovery_codes(platform: Platform, conn: AsyncConnection, account: Account) -> list[str]:
    """Replace the account's recovery codes; the plain codes are returned once, only hashes are kept."""
    codes = totp_codes.new_recovery_codes()
    await store.replace_recovery_codes(conn, account.id, [totp_codes.recovery_code_hash(account.id, c) for c in codes],
                                       platform.clock.now())
    return codes


async def recovery_codes_left(conn: AsyncConnection, account: Account) -> int:
    return await store.recovery_codes_left(conn, account.id)


async def enrol_totp(platform: Platform, conn: AsyncConnection, account: Account, secret: str, code: str) -> list[str] | None:
    """Turn on TOTP with ``secret`` once ``code`` proves the authenticator has it.

    Returns fresh recovery codes, or None when the code does not match.
    """
    now = platform.clock.now()
    step = totp_codes.matching_step(secret, code, now)
    if step is None:
        return None
    await store.update_fields(conn, account.id, now, totp_secret=secret, totp_last_step=step)
    return await new_recovery_codes(platform, conn, account)


async def set_locale(platform: Platform, conn: AsyncConnection, account: Account, locale: str) -> None:
    await store.update_fields(conn, account.id, platform.clock.now(), locale=locale)
