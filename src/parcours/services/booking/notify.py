"""Booking notifications: e-mails with an iCalendar invitation, SMS, and their queue runner.

The booking rule queues jobs in ``booking_job`` in the transaction that books or
cancels (so a notice exists if and only if the change was committed). Every server
process runs :func:`run_due` in the background; it claims due jobs with ``FOR UPDATE
SKIP LOCKED`` (each job runs once whatever the number of workers), sends, and marks
them done, retrying later on failure. Tests call :func:`run_due` with a chosen ``now``.

Messages say when and where, with whom, and how (in person, video, home visit); never
why: no visit reason, specialty, comment or other clinical detail leaves by e-mail or SMS.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import formataddr, make_msgid, parseaddr
from typing import Protocol
from urllib.parse import urlsplit

from icalendar import Calendar, Event, vCalAddress, vText

from parcours.core.errors import Gone, NotFound
from parcours.core.settings import Settings
from parcours.security.caller import PLATFORM
from parcours.services import jobs
from parcours.services.booking import model, waitlist
from parcours.services.booking.rules import (
    CANCELLATION,
    CONFIRMATION,
    OFFER,
    OFFER_EXPIRY,
    REMINDER,
)
from parcours.services.directory import model as directory
from parcours.services.platform import Platform
from parcours.store import accounts as account_store
from parcours.store import booking as store
from parcours.store.repository import Repository

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 6


# -- channels ------------------------------------------------------------------------------------

class EmailChannel(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class SmsChannel(Protocol):
    """Where SMS go: an operator's gateway in production, :class:`LoggingSms` in development."""

    async def send(self, to: str, text: str) -> None: ...


@dataclass
class LoggingSms:
    """Development SMS channel: logs each message and keeps the last ones for tests."""

    sent: list[tuple[str, str]] = field(default_factory=list)

    async def send(self, to: str, text: str) -> None:
        log.info("SMS to %s: %s", to, text)
        self.sent.append((to, text))
        del self.sent[:-200]


@dataclass
class LoggingEmail:
    """E-mail channel when no SMTP server is configured: logs the subject and recipients."""

    sent: list[EmailMessage] = field(default_factory=list)

    async def send(self, message: EmailMessage) -> None:
        log.info("E-mail (no SMTP server configured) to %s: %s", message["To"], message["Subject"])
        self.sent.append(message)
        del self.sent[:-200]


class SmtpEmail:
    """Sends through the SMTP server of the settings (plain, STARTTLS or implicit TLS)."""

    def __init__(self, settings: Settings) -> None:
        self.host = settings.smtp_host or "localhost"
        self.port = settings.smtp_port
        self.tls = settings.smtp_tls
        self.username = settings.smtp_username
        self.password = settings.smtp_password

    def _send(self, message: EmailMessage) -> None:
        context = ssl.create_default_context()
        if self.tls == "tls":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(self.host, self.port, timeout=30, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=30)
        with smtp:
            if self.tls == "starttls":
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)

    async def send(self, message: EmailMessage) -> None:
        await asyncio.to_thread(self._send, message)


@dataclass
class Notifier:
    settings: Settings
    email: EmailChannel
    sms: SmsChannel

    @classmethod
    def from_settings(cls, settings: Settings, *, sms: SmsChannel | None = None) -> "Notifier":
        email: EmailChannel = SmtpEmail(settings) if settings.smtp_host else LoggingEmail()
        return cls(settings, email, sms or LoggingSms())


# -- what the messages say ------------------------------------------------------------------------

