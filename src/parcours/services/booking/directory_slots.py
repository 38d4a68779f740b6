"""Booking's ``SlotsHook`` for the directory search: the next free slots of each role on the page."""

from __future__ import annotations

from parcours.services.booking import model, service
from parcours.services.directory.search import DirectoryHit
from parcours.store.repository import Repository

PER_ROLE = 3


class NextSlots:
    """Fills ``DirectoryHit.next_slots`` with up to ``per_role`` free slots, soonest first."""

    def __init__(self, per_role: int = PER_ROLE) -> None:
        self.per_role = per_role

    async def __call__(self, repo: Repository, hits: list[DirectoryHit]) -> None:
        now = repo.clock.now()
        for hit in hits:
            slots = await service.find(repo, service.SlotQuery(start=now, roles=[hit.role.id], limit=self.per_role))
            hit.next_slots = [{"id": s.id, "start": r["start"], "end": r["end"], "offer": model.slot_visit(r).offer,
                               "mode": model.slot_visit(r).mode} for s in slots for r in (s.resource(),)]


__all__ = ["NextSlots"]
