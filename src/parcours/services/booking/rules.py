"""The booking rule: an Appointment and the Slots it holds change together, in one transaction.

Registered on the platform (``services.platform.write_rules``), so it runs inside every
write of an Appointment or a Slot, whatever the door: the FHIR API, a Bundle, ``$book``,
the booking pages. For each slot an Appointment starts holding (status ``booked``...):

1. the Slot row is locked (``SELECT ... FOR UPDATE`` through ``Repository.lock``):
   concurrent bookings of one slot queue here, and each sees what the previous one
   committed;
2. it must be ``free`` (or offered to this patient from the waiting list), else
   :class:`SlotTaken` (409);
3. a row goes into ``booking_claim`` (primary key: the slot), the database's own
   guarantee that a slot never has two appointments;
4. the Slot becomes ``busy``; confirmation and reminders are queued.

A slot the Appointment stops holding (cancelled, moved, entered in error) is released:
claim removed, Slot ``free`` again, reminders withdrawn, the cancellation queued and
the slot offered to the waiting list. Patients (and proxies) cancel or move no later
than the practitioner's deadline. A Slot still claimed cannot be freed or deleted
directly: cancel its appointment.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from parcours.core.errors import BookingRuleViolation, Conflict, Gone, NotFound, SlotTaken, Unprocessable
from parcours.services.booking import model
from parcours.store import booking as store
from parcours.store.repository import Repository

CONFIRMATION, REMINDER, CANCELLATION, OFFER, OFFER_EXPIRY = "confirmation", "reminder", "cancellation", "waitlist-offer", "offer-expiry"
PATIENT_KINDS = ("patient", "proxy")


class BookingRule:
    types = frozenset({"Appointment", "Slot"})

    def __init__(self, reminder_hours: tuple[int, ...] | list[int] = (48, 2), offer_minutes: int = 120) -> None:
        self.reminder_hours = tuple(sorted({int(h) for h in reminder_hours if h > 0}, reverse=True))
        self.offer_minutes = offer_minutes

    async def before_write(self, repo: Repository, rtype: str, rid: str, resource: dict | None, previous: dict | None) -> None:
        if rtype == "Slot":
            await self._slot(repo, rid, resource)
        else:
            await self._appointment(repo, rid, resource, previous)

    # -- Slot written directly ------------------------------------------------------------------
    async def _slot(self, repo: Repository, rid: str, resource: dict | None) -> None:
        if resource is not None and resource.get("status") == "busy":
            return
        holder = await store.holder(repo.conn, rid)
        if holder is not None:
            raise Conflict(f"Slot/{rid} is booked (Appointment/{holder}): cancel the appointment to free it")

    # -- Appointment ----------------------------------------------------------------------------
    async def _appointment(self, repo: Repository, rid: str, resource: dict | None, previous: dict | None) -> None:
        new = set(model.appointment_slots(resource)) if model.holds_slots(resource) else set()
        old = set(model.appointment_slots(previous)) if model.holds_slots(previous) else set()
        if new == old:
            return
        now = repo.clock.now()
        plat = repo.as_platform()
        released = sorted(old - new)
        claimed = sorted(new - old)
        if released and repo.caller.kind in PATIENT_KINDS and previous is not None:
            await self._check_deadline(plat, previous, released, now)
        for sid in released:  # sorted: two multi-slot bookings lock in the same order
            await self._release(plat, sid, rid, previous or {}, now)
        if released and resource is not None and not claimed:
            await store.cancel_jobs(repo.conn, rid, (CONFIRMATION, REMINDER), now)
            start = model.appointment_start(previous or {})
            if start and start > now:
                await store.enqueue(repo.conn, CANCELLATION, now, now, appointment_id=rid)
        elif released and resource is None:
            await store.cancel_jobs(repo.conn, rid, (CONFIRMATION, REMINDER), now)
        if claimed:
            assert resource is not None
            patients = model.participants(resource, "Patient")
            for sid in claimed:
                await self._claim(plat, sid, rid, patients, now, patient_caller=repo.caller.kind in PATIENT_KINDS)
            await store.cancel_jobs(repo.conn, rid, (CONFIRMATION, REMINDER), now)
            await self._queue_notices(repo, rid, resource, now)

    async def _check_deadline(self, plat: Repository, previous: dict, released: list[str], now: datetime) -> None:
        start = model.appointment_start(previous)
        if start is None or start <= now:
            if start is not None:
                raise BookingRuleViolation("This appointment has already started: only the practice can change it now")
            return
        policy = await self._policy_of(plat, released[0])
        if start - now < timedelta(hours=policy.cancel_hours):
            raise BookingRuleViolation(
                f"Appointments are cancelled or moved at least {policy.cancel_hours} h ahead: please call the practice")

    async def _policy_of(self, plat: Repository, slot_id: str) -> model.Policy:
        s = await plat.lock("Slot", slot_id)
        sched_id = model.slot_schedule(s or {})
        if sched_id:
            sched = await _read_plain(plat, "Schedule", sched_id)
            if sched is not None:
                return model.read_availability(sched).policy
        return model.Policy()

    async def _claim(self, plat: Repository, sid: str, rid: str, patients: list[str], now: datetime, *, patient_caller: bool) -> None:
        s = await plat.lock("Slot", sid)
        if s is None:
            raise Unprocessable(f"Slot/{sid} does not exist: an appointment can only hold a slot of this server")
        status = s.get("status")
        hold = model.slot_hold(s)
        held_for_us = status == "busy-tentative" and hold is not None and (hold[0] in patients or hold[1] <= now)
        if status != "free" and not held_for_us:
            if status == "busy" and await store.holder(plat.conn, sid) == rid:
                return
            raise SlotTaken(f"Slot/{sid} is already taken")
        if patient_caller:
            start = model.slot_start(s)
            policy = await self._policy_of(plat, sid)
            if start < now + timedelta(minutes=policy.notice_minutes):
                raise BookingRuleViolation(f"This slot starts too soon to be booked online (at least {policy.notice_minutes} min ahead)")
        if not await store.claim(plat.conn, sid, rid, now):
            raise SlotTaken(f"Slot/{sid} is already taken")
        await plat.update("Slot", sid, {**model.with_hold(s, None, None), "status": "busy"})

    async def _release(self, plat: Repository, sid: str, rid: str, previous: dict, now: datetime) -> None:
        s = await plat.lock("Slot", sid)
        if not await store.release(plat.conn, sid, rid) or s is None:
            return
        if s.get("status") != "busy":
            return
        freed = {**model.with_hold(s, None, None), "status": "free"}
        await plat.update("Slot", sid, freed)
        if model.slot_start(s) > now:
            from parcours.services.booking import waitlist

            await waitlist.offer_freed_slot(plat, sid, freed, now, offer_minutes=self.offer_minutes,
                                            exclude=model.participants(previous, "Patient"))

    async def _queue_notices(self, repo: Repository, rid: str, appt: dict, now: datetime) -> None:
        await store.enqueue(repo.conn, CONFIRMATION, now, now, appointment_id=rid)
        start = model.appointment_start(appt)
        if start is None:
            return
        for hours in self.reminder_hours:
            due = start - timedelta(hours=hours)
            if due > now:
                await store.enqueue(repo.conn, REMINDER, due, now, appointment_id=rid, payload={"hours": hours})


async def _read_plain(plat: Repository, rtype: str, rid: str) -> dict | None:
    """A resource read by the platform for a rule's decision (not a disclosure: not audited)."""
    before = plat.audit_enabled
    plat.audit_enabled = False
    try:
        return (await plat.read(rtype, rid)).resource()
    except (NotFound, Gone):  # a missing schedule means the default policy
        return None
    finally:
        plat.audit_enabled = before


__all__ = ["BookingRule", "CANCELLATION", "CONFIRMATION", "OFFER", "OFFER_EXPIRY", "REMINDER"]
