"""The consent page: what an app would get (requested ∩ registration ∩ role), in words, and
for which patient: a patient's own record, one of a proxy's represented patients, or a
patient a professional cares for (offered from their own searches, or typed and checked
through their own access)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from psycopg import AsyncConnection

from parcours.core.errors import BadRequest, Forbidden, NotFound, ParcoursError
from parcours.fhir import fr_core
from parcours.security import roles, scopes
from parcours.services import accounts
from parcours.services.platform import Platform
from parcours.store import oauth as store
from parcours.store.accounts import Account

PATIENT_CHOICES = 50


@dataclass(frozen=True)
class ScopeLine:
    """One line of the consent page."""

    key: str  # message key
    rtype: str | None = None  # resource type, "*" for all
    actions: tuple[str, ...] = ()  # read, search, create, update, delete
    context: str | None = None  # patient | user


@dataclass(frozen=True)
class PatientChoice:
    id: str
    name: str


@dataclass(frozen=True)
class ConsentView:
    client: store.Client
    params: dict[str, str]  # the authorization request, carried by the consent form
    granted: list[str]
    lines: list[ScopeLine]
    needs_patient: bool
    patient: PatientChoice | None  # decided without asking (a patient's own record)
    choices: list[PatientChoice]  # to choose from
    free_entry: bool  # professionals may type a patient id
    redirect_host: str
    error: str | None = None

    def with_error(self, error: str) -> "ConsentView":
        return replace(self, error=error)


_ACTION_OF = {"r": "read", "s": "search", "c": "create", "u": "update", "d": "delete"}


def describe(granted: Iterable[str]) -> list[ScopeLine]:
    lines: list[ScopeLine] = []
    for s in granted:
        r = scopes.parse(s)
        if r is not None:
            actions = tuple(_ACTION_OF[ch] for ch in "rscud" if ch in r.perms)
            lines.append(ScopeLine(f"smart.scope.{r.context}", r.rtype, actions, r.context))
        elif s in (scopes.OPENID, scopes.FHIR_USER, scopes.PROFILE):
            if not any(line.key == "smart.scope.identity" for line in lines):
                lines.append(ScopeLine("smart.scope.identity"))
        elif s == scopes.OFFLINE:
            lines.append(ScopeLine("smart.scope.offline"))
        elif s == scopes.LAUNCH_PATIENT:
            lines.append(ScopeLine("smart.scope.launch_patient"))
    return lines


async def consent_view(platform: Platform, conn: AsyncConnection, client: store.Client, account: Account,
                       params: dict[str, str]) -> ConsentView:
    role = roles.role(account.role)
    granted = scopes.grant(params.get("scope"), client_allowed=scopes.split(client.scope), role_allowed=role.session_scopes)
    needs_patient = scopes.has_patient_scopes(granted) or scopes.LAUNCH_PATIENT in granted
    patient: PatientChoice | None = None
    choices: list[PatientChoice] = []
    free_entry = False
    if needs_patient:
        if account.role == roles.PATIENT and account.fhir_user and account.fhir_user.startswith("Patient/"):
            patient = PatientChoice(account.fhir_user.split("/", 1)[1], account.display_name)
        else:
            choices = await reachable_patients(platform, conn, account)
            free_entry = role.space == "workspace"
    redirect = params.get("redirect_uri") or (client.redirect_uris[0] if client.redirect_uris else "")
    return ConsentView(client, {k: v for k, v in params.items() if k not in FORM_ONLY}, granted, describe(granted),
                       needs_patient, patient, choices, free_entry, urlsplit(redirect).netloc or redirect)


# Fields of the consent form that are not part of the authorization request.
FORM_ONLY = frozenset({"csrf_token", "decision", "patient", "patient_id"})


async def reachable_patients(platform: Platform, conn: AsyncConnection, account: Account) -> list[PatientChoice]:
    """The Patients this user may open, as the access policy sees it (a proxy's represented
    patients, a professional's patients): the same search the user's pages would run."""
    repo = platform.repository(conn, accounts.caller_for(account))
    try:
        found = await repo.search(repo.parse_search("Patient", [("_count", str(PATIENT_CHOICES))]))
    except ParcoursError:
        return []
    return [PatientChoice(s.id, fr_core.display_name(s.resource()) or s.id) for s in found.matches]


async def check_patient_choice(platform: Platform, conn: AsyncConnection, account: Account, view: ConsentView,
                               chosen: str | None) -> str | None:
    """The Patient id of the launch context, checked through the user's own access."""
    if not view.needs_patient:
        return None
    if view.patient is not None:
        return view.patient.id
    chosen = (chosen or "").strip().removeprefix("Patient/")
    if not chosen:
        return None
    if any(c.id == chosen for c in view.choices):
        return chosen
    if not view.free_entry:
        raise Forbidden("This patient is not one you may choose")
    repo = platform.repository(conn, accounts.caller_for(account))
    try:
        await repo.read("Patient", chosen)
    except (NotFound, Forbidden, BadRequest):
        raise Forbidden(f"You have no access to Patient/{chosen}") from None
    return chosen


