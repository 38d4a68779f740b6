"""French communes: lookup, autocomplete and distances.

The table (``data/communes.tsv.gz``, built by ``scripts/build_communes.py``) holds
every commune and municipal arrondissement of France with its INSEE code, name,
département, region, postal codes, population and one WGS84 point (the town
hall, or the centroid of the commune). It is read once per process (~35,000
rows, a few MB in memory).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

from parcours.core.errors import BadRequest, NotFound
from parcours.services.directory.nomenclatures import fold

EARTH_RADIUS_KM = 6371.0088  # the same mean radius as the store's near search
COMMUNE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R13-Commune/FHIR/TRE-R13-Commune"
INSEE_CODE_EXTENSION = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"


@dataclass(frozen=True)
class Commune:
    code: str  # INSEE code (COG)
    name: str
    departement: str
    region: str
    postal_codes: tuple[str, ...]
    population: int
    lat: float
    lon: float
    kind: str  # "C" commune, "A" municipal arrondissement (Paris, Lyon, Marseille)

    @property
    def postal_code(self) -> str:
        return self.postal_codes[0] if self.postal_codes else ""

    def as_json(self) -> dict:
        return {
            "code": self.code, "name": self.name, "departement": self.departement, "region": self.region,
            "postalCodes": list(self.postal_codes), "population": self.population, "lat": self.lat, "lon": self.lon,
        }


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


class Communes:
    def __init__(self, rows: list[Commune], territories: dict) -> None:
        self.rows = rows
        self.by_code = {c.code: c for c in rows}
        self.departements: dict[str, dict] = territories["departements"]
        self.regions: dict[str, str] = territories["regions"]
        self._by_postal: dict[str, list[Commune]] = {}
        for c in rows:
            if c.code in _PLM:
                continue  # its postal codes are its arrondissements'
            for pc in c.postal_codes:
                self._by_postal.setdefault(pc, []).append(c)
        # Folded names without hyphens or apostrophes, for autocomplete.
        self._keys = [(_name_key(c.name), c) for c in rows]

    def get(self, code: str) -> Commune:
        c = self.by_code.get(code.strip())
        if c is None:
            raise NotFound(f"No commune has INSEE code {code!r}")
        return c

    def in_region(self, region: str) -> list[Commune]:
        # Municipal arrondissements stand in for their city, never both.
        return [c for c in self.rows if c.region == region and (c.kind == "A" or c.code not in _PLM)]

    def by_postal_code(self, postal_code: str) -> list[Commune]:
        return sorted(self._by_postal.get(postal_code.strip(), []), key=lambda c: -c.population)

    def autocomplete(self, text: str, *, limit: int = 10, region: str | None = None) -> list[Commune]:
        """Communes matching what a person typed: a postal code (prefix) or a name (prefix).

        Bigger communes come first among equal matches, as people most often
        look for the town they know.
        """
        q = _name_key(text)
        if not q:
            return []
        limit = max(1, min(limit, 50))
        if q.isdigit():
            found = {c.code: c for pc, cs in self._by_postal.items() if pc.startswith(q) for c in cs}
            out = sorted((c for c in found.values() if region is None or c.region == region), key=lambda c: (-c.population, c.name))
            # Five digits may also be an INSEE code: that commune comes after the postal-code matches.
            by_insee = self.by_code.get(q) if len(q) == 5 else None
            if by_insee is not None and by_insee.code not in found and (region is None or by_insee.region == region):
                out.append(by_insee)
            return out[:limit]
        scored: list[tuple[int, int, Commune]] = []
        for key, c in self._keys:
            if region is not None and c.region != region:
                continue
            if key == q:
                rank = 0
            elif key.startswith(q):
                rank = 1
            elif f" {q}" in f" {key}":
                rank = 2
            else:
                continue
            scored.append((rank, -c.population, c))
        scored.sort(key=lambda s: (s[0], s[1], s[2].name))
        return [c for _, _, c in scored[:limit]]

    def resolve_place(self, place: str) -> Commune:
        """A commune from an INSEE code, a postal code or an exact name."""
        p = place.strip()
        if p in self.by_code:
            return self.by_code[p]
        if p.isdigit():
            hits = self.by_postal_code(p)
            if hits:
                return hits[0]
        hits = self.autocomplete(p, limit=1)
        if hits and _name_key(hits[0].name) == _name_key(p):
            return hits[0]
        raise BadRequest(f"Unknown place {place!r}: give an INSEE code, a postal code or a commune name (see /api/directory/places)")

    def departement_name(self, code: str) -> str:
        d = self.departements.get(code)
        return d["name"] if d else code


def _name_key(text: str) -> str:
    """'Saint-Quentin', 'saint quentin' and 'SAINT QUENTIN' are one key; so are 'Étaples' and 'etaples'."""
    return " ".join(fold(text).replace("-", " ").replace("'", " ").split())


# Paris, Lyon and Marseille: the commune rows whose arrondissements are also listed.
_PLM = {"75056", "69123", "13055"}


@cache
def communes() -> Communes:
    pkg = resources.files("parcours.services.directory")
    rows: list[Commune] = []
    with pkg.joinpath("data/communes.tsv.gz").open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            code, name, dep, reg, pcs, pop, lat, lon, kind = line.rstrip("\n").split("\t")
            rows.append(Commune(code, name, dep, reg, tuple(pcs.split()), int(pop), float(lat), float(lon), kind))
    territories = json.loads(pkg.joinpath("data/territories.json").read_text("utf-8"))
    return Communes(rows, territories)


__all__ = ["COMMUNE_SYSTEM", "Commune", "Communes", "EARTH_RADIUS_KM", "INSEE_CODE_EXTENSION", "communes", "haversine_km"]
