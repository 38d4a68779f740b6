"""Nearest places first, from a spatial index (revision 0014_booking_search).

``Location?near=`` (store.search) is exact but sorts every place of the radius: in Paris at
national size, thousands of rows joined and sorted for each page. The directory search only
needs the next few dozen places in distance order, so it asks this index for their ids, then
applies its criteria and the caller's policy with an ordinary FHIR search on those ids.

The index: GiST over the ``cube`` (contrib extension, shipped with PostgreSQL and with the
embedded wheel) of each position's unit vector on the sphere, for ``"Location_idx"`` rows of
code ``near`` (latitude in ``nlo``, longitude in ``nhi``, see ``fhir.indexing``). The chord
between two unit vectors grows with the great-circle distance, so ``ORDER BY <->`` (a KNN
index scan) is exactly the order of the haversine distance; the cube box of the radius's
chord bounds the scan, so it stops at the edge of the radius. Great-circle distance =
2 R asin(chord / 2): the same value as the haversine formula of ``store.search``.
"""

from __future__ import annotations

import math

from psycopg import AsyncConnection

from parcours.store.search import EARTH_RADIUS_KM

# The exact expression of the index (an expression index is used only for this same text).
UNIT_VECTOR = ("cube(ARRAY[cos(radians(nlo::float8)) * cos(radians(nhi::float8)), "
               "cos(radians(nlo::float8)) * sin(radians(nhi::float8)), sin(radians(nlo::float8))])")
INDEX_SQL = f'CREATE INDEX IF NOT EXISTS "Location_idx_near_gist" ON "Location_idx" USING gist (({UNIT_VECTOR})) WHERE code = \'near\''

_NEAREST = f"""
SELECT resource_id, 2 * {EARTH_RADIUS_KM} * asin(least(1.0, ({UNIT_VECTOR} <-> cube(%(p)s::float8[])) / 2)) AS km
FROM "Location_idx"
WHERE code = 'near'
  AND {UNIT_VECTOR} <@ cube(%(lo)s::float8[], %(hi)s::float8[])
  AND {UNIT_VECTOR} <-> cube(%(p)s::float8[]) <= %(chord)s
ORDER BY {UNIT_VECTOR} <-> cube(%(p)s::float8[]), resource_id
LIMIT %(limit)s OFFSET %(offset)s
"""


def unit_vector(lat: float, lon: float) -> list[float]:
    la, lo = math.radians(lat), math.radians(lon)
    return [math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)]


async def nearest_locations(conn: AsyncConnection, lat: float, lon: float, radius_km: float, *, limit: int,
                            offset: int = 0) -> list[tuple[str, float]]:
    """(Location id, great-circle km) of the places within ``radius_km``, nearest first
    (ties by id), ``offset`` and ``limit`` applied. No policy: ids and distances only; the
    caller reads the resources through its Repository."""
    p = unit_vector(lat, lon)
    chord = 2 * math.sin(min(math.pi / 2, radius_km / (2 * EARTH_RADIUS_KM))) + 1e-12
    cur = await conn.execute(_NEAREST, {"p": p, "lo": [x - chord for x in p], "hi": [x + chord for x in p], "chord": chord,
                                        "limit": limit, "offset": offset})
    return [(r[0], float(r[1])) for r in await cur.fetchall()]


__all__ = ["INDEX_SQL", "UNIT_VECTOR", "nearest_locations", "unit_vector"]