TEXTS = {
    "fr": {
        CONFIRMATION: ("Rendez-vous confirmé", "Votre rendez-vous est confirmé."),
        REMINDER: ("Rappel de rendez-vous", "Nous vous rappelons votre rendez-vous."),
        CANCELLATION: ("Rendez-vous annulé", "Votre rendez-vous a été annulé."),
        OFFER: ("Un créneau plus tôt s'est libéré", "Un créneau plus proche s'est libéré pour vous. Il vous est réservé jusqu'au {until}."),
        "when": "Quand", "with": "Avec", "where": "Où", "how": "Comment", "manage": "Gérer mes rendez-vous",
        "AMB": "au cabinet", "VR": "en vidéo (téléconsultation)", "HH": "à domicile",
        "footer": "Ce message est envoyé par Parcours. Il ne contient aucune information médicale.",
        "summary": "Rendez-vous", "sms": "Parcours : {what} {when}, {who}. {link}",
    },
    "en": {
        CONFIRMATION: ("Appointment confirmed", "Your appointment is confirmed."),
        REMINDER: ("Appointment reminder", "This is a reminder of your appointment."),
        CANCELLATION: ("Appointment cancelled", "Your appointment was cancelled."),
        OFFER: ("An earlier slot is free", "An earlier slot became free for you. It is kept for you until {until}."),
        "when": "When", "with": "With", "where": "Where", "how": "How", "manage": "Manage my appointments",
        "AMB": "at the practice", "VR": "by video (teleconsultation)", "HH": "at home",
        "footer": "This message is sent by Parcours. It contains no medical information.",
        "summary": "Appointment", "sms": "Parcours: {what} {when}, {who}. {link}",
    },
}


def when_text(start: datetime, lang: str) -> str:
    local = start.astimezone(model.PARIS)
    if lang == "en":
        return local.strftime("%A %d %B %Y at %H:%M").replace(" 0", " ")
    days = ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche")
    months = ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre")
    return f"{days[local.weekday()]} {local.day} {months[local.month - 1]} {local.year} à {local:%H:%M}"


@dataclass
class Visit:
    """The non-clinical facts of an appointment that a message may carry."""

    appointment_id: str
    version: int
    status: str
    start: datetime
    end: datetime
    mode: str
    practitioner: str
    place: str
    address: str
    patient: str | None


async def visit_of(repo: Repository, appointment_id: str) -> Visit | None:
    try:
        appt = (await repo.read("Appointment", appointment_id)).resource()
    except (NotFound, Gone):
        return None
    return await visit_from(repo, appointment_id, appt)


async def visit_from(repo: Repository, appointment_id: str, appt: dict) -> Visit | None:
    start, end = model.appointment_start(appt), model._dt(appt.get("end"))  # noqa: SLF001
    if start is None:
        return None
    mode = "AMB"
    for concept in appt.get("serviceType") or []:
        for c in concept.get("coding") or []:
            if c.get("system") == model.ACT_CODE_SYSTEM:
                mode = c.get("code") or mode
    names = await _displays(repo, model.participants(appt, "Practitioner"))
    place, address = "", ""
    for ref in model.participants(appt, "Location"):
        try:
            loc = (await repo.read("Location", ref.split("/", 1)[1])).resource()
        except (NotFound, Gone):
            continue
        place, address = loc.get("name") or "", directory.address_text(loc.get("address"))
    patients = model.participants(appt, "Patient")
    return Visit(appointment_id, int((appt.get("meta") or {}).get("versionId") or 1), appt.get("status") or "", start,
                 end or start + timedelta(minutes=int(appt.get("minutesDuration") or 20)), mode, ", ".join(names), place, address,
                 patients[0] if patients else None)


async def _displays(repo: Repository, refs: list[str]) -> list[str]:
    out = []
    for ref in refs:
        try:
            out.append(directory.display_name((await repo.read("Practitioner", ref.split("/", 1)[1])).resource()))
        except (NotFound, Gone):
            continue
    return [n for n in out if n]


