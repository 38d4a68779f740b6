"""Booking's ``SlotsHook`` for the directory search: the next free slots of each role on the page.

The roles' Schedules are found with a FHIR search through the caller's Repository (its
policy applies); the ids of their next free slots come from ``booking_free_slot`` (revision
``0014_booking_search``): one btree range scan per schedule, ``ORDER BY start LIMIT 3``,
whatever the size of the directory or the length of the horizon. It holds exactly the
Slots a ``Slot?schedule=...&status=free&start=ge<now>&_sort=start`` search returns.
"""

from __future__ import annotations


from parcours.services.booking import model
from parcours.services.directory.search import DirectoryHit
from parcours.store import booking as store
from parcours.store.repository import Repository

PER_ROLE = 3


class NextSlots:
    """Fills ``DirectoryHit.next_slots`` with up to ``per_role`` free slots, soonest first."""

    def __init__(self, per_role: int = PER_ROLE) -> None:
        self.per_role = per_role

    async def __call__(self, repo: Repository, hits: list[DirectoryHit]) -> None:
        if not hits:
            return
        now = repo.clock.now()
        found: dict[str, list[tuple[str, str, dict]]] = {h.role.id: [] for h in hits}
        scheds = await repo.search(repo.parse_search("Schedule", [
            ("actor", ",".join(f"PractitionerRole/{r}" for r in found)), ("active", "true"), ("_count", "500")]))
        role_of = {s.id: model.actor_id(s.resource(), "PractitionerRole") for s in scheds.matches}
        role_of = {sid: r for sid, r in role_of.items() if r in found}
        # The free-slot index picks the ids; the Slots themselves are read through the
        # Repository (policy and audit), deleted ones left out by it.
        picked = await store.next_free_slots(repo.conn, list(role_of), now, self.per_role)
        slots = {}
        if picked:
            res = await repo.search(repo.parse_search("Slot", [("_id", ",".join(sid for _, sid in picked)), ("_count", str(len(picked)))]))
            slots = {m.id: m.resource() for m in res.matches}
        for sched_id, slot_id in picked:
            if (slot := slots.get(slot_id)) is not None:
                found[role_of[sched_id]].append((slot["start"], slot_id, slot))
        for h in hits:
            best = sorted(found[h.role.id], key=lambda x: (model.slot_start(x[2]), x[1]))[: self.per_role]
            h.next_slots = [{"id": sid, "start": slot["start"], "end": slot["end"], "offer": model.slot_visit(slot).offer,
                             "mode": model.slot_visit(slot).mode} for _, sid, slot in best]


__all__ = ["NextSlots"]
