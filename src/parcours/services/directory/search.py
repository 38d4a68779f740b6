"""Geolocated directory search: who offers this care near this place.

Built on the FHIR search engine through the caller's Repository, nothing else:

1. places nearest first, in pages growing from 32 places: their ids from the
   spatial index (``store.geo``: a KNN scan of a GiST index bounded by the
   radius, only the page's rows touched), then ``Location?_id=<those>&status=active``
   through the Repository (criteria and policy). Same places, same order as
   ``Location?near=lat|lon|radius|km`` (which sorts the whole radius);
2. for each page, ``PractitionerRole?location=<those places>`` with the
   searchable criteria: ``role`` (profession, TRE_G15), ``specialty`` (TRE_R38),
   ``service.service-type`` (care offers), ``practitioner.communication``
   (language), ``_include`` of practitioner, organization and services;
3. the two criteria that live in extensions (accepts new patients on the role,
   wheelchair access on the place) are mirrored as ``meta.tag`` codes by
   ``model.flag_tags``, so they are ``_tag`` criteria of the same SQL searches
   (paging and limits stay exact).

Pages go outwards until the requested window is filled, so the answer is in
distance order without loading everything in the radius. Next free slots are
not known to the directory: ``SlotsHook`` is where booking plugs them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import orjson

from parcours.core.errors import BadRequest
from parcours.services.directory import model
from parcours.services.directory.geo import haversine_km
from parcours.services.directory.nomenclatures import (
    CARE_OFFER_SYSTEM,
    PROFESSION_SYSTEM,
    SPECIALTY_SYSTEM,
    nomenclatures,
)
from parcours.store import geo
from parcours.store.repository import Repository, Stored

MAX_RADIUS_KM = 200.0
# Places are read nearest first in pages that grow (x4) until the window is full: most
# searches are answered from the first page (a place has about 1.5 roles), so only the
# roles of the nearest few dozen places are read with their practitioners and services.
FIRST_LOCATION_PAGE = 32
LOCATION_PAGE = 512  # largest page
MAX_LIMIT = 100


@dataclass(frozen=True)
class DirectoryQuery:
    lat: float
    lon: float
    radius_km: float = 10.0
    profession: str | None = None  # TRE_G15 code
    specialty: str | None = None  # TRE_R38 code
    offers: tuple[str, ...] = ()  # care-offer codes that must all be offered
    accepts_new_patients: bool = False
    language: str | None = None  # BCP-47 / TRE_G00 code
    wheelchair: bool = False
    limit: int = 20
    offset: int = 0
    dataset: str | None = None  # restrict to resources tagged with this dataset
    lang: str = "fr"  # labels in the answer


@dataclass
class DirectoryHit:
    role: Stored
    practitioner: dict | None
    organization: dict | None
    location: dict
    location_id: str
    distance_km: float
    services: list[dict]
    next_slots: list[dict] | None = None  # filled by a SlotsHook (booking), None when unknown

    def as_json(self, lang: str = "fr") -> dict:
        nom = nomenclatures()
        role = self.role.resource()
        prac = self.practitioner or {}
        org = self.organization or {}
        pos = model.position(self.location) or (None, None)
        addr = self.location.get("address") or {}
        offers = sorted({o for s in self.services for o in model.service_offers(s)})
        return {
            "id": self.role.id,
            "reference": f"PractitionerRole/{self.role.id}",
            "practitioner": {
                "id": model.reference_id(role.get("practitioner"), "Practitioner"),
                "name": model.display_name(prac),
                "gender": prac.get("gender"),
                "languages": model.languages(prac),
            },
            "professions": [_concept(nom.professions.get(c), c, lang) for c in model.role_professions(role)],
            "specialties": [_concept(nom.specialties.get(c), c, lang) for c in model.role_specialties(role)],
            "organization": {"id": model.reference_id(role.get("organization"), "Organization"), "name": org.get("name")},
            "location": {
                "id": self.location_id,
                "name": self.location.get("name"),
                "address": model.address_text(addr),
                "city": addr.get("city"),
                "postalCode": addr.get("postalCode"),
                "lat": pos[0],
                "lon": pos[1],
                "wheelchairAccessible": model.wheelchair_accessible(self.location),
                "hoursOfOperation": self.location.get("hoursOfOperation") or [],
            },
            "distanceKm": round(self.distance_km, 3),
            "acceptsNewPatients": model.accepts_new_patients(role),
            "offers": [_concept(nom.care_offers.get(o), o, lang) for o in offers],
            "telecom": [t.get("value") for t in (role.get("telecom") or self.location.get("telecom") or []) if t.get("value")],
            "nextSlots": self.next_slots,
        }


def _concept(c, code: str, lang: str) -> dict:  # type: ignore[no-untyped-def]
    return {"code": code, "label": c.label(lang) if c else code}


@dataclass
class DirectoryResult:
    query: DirectoryQuery
    hits: list[DirectoryHit]
    has_more: bool
    total: int | None  # known when every place in the radius was scanned
    scanned_locations: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        q = self.query
        return {
            "center": {"lat": q.lat, "lon": q.lon},
            "radiusKm": q.radius_km,
            "offset": q.offset,
            "limit": q.limit,
            "total": self.total,
            "hasMore": self.has_more,
            "results": [h.as_json(q.lang) for h in self.hits],
        }


class SlotsHook(Protocol):
    """Booking's way in: the next free slots of the roles on the page."""

    async def __call__(self, repo: Repository, hits: list[DirectoryHit]) -> None: ...