def invitation(settings: Settings, visit: Visit, *, method: str, lang: str, attendee: str | None) -> bytes:
    """An RFC 5545 VCALENDAR with one VEVENT (METHOD REQUEST, or CANCEL)."""
    t = TEXTS[lang]
    cal = Calendar()
    cal.add("prodid", "-//Parcours//Booking//FR")
    cal.add("version", "2.0")
    cal.add("method", method)
    ev = Event()
    host = urlsplit(settings.base_url).hostname or "parcours"
    ev.add("uid", f"appointment-{visit.appointment_id}@{host}")
    ev.add("dtstamp", datetime.now(model.PARIS).astimezone(model.UTC))
    ev.add("dtstart", visit.start.astimezone(model.UTC))
    ev.add("dtend", visit.end.astimezone(model.UTC))
    ev.add("sequence", visit.version)
    ev.add("summary", f"{t['summary']} - {visit.practitioner}" if visit.practitioner else t["summary"])
    if visit.place or visit.address:
        ev.add("location", vText(", ".join(x for x in (visit.place, visit.address) if x)))
    ev.add("status", "CANCELLED" if method == "CANCEL" else "CONFIRMED")
    ev.add("url", settings.base_url.rstrip("/") + "/portal/appointments")
    organizer = vCalAddress(f"mailto:{parseaddr(settings.smtp_from)[1]}")
    organizer.params["cn"] = vText("Parcours")
    ev["organizer"] = organizer
    if attendee:
        a = vCalAddress(f"mailto:{attendee}")
        a.params["role"] = vText("REQ-PARTICIPANT")
        a.params["partstat"] = vText("ACCEPTED")
        ev.add("attendee", a, encode=False)
    cal.add_component(ev)
    return cal.to_ical()


def email_message(settings: Settings, kind: str, visit: Visit, to: str, lang: str, *, until: datetime | None = None) -> EmailMessage:
    t = TEXTS[lang]
    subject, lead = t[kind]
    lead = lead.format(until=when_text(until, lang) if until else "")
    manage = settings.base_url.rstrip("/") + "/portal/appointments"
    lines = [lead, "", f"{t['when']} : {when_text(visit.start, lang)}"]
    if visit.practitioner:
        lines.append(f"{t['with']} : {visit.practitioner}")
    if visit.mode != "VR" and (visit.place or visit.address):
        lines.append(f"{t['where']} : {', '.join(x for x in (visit.place, visit.address) if x)}")
    lines += [f"{t['how']} : {t.get(visit.mode, t['AMB'])}", "", f"{t['manage']} : {manage}", "", t["footer"]]
    msg = EmailMessage()
    msg["Subject"] = f"{subject} - {when_text(visit.start, lang)}"
    msg["From"] = settings.smtp_from
    msg["To"] = to
    msg["Message-ID"] = make_msgid(domain=urlsplit(settings.base_url).hostname or "parcours")
    msg.set_content("\n".join(lines))
    if kind != OFFER:
        method = "CANCEL" if kind == CANCELLATION else "REQUEST"
        ics = invitation(settings, visit, method=method, lang=lang, attendee=to).decode()
        msg.add_attachment(ics, subtype="calendar", filename="rendez-vous.ics", params={"method": method})
    return msg


@dataclass(frozen=True)
class Contact:
    emails: tuple[str, ...]
    phones: tuple[str, ...]
    lang: str


async def contact_of(repo: Repository, patient_ref: str) -> Contact:
    emails: list[str] = []
    phones: list[str] = []
    lang = "fr"
    try:
        patient = (await repo.read("Patient", patient_ref.split("/", 1)[1])).resource()
    except (NotFound, Gone):
        patient = {}
    for tc in patient.get("telecom") or []:
        if tc.get("system") == "email" and tc.get("value"):
            emails.append(tc["value"])
        elif tc.get("system") == "sms" and tc.get("value") or (tc.get("system") == "phone" and tc.get("use") == "mobile" and tc.get("value")):
            phones.append(tc["value"])
    for comm in patient.get("communication") or []:
        for c in (comm.get("language") or {}).get("coding") or []:
            if (c.get("code") or "")[:2] == "en" and comm.get("preferred"):
                lang = "en"
    for acct in await account_store.by_fhir_user(repo.conn, patient_ref):
        if acct.active and acct.email not in emails:
            emails.append(acct.email)
        if acct.locale in ("fr", "en"):
            lang = acct.locale
    return Contact(tuple(dict.fromkeys(emails)), tuple(dict.fromkeys(phones)), lang)


# -- the queue runner ---------------------------------------------------------------------------------

