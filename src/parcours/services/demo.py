"""The demo platform: a realistic region, a followed patient and one account per role.

Loaded once into an empty database (``make demo``); loading again changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time, timedelta

from parcours.core.errors import Conflict
from parcours.fhir.fr_core import RPPS_SYSTEM
from parcours.security import roles
from parcours.security.caller import SYSTEM, Caller
from parcours.services import accounts
from parcours.services.directory import demo as region_demo
from parcours.services.directory.nomenclatures import SPECIALTY_SYSTEM
from parcours.services.platform import Platform
from parcours.services.telehealth import expertise, stroke
from parcours.store import accounts as account_store

PASSWORD = "Parcours-demo-2026"
DOMAIN = "demo.parcours.fr"
# A fixed authenticator secret for the demo professionals, so that anyone can sign in
# with any TOTP app (or `oathtool --totp -b SECRET`). Never use such a secret elsewhere.
DEMO_TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@dataclass(frozen=True)
class Login:
    role: str
    email: str
    who: str
    totp: bool


async def _already_loaded(platform: Platform) -> bool:
    async with platform.pool.connection() as conn:
        return await account_store.by_email(conn, f"patient@{DOMAIN}") is not None


async def load(platform: Platform, *, region: str = region_demo.DEFAULT_REGION, roles: int = region_demo.DEFAULT_ROLES,
               seed: int = 1) -> tuple[list[Login], dict[str, int]]:
    """Write the demo region and its accounts; returns the logins and what was written."""
    if await _already_loaded(platform):
        return logins(), {}
    demo = region_demo.build_region(region, seed=seed, roles=roles)
    from parcours.services.booking import (
        demo as booking_demo,  # agendas, slots and a few bookings
    )

    counts = await region_demo.write_region(platform, demo, validate=False, hooks=[booking_demo.schedules_hook()])
    patients = [r for r in demo.resources if r["resourceType"] == "Patient"]
    gp_role = next((r for r in demo.roles if r.kind == "gp"), demo.roles[0])
    gp = demo.practitioners[gp_role.practitioner]
    patient, proxied = patients[0], patients[1] if len(patients) > 1 else patients[0]
    now = platform.clock.now()
    clinical = [
        {"resourceType": "CareTeam", "status": "active", "name": "Équipe de soins primaires",
         "subject": {"reference": f"Patient/{patient['id']}"},
         "participant": [{"member": {"reference": f"Practitioner/{gp['id']}"}}]},
        {"resourceType": "Condition", "subject": {"reference": f"Patient/{patient['id']}"},
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabète de type 2"}], "text": "Diabète de type 2"},
         "recordedDate": (now - timedelta(days=400)).date().isoformat()},
    ]
    for months, value in ((9, 7.9), (6, 7.4), (3, 7.1), (0, 6.8)):
        clinical.append({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hémoglobine A1c"}], "text": "HbA1c"},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "effectiveDateTime": (now - timedelta(days=30 * months)).isoformat(timespec="seconds"),
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
            "referenceRange": [{"high": {"value": 6.5, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}],
        })
    proxy = {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{proxied['id']}"},
             "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "DAU", "display": "fille"}]}],
             "name": [{"family": "Martin", "given": ["Claire"]}]}
    async with platform.transaction(SYSTEM) as repo:
        for res in clinical:
            await repo.create(res["resourceType"], res)
        proxy_id = (await repo.create("RelatedPerson", proxy)).stored.id
    telehealth = await _telehealth(platform, demo, patient["id"], gp["id"])
    new = [
        accounts.NewAccount(f"patient@{DOMAIN}", PASSWORD, "patient", f"Patient/{patient['id']}", identity_status="validated"),
        accounts.NewAccount(f"aidant@{DOMAIN}", PASSWORD, "proxy", f"RelatedPerson/{proxy_id}"),
        accounts.NewAccount(f"medecin@{DOMAIN}", PASSWORD, "practitioner", f"Practitioner/{gp['id']}", totp_secret=DEMO_TOTP_SECRET),
        accounts.NewAccount(f"secretariat@{DOMAIN}", PASSWORD, "staff", f"PractitionerRole/{gp_role.key}",  # the GP's agenda
                            totp_secret=DEMO_TOTP_SECRET, display_name="Secrétariat médical"),
        accounts.NewAccount(f"admin@{DOMAIN}", PASSWORD, "admin", None, totp_secret=DEMO_TOTP_SECRET, display_name="Administration régionale"),
        accounts.NewAccount(f"dermatologue@{DOMAIN}", PASSWORD, "practitioner", telehealth["dermatologist"], totp_secret=DEMO_TOTP_SECRET),
        accounts.NewAccount(f"neurologue@{DOMAIN}", PASSWORD, "practitioner", telehealth["neurologists"][0], totp_secret=DEMO_TOTP_SECRET),
    ]
    async with platform.pool.connection() as conn:
        for n in new:
            try:
                async with conn.transaction():
                    await accounts.create_account(platform, conn, n)
            except Conflict:
                pass
    return logins(), counts


async def _telehealth(platform: Platform, demo: region_demo.DemoRegion, patient_id: str, gp_id: str) -> dict:
    """Telemedicine to try at once: two neurologists on call around the clock at the region's
    first hospital (the tele-stroke roster), and a tele-expertise request from the GP to a
    dermatologist about the followed patient, waiting for the expert."""
    derm_role = next((r for r in demo.roles if r.kind == "dermato"), demo.roles[-1])
    dermatologist = f"Practitioner/{demo.practitioners[derm_role.practitioner]['id']}"
    site = next((k for k, p in demo.practices.items() if p.kind == "hospital"), derm_role.practice)
    now = platform.clock.now()
    async with platform.transaction(SYSTEM) as repo:
        neurologists = []
        for n, (family, given) in enumerate((("Lefebvre", "Anne"), ("Moreau", "Julien"))):
            prac = (await repo.create("Practitioner", {
                "resourceType": "Practitioner", "active": True, "name": [{"family": family, "given": [given], "prefix": ["Dr"]}],
                "identifier": [{"system": RPPS_SYSTEM, "value": f"1999900000{n}"}]})).stored.id
            await repo.create("PractitionerRole", {
                "resourceType": "PractitionerRole", "active": True, "practitioner": {"reference": f"Practitioner/{prac}"},
                "organization": {"reference": f"Organization/{site}"}, "location": [{"reference": f"Location/{site}-loc"}],
                "specialty": [{"coding": [{"system": SPECIALTY_SYSTEM, "code": "SM32", "display": "Neurologie"}]}]})
            neurologists.append(f"Practitioner/{prac}")
        day_and_night = [stroke.Shift(d, time(8, 0), time(8, 0), tuple(neurologists)) for d in stroke.DAYS]
        await repo.create("Schedule", stroke.roster_resource("Neurologie vasculaire (AVC)", f"Location/{site}-loc", day_and_night))
    gp = Caller(kind="practitioner", fhir_user=f"Practitioner/{gp_id}", display="Médecin généraliste",
                scopes=frozenset(roles.role("practitioner").session_scopes))
    async with platform.transaction(gp) as repo:
        await expertise.request_opinion(
            platform, repo, patient=patient_id, expert=dermatologist, priority="routine", consent=True, now=now,
            due=now + timedelta(days=7), question="Lésion pigmentée du dos apparue il y a trois mois, asymétrique : avis sur "
                                                   "la nécessité d'une exérèse ?")
    return {"dermatologist": dermatologist, "neurologists": neurologists}


def logins() -> list[Login]:
    return [
        Login("patient", f"patient@{DOMAIN}", "patiente suivie pour un diabète", False),
        Login("proxy", f"aidant@{DOMAIN}", "aidante (fille) d'une autre patiente", False),
        Login("practitioner", f"medecin@{DOMAIN}", "médecin généraliste de la patiente", True),
        Login("staff", f"secretariat@{DOMAIN}", "secrétariat médical (agenda du médecin)", True),
        Login("admin", f"admin@{DOMAIN}", "administration régionale", True),
        Login("practitioner", f"dermatologue@{DOMAIN}", "dermatologue : une demande de téléexpertise l'attend", True),
        Login("practitioner", f"neurologue@{DOMAIN}", "neurologue d'astreinte AVC (garde de l'hôpital)", True),
    ]
