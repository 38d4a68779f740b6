"""Reminders of open tele-expertise requests near or past their due date, and their job loop.

Stages: ``due-soon`` (a quarter of the time given is left, at most 24 hours and at least
one hour before the due date) and ``overdue``. Each stage is sent at most once per
request: the Task's row is locked, the stages already sent are read from its
``REMINDER_EXT`` extensions, the e-mails leave, then the stage is recorded, all in one
transaction per request (two processes running the loop queue on the lock, the second
sees the stage and sends nothing). The expert who owns the request is reminded, or,
while nobody has taken it, every member of its specialty pool.

The e-mail names no patient, question or specialty: only that a request awaits an answer,
when it is due, and the link to it (no clinical content leaves by e-mail). It goes through
the platform's e-mail channel (``services.booking.notify``: ``PARCOURS_SMTP_*``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from parcours.security.caller import PLATFORM
from parcours.services import jobs
from parcours.services.booking.notify import EmailChannel
from parcours.services.directory.nomenclatures import SPECIALTY_SYSTEM
from parcours.services.platform import Platform
from parcours.services.telehealth import expertise
from parcours.store import accounts as account_store
from parcours.store.repository import Repository

log = logging.getLogger(__name__)

OPEN = ("requested", "accepted", "in-progress")
TEXTS = {
    "fr": {
        "subject": {"due-soon": "Demande de téléexpertise à rendre bientôt", "overdue": "Demande de téléexpertise en retard"},
        "lead": {"due-soon": "Une demande de téléexpertise qui vous est adressée attend votre réponse avant le {due}.",
                 "overdue": "Une demande de téléexpertise qui vous est adressée devait recevoir une réponse avant le {due}."},
        "read": "Pour la consulter, connectez-vous à Parcours :",
        "footer": "Ce message est envoyé par Parcours. Il ne contient aucune information médicale.",
    },
    "en": {
        "subject": {"due-soon": "Tele-expertise request due soon", "overdue": "Tele-expertise request overdue"},
        "lead": {"due-soon": "A tele-expertise request addressed to you awaits your answer before {due}.",
                 "overdue": "A tele-expertise request addressed to you was due before {due}."},
        "read": "To read it, sign in to Parcours:",
        "footer": "This message is sent by Parcours. It contains no medical information.",
    },
}


def due_of(task: dict) -> datetime | None:
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    return datetime.fromisoformat(end) if end else None


def stage_of(task: dict, now: datetime) -> str | None:
    """The reminder stage a request is in now, or None."""
    due = due_of(task)
    if due is None or task.get("status") not in OPEN:
        return None
    if now >= due:
        return "overdue"
    authored = datetime.fromisoformat(task["authoredOn"]) if task.get("authoredOn") else due - timedelta(days=1)
    lead = min(max((due - authored) / 4, timedelta(hours=1)), timedelta(hours=24))
    return "due-soon" if now >= due - lead else None


def sent_stages(task: dict) -> set[str]:
    return {str(e.get("valueCode")) for e in task.get("extension") or [] if e.get("url") == expertise.REMINDER_EXT}


def email_for(platform: Platform, to: str, lang: str, stage: str, task_id: str, due: datetime) -> EmailMessage:
    t = TEXTS.get(lang, TEXTS["fr"])
    when = due.astimezone(ZoneInfo("Europe/Paris")).strftime("%d/%m/%Y %H:%M" if lang == "fr" else "%Y-%m-%d %H:%M")
    msg = EmailMessage()
    msg["Subject"] = t["subject"][stage]
    msg["From"] = platform.settings.smtp_from
    msg["To"] = to
    msg["Message-ID"] = make_msgid(domain=urlsplit(platform.settings.base_url).hostname or "parcours")
    link = platform.settings.base_url.rstrip("/") + f"/workspace/expertise/{task_id}"
    msg.set_content("\n".join([t["lead"][stage].format(due=when + " (Paris)"), "", t["read"], link, "", t["footer"]]))
    return msg


async def recipients(repo: Repository, task: dict) -> list[str]:
    """The FHIR references to remind: the owner (and the Practitioner of an owning role), or the pool."""
    owner = (task.get("owner") or {}).get("reference")
    if owner:
        refs = [owner]
        if owner.startswith("PractitionerRole/"):
            role = (await repo.read("PractitionerRole", owner.split("/", 1)[1])).resource()
            if p := (role.get("practitioner") or {}).get("reference"):
                refs.append(p)
        return refs
    code = expertise.pool_specialty(task)
    if code is None:
        return []
    params = [("specialty", f"{SPECIALTY_SYSTEM}|{code}"), ("_count", "500")]
    if org := expertise.pool_organization(task):
        params.append(("organization", org))
    roles = (await repo.search(repo.parse_search("PractitionerRole", params))).matches
    return sorted({p for r in roles if r.resource().get("active") is not False
                   and (p := ((r.resource().get("practitioner") or {}).get("reference")))})


async def run_due(platform: Platform, email: EmailChannel, *, now: datetime | None = None, limit: int = 1000) -> int:
    """Send the reminders that are due; returns how many e-mails left."""
    now = now or platform.clock.now()
    async with platform.transaction(PLATFORM) as repo:
        req = repo.parse_search("Task", [("code:text", expertise.KIND["text"]), ("status", ",".join(OPEN)),
                                         ("_count", str(limit))])
        candidates = [s.id for s in (await repo.search(req)).matches
                      if (st := stage_of(s.resource(), now)) and st not in sent_stages(s.resource())]
    sent = 0
    for task_id in candidates:
        async with platform.transaction(PLATFORM) as repo:
            task = await repo.lock("Task", task_id)  # another process may be on it: wait, then re-read
            if task is None or task.get("code") != expertise.KIND:
                continue
            stage = stage_of(task, now)
            if stage is None or stage in sent_stages(task):
                continue
            due = due_of(task)
            assert due is not None
            for ref in await recipients(repo, task):
                for a in await account_store.by_fhir_user(repo.conn, ref):
                    if a.active:
                        await email.send(email_for(platform, a.email, a.locale or "fr", stage, task_id, due))
                        sent += 1
            task.setdefault("extension", []).append({"url": expertise.REMINDER_EXT, "valueCode": stage})
            await repo.update("Task", task_id, task)
    return sent


def start_in_background(platform: Platform, email: EmailChannel) -> Callable[[], Awaitable[None]]:
    """Reminders in this process, every ``expertise_jobs_poll_seconds``."""
    return jobs.every(lambda: platform.settings.expertise_jobs_poll_seconds, lambda: run_due(platform, email),
                      name="expertise-reminders", enabled=platform.settings.expertise_jobs_worker, log=log)
