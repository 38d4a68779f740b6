"""The messaging write rule: who may write what to whom, whatever the path.

Registered on the platform, it runs in the transaction of every write of a
Communication (pages, the messaging API, the FHIR REST API, Bundles), after the
access policy let the write through and before it is stored:

* **Conversations** name their participants (Practitioners and at most one Patient);
  the sender is the caller and one of them (a proxy writes for their patient).
  A patient (or proxy) writes only to professionals with whom the patient has a care
  relationship (``store.care``: care team, appointment, encounter, referral, task) or
  who accept messages from patients (``model.ACCEPTS_PATIENT_MESSAGES`` on one of their
  roles or its practice), and never to one they blocked. A professional writes to any
  professional of the directory; to a patient, or about one, only within a care
  relationship (a patient who blocked them is refused by the access policy already).
* **Messages** belong to one conversation (``partOf``), go to all its participants and
  nobody else, come from one of them, answer (``inResponseTo``) only messages of the
  same conversation, carry checked attachments (``attachments.check_attachment``).
  A professional writes to a patient within a care relationship, or in a conversation
  the patient opened (a practice that accepts patients' messages answers them).
* Sent messages and conversations are not changed or deleted, except by the platform
  (retention). Other Communications that name a patient and a sender or recipients
  (messages written straight through the FHIR API) follow the same care-relationship
  rule, since the access policy lets the participants of a Communication see it.

It also keeps the messaging tables in step in the same transaction: a new conversation
gets its row and participants; a new message takes the conversation's next number
(``store.messaging.next_seq``: gapless, in commit order) and queues e-mail notices.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from parcours.core.errors import Forbidden, Unprocessable
from parcours.core.settings import Settings
from parcours.security.caller import Caller
from parcours.services.messaging import attachments, model
from parcours.store import care
from parcours.store import messaging as store

if TYPE_CHECKING:
    from parcours.store.repository import Repository


# What one transaction (one Repository) already read or numbered: the conversation a message
# is sent in (its messaging row, read by the service to build the message) and the numbers
# the rule gave new messages, so that neither is read twice.
_seen: WeakKeyDictionary[Repository, dict[str, store.Conversation | int]] = WeakKeyDictionary()


def remember_conversation(repo: Repository, conv: store.Conversation) -> None:
    _seen.setdefault(repo, {})[f"conversation:{conv.id}"] = conv


def number_of(repo: Repository, message_id: str) -> int | None:
    """The number this transaction gave a new message (None: it numbered no such message)."""
    seq = _seen.get(repo, {}).get(f"seq:{message_id}")
    return seq if isinstance(seq, int) else None


async def _conversation(repo: Repository, cid: str) -> store.Conversation | None:
    conv = _seen.get(repo, {}).get(f"conversation:{cid}")
    return conv if isinstance(conv, store.Conversation) else await store.get_conversation(repo.conn, cid)


class MessagingRule:
    types = frozenset({"Communication"})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def before_write(self, repo: Repository, rtype: str, rid: str, resource: dict | None, previous: dict | None) -> None:
        kind = model.kind_of(resource)
        before = model.kind_of(previous)
        if resource is not None and kind is None and model.conversation_of(resource):
            if await store.existing_conversations(repo.conn, [model.conversation_of(resource) or ""]):
                raise Unprocessable("A message of a conversation carries the category messaging#message")
        if kind is None and before is None:
            if resource is not None and previous is None and not repo.caller.is_system:
                await self._check_other(repo, resource)
            return
        if repo.caller.is_system:
            if previous is None and resource is not None:
                await self._record(repo, rid, resource, kind)
            return
        if previous is not None or resource is None:
            raise Forbidden("A message, once sent, is neither changed nor deleted")
        conv = None
        if kind == model.CONVERSATION:
            await self._check_conversation(repo, resource)
        else:
            conv = await self._check_message(repo, rid, resource)
        await self._record(repo, rid, resource, kind, conv)

    # -- checks --------------------------------------------------------------------------------
    async def _acting_as(self, repo: Repository, resource: dict, participants: list[str]) -> str:
        """The participant the caller is (or acts for) as the sender of ``resource``."""
        caller = repo.caller
        sender = model.sender(resource)
        if not caller.fhir_user or sender != caller.fhir_user:
            raise Forbidden("A message's sender is the person who sends it")
        if caller.kind == "proxy":
            ctx = await repo.care()
            mine = [p for p in model.patient_of(participants) if p in ctx.patients]
            if not mine:
                raise Forbidden("A proxy writes in the conversations of the patient they represent")
            return mine[0]
        if sender not in participants:
            raise Unprocessable("The sender of a conversation is one of its participants")
        return sender

    async def _check_conversation(self, repo: Repository, resource: dict) -> None:
        participants = model.participants(resource)
        if len(participants) < 2:
            raise Unprocessable("A conversation has at least two participants")
        if len(participants) > model.MAX_PARTICIPANTS:
            raise Unprocessable(f"A conversation has at most {model.MAX_PARTICIPANTS} participants")
        bad = [p for p in participants if p.split("/", 1)[0] not in model.PARTICIPANT_TYPES or "/" not in p]
        if bad:
            raise Unprocessable(f"Participants are professionals (Practitioner) and one patient (Patient), not {bad[0]}")
        patients = model.patient_of(participants)
        if len(patients) > 1:
            raise Unprocessable("A conversation is with one patient at most")
        subject = model.subject(resource)
        if subject is not None and not subject.startswith("Patient/"):
            raise Unprocessable("A conversation is about a patient (subject) or about nothing")
        if patients and subject != patients[0]:
            raise Unprocessable("A conversation with a patient is about that patient (its subject)")
        if not model.topic(resource).strip():
            raise Unprocessable("A conversation has a subject line (topic)")
        pros = [p.split("/", 1)[1] for p in participants if p.startswith("Practitioner/")]
        missing = set(pros) - await store.live_ids(repo.conn, "Practitioner", pros)
        if missing:
            raise Unprocessable(f"Practitioner/{sorted(missing)[0]} is not in the directory")
        if patients and not await store.live_ids(repo.conn, "Patient", [patients[0].split("/", 1)[1]]):
            raise Unprocessable(f"{patients[0]} is not known")
        me = await self._acting_as(repo, resource, participants)
        caller = repo.caller
        ctx = await repo.care()
        if caller.kind in ("patient", "proxy"):
            patient = patients[0] if patients else None
            if patient is None or patient not in ctx.patients:
                raise Forbidden("A patient writes to professionals in their own name (or as the proxy of the patient)")
            now = repo.clock.now()
            for pro in participants:
                if pro != me and pro.startswith("Practitioner/"):
                    await self._patient_may_write(repo, pro, patient, now)
        elif caller.kind == "practitioner":
            about = patients[0] if patients else subject
            if about is not None and about not in (ctx.patients | ctx.emergency):
                raise Forbidden("You can write to or about a patient only within a care relationship")
        else:
            raise Forbidden("Messaging is for patients, their proxies and professionals")

    async def _patient_may_write(self, repo: Repository, pro: str, patient: str, now: datetime) -> None:
        theirs = await care.load(repo.conn, Caller(kind="practitioner", fhir_user=pro), now)
        if patient in theirs.blocked_by:
            raise Forbidden("You blocked this professional's access to your record: you cannot write to them")
        if patient in theirs.patients:
            return
        if await accepts_patient_messages(repo, pro):
            return
        raise Forbidden("You can write to the professionals who care for you, and to those who accept messages from patients")

    async def _check_message(self, repo: Repository, rid: str, resource: dict) -> store.Conversation:
        cid = model.conversation_of(resource)
        conv = await _conversation(repo, cid) if cid else None
        if conv is None or len(model.part_of(resource)) != 1:
            raise Unprocessable("A message is part of one conversation (partOf a conversation's Communication)")
        participants = list(conv.participants)
        if set(model.participants(resource)) != set(participants):
            raise Unprocessable("A message goes to every participant of its conversation, and to nobody else")
        if model.subject(resource) != conv.patient:
            raise Unprocessable("A message is about the patient of its conversation")
        await self._acting_as(repo, resource, participants)
        payload = resource.get("payload") or []
        if not payload:
            raise Unprocessable("A message has a text or an attachment")
        limit = self.settings.messaging_max_text_chars
        if any(len(t) > limit for t in model.texts(resource)):
            raise Unprocessable(f"A message's text is at most {limit} characters")
        files = model.attachments(resource)
        if len(files) > attachments.MAX_PER_MESSAGE:
            raise Unprocessable(f"A message carries at most {attachments.MAX_PER_MESSAGE} files")
        for a in files:
            attachments.check_attachment(a, max_bytes=self.settings.messaging_max_attachment_bytes)
        answered = model.refs(resource.get("inResponseTo"))
        if answered:
            ids = [r.split("/", 1)[1] for r in answered if r.startswith("Communication/")]
            rows = await store.messages_by_id(repo.conn, ids)
            if len(ids) != len(answered) or len(rows) != len(ids) or any(r.conversation_id != cid for r in rows):
                raise Unprocessable("A reply answers a message of the same conversation")
        caller = repo.caller
        if caller.kind == "practitioner":
            ctx = await repo.care()
            with_patient = model.patient_of(participants)
            if with_patient and with_patient[0] not in (ctx.patients | ctx.emergency) and not conv.patient_started:
                raise Forbidden("You can write to a patient within a care relationship, or answer a conversation they opened")
        return conv

    async def _check_other(self, repo: Repository, resource: dict) -> None:
        """A Communication outside messaging that names a sender or recipients: the
        participants see it, so writing to a patient needs what messaging needs."""
        if not (resource.get("sender") or resource.get("recipient")):
            return
        named = {r for r in [model.subject(resource), model.sender(resource), *model.participants(resource)]
                 if r and r.startswith("Patient/")}
        if not named:
            return
        ctx = await repo.care()
        reachable = ctx.patients | (ctx.emergency if repo.caller.kind == "practitioner" else frozenset())
        if not named <= reachable:
            raise Forbidden("You can write to or about a patient only within a care relationship")
        if repo.caller.kind in ("patient", "proxy"):
            now = repo.clock.now()
            for pro in (r for r in model.participants(resource) if r.startswith("Practitioner/")):
                for patient in named:
                    await self._patient_may_write(repo, pro, patient, now)

    # -- bookkeeping ----------------------------------------------------------------------------
    async def _record(self, repo: Repository, rid: str, resource: dict, kind: str | None,
                      conv: store.Conversation | None = None) -> None:
        now = repo.clock.now()
        if kind == model.CONVERSATION:
            participants = model.participants(resource)
            patients = model.patient_of(participants)
            by_patient = repo.caller.kind in ("patient", "proxy") or bool(
                (model.sender(resource) or "").startswith(("Patient/", "RelatedPerson/")))
            await store.open_conversation(repo.conn, rid, patient=patients[0] if patients else model.subject(resource),
                                          started_by=model.sender(resource) or "", patient_started=by_patient,
                                          participants=participants, now=now, topic=model.topic(resource),
                                          names=model.names(resource))
            return
        cid = model.conversation_of(resource) or ""
        conv = conv or await _conversation(repo, cid)
        if conv is None:
            raise Unprocessable("A message is part of one conversation (partOf a conversation's Communication)")
        sender = model.sender(resource) or ""
        me = sender if sender in conv.participants else next(iter(model.patient_of(list(conv.participants))), sender)
        seq = await store.add_message(repo.conn, cid, rid, sender=sender, sender_participant=me, sent_at=now,
                                      notify=[p for p in conv.participants if p != me])
        if seq is not None:
            _seen.setdefault(repo, {})[f"seq:{rid}"] = seq


async def accepts_patient_messages(repo: Repository, pro: str) -> bool:
    """Whether a professional, or the practice of one of their active roles, accepts
    messages from patients who are not (yet) theirs."""
    roles = [r for r in await store.roles_of(repo.conn, pro) if r.get("active", True) is not False]
    if any(model.accepts_patient_messages(r) for r in roles):
        return True
    orgs = [o.split("/", 1)[1] for o in (model.ref_of(r.get("organization")) for r in roles) if o and o.startswith("Organization/")]
    return any(model.accepts_patient_messages(o) for o in (await store.contents(repo.conn, "Organization", orgs)).values())
