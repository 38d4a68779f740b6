"""The teleconsultations a caller takes part in (their Appointments, coming and of the last day)."""

from __future__ import annotations

from datetime import datetime, timedelta

from parcours.store.repository import Repository, Stored


async def my_consultations(repo: Repository, now: datetime, limit: int = 50) -> list[Stored]:
    me = repo.caller.fhir_user
    if not me:
        return []
    ctx = await repo.care()
    identities = sorted(set(ctx.identities) | {me})
    req = repo.parse_search("Appointment", [("actor", ",".join(identities)),
                                            ("date", "ge" + (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")),
                                            ("status", "booked,arrived,checked-in,fulfilled"),
                                            ("_sort", "date"), ("_count", str(limit))])
    return (await repo.search(req)).matches