def check_query(q: DirectoryQuery) -> None:
    nom = nomenclatures()
    if not (-90 <= q.lat <= 90 and -180 <= q.lon <= 180):
        raise BadRequest(f"Invalid position {q.lat},{q.lon}")
    if not (0 < q.radius_km <= MAX_RADIUS_KM):
        raise BadRequest(f"The radius must be between 0 and {MAX_RADIUS_KM:g} km")
    if q.profession and q.profession not in nom.professions:
        raise BadRequest(f"Unknown profession code {q.profession!r} (TRE_G15-ProfessionSante)")
    if q.specialty and q.specialty not in nom.specialties:
        raise BadRequest(f"Unknown specialty code {q.specialty!r} (TRE_R38-SpecialiteOrdinale)")
    for o in q.offers:
        if o not in nom.care_offers:
            raise BadRequest(f"Unknown care offer {o!r}; known: {', '.join(c.code for c in nom.care_offers.concepts)}")
    if not (1 <= q.limit <= MAX_LIMIT) or q.offset < 0:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, offset 0 or more")


def role_criteria(q: DirectoryQuery) -> list[tuple[str, str]]:
    """The searchable criteria of a query, as FHIR search parameters on PractitionerRole."""
    items: list[tuple[str, str]] = [("active", "true")]
    if q.profession:
        items.append(("role", f"{PROFESSION_SYSTEM}|{q.profession}"))
    if q.specialty:
        items.append(("specialty", f"{SPECIALTY_SYSTEM}|{q.specialty.upper()}"))
    for o in q.offers:
        items.append(("service.service-type", f"{CARE_OFFER_SYSTEM}|{o}"))
    if q.language:
        items.append(("practitioner.communication", q.language))
    if q.accepts_new_patients:
        items.append(("_tag", f"{model.FLAG_TAG_SYSTEM}|{model.FLAG_NEW_PATIENTS}"))
    if q.dataset:
        items.append(("_tag", f"{model.DATASET_TAG_SYSTEM}|{q.dataset}"))
    return items


