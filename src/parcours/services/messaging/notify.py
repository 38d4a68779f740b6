"""E-mail notices of unread messages for people who are offline, and the background jobs.

A new message queues a notice for each other participant who did not mute the
conversation (``messaging_pending``, in the sending transaction). Every server process
runs :func:`run_due`: notices older than ``messaging_email_delay_minutes`` (time to read
it live) are claimed with ``FOR UPDATE SKIP LOCKED``; someone with a live socket on
any process (``messaging_presence``) is not e-mailed (their notice waits); someone
e-mailed less than ``messaging_email_interval_minutes`` ago waits too, so that one
e-mail covers every message of the interval (batching). What was read meanwhile is
not announced.

The e-mail says how many new messages there are and where to read them: never who
wrote, about whom or what (no clinical content leaves by e-mail). It goes through the
platform's e-mail channel: the booking notices' (``services.booking.notify``: SMTP
settings ``PARCOURS_SMTP_*``, or only logged when no SMTP server is set).

The same loop purges conversations idle for longer than the retention
(``messaging_retention_days``, 0: kept; :func:`purge`): their Communications are
deleted through the platform's Repository (audited), their past versions expunged.
Documents filed into a record from a message are documents of the record: they stay.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import urlsplit

from parcours.security import roles
from parcours.security.caller import PLATFORM
from parcours.services import jobs
from parcours.services.booking.notify import EmailChannel
from parcours.services.platform import Platform
from parcours.store import accounts as account_store
from parcours.store import messaging as store

log = logging.getLogger(__name__)

TEXTS = {
    "fr": {
        "subject": "Nouveaux messages sur Parcours",
        "lead": "Vous avez {messages} nouveau(x) message(s) dans {conversations} conversation(s) de votre messagerie sécurisée.",
        "read": "Pour les lire, connectez-vous à Parcours :",
        "footer": "Ce message est envoyé par Parcours. Il ne contient aucune information médicale ; "
                  "vous pouvez mettre une conversation en sourdine depuis la messagerie.",
    },
    "en": {
        "subject": "New messages on Parcours",
        "lead": "You have {messages} new message(s) in {conversations} conversation(s) of your secure messaging.",
        "read": "To read them, sign in to Parcours:",
        "footer": "This message is sent by Parcours. It contains no medical information; "
                  "you can mute a conversation from your messages.",
    },
}


def email_for(platform: Platform, to: str, lang: str, role: str, messages: int, conversations: int) -> EmailMessage:
    t = TEXTS.get(lang, TEXTS["fr"])
    space = roles.role(role).space if roles.is_role(role) else "portal"
    link = platform.settings.base_url.rstrip("/") + f"/{space}/messages"
    msg = EmailMessage()
    msg["Subject"] = t["subject"]
    msg["From"] = platform.settings.smtp_from
    msg["To"] = to
    msg["Message-ID"] = make_msgid(domain=urlsplit(platform.settings.base_url).hostname or "parcours")
    msg.set_content("\n".join([t["lead"].format(messages=messages, conversations=conversations), "", t["read"], link, "",
                               t["footer"]]))
    return msg


async def run_due(platform: Platform, email: EmailChannel, *, now: datetime | None = None, limit: int = 200) -> int:
    """Send the e-mail notices that are due; returns how many e-mails left."""
    s = platform.settings
    now = now or platform.clock.now()
    due_before = now - timedelta(minutes=s.messaging_email_delay_minutes)
    interval = timedelta(minutes=s.messaging_email_interval_minutes)
    fresh = now - timedelta(seconds=max(2.5 * s.messaging_presence_seconds, 10.0))
    sent = 0
    async with platform.pool.connection() as conn, conn.transaction():
        for due in await store.claim_due(conn, due_before, limit):
            if due.messages == 0:  # read (or muted) meanwhile
                await store.clear_pending(conn, due.participant, due_before)
                continue
            last = await store.last_mailed(conn, due.participant)
            if last is not None and last > now - interval:
                continue  # one e-mail per interval: this one waits and will cover the rest
            accounts = [a for a in await account_store.by_fhir_user(conn, due.participant) if a.active]
            if not accounts:
                await store.clear_pending(conn, due.participant, due_before)
                continue
            if await store.online(conn, [a.id for a in accounts], fresh):
                continue  # reading live; told by e-mail only if they leave without reading
            for a in accounts:
                await email.send(email_for(platform, a.email, a.locale or "fr", a.role, due.messages, due.conversations))
                sent += 1
            await store.set_mailed(conn, due.participant, now)
            await store.clear_pending(conn, due.participant, due_before)
    return sent


async def purge(platform: Platform, *, now: datetime | None = None, limit: int = 100) -> int:
    """Delete the conversations idle for longer than the retention; returns how many."""
    days = platform.settings.messaging_retention_days
    if days <= 0:
        return 0
    now = now or platform.clock.now()
    done = 0
    async with platform.transaction(PLATFORM) as repo:
        for cid in await store.expired_conversations(repo.conn, now - timedelta(days=days), limit):
            ids = await store.message_ids_of(repo.conn, cid)
            for mid in ids:
                await repo.delete("Communication", mid)
            await repo.delete("Communication", cid)
            await store.expunge_history(repo.conn, [*ids, cid])
            await store.forget_conversation(repo.conn, cid)
            done += 1
    return done


def start_in_background(platform: Platform, email: EmailChannel) -> Callable[[], Awaitable[None]]:
    """E-mail notices and retention in this process, every ``messaging_jobs_poll_seconds``."""
    next_purge = platform.clock.now()

    async def round_() -> None:
        nonlocal next_purge
        await run_due(platform, email)
        if platform.clock.now() >= next_purge:
            if await purge(platform) < 100:
                next_purge = platform.clock.now() + timedelta(hours=1)

    return jobs.every(lambda: platform.settings.messaging_jobs_poll_seconds, round_, name="messaging-jobs",
                      enabled=platform.settings.messaging_jobs_worker, log=log)
