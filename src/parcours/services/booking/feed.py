"""Private iCalendar feeds: each account's appointments at a secret URL calendar apps subscribe to.

The URL carries a random token (256 bits); only its SHA-256 is stored, and making a new
one retires the old URL. The feed is built with the account's own Caller, so it shows
exactly what the account may see. Events say when and where, never why; a
professional's feed names no patient (a calendar app is not a safe place for that).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, timedelta
from urllib.parse import urlsplit

from icalendar import Calendar, Event, vText
from psycopg import AsyncConnection

from parcours.services import accounts
from parcours.services.booking import model, service
from parcours.services.platform import Platform
from parcours.store import accounts as account_store
from parcours.store import booking as store
from parcours.store.accounts import Account

PAST = timedelta(days=30)
AHEAD = timedelta(days=180)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def new_token(platform: Platform, conn: AsyncConnection, account: Account) -> str:
    token = secrets.token_urlsafe(32)
    await store.set_feed(conn, account.id, _hash(token), platform.clock.now())
    return token


def feed_url(platform: Platform, token: str) -> str:
    return f"{platform.settings.base_url.rstrip('/')}/booking/feed/{token}.ics"


async def calendar(platform: Platform, token: str) -> bytes | None:
    """The feed of the account owning ``token``, or None (unknown or retired token)."""
    async with platform.pool.connection() as conn:
        account_id = await store.feed_account(conn, _hash(token))
        account = await account_store.get(conn, account_id) if account_id else None
    if account is None or not account.active:
        return None
    caller = accounts.caller_for(account)
    now = platform.clock.now()
    host = urlsplit(platform.settings.base_url).hostname or "parcours"
    cal = Calendar()
    cal.add("prodid", "-//Parcours//Agenda//FR")
    cal.add("version", "2.0")
    cal.add("x-wr-calname", "Parcours")
    async with platform.transaction(caller) as repo:
        items: list[dict] = []
        if account.role in ("patient", "proxy"):
            patients = sorted((await repo.care()).patients)
            items = [s.resource() for s in await service.appointments_of_patients(repo, patients)]
            professional = False
        else:
            professional = True
            for role in await service.roles_of(repo):
                _, appts, _ = await service.agenda(repo, role.id, now - PAST, now + AHEAD)
                items += [s.resource() for s in appts]
        for appt in items:
            start, end = model.appointment_start(appt), model._dt(appt.get("end"))  # noqa: SLF001
            if start is None or not (now - PAST <= start <= now + AHEAD) or appt.get("status") == "waitlist":
                continue
            ev = Event()
            ev.add("uid", f"appointment-{appt['id']}@{host}")
            ev.add("dtstamp", now.astimezone(UTC))
            ev.add("dtstart", start.astimezone(UTC))
            ev.add("dtend", (end or start + timedelta(minutes=20)).astimezone(UTC))
            ev.add("sequence", int((appt.get("meta") or {}).get("versionId") or 1))
            ev.add("summary", "Rendez-vous (Parcours)" if professional else "Rendez-vous médical")
            ev.add("status", "CANCELLED" if appt.get("status") in ("cancelled", "entered-in-error") else "CONFIRMED")
            if not professional:
                where = await _where(repo, appt)
                if where:
                    ev.add("location", vText(where))
            cal.add_component(ev)
    return cal.to_ical()


async def _where(repo, appt: dict) -> str:  # type: ignore[no-untyped-def]
    from parcours.core.errors import Gone, NotFound
    from parcours.services.directory import model as directory

    for ref in model.participants(appt, "Location"):
        try:
            loc = (await repo.read("Location", ref.split("/", 1)[1])).resource()
        except (NotFound, Gone):
            continue
        return ", ".join(x for x in (loc.get("name"), directory.address_text(loc.get("address"))) if x)
    return ""


__all__ = ["calendar", "feed_url", "new_token"]
