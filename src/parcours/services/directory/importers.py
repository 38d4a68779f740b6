"""Import the care-offer directory: national directory FHIR exports and CSV files.

Both importers are idempotent: every resource is matched by its business
identifier (a conditional ``identifier=system|value`` search, under an advisory
lock so two imports cannot both create it), then created, replaced, or left
alone when nothing changed. Importing the same file twice changes nothing.

FHIR (``import_fhir``): Bundles (any type), single resources, folders of JSON
files or NDJSON, as published by the Annuaire Santé (``ans.fhir.fr.annuaire``
IG). Organization, Location, Practitioner, HealthcareService and
PractitionerRole are imported in that order; references between them are
rewritten to the stored ids. Matching keys:

* Organization: IDNST (``urn:oid:1.2.250.1.71.4.2.2``), else FINESS, else its first identifier;
* Practitioner: IDNPS (``urn:oid:1.2.250.1.71.4.2.1``), else RPPS, else its first identifier;
* PractitionerRole: the directory's role identifier, the same under
  ``https://annuaire.sante.fr`` and ``https://rpps.esante.gouv.fr`` (restricted
  and public extracts); else its first identifier;
* Location, HealthcareService: their first identifier.

A resource without any identifier gets one from its source id
(``SOURCE_ID_SYSTEM``). When one import holds several versions of the same
entity (the directory publishes a restricted "DR" and a public "DP" version),
they are merged field by field, later files winning (identifiers and contact points
add up), and stored once.

CSV (``import_csv``): one row per practitioner role at a place; see ``CSV_COLUMNS``
and ``docs/directory.md``. A bad row is reported with its line number and
nothing of it is stored; the other rows are.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from parcours.core.errors import MultipleMatches, ParcoursError
from parcours.core.ids import new_id
from parcours.security.caller import SYSTEM, Caller
from parcours.services.directory import model
from parcours.services.directory.geo import Commune, communes
from parcours.services.directory.nomenclatures import fold, nomenclatures
from parcours.services.platform import Platform
from parcours.store.repository import Repository

ORDER = ("Organization", "Location", "Practitioner", "HealthcareService", "PractitionerRole")
SOURCE_ID_SYSTEM = f"{model.PARCOURS}/NamingSystem/source-id"
BATCH = 500


@dataclass
class ImportIssue:
    where: str  # "line 12", "Practitioner-334081.json", "entry 3 (Organization/1)"
    message: str

    def as_json(self) -> dict:
        return {"where": self.where, "message": self.message}


@dataclass
class ImportReport:
    created: Counter = field(default_factory=Counter)
    updated: Counter = field(default_factory=Counter)
    unchanged: Counter = field(default_factory=Counter)
    merged: Counter = field(default_factory=Counter)  # duplicates of one entity within the import
    skipped: Counter = field(default_factory=Counter)  # resource types the directory does not import
    errors: list[ImportIssue] = field(default_factory=list)
    warnings: list[ImportIssue] = field(default_factory=list)
    rows: int = 0  # CSV data rows read

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict:
        return {
            "created": dict(self.created), "updated": dict(self.updated), "unchanged": dict(self.unchanged),
            "merged": dict(self.merged), "skipped": dict(self.skipped), "rows": self.rows,
            "errors": [e.as_json() for e in self.errors], "warnings": [w.as_json() for w in self.warnings],
        }


# -- matching -----------------------------------------------------------------------------------------
def _esc(value: str) -> str:
    return re.sub(r"([\\,|$])", r"\\\1", value)


def _ident_query(pairs: list[tuple[str, str]]) -> str:
    return urlencode([("identifier", ",".join(f"{_esc(s)}|{_esc(v)}" for s, v in pairs))])


def match_key(res: dict) -> tuple[str, str] | None:
    """(an in-memory key, the conditional search) that identifies this entity, or None."""
    rtype = res["resourceType"]
    idents = [(i.get("system"), i.get("value")) for i in res.get("identifier") or []
              if isinstance(i, dict) and i.get("system") and i.get("value")]
    prefer = {
        "Organization": (model.IDNST_SYSTEM, model.FINESS_SYSTEM),
        "Practitioner": (model.IDNPS_SYSTEM, model.RPPS_SYSTEM),
    }.get(rtype, ())
    for system in prefer:
        for s, v in idents:
            if s == system:
                return f"{rtype}|{s}|{v}", _ident_query([(s, v)])
    if rtype == "PractitionerRole":
        for s, v in idents:
            if s in model.ROLE_SYSTEMS:
                return f"{rtype}|role|{v}", _ident_query([(alias, v) for alias in model.ROLE_SYSTEMS])
    if idents:
        s, v = idents[0]
        return f"{rtype}|{s}|{v}", _ident_query([(s, v)])
    return None


def _comparable(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k not in ("id", "meta")}
    meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


async def _locate(repo: Repository, rtype: str, query: str) -> str | None:
    ids = await repo._matches(rtype, query, limit=2, lock=True)
    if len(ids) > 1:
        raise MultipleMatches(f"{len(ids)} {rtype} resources match {query}: fix the duplicates before importing")
    return ids[0] if ids else None


async def _store(repo: Repository, rtype: str, rid: str, body: dict, exists: bool, report: ImportReport) -> None:
    body = {**body, "id": rid}
    if exists:
        current = await repo.read(rtype, rid)
        if _comparable(current.resource()) == _comparable(body):
            report.unchanged[rtype] += 1
            return
        await repo.update(rtype, rid, body)
        report.updated[rtype] += 1
    else:
        await repo.create(rtype, body, rid=rid)
        report.created[rtype] += 1


# -- FHIR ------------------------------------------------------------------------------------------------
def read_fhir(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, resource) for every resource in a file or a folder (sorted), unwrapping Bundles."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".ndjson")) if path.is_dir() else [path]
    for f in files:
        text = f.read_text("utf-8-sig")
        if f.suffix == ".ndjson":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield from _unwrap(f"{f.name}:{n}", json.loads(line))
        else:
            yield from _unwrap(f.name, json.loads(text))


def _unwrap(where: str, res: object) -> Iterator[tuple[str, dict]]:
    if not isinstance(res, dict):
        return
    if res.get("resourceType") == "Bundle":
        for i, e in enumerate(res.get("entry") or []):
            r = e.get("resource") if isinstance(e, dict) else None
            if isinstance(r, dict):
                yield from _unwrap(f"{where} entry {i}", r)
        return
    yield where, res


async def import_fhir(platform: Platform, items: Iterable[tuple[str, dict]], *, caller: Caller = SYSTEM,
                      batch: int = BATCH) -> ImportReport:
    report = ImportReport()
    pending: dict[str, list[tuple[str, dict]]] = {t: [] for t in ORDER}
    for where, res in items:
        rtype = res.get("resourceType")
        if rtype in pending:
            pending[rtype].append((where, res))
        else:
            report.skipped[str(rtype)] += 1
    ref_map: dict[str, str] = {}  # "Type/source-id" -> "Type/stored-id"
    for rtype in ORDER:
        # Entities that appear several times are merged field by field; later ones win.
        groups: dict[str, tuple[str, str, dict, list[str]]] = {}
        for where, res in pending[rtype]:
            res = dict(res)
            src = f"{rtype}/{res['id']}" if res.get("id") else None
            key = match_key(res)
            if key is None:
                if not src:
                    report.errors.append(ImportIssue(where, f"{rtype} without identifier or id: cannot be matched on re-import"))
                    continue
                res["identifier"] = [*(res.get("identifier") or []), {"system": SOURCE_ID_SYSTEM, "value": src}]
                key = match_key(res)
                assert key is not None
            k, query = key
            if k in groups:
                report.merged[rtype] += 1
                w0, q0, prev, srcs = groups[k]
                groups[k] = (w0, q0, _merge(prev, res), srcs + ([src] if src else []))
            else:
                groups[k] = (where, query, res, [src] if src else [])
        entries = list(groups.values())
        for start in range(0, len(entries), batch):
            async with platform.transaction(caller) as repo:
                for where, query, res, srcs in entries[start : start + batch]:
                    try:
                        async with repo.conn.transaction():  # a savepoint: one bad resource, not the batch
                            existing = await _locate(repo, rtype, query)
                            rid = existing or new_id()
                            body = _rewrite(_clean(res), ref_map)
                            await _store(repo, rtype, rid, body, existing is not None, report)
                    except ParcoursError as e:
                        report.errors.append(ImportIssue(where, _message(e)))
                        continue
                    for s in srcs:
                        ref_map[s] = f"{rtype}/{rid}"
    return report


UNION_FIELDS = ("identifier", "telecom")


def _merge(earlier: dict, later: dict) -> dict:
    """Two versions of one entity: later fields win, identifiers and contact points add up."""
    out = {**earlier, **later}
    for f in UNION_FIELDS:
        both = [*(earlier.get(f) or []), *(later.get(f) or [])]
        if both:
            out[f] = [x for i, x in enumerate(both) if x not in both[:i]]
    return out


def _clean(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k != "id"}
    meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return model.flag_tags(out)  # the search criteria kept in extensions, as tags


def _rewrite(node: object, ref_map: dict[str, str]) -> object:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in ref_map:
                out[k] = ref_map[v]
            else:
                out[k] = _rewrite(v, ref_map)
        return out
    if isinstance(node, list):
        return [_rewrite(v, ref_map) for v in node]
    return node


def _message(e: ParcoursError) -> str:
    details = "; ".join(i.diagnostics for i in e.issues if i.diagnostics and i.diagnostics not in e.message)
    return f"{e.code}: {e.message}" + (f" ({details})" if details else "")


# -- CSV -----------------------------------------------------------------------------------------------
CSV_COLUMNS: dict[str, str] = {
    "rpps": "required: RPPS number, 11 digits",
    "family": "required: family name",
    "given": "required: given name",
    "gender": "F, M or empty",
    "profession": "required: TRE_G15 code (10 médecin, 60 infirmier...) or its French label",
    "specialty": "TRE_R38 code (SM54 médecine générale...), empty if none",
    "languages": "BCP-47 codes separated by spaces or commas; default fr",
    "organization": "required: name of the practice",
    "finess": "FINESS number of the practice (9 characters), if it has one",
    "siret": "SIRET number of the practice (14 digits), if it has one",
    "address": "required: street line of the place",
    "postal_code": "postal code; with city or insee when several communes share it",
    "city": "commune name",
    "insee": "INSEE code of the commune (the most precise)",
    "lat": "latitude (WGS84); with lon; default: the commune's centre",
    "lon": "longitude (WGS84)",
    "phone": "phone number of the place",
    "accepts_new_patients": "yes/no (oui/non, true/false, 1/0), empty if unknown",
    "wheelchair": "yes/no: the place is wheelchair accessible",
    "offers": "care offers separated by spaces or commas: consultation teleconsultation tele-expertise "
              "unscheduled-care home-visit vaccination; default consultation",
    "opening_hours": "e.g. 'mon-fri 08:30-19:00 | sat 09:00-12:00' (parts separated by | or ;)",
}
REQUIRED = ("rpps", "family", "given", "profession", "organization", "address")
YES = {"yes", "oui", "true", "1", "y", "o", "x"}
NO = {"no", "non", "false", "0", "n"}


@dataclass
class CsvRow:
    line: int
    rpps: str
    family: str
    given: str
    gender: str | None
    profession: str
    specialty: str | None
    languages: list[str]
    organization: str
    finess: str | None
    siret: str | None
    address: str
    commune: Commune
    postal_code: str
    lat: float
    lon: float
    phone: str | None
    accepts_new_patients: bool | None
    wheelchair: bool
    offers: list[str]
    hours: list[dict]


class RowError(ValueError):
    pass


def _bool(value: str, column: str) -> bool | None:
    v = fold(value)
    if not v:
        return None
    if v in YES:
        return True
    if v in NO:
        return False
    raise RowError(f"{column}: expected yes or no, got {value!r}")


def _split(value: str) -> list[str]:
    return [x for x in re.split(r"[\s,;]+", value.strip()) if x]


def parse_hours(text: str) -> list[dict]:
    """'mon-fri 08:30-19:00 | sat 09:00-12:00' (or ';' between parts) -> Location.hoursOfOperation."""
    out: list[dict] = []
    for part in [p.strip() for p in re.split(r"[;|]", text) if p.strip()]:
        m = re.fullmatch(r"([a-z]{3})(?:-([a-z]{3}))?\s+(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", part.lower())
        if not m or m.group(1) not in model.DAYS or (m.group(2) and m.group(2) not in model.DAYS):
            raise RowError(f"opening_hours: cannot read {part!r} (expected e.g. 'mon-fri 08:30-19:00')")
        d1 = model.DAYS.index(m.group(1))
        d2 = model.DAYS.index(m.group(2)) if m.group(2) else d1
        if d2 < d1:
            raise RowError(f"opening_hours: {part!r} goes backwards")
        h1, m1, h2, m2 = (int(m.group(i)) for i in range(3, 7))
        if not (0 <= h1 < 24 and 0 <= h2 < 24 and m1 < 60 and m2 < 60) or (h2, m2) <= (h1, m1):
            raise RowError(f"opening_hours: invalid times in {part!r}")
        out += model.opening_hours(model.DAYS[d1 : d2 + 1], f"{h1:02d}:{m1:02d}:00", f"{h2:02d}:{m2:02d}:00")
    return out


def parse_row(line: int, raw: dict[str, str]) -> CsvRow:
    nom, geo = nomenclatures(), communes()
    get = lambda k: (raw.get(k) or "").strip()  # noqa: E731
    if raw.get(None):  # type: ignore[call-overload]
        raise RowError("more fields than the header has columns (quote a field that contains the separator)")
    missing = [k for k in REQUIRED if not get(k)]
    if missing:
        raise RowError(f"missing {', '.join(missing)}")
    rpps = get("rpps")
    if not re.fullmatch(r"\d{11}", rpps):
        raise RowError(f"rpps: expected 11 digits, got {rpps!r}")
    prof = nom.professions.get(get("profession"))
    if prof is None:
        hits = [c for c in nom.professions.concepts if fold(c.fr) == fold(get("profession")) or fold(c.en) == fold(get("profession"))]
        prof = hits[0] if hits else None
    if prof is None:
        raise RowError(f"profession: unknown TRE_G15 code or label {get('profession')!r}")
    specialty = None
    if get("specialty"):
        sp = nom.specialties.get(get("specialty"))
        if sp is None:
            raise RowError(f"specialty: unknown TRE_R38 code {get('specialty')!r}")
        specialty = sp.code
    gender = {"f": "female", "m": "male", "female": "female", "male": "male", "": None}.get(fold(get("gender")), "?")
    if gender == "?":
        raise RowError(f"gender: expected F or M, got {get('gender')!r}")
    langs = _split(get("languages")) or ["fr"]
    for lg in langs:
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{1,8})*", lg):
            raise RowError(f"languages: {lg!r} is not a language code such as fr or en")
    finess, siret = get("finess") or None, (get("siret").replace(" ", "") or None)
    if finess and not re.fullmatch(r"[0-9]{2}[0-9AB][0-9]{6}|2[AB][0-9]{7}", finess):
        raise RowError(f"finess: expected 9 characters, got {finess!r}")
    if siret and not re.fullmatch(r"\d{14}", siret):
        raise RowError(f"siret: expected 14 digits, got {siret!r}")
    commune = _commune(geo, get("insee"), get("postal_code"), get("city"))
    lat_s, lon_s = get("lat").replace(",", "."), get("lon").replace(",", ".")
    if lat_s or lon_s:
        try:
            lat, lon = float(lat_s), float(lon_s)
        except ValueError:
            raise RowError(f"lat/lon: not numbers ({lat_s!r}, {lon_s!r})") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise RowError(f"lat/lon: out of range ({lat}, {lon})")
    else:
        lat, lon = commune.lat, commune.lon
    offers = _split(get("offers")) or ["consultation"]
    for o in offers:
        if o not in nom.care_offers:
            raise RowError(f"offers: unknown care offer {o!r}")
    return CsvRow(
        line, rpps, get("family"), get("given"), gender, prof.code, specialty, langs, get("organization"), finess, siret,
        get("address"), commune, get("postal_code") or commune.postal_code, lat, lon, get("phone") or None,
        _bool(get("accepts_new_patients"), "accepts_new_patients"), bool(_bool(get("wheelchair"), "wheelchair")),
        list(dict.fromkeys(offers)), parse_hours(get("opening_hours")) if get("opening_hours") else [],
    )


def _commune(geo, insee: str, postal_code: str, city: str) -> Commune:  # type: ignore[no-untyped-def]
    if insee:
        c = geo.by_code.get(insee)
        if c is None:
            raise RowError(f"insee: unknown commune code {insee!r}")
        return c
    if postal_code:
        cands = geo.by_postal_code(postal_code)
        if not cands:
            raise RowError(f"postal_code: unknown postal code {postal_code!r}")
        if city:
            named = [c for c in cands if fold(c.name) == fold(city)]
            if named:
                return named[0]
            raise RowError(f"city: {city!r} does not have postal code {postal_code}")
        if len(cands) > 1:
            raise RowError(f"postal_code {postal_code} is shared by {len(cands)} communes: add city or insee")
        return cands[0]
    raise RowError("the place needs insee, or postal_code (and city)")


def read_csv(text: str) -> tuple[list[CsvRow], list[ImportIssue], list[ImportIssue], int]:
    """Parse and check every row: (good rows, one error per bad row, warnings, rows read)."""
    text = text.lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    delim = max((";", ",", "\t"), key=first.count)
    reader = csv.DictReader(io.StringIO(text), delimiter=delim)
    headers = [h.strip().lower() for h in reader.fieldnames or []]
    reader.fieldnames = headers
    unknown = [h for h in headers if h and h not in CSV_COLUMNS]
    issues: list[ImportIssue] = []
    warnings = [ImportIssue("line 1", f"unknown columns ignored: {', '.join(unknown)}")] if unknown else []
    missing = [k for k in REQUIRED if k not in headers]
    if missing:
        return [], [ImportIssue("line 1", f"missing required columns: {', '.join(missing)}")], warnings, 0
    rows: list[CsvRow] = []
    n = 0
    for raw in reader:
        n += 1
        line = reader.line_num
        if not any((v or "").strip() for k, v in raw.items() if k):
            continue
        try:
            rows.append(parse_row(line, raw))
        except RowError as e:
            issues.append(ImportIssue(f"line {line}", str(e)))
    return rows, issues, warnings, n


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", fold(text)).strip("-")


def csv_resources(row: CsvRow) -> list[tuple[str, str, dict]]:
    """(key, conditional search, resource) of one row, in write order; references use keys."""
    if row.finess or row.siret:
        org_ids = model.organization_identifiers(finess=row.finess, siret=row.siret if not row.finess else None)
        org_key = f"{org_ids[0]['system']}|{org_ids[0]['value']}"
    else:
        org_key = f"{_slug(row.organization)}.{row.commune.code}"
        org_ids = [{"system": model.ORGANIZATION_ID_SYSTEM, "value": org_key}]
        org_key = f"{model.ORGANIZATION_ID_SYSTEM}|{org_key}"
    org_ref = f"urn:key:{org_key}"
    loc_key = f"{_slug(org_key)}.{_slug(row.address)}"[:200]
    loc_ref = f"urn:key:loc:{loc_key}"
    org = model.organization(name=row.organization, identifiers=org_ids, line=row.address, commune=row.commune, phone=row.phone)
    loc = model.location(key=loc_key, name=row.organization, line=row.address, commune=row.commune, lat=row.lat, lon=row.lon,
                         organization_ref=org_ref, wheelchair=row.wheelchair, hours=row.hours or None, phone=row.phone)
    loc["address"]["postalCode"] = row.postal_code
    prac = model.practitioner(rpps=row.rpps, family=row.family, given=row.given, gender=row.gender, profession=row.profession,
                              languages=row.languages)
    what = row.specialty or row.profession
    out: list[tuple[str, str, dict]] = [(org_ref, "", org), (loc_ref, "", loc), (f"urn:key:prac:{row.rpps}", "", prac)]
    nom = nomenclatures()
    svc_refs = []
    for offer in row.offers:
        skey = f"{loc_key}.{offer}.{what}"
        label = nom.care_offers.get(offer).fr  # type: ignore[union-attr]
        svc = model.healthcare_service(key=skey, offer=offer, name=f"{label} - {row.organization}", organization_ref=org_ref,
                                       location_refs=[loc_ref], specialty=row.specialty, profession=row.profession,
                                       hours=row.hours or None)
        out.append((f"urn:key:svc:{skey}", "", svc))
        svc_refs.append(f"urn:key:svc:{skey}")
    role = model.practitioner_role(key=f"{row.rpps}.{_slug(org_key)}.{what}"[:200], practitioner_ref=f"urn:key:prac:{row.rpps}",
                                   organization_ref=org_ref, location_refs=[loc_ref], service_refs=svc_refs,
                                   profession=row.profession, specialty=row.specialty,
                                   accepts_new_patients=row.accepts_new_patients, phone=row.phone)
    out.append((f"urn:key:role:{row.rpps}.{org_key}.{what}", "", role))
    return [(k, match_key(r)[1], r) for k, _, r in out]  # type: ignore[index]


async def import_csv(platform: Platform, text: str, *, caller: Caller = SYSTEM, batch: int = BATCH) -> ImportReport:
    rows, issues, warnings, n = read_csv(text)
    report = ImportReport(errors=issues, warnings=warnings, rows=n)
    for start in range(0, len(rows), batch):
        async with platform.transaction(caller) as repo:
            keys: dict[str, str] = {}  # urn:key:... -> Type/id, for this batch
            for row in rows[start : start + batch]:
                try:
                    async with repo.conn.transaction():  # a savepoint: nothing of a failed row is kept
                        local = dict(keys)
                        for key, query, res in csv_resources(row):
                            rtype = res["resourceType"]
                            if key in local:
                                continue
                            existing = await _locate(repo, rtype, query)
                            rid = existing or new_id()
                            await _store(repo, rtype, rid, _rewrite(res, local), existing is not None, report)  # type: ignore[arg-type]
                            local[key] = f"{rtype}/{rid}"
                    keys = local
                except ParcoursError as e:
                    report.errors.append(ImportIssue(f"line {row.line}", _message(e)))
    report.errors.sort(key=lambda i: int(i.where.split()[1]))
    return report


__all__ = ["CSV_COLUMNS", "ImportIssue", "ImportReport", "import_csv", "import_fhir", "match_key", "parse_hours", "read_csv", "read_fhir"]
