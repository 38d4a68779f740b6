"""Booking notifications: e-mails through a real SMTP server (aiosmtpd, started here) with a
valid iCalendar invitation and no clinical words, reminders that fall due on a fake clock,
SMS through the dev channel, and the private iCalendar feed."""

from __future__ import annotations

from datetime import timedelta
from email.message import Message

from icalendar import Calendar

from parcours.security.caller import SYSTEM
from parcours.services.booking import feed, model, notify, service
from parcours.store import booking as booking_store
from tests.accounts_helpers import create_resource, new_account
from tests.booking_helpers import define, free_slots, monday_after, new_practice
from tests.conftest import uniq

# Words that would say why someone sees a doctor: none may leave in a message.
CLINICAL = ("cardiolog", "douleur", "thoracique", "diabète", "consultation de suivi", "SM04")




def parts(msg: Message) -> tuple[str, Calendar | None]:
    text, cal = "", None
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            text += part.get_payload(decode=True).decode()
        elif part.get_content_type() == "text/calendar":
            cal = Calendar.from_ical(part.get_payload(decode=True))
    return text, cal


async def test_confirmation_reminders_and_cancellation_by_email_and_sms(client, platform, smtp) -> None:
    inbox, port = smtp
    settings = platform.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_from": "Parcours <rdv@parcours.test>"})
    sms = notify.LoggingSms()
    notifier = notify.Notifier(settings, notify.SmtpEmail(settings), sms)
    pr = await new_practice(client, specialty="SM04")  # a cardiologist: the word must not leave
    sid, _ = await define(platform, pr["role"], ["mon-fri 10:00-11:00 consultation 30"], now=monday_after(platform.clock.now()))
    slot = (await free_slots(client, sid))[2]
    address = f"{uniq('patient')}@example.org"
    phone = "+33612" + uniq("")[-6:].replace("-", "0").translate(str.maketrans("abcdef", "123456"))
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Roux", "given": ["Léa"]}],
                                         "telecom": [{"system": "email", "value": address}, {"system": "sms", "value": phone}]})
    async with platform.transaction(SYSTEM) as repo:
        appt = (await service.book(repo, slot["id"], patient=f"Patient/{pid}", comment="Douleur thoracique depuis hier")).stored
    start = model.slot_start(slot)

    await notify.run_due(platform, notifier, now=platform.clock.now(), limit=10_000)
    [confirmation] = inbox.to(address)
    text, cal = parts(confirmation)
    assert "Rendez-vous confirmé" in confirmation["Subject"]
    assert "Durand" in text and "12 rue des Lilas" in text
    assert not [w for w in CLINICAL if w.lower() in (confirmation.as_string() + text).lower()]
    assert cal is not None and cal["METHOD"] == "REQUEST"
    [event] = [c for c in cal.walk("VEVENT")]
    assert event.decoded("DTSTART") == start
    assert event.decoded("DTEND") == start + timedelta(minutes=30)
    assert str(event["UID"]).startswith(f"appointment-{appt.id}@")
    assert str(event["ATTENDEE"]) == f"mailto:{address}"
    assert [p for p, _ in sms.sent] == [phone]

    # Reminders 48 h and 2 h before: due on the fake clock, nothing sent before.
    async with platform.pool.connection() as conn:
        due = sorted(j["due_at"] for j in await booking_store.jobs_of(conn, appt.id) if j["kind"] == "reminder")
    assert due == [start - timedelta(hours=48), start - timedelta(hours=2)]
    await notify.run_due(platform, notifier, now=start - timedelta(hours=49), limit=10_000)
    assert len(inbox.to(address)) == 1
    await notify.run_due(platform, notifier, now=start - timedelta(hours=47), limit=10_000)
    assert len(inbox.to(address)) == 2 and "Rappel" in inbox.to(address)[1]["Subject"]

    async with platform.transaction(SYSTEM) as repo:
        await service.cancel(repo, appt.id)
    await notify.run_due(platform, notifier, now=start - timedelta(hours=40), limit=10_000)
    cancelled = inbox.to(address)[2]
    _, cal = parts(cancelled)
    assert "annulé" in cancelled["Subject"]
    assert cal is not None and cal["METHOD"] == "CANCEL" and str(cal.walk("VEVENT")[0]["STATUS"]) == "CANCELLED"
    # The 2 h reminder was withdrawn with the appointment.
    await notify.run_due(platform, notifier, now=start - timedelta(hours=1), limit=10_000)
    assert len(inbox.to(address)) == 3
    async with platform.pool.connection() as conn:
        statuses = {(j["kind"], j["status"]) for j in await booking_store.jobs_of(conn, appt.id)}
    assert ("reminder", "cancelled") in statuses and ("cancellation", "done") in statuses


async def test_private_calendar_feed(client, anon, platform) -> None:
    pr = await new_practice(client)
    sid, _ = await define(platform, pr["role"], ["tue 08:00-09:00 consultation 30"], now=monday_after(platform.clock.now()))
    slot = (await free_slots(client, sid))[0]
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Petit", "given": ["Jules"]}]})
    account = await new_account(platform, "patient", f"Patient/{pid}")
    async with platform.transaction(SYSTEM) as repo:
        appt = (await service.book(repo, slot["id"], patient=f"Patient/{pid}")).stored
    async with platform.pool.connection() as conn, conn.transaction():
        token = await feed.new_token(platform, conn, account)
    url = feed.feed_url(platform, token)
    assert token in url
    r = await anon.get(f"/booking/feed/{token}.ics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/calendar")
    events = Calendar.from_ical(r.content).walk("VEVENT")
    assert [str(e["UID"]).split("@")[0] for e in events] == [f"appointment-{appt.id}"]
    assert events[0].decoded("DTSTART") == model.slot_start(slot)
    assert "12 rue des Lilas" in str(events[0]["LOCATION"])
    # A new link retires the old one; a made-up one finds nothing.
    async with platform.pool.connection() as conn, conn.transaction():
        await feed.new_token(platform, conn, account)
    assert (await anon.get(f"/booking/feed/{token}.ics")).status_code == 404
    assert (await anon.get("/booking/feed/nothing-here.ics")).status_code == 404
