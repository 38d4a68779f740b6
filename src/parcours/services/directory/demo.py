"""A realistic demo region: practices, practitioners, their roles, places and services.

``build_region`` is pure and deterministic (same arguments, same resources, same
ids); ``write_region`` stores the result through the Repository in large
transactions. What it models:

* real communes of the region (``geo.communes``) with their population;
* how many roles each département gets: its population times the DREES
  density of its physicians, nurses or dentists (``data/density.json``), so
  thinly served départements (Aisne, Oise) stay thin;
* where they practise: communes drawn with a weight that grows faster than
  population and a minimum size per profession (no specialist in a village, no
  pharmacy under 2,500 inhabitants), which leaves rural areas without any
  practice for kilometres, as in reality;
* practices: health centres (maisons de santé), group and single practices,
  pharmacies, hospital outpatient clinics in the larger towns, each with a
  Location near the commune's centre, opening hours and wheelchair access;
* offers per role (consultation, teleconsultation, unscheduled care, home
  visits, vaccination, tele-expertise) as HealthcareServices, languages, and
  whether the role accepts new patients;
* a few patients living in the region.

Schedules and slots are booking's: pass ``hooks`` to ``write_region`` to add
them once the directory is stored (each hook gets the Repository and the
built ``DemoRegion``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cache
from importlib import resources

from parcours.core.errors import BadRequest
from parcours.security.caller import SYSTEM, Caller
from parcours.services.directory import model
from parcours.services.directory.geo import Commune, communes
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.services.platform import Platform
from parcours.store.bulk import BatchBuilder
from parcours.store.repository import Repository

DEFAULT_REGION = "32"  # Hauts-de-France
DEFAULT_ROLES = 1500
DEFAULT_PATIENTS = 25
WRITE_BATCH = 2000

# One demo mix: (key, G15 profession, R38 specialty, share of roles, density column, minimum commune population, weight exponent)
#   density column: 0 physicians, 1 nurses, 2 dentists (DREES per 100,000).
MIX: tuple[tuple[str, str, str | None, float, int, int, float], ...] = (
    ("gp", "10", "SM54", 0.28, 0, 1000, 1.10),
    ("cardio", "10", "SM04", 0.020, 0, 15000, 1.35),
    ("dermato", "10", "SM15", 0.015, 0, 15000, 1.35),
    ("ophtalmo", "10", "SM38", 0.020, 0, 15000, 1.35),
    ("pediatre", "10", "SM40", 0.018, 0, 15000, 1.35),
    ("gyneco", "10", "SM19", 0.015, 0, 15000, 1.35),
    ("psychiatre", "10", "SM42", 0.020, 0, 15000, 1.35),
    ("orl", "10", "SM39", 0.010, 0, 20000, 1.35),
    ("rhumato", "10", "SM48", 0.008, 0, 20000, 1.35),
    ("pneumo", "10", "SM41", 0.008, 0, 20000, 1.35),
    ("gastro", "10", "SM24", 0.008, 0, 20000, 1.35),
    ("radio", "10", "SM44", 0.012, 0, 15000, 1.35),
    ("endocrino", "10", "SM62", 0.006, 0, 30000, 1.35),
    ("nurse", "60", None, 0.24, 1, 700, 1.00),
    ("physio", "70", None, 0.13, 0, 1500, 1.10),
    ("dentist", "40", None, 0.09, 2, 2000, 1.20),
    ("midwife", "50", None, 0.03, 0, 5000, 1.20),
    ("pharmacist", "21", None, 0.06, 0, 2500, 1.05),
    ("speech", "91", None, 0.02, 0, 3000, 1.20),
)
SPECIALIST_KEYS = {k for k, prof, sp, *_ in MIX if prof == "10" and sp != "SM54"}

# Chance that a role offers each care offer, by kind of role.
OFFER_RATES: dict[str, dict[str, float]] = {
    "gp": {"teleconsultation": 0.40, "unscheduled-care": 0.45, "home-visit": 0.25, "vaccination": 0.80},
    "specialist": {"teleconsultation": 0.35, "tele-expertise": 0.30},
    "nurse": {"home-visit": 0.90, "vaccination": 0.80, "unscheduled-care": 0.15, "teleconsultation": 0.05},
    "physio": {"home-visit": 0.45, "teleconsultation": 0.10},
    "dentist": {"unscheduled-care": 0.20},
    "midwife": {"teleconsultation": 0.30, "home-visit": 0.40, "vaccination": 0.70},
    "pharmacist": {"vaccination": 0.90},
    "speech": {"teleconsultation": 0.20},
}
EXTRA_LANGUAGES = (("en", 0.30), ("es", 0.05), ("de", 0.04), ("it", 0.03), ("ar", 0.05), ("pt", 0.02), ("nl", 0.04), ("pl", 0.02))
PHONE_AREA = {"11": "1", "24": "2", "28": "2", "52": "2", "53": "2", "32": "3", "44": "3", "27": "3", "84": "4", "93": "4",
              "94": "4", "76": "5", "75": "5"}

Hook = Callable[[Repository, "DemoRegion"], Awaitable[None]]


@dataclass
class Practice:
    key: str
    kind: str  # msp, cabinet, pharmacy, hospital
    name: str
    commune: Commune
    lat: float
    lon: float
    line: str
    wheelchair: bool
    hours: list[dict]
    phone: str
    members: list[int] = field(default_factory=list)  # indexes into DemoRegion.roles


@dataclass
class RoleSpec:
    key: str
    kind: str  # MIX key
    profession: str
    specialty: str | None
    practitioner: int  # index into DemoRegion.practitioners
    practice: str
    offers: list[str]
    accepts_new_patients: bool


@dataclass
class DemoRegion:
    region: str
    seed: int
    dataset: str
    prefix: str
    practices: dict[str, Practice]
    roles: list[RoleSpec]
    practitioners: list[dict]  # Practitioner resources (with ids)
    resources: list[dict]  # every resource to store, with its id, in write order

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.resources:
            out[r["resourceType"]] = out.get(r["resourceType"], 0) + 1
        return out


@cache
def _names() -> dict:
    return json.loads(resources.files("parcours.services.directory").joinpath("data/names.json").read_text("utf-8"))


@cache
def densities() -> dict[str, list[float]]:
    raw = json.loads(resources.files("parcours.services.directory").joinpath("data/density.json").read_text("utf-8"))
    return raw["per_100k"]


def dataset_name(region: str, seed: int) -> str:
    return f"demo-{region}-{seed}"


def _prefix(dataset: str) -> str:
    p = re.sub(r"[^A-Za-z0-9\-]", "-", dataset)[:40]
    return p


def build_region(region: str = DEFAULT_REGION, *, seed: int = 1, roles: int = DEFAULT_ROLES,
                 patients: int = DEFAULT_PATIENTS, dataset: str | None = None, today: date | None = None) -> DemoRegion:
    """The resources of a demo region (INSEE region code), about ``roles`` practitioner roles;
    pure: the same arguments give the same resources, ids included."""
    geo = communes()
    if region not in geo.regions:
        raise BadRequest(f"Unknown region {region!r}; INSEE region codes: {', '.join(sorted(geo.regions))}")
    if not (10 <= roles <= 100_000):
        raise BadRequest("roles must be between 10 and 100,000")
    dataset = dataset or dataset_name(region, seed)
    prefix = _prefix(dataset)
    rng = random.Random(f"{seed}:{region}")  # the dataset name changes ids and tags, not the data
    names = _names()
    region_communes = [c for c in geo.in_region(region) if c.population > 0]
    deps = sorted({c.departement for c in region_communes})
    dens = densities()
    id_base = int(hashlib.sha256(dataset.encode()).hexdigest(), 16) % 10**8

    # 1. How many roles of each kind in each département, then in which commune.
    assignments: list[tuple[str, Commune]] = []  # (mix key, commune), in a stable order
    share_total = sum(m[3] for m in MIX)
    for kind_key, _prof, _spec, share, col, min_pop, expo in MIX:
        n_kind = max(1, round(roles * share / share_total))
        dep_weight = {d: sum(c.population for c in region_communes if c.departement == d) * dens.get(d, [250, 1000, 50])[col]
                      for d in deps}
        total_w = sum(dep_weight.values()) or 1
        quotas = _largest_remainder({d: n_kind * w / total_w for d, w in dep_weight.items()}, n_kind)
        for d in deps:
            pool = [c for c in region_communes if c.departement == d and c.population >= min_pop]
            if not pool or not quotas[d]:
                continue
            weights = [c.population ** expo for c in pool]
            for c in rng.choices(pool, weights=weights, k=quotas[d]):
                assignments.append((kind_key, c))

    # 2. Group each commune's roles into practices.
    by_commune: dict[str, list[str]] = {}
    commune_of: dict[str, Commune] = {}
    for key, c in assignments:
        by_commune.setdefault(c.code, []).append(key)
        commune_of[c.code] = c
    practices: dict[str, Practice] = {}
    role_specs: list[RoleSpec] = []
    practitioners: list[dict] = []
    area = PHONE_AREA.get(region, "3")
    counter = {"practice": 0, "role": 0}

    def new_practice(kind: str, name: str, c: Commune) -> Practice:
        counter["practice"] += 1
        key = f"{prefix}-org{counter['practice']}"
        radius = min(3.0, 0.3 + 1.6 * math.sqrt(c.population / 100_000))
        ang, dist = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.random())
        lat = c.lat + (dist * math.cos(ang)) / 111.2
        lon = c.lon + (dist * math.sin(ang)) / (111.2 * max(0.2, math.cos(math.radians(c.lat))))
        street = rng.choice(names["streets"])
        number = rng.randint(1, 180)
        wheelchair = kind in ("msp", "hospital") or rng.random() < 0.55
        saturday = rng.random() < 0.5
        hours = model.opening_hours(model.DAYS[:5], rng.choice(["08:00:00", "08:30:00", "09:00:00"]),
                                    rng.choice(["18:00:00", "19:00:00", "19:30:00"]))
        if kind == "hospital":
            hours = model.opening_hours(model.DAYS, "00:00:00", "23:59:00")
        elif saturday:
            hours += model.opening_hours(("sat",), "09:00:00", "12:30:00")
        phone = f"0{area}{rng.randint(10_00_00_00, 99_99_99_99):08d}"
        p = Practice(key, kind, name, c, lat, lon, f"{number} {street}", wheelchair, hours, phone)
        practices[key] = p
        return p

    def new_practitioner(kind: str, profession: str) -> int:
        i = len(practitioners)
        gender = "female" if rng.random() < (0.85 if kind in ("nurse", "midwife", "speech") else 0.5) else "male"
        given = rng.choice(names["female"] if gender == "female" else names["male"])
        family = rng.choice(names["family"])
        langs = ["fr"] + [code for code, p in EXTRA_LANGUAGES if rng.random() < p]
        rpps = model.with_luhn("1" + f"{(id_base + i) % 10**9:09d}")
        res = model.practitioner(rpps=rpps, family=family, given=given, gender=gender, profession=profession,
                                 languages=langs, dataset=dataset)
        res["id"] = f"{prefix}-prac{i + 1}"
        practitioners.append(res)
        return i

    def add_role(kind: str, practice: Practice, practitioner: int | None = None) -> None:
        _, prof, spec, *_ = next(m for m in MIX if m[0] == kind)
        counter["role"] += 1
        pi = practitioner if practitioner is not None else new_practitioner(kind, prof)
        group = "specialist" if kind in SPECIALIST_KEYS else kind
        offers = ["consultation"] + [o for o, p in sorted(OFFER_RATES.get(group, {}).items()) if rng.random() < p]
        if kind == "pharmacist":
            offers = [o for o in offers if o != "consultation"]
        dens_col = dens.get(practice.commune.departement, [300.0])[0]
        p_new = 0.3 if dens_col < 250 else 0.5
        accepts = rng.random() < (p_new if kind == "gp" else 0.7)
        spec_obj = RoleSpec(f"{prefix}-role{counter['role']}", kind, prof, spec, pi, practice.key, offers, accepts)
        practice.members.append(len(role_specs))
        role_specs.append(spec_obj)

    nom = nomenclatures()
    for code in sorted(by_commune):
        c = commune_of[code]
        kinds = sorted(by_commune[code], key=lambda k: [m[0] for m in MIX].index(k))
        rest = list(kinds)
        if c.population >= 40_000 and sum(1 for k in rest if k in SPECIALIST_KEYS) >= 2:
            hospital = new_practice("hospital", f"Centre hospitalier de {c.name}", c)
            for k in [k for k in rest if k in SPECIALIST_KEYS][::2]:
                add_role(k, hospital)
                rest.remove(k)
        if rest.count("gp") >= 2 and any(k in rest for k in ("nurse", "physio")) and rng.random() < 0.6:
            msp = new_practice("msp", f"Maison de santé pluriprofessionnelle de {c.name}", c)
            quota = {"gp": 3, "nurse": 2, "physio": 2, "midwife": 1, "speech": 1}
            for k in list(rest):
                if quota.get(k, 0) > 0:
                    quota[k] -= 1
                    add_role(k, msp)
                    rest.remove(k)
        for kind in [m[0] for m in MIX]:
            n = rest.count(kind)
            while n > 0:
                size = min(n, rng.choice([1, 1, 1, 2, 2, 3]))
                if kind == "pharmacist":
                    where = rng.choice(["du Centre", "de la Gare", "de la Mairie", "des Écoles", rng.choice(names["family"])])
                    label = f"Pharmacie {where}"
                    p = new_practice("pharmacy", label, c)
                else:
                    _, prof, spec, *_ = next(m for m in MIX if m[0] == kind)
                    what = (nom.specialties.get(spec).fr if spec else nom.professions.get(prof).fr)  # type: ignore[union-attr]
                    label = f"Cabinet {'de groupe ' if size > 1 else ''}{what.lower()} - {c.name}"
                    p = new_practice("cabinet", label, c)
                for _ in range(size):
                    add_role(kind, p)
                n -= size

    # A few specialists also consult at the nearest hospital of the département (second role).
    hospitals = [p for p in practices.values() if p.kind == "hospital"]
    for spec_role in list(role_specs):
        if spec_role.kind in SPECIALIST_KEYS and practices[spec_role.practice].kind == "cabinet" and hospitals and rng.random() < 0.1:
            home = practices[spec_role.practice]
            near = min(hospitals, key=lambda h: (h.lat - home.lat) ** 2 + (h.lon - home.lon) ** 2)
            if near.commune.departement == home.commune.departement:
                add_role(spec_role.kind, near, practitioner=spec_role.practitioner)

    # 3. FHIR resources.
    out: list[dict] = []
    service_ids: dict[tuple[str, str, str], str] = {}
    for p in practices.values():
        org = model.organization(name=p.name, identifiers=_org_identifiers(p, id_base), line=p.line, commune=p.commune,
                                 phone=p.phone, kind=p.kind, dataset=dataset,
                                 extra_identifiers=[{"system": model.ORGANIZATION_ID_SYSTEM, "value": p.key}])
        org["id"] = p.key
        loc = model.location(key=p.key, name=p.name, line=p.line, commune=p.commune, lat=p.lat, lon=p.lon,
                             organization_ref=f"Organization/{p.key}", wheelchair=p.wheelchair, hours=p.hours,
                             phone=p.phone, dataset=dataset)
        loc["id"] = f"{p.key}-loc"
        out += [org, loc]
        for ri in p.members:
            r = role_specs[ri]
            for offer in r.offers:
                what = r.specialty or r.profession
                skey = (p.key, offer, what)
                if skey in service_ids:
                    continue
                sid = f"{p.key}-svc{len(service_ids) + 1}"
                service_ids[skey] = sid
                label = nom.care_offers.get(offer).fr  # type: ignore[union-attr]
                what_label = (nom.specialties.get(r.specialty).fr if r.specialty else nom.professions.get(r.profession).fr)  # type: ignore[union-attr]
                svc = model.healthcare_service(key=sid, offer=offer, name=f"{label} - {what_label} - {p.name}",
                                               organization_ref=f"Organization/{p.key}", location_refs=[f"Location/{p.key}-loc"],
                                               specialty=r.specialty, profession=r.profession, hours=p.hours, dataset=dataset)
                svc["id"] = sid
                out.append(svc)
    out += practitioners
    for r in role_specs:
        p = practices[r.practice]
        what = r.specialty or r.profession
        role = model.practitioner_role(
            key=r.key, practitioner_ref=f"Practitioner/{practitioners[r.practitioner]['id']}",
            organization_ref=f"Organization/{p.key}", location_refs=[f"Location/{p.key}-loc"],
            service_refs=[f"HealthcareService/{service_ids[(p.key, o, what)]}" for o in r.offers],
            profession=r.profession, specialty=r.specialty, accepts_new_patients=r.accepts_new_patients,
            phone=p.phone, dataset=dataset)
        role["id"] = r.key
        out.append(role)
    out += _patients(rng, region_communes, patients, prefix, dataset, names, today or date(2026, 1, 1))
    return DemoRegion(region, seed, dataset, prefix, practices, role_specs, practitioners, out)


def _org_identifiers(p: Practice, id_base: int) -> list[dict]:
    n = int(p.key.rsplit("org", 1)[1])
    if p.kind in ("msp", "hospital", "pharmacy"):
        finess = model.with_luhn(f"{p.commune.departement[:2]}{(id_base + n) % 10**6:06d}")
        return model.organization_identifiers(finess=finess)
    siret = model.with_luhn(f"9{(id_base * 7 + n) % 10**12:012d}")
    return model.organization_identifiers(siret=siret)


def _patients(rng: random.Random, pool: list[Commune], n: int, prefix: str, dataset: str, names: dict, today: date) -> list[dict]:
    out = []
    weights = [c.population for c in pool]
    for i in range(n):
        c = rng.choices(pool, weights=weights)[0]
        gender = rng.choice(["female", "male"])
        born = today - timedelta(days=rng.randint(18 * 365, 90 * 365))
        out.append({
            "resourceType": "Patient",
            "id": f"{prefix}-pat{i + 1}",
            "meta": model.tag(dataset),
            "identifier": [{"system": f"{model.PARCOURS}/NamingSystem/demo-patient", "value": f"{prefix}-pat{i + 1}"}],
            "active": True,
            "name": [{"use": "official", "family": rng.choice(names["family"]).upper(),
                      "given": [rng.choice(names["female"] if gender == "female" else names["male"])]}],
            "gender": gender,
            "birthDate": born.isoformat(),
            "address": [{**model.address(f"{rng.randint(1, 120)} {rng.choice(names['streets'])}", c), "use": "home"}],
        })
    return out


def _largest_remainder(shares: dict[str, float], total: int) -> dict[str, int]:
    base = {k: math.floor(v) for k, v in shares.items()}
    left = total - sum(base.values())
    for k in sorted(shares, key=lambda k: (-(shares[k] - base[k]), k))[:left]:
        base[k] += 1
    return base


async def write_region(platform: Platform, demo: DemoRegion, *, caller: Caller = SYSTEM,
                       hooks: list[Hook] | None = None, validate: bool = True) -> dict[str, int]:
    """Store every resource (create, or replace by id), ``WRITE_BATCH`` per transaction.

    Resources go through the Repository's bulk path (``Repository.bulk_writer``: COPY,
    many resources per statement, policy checked per type); the default region is
    about 8,000 resources. ``validate`` runs the Repository's validation on each
    first (about 1 ms each, half the time); the builders' output is validated by
    the test suite, so the CLI may skip it.
    """
    for start in range(0, len(demo.resources), WRITE_BATCH):
        async with platform.transaction(caller) as repo:
            builder = BatchBuilder(repo.registry, repo.base_url, repo.clock.now())
            for res in demo.resources[start : start + WRITE_BATCH]:
                if validate:
                    repo.prepare(res["resourceType"], res)
                builder.add(res["resourceType"], res["id"], res, "PUT")
            writer = repo.bulk_writer()
            for batch in builder.batches():
                await writer.add(batch)
            await writer.flush()
    for hook in hooks or []:
        async with platform.transaction(caller) as repo:
            await hook(repo, demo)
    return demo.counts()


__all__ = ["DEFAULT_REGION", "DEFAULT_ROLES", "DemoRegion", "Hook", "MIX", "build_region", "dataset_name", "densities", "write_region"]
