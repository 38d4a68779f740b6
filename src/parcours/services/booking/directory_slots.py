"""Booking's ``SlotsHook`` for the directory search: the next free slots of each role on the page."""

from __future__ import annotations

from datetime import timedelta

from parcours.services.booking import model
from parcours.services.directory.search import DirectoryHit
from parcours.store.repository import Repository

PER_ROLE = 3
# Windows tried in turn (days ahead): most roles of a page fill up with today's or this
# week's slots in one query for the whole page; only the others are asked again, further ahead.
WINDOWS = (1, 7, 62)


class NextSlots:
    """Fills ``DirectoryHit.next_slots`` with up to ``per_role`` free slots, soonest first."""

    def __init__(self, per_role: int = PER_ROLE) -> None:
        self.per_role = per_role

    async def __call__(self, repo: Repository, hits: list[DirectoryHit]) -> None:
        if not hits:
            return
        now = repo.clock.now()
        found: dict[str, list[dict]] = {h.role.id: [] for h in hits}
        scheds = await repo.search(repo.parse_search("Schedule", [
            ("actor", ",".join(f"PractitionerRole/{r}" for r in found)), ("active", "true"), ("_count", "500")]))
        role_of = {s.id: model.actor_id(s.resource(), "PractitionerRole") for s in scheds.matches}
        pending = sorted({r for r in role_of.values() if r in found})
        for days in WINDOWS:
            if not pending:
                break
            res = await repo.search(repo.parse_search("Slot", [
                ("schedule", ",".join(f"Schedule/{sid}" for sid, r in role_of.items() if r in pending)), ("status", "free"),
                ("start", f"ge{model.iso(now)}"), ("start", f"lt{model.iso(now + timedelta(days=days))}"),
                ("_sort", "start"), ("_count", str(min(1000, 40 * len(pending))))]))
            got: dict[str, list[dict]] = {r: [] for r in pending}
            for s in res.matches:
                slot = s.resource()
                role = role_of.get(model.slot_schedule(slot) or "")
                if role in got and len(got[role]) < self.per_role:
                    visit = model.slot_visit(slot)
                    got[role].append({"id": s.id, "start": slot["start"], "end": slot["end"], "offer": visit.offer,
                                      "mode": visit.mode})
            for role, slots in got.items():
                found[role] = slots
            pending = [r for r in pending if len(found[r]) < self.per_role]
        for h in hits:
            h.next_slots = found[h.role.id]


__all__ = ["NextSlots"]
