"""Shared helpers of the messaging tests: a small world of professionals, a patient and a proxy.

* ``gp`` and ``nurse`` care for the patient (her active CareTeam); ``blocked`` was in it
  too but the patient blocked him (a Consent that denies him);
* ``open`` has no relationship with the patient but accepts messages from patients
  (the extension on his PractitionerRole); ``stranger`` has none and does not;
* ``proxy``: the patient's daughter (an active RelatedPerson).

Each person has a Caller as a web session would give (``services.accounts.caller_for``);
those named in ``make_world(accounts=...)`` also have an account (e-mail notices, sign-in):
hashing a password takes a while.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from parcours.fhir import fr_core
from parcours.security import roles, tokens
from parcours.security.caller import Caller
from parcours.services import accounts
from parcours.services.messaging import model
from parcours.services.platform import Platform
from parcours.store.accounts import Account
from tests.accounts_helpers import create_resource, new_account
from tests.conftest import uniq

JSON = {"Content-Type": "application/fhir+json"}
MAX = 5 * 1024 * 1024


@dataclass
class Person:
    ref: str
    account: Account | None
    caller: Caller
    name: str

    @property
    def user_id(self) -> str:
        assert self.caller.user_id is not None
        return self.caller.user_id

    def token(self, platform: Platform) -> str:
        return tokens.issue(platform.token_key, subject=self.user_id, kind=self.caller.kind,
                            scopes=list(self.caller.scopes), fhir_user=self.ref)

    def headers(self, platform: Platform) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(platform)}"}


@dataclass
class World:
    patient: Person
    proxy: Person
    gp: Person
    nurse: Person
    blocked: Person
    open: Person
    stranger: Person
    tag: str
    people: dict[str, Person] = field(default_factory=dict)


async def person(platform: Platform, role: str, ref: str, name: str, *, account: bool, totp_secret: str | None = None) -> Person:
    if account:
        acct = await new_account(platform, role, ref, totp_secret=totp_secret, display_name=name)
        return Person(ref, acct, accounts.caller_for(acct), name)
    caller = Caller(kind=role, user_id=uniq(role), fhir_user=ref, scopes=frozenset(roles.role(role).session_scopes), display=name)
    return Person(ref, None, caller, name)


async def _pro(client: httpx.AsyncClient, platform: Platform, family: str, given: str, *, accepts: bool = False,
               totp_secret: str | None = None, account: bool = False) -> Person:
    pid = await create_resource(client, {
        "resourceType": "Practitioner", "name": [{"family": family, "given": [given], "prefix": ["Dr"]}],
        "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}]})
    org = await create_resource(client, {"resourceType": "Organization", "name": f"Cabinet {family}"})
    role: dict = {"resourceType": "PractitionerRole", "active": True, "practitioner": {"reference": f"Practitioner/{pid}"},
                  "organization": {"reference": f"Organization/{org}"}, "specialty": [{"text": "Médecine générale"}]}
    if accepts:
        role = model.with_accepts_patient_messages(role, True)
    await create_resource(client, role)
    p = await person(platform, "practitioner", f"Practitioner/{pid}", f"{given} {family}", account=account,
                     totp_secret=totp_secret)
    p.name = f"Dr {given} {family}"
    return p


async def make_world(client: httpx.AsyncClient, platform: Platform, *, totp: dict[str, str] | None = None,
                     accounts: tuple[str, ...] = ()) -> World:
    """``accounts``: who gets an account (``patient``, ``gp``...)."""
    tag = uniq("msg")
    totp = totp or {}
    suffix = tag[-6:].upper()

    def pro(key: str, family: str, given: str, **kw: object):  # type: ignore[no-untyped-def]
        return _pro(client, platform, f"{family}{suffix}", given, totp_secret=totp.get(key), account=key in accounts, **kw)

    gp = await pro("gp", "Généraliste", "Claire")
    nurse = await pro("nurse", "Infirmier", "Paul")
    blocked = await pro("blocked", "Bloqué", "Bruno")
    open_ = await pro("open", "Ouvert", "Odile", accepts=True)
    stranger = await pro("stranger", "Inconnu", "Igor")
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": f"Durand{suffix}", "given": ["Héloïse"]}],
                                         "birthDate": "1975-04-03", "gender": "female"})
    patient_ref = f"Patient/{pid}"
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": patient_ref},
                                   "participant": [{"member": {"reference": p.ref}} for p in (gp, nurse, blocked)]})
    patient = await person(platform, "patient", patient_ref, f"Héloïse Durand{suffix}", account="patient" in accounts)
    r = await client.post("/fhir/Consent", headers={**JSON, **patient.headers(platform)}, json={
        "resourceType": "Consent", "status": "active", "patient": {"reference": patient_ref},
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "actor": [{"role": {"text": "professional"}, "reference": {"reference": blocked.ref}}]}})
    assert r.status_code == 201, r.text
    rp = await create_resource(client, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": patient_ref},
                                        "name": [{"family": f"Durand{suffix}", "given": ["Lise"]}]})
    proxy = await person(platform, "proxy", f"RelatedPerson/{rp}", f"Lise Durand{suffix}", account="proxy" in accounts)
    w = World(patient, proxy, gp, nurse, blocked, open_, stranger, tag)
    w.people = {"patient": patient, "proxy": proxy, "gp": gp, "nurse": nurse, "blocked": blocked, "open": open_,
                "stranger": stranger}
    return w