async def search(repo: Repository, q: DirectoryQuery, *, slots: SlotsHook | None = None) -> DirectoryResult:
    check_query(q)
    wanted = q.offset + q.limit + 1
    hits: list[DirectoryHit] = []
    seen_roles: set[str] = set()
    loc_offset = 0
    scanned = 0
    exhausted = False
    page_size = min(LOCATION_PAGE, max(FIRST_LOCATION_PAGE, wanted))
    while len(hits) < wanted:
        # The next places in distance order from the spatial index (ids and distances only),
        # then their resources through the search engine with the criteria and the policy.
        nearest = await geo.nearest_locations(repo.conn, q.lat, q.lon, q.radius_km, limit=page_size, offset=loc_offset)
        loc_offset += page_size
        more = len(nearest) == page_size
        page_size = min(LOCATION_PAGE, page_size * 4)
        scanned += len(nearest)
        places: dict[str, tuple[dict, float]] = {}
        if nearest:
            items = [("_id", ",".join(lid for lid, _ in nearest)), ("status", "active"), ("_count", str(len(nearest)))]
            if q.wheelchair:
                items.append(("_tag", f"{model.FLAG_TAG_SYSTEM}|{model.FLAG_WHEELCHAIR}"))
            if q.dataset:
                items.append(("_tag", f"{model.DATASET_TAG_SYSTEM}|{q.dataset}"))
            found = {s.id: s for s in (await repo.search(repo.parse_search("Location", items))).matches}
            for lid, _km in nearest:
                s = found.get(lid)
                pos = model.position(s.resource()) if s is not None else None
                if s is None or pos is None:
                    continue
                places[lid] = (s.resource(), haversine_km(q.lat, q.lon, pos[0], pos[1]))
        if places:
            hits.extend(await _roles_at(repo, q, places, seen_roles))
        if not more:
            exhausted = True
            break
    hits.sort(key=lambda h: (h.distance_km, model.display_name(h.practitioner or {}), h.role.id))
    window = hits[q.offset : q.offset + q.limit]
    if slots is not None and window:
        await slots(repo, window)
    has_more = len(hits) > q.offset + q.limit
    total = len(hits) if exhausted else None
    return DirectoryResult(q, window, has_more, total, scanned)


async def _roles_at(repo: Repository, q: DirectoryQuery, places: dict[str, tuple[dict, float]],
                    seen: set[str]) -> list[DirectoryHit]:
    items = role_criteria(q)
    items.append(("location", ",".join(f"Location/{lid}" for lid in places)))
    items += [("_include", "PractitionerRole:practitioner"), ("_include", "PractitionerRole:organization"),
              ("_include", "PractitionerRole:service"), ("_count", str(repo.parser.max_count))]
    out: list[DirectoryHit] = []
    offset = 0
    while True:
        res = await repo.search(repo.parse_search("PractitionerRole", items + [("_offset", str(offset))]))
        included = {(s.resource_type, s.id): s for s in res.includes}
        for s in res.matches:
            if s.id in seen:
                continue
            role = orjson.loads(s.content or "{}")
            best: tuple[float, str] | None = None
            for ref in role.get("location") or []:
                lid = model.reference_id(ref, "Location")
                if lid in places and (best is None or places[lid][1] < best[0]):
                    best = (places[lid][1], lid)
            if best is None:
                continue
            seen.add(s.id)
            prac = _included(included, "Practitioner", model.reference_id(role.get("practitioner"), "Practitioner"))
            org = _included(included, "Organization", model.reference_id(role.get("organization"), "Organization"))
            services = [x for x in (_included(included, "HealthcareService", model.reference_id(r, "HealthcareService"))
                                    for r in role.get("healthcareService") or []) if x]
            out.append(DirectoryHit(s, prac, org, places[best[1]][0], best[1], best[0], services))
        if not res.has_more:
            return out
        offset += len(res.matches)


def _included(included: dict[tuple[str, str], Stored], rtype: str, rid: str | None) -> dict | None:
    s = included.get((rtype, rid or ""))
    return s.resource() if s is not None else None


__all__ = ["DirectoryHit", "DirectoryQuery", "DirectoryResult", "SlotsHook", "check_query", "role_criteria", "search"]
