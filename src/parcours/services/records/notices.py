"""Patients are told when documents or results arrive in their record.

A notice row (``record_notice``) is written in the transaction that stores the document or
the results, so a notice exists if and only if they were committed. The portal shows the
unseen ones; every server process also e-mails pending notices through the e-mail channel
booking set up (``services.booking.notify``: SMTP when configured, else logged), with no
clinical detail: not the kind of document, not its author, not a value; only that
something new is in the record and where to see it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import make_msgid

from parcours.security.caller import PLATFORM
from parcours.services import jobs
from parcours.services.booking.notify import EmailChannel, contact_of
from parcours.services.platform import Platform
from parcours.store import records as record_store

log = logging.getLogger(__name__)

TEXTS = {
    "fr": ("Nouveau dans votre dossier Parcours", "Bonjour,\n\nUn nouvel élément a été ajouté à votre dossier de santé Parcours.\n"
           "Connectez-vous pour le consulter : {link}\n\nCe message est envoyé par Parcours. Il ne contient aucune information médicale."),
    "en": ("New in your Parcours record", "Hello,\n\nSomething new was added to your Parcours health record.\n"
           "Sign in to see it: {link}\n\nThis message is sent by Parcours. It contains no medical information."),
}


def email_of(platform: Platform, to: str, lang: str) -> EmailMessage:
    subject, body = TEXTS.get(lang, TEXTS["fr"])
    msg = EmailMessage()
    msg["From"] = platform.settings.smtp_from
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="parcours.example")
    msg.set_content(body.format(link=platform.settings.base_url.rstrip("/") + "/portal/records"))
    return msg


async def run_due(platform: Platform, email: EmailChannel, *, limit: int = 100) -> int:
    """Send pending notices (one e-mail per patient and run, however many notices); returns how many were handled."""
    async with platform.transaction(PLATFORM) as repo:
        repo.audit_enabled = False  # reading a contact address to send a notice is no access to the record
        due = await record_store.notices_due(repo.conn, limit)
        done: set[str] = set()
        for n in due:
            status = "sent"
            if n.patient not in done:
                contact = await contact_of(repo, n.patient)
                if not contact.emails:
                    status = "skipped"
                else:
                    try:
                        for to in contact.emails[:2]:
                            await email.send(email_of(platform, to, contact.lang))
                    except Exception:  # the SMTP server is down: kept pending for the next run
                        log.exception("Record notice %s could not be sent", n.id)
                        continue
                done.add(n.patient)
            await record_store.notice_done(repo.conn, n.id, status, platform.clock.now())
    return len(due)


def start_in_background(platform: Platform, email: EmailChannel, every: float = 15.0) -> Callable[[], Awaitable[None]]:
    return jobs.every(every, lambda: run_due(platform, email), name="record-notices", log=log)
