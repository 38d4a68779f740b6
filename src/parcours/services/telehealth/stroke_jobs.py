"""The tele-stroke job loop: escalation of unacknowledged requests, and alerts by e-mail and SMS.

Every ``stroke_jobs_poll_seconds`` each server process:

1. escalates the requests past their acknowledgment deadline (``stroke.escalate_one``: the
   Task row is locked, so two processes never escalate one request twice: the second waits,
   then sees the new deadline);
2. alerts whoever was put on a request and not alerted yet (the first on call of a new
   request, the next one after an escalation): an e-mail to their accounts and an SMS to the
   mobile numbers of their ``Practitioner``. The Task row is locked, the alerts leave, then
   the ``ALERT_EXT`` extension records how many people were alerted, in one transaction per
   request: a second process sees it and sends nothing; a failed SMTP send rolls back and is
   retried at the next round.

E-mails and SMS carry no clinical content: only that an urgent request awaits acknowledgment,
and the link to it. The acknowledgment delay is ``PARCOURS_STROKE_ACK_MINUTES``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import urlsplit

from parcours.core.errors import Gone, NotFound
from parcours.security.caller import PLATFORM
from parcours.services import jobs
from parcours.services.booking.notify import Notifier
from parcours.services.platform import Platform
from parcours.services.telehealth import stroke
from parcours.store import accounts as account_store
from parcours.store.repository import Repository

log = logging.getLogger(__name__)

ALERT_EXT = stroke.BASE + "stroke-alert-sent"
TEXTS = {
    "fr": {"subject": "URGENT : demande de téléavis AVC à acquitter",
           "lead": "Une demande urgente de téléavis AVC vous est adressée : acquittez-la sans attendre.",
           "open": "Pour l'acquitter et rejoindre la vidéo, connectez-vous à Parcours :",
           "footer": "Ce message est envoyé par Parcours. Il ne contient aucune information médicale.",
           "sms": "Parcours : demande URGENTE de téléavis AVC à acquitter. {link}"},
    "en": {"subject": "URGENT: tele-stroke request to acknowledge",
           "lead": "An urgent tele-stroke request is addressed to you: acknowledge it now.",
           "open": "To acknowledge it and join the video, sign in to Parcours:",
           "footer": "This message is sent by Parcours. It contains no medical information.",
           "sms": "Parcours: URGENT tele-stroke request to acknowledge. {link}"},
}


def link_of(platform: Platform, task_id: str) -> str:
    return platform.settings.base_url.rstrip("/") + f"/workspace/stroke/{task_id}"


def alerts_sent(task: dict) -> int:
    return max([int(e.get("valueInteger") or 0) for e in task.get("extension") or [] if e.get("url") == ALERT_EXT] or [0])


def email_for(platform: Platform, to: str, lang: str, task_id: str) -> EmailMessage:
    t = TEXTS.get(lang, TEXTS["fr"])
    msg = EmailMessage()
    msg["Subject"] = t["subject"]
    msg["From"] = platform.settings.smtp_from
    msg["To"] = to
    msg["Message-ID"] = make_msgid(domain=urlsplit(platform.settings.base_url).hostname or "parcours")
    msg["Importance"] = "high"
    msg.set_content("\n".join([t["lead"], "", t["open"], link_of(platform, task_id), "", t["footer"]]))
    return msg


async def mobiles_of(repo: Repository, ref: str) -> list[str]:
    if not ref.startswith("Practitioner/"):
        return []
    try:
        who = (await repo.read("Practitioner", ref.split("/", 1)[1])).resource()
    except (NotFound, Gone):
        return []
    return list(dict.fromkeys(tc["value"] for tc in who.get("telecom") or [] if tc.get("value") and (
        tc.get("system") == "sms" or (tc.get("system") == "phone" and tc.get("use") == "mobile"))))


async def alert(platform: Platform, notifier: Notifier, repo: Repository, task_id: str, ref: str) -> int:
    """E-mail and SMS to one person put on a request; returns how many messages left."""
    sent, lang = 0, "fr"
    for acct in await account_store.by_fhir_user(repo.conn, ref):
        if acct.active:
            lang = acct.locale if acct.locale in TEXTS else lang
            await notifier.email.send(email_for(platform, acct.email, acct.locale or "fr", task_id))
            sent += 1
    for phone in await mobiles_of(repo, ref):
        await notifier.sms.send(phone, TEXTS[lang]["sms"].format(link=link_of(platform, task_id)))
        sent += 1
    return sent


async def pending_alerts(repo: Repository, limit: int = 500) -> list[str]:
    req = repo.parse_search("Task", [("code:text", stroke.KIND["text"]), ("status", "requested"), ("_count", str(limit))])
    return [s.id for s in (await repo.search(req)).matches if alerts_sent(s.resource()) < len(stroke.alerted(s.resource()))]


async def run_due(platform: Platform, notifier: Notifier, *, now: datetime | None = None) -> list[str]:
    """One round: escalations, then alerts. Returns the ids of the requests escalated."""
    now = now or platform.clock.now()
    async with platform.transaction(PLATFORM) as repo:
        due = await stroke.due_requests(repo, now)
    escalated = []
    for task_id in due:
        async with platform.transaction(PLATFORM) as repo:  # one request per transaction: a failure stays local
            if await stroke.escalate_one(repo, task_id, now):
                escalated.append(task_id)
    async with platform.transaction(PLATFORM) as repo:
        pending = await pending_alerts(repo)
    for task_id in pending:
        async with platform.transaction(PLATFORM) as repo:
            task = await repo.lock("Task", task_id)  # another process may be alerting: wait, then re-read
            if task is None or task.get("code") != stroke.KIND or task.get("status") != "requested":
                continue
            people = stroke.alerted(task)
            if alerts_sent(task) >= len(people):
                continue
            await alert(platform, notifier, repo, task_id, people[-1])
            task.setdefault("extension", []).append({"url": ALERT_EXT, "valueInteger": len(people)})
            await repo.update("Task", task_id, task)
    return escalated


def start_in_background(platform: Platform, notifier: Notifier) -> Callable[[], Awaitable[None]]:
    """The loop in this process, every ``stroke_jobs_poll_seconds`` (off: ``stroke_jobs_worker``)."""
    return jobs.every(lambda: platform.settings.stroke_jobs_poll_seconds, lambda: run_due(platform, notifier),
                      name="stroke-jobs", enabled=platform.settings.stroke_jobs_worker, log=log)