async def handle(repo: Repository, notifier: Notifier, job: store.Job, now: datetime) -> None:
    if job.kind == OFFER_EXPIRY:
        await waitlist.expire_offer(repo, job.appointment_id or "", job.payload, now)
        return
    kind, until = job.kind, None
    if kind == OFFER:
        # A place on a waiting list has no time of its own: the message is about the offered slot.
        entry = (await repo.read("Appointment", job.appointment_id or "")).resource()
        offered = model.waitlist_offer(entry)
        if entry.get("status") != "waitlist" or offered is None or offered[1] <= now:
            return
        slot = (await repo.read("Slot", offered[0].split("/", 1)[1])).resource()
        sched = (await repo.read("Schedule", model.slot_schedule(slot) or "")).resource()
        location = model.actor_id(sched, "Location")
        entry = {**entry, "start": slot["start"], "end": slot["end"], "serviceType": slot.get("serviceType"),
                 "participant": [*entry.get("participant", []), *([{"actor": {"reference": f"Location/{location}"}}] if location else [])]}
        visit = await visit_from(repo, job.appointment_id or "", entry)
        until = offered[1]
    else:
        visit = await visit_of(repo, job.appointment_id or "")
    if visit is None or visit.patient is None:
        return
    if kind in (CONFIRMATION, REMINDER) and visit.status != "booked":
        return  # cancelled or moved since: its own notices follow
    if kind == REMINDER and visit.start <= now:
        return
    contact = await contact_of(repo, visit.patient)
    for to in contact.emails:
        await notifier.email.send(email_message(notifier.settings, kind, visit, formataddr(("", to)) if "<" in to else to,
                                                contact.lang, until=until))
    t = TEXTS[contact.lang]
    for phone in contact.phones:
        await notifier.sms.send(phone, t["sms"].format(what=t[kind][0], when=when_text(visit.start, contact.lang),
                                                       who=visit.practitioner or "Parcours",
                                                       link=notifier.settings.base_url.rstrip("/") + "/portal/appointments"))


async def run_due(platform: Platform, notifier: Notifier, *, now: datetime | None = None, limit: int = 200) -> int:
    """Run the jobs due at ``now`` (default: the platform's clock); returns how many ran."""
    ran = 0
    while ran < limit:
        at = now or platform.clock.now()
        async with platform.pool.connection() as conn, conn.transaction():
            jobs = await store.claim_due(conn, at, 1)
            if not jobs:
                break
            job = jobs[0]
            repo = platform.repository(conn, PLATFORM)
            try:
                async with conn.transaction():  # a savepoint: a failed job's writes go, the job row stays
                    await handle(repo, notifier, job, at)
            except Exception as err:  # noqa: BLE001 - any failure is retried, then recorded
                log.warning("Booking notification %s (%s) failed: %s", job.id, job.kind, err)
                if job.attempts + 1 >= MAX_ATTEMPTS:
                    await store.finish(conn, job.id, at, store.FAILED, str(err)[:1000])
                else:
                    await store.retry(conn, job.id, at + timedelta(minutes=2 ** job.attempts), str(err))
            else:
                await store.finish(conn, job.id, at)
        ran += 1
    return ran


def start_in_background(platform: Platform, notifier: Notifier) -> Callable[[], Awaitable[None]]:
    """Run due notification jobs every few seconds in this process; returns the stopper."""
    from parcours.services.booking import generation

    next_roll = platform.clock.now()

    async def round_() -> None:
        nonlocal next_roll
        await run_due(platform, notifier)
        if platform.clock.now() >= next_roll:
            # The rolling horizon: schedules get their next days of slots.
            if await generation.roll(platform) < 200:
                next_roll = platform.clock.now() + timedelta(hours=1)

    return jobs.every(lambda: platform.settings.booking_jobs_poll_seconds, round_, name="booking-notifications",
                      enabled=platform.settings.booking_jobs_worker, log=log)


__all__ = ["EmailChannel", "LoggingEmail", "LoggingSms", "Notifier", "SmsChannel", "SmtpEmail", "email_message", "invitation",
           "run_due", "start_in_background"]
