"""Secure messaging: start a conversation, send, read, mark read, mute, search, file into
the record, find whom to write to.

Every read and write of a conversation or message goes through the caller's
Repository, so the access policy (participants only) and the audit trail apply, and
the write rule (``rule.MessagingRule``) decides who may write to whom. The per-person
state (read marks, unread counts, mutes) is in ``store.messaging``; functions run in
the transaction of the caller's Repository (``repo.conn``) and never commit.

"Me" in a conversation: a professional is their Practitioner, a patient their
Patient; a proxy acts for the patients they represent (their messages are sent as
their RelatedPerson, the patient is the participant: read marks are the patient's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from parcours.core.errors import BadRequest, Forbidden, Gone, NotFound, ParcoursError
from parcours.fhir import fr_core
from parcours.services.messaging import attachments, model, rule
from parcours.store import messaging as store
from parcours.store.repository import Repository, Stored

MAX_RECIPIENTS_FROM_GROUPS = 20


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class Started:
    conversation: Stored
    message: Stored | None


async def me(repo: Repository) -> list[str]:
    """The participant references the caller is, or acts for."""
    c = repo.caller
    if c.kind == "proxy":
        return sorted((await repo.care()).patients)
    if c.fhir_user and c.fhir_user.split("/", 1)[0] in model.PARTICIPANT_TYPES:
        return [c.fhir_user]
    return []


def _ids(refs: Sequence[str], rtype: str) -> list[str]:
    return [r.split("/", 1)[1] for r in refs if r.startswith(f"{rtype}/")]


async def _search(repo: Repository, rtype: str, items: list[tuple[str, str]]) -> list[Stored]:
    return (await repo.search(repo.parse_search(rtype, items))).matches


async def _by_ids(repo: Repository, rtype: str, ids: Sequence[str]) -> dict[str, Stored]:
    """Resources by id through the caller's Repository (one search; what it may not see is absent)."""
    out: dict[str, Stored] = {}
    unique = list(dict.fromkeys(ids))
    for i in range(0, len(unique), 200):
        chunk = unique[i:i + 200]
        for s in await _search(repo, rtype, [("_id", ",".join(chunk)), ("_count", str(len(chunk)))]):
            out[s.id] = s
    return out


async def display_names(repo: Repository, refs: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for pid, s in (await _by_ids(repo, "Practitioner", _ids(refs, "Practitioner"))).items():
        names[f"Practitioner/{pid}"] = _pro_name(s.resource())
    for pid in _ids(refs, "Patient"):
        try:
            names[f"Patient/{pid}"] = fr_core.display_name((await repo.read("Patient", pid)).resource()) or f"Patient/{pid}"
        except ParcoursError:
            pass
    return names


def _pro_name(resource: dict) -> str:
    name = fr_core.display_name(resource)
    prefix = next((" ".join(n.get("prefix") or []) for n in resource.get("name") or [] if isinstance(n, dict) and n.get("prefix")), "")
    return f"{prefix} {name}".strip() if name and prefix and not name.startswith(prefix) else (name or "")


async def _expand(repo: Repository, to: Sequence[str]) -> list[str]:
    """Recipients as participants: a PractitionerRole is its Practitioner; a CareTeam is
    its professional members (as they are now)."""
    out: list[str] = []
    for r in to:
        r = r.strip()
        kind = r.split("/", 1)[0]
        if kind in model.PARTICIPANT_TYPES:
            out.append(r)
        elif kind == "PractitionerRole":
            role = (await repo.read("PractitionerRole", r.split("/", 1)[1])).resource()
            pract = model.ref_of(role.get("practitioner"))
            if not pract:
                raise BadRequest(f"{r} names no practitioner")
            out.append(pract)
        elif kind == "CareTeam":
            team = (await repo.read("CareTeam", r.split("/", 1)[1])).resource()
            members = [m for m in (model.ref_of((p or {}).get("member")) for p in team.get("participant") or []) if m]
            out += [m for m in members if m.startswith("Practitioner/")][:MAX_RECIPIENTS_FROM_GROUPS]
        else:
            raise BadRequest(f"Write to professionals (Practitioner, PractitionerRole, CareTeam) or a patient, not {r!r}")
    return out


async def start_conversation(repo: Repository, *, to: Sequence[str], topic: str, text: str = "",
                             uploads: Sequence[Upload] = (), about: str | None = None, max_attachment_bytes: int) -> Started:
    """Open a conversation with ``to`` (and post its first message when there is one).
    ``about``: the patient it is about (professionals; for a proxy, the patient they
    write for when they represent several)."""
    caller = repo.caller
    if not caller.fhir_user or caller.kind not in ("practitioner", "patient", "proxy"):
        raise Forbidden("Messaging is for patients, their proxies and professionals")
    topic = " ".join(topic.split())[:200]
    if not topic:
        raise BadRequest("Give the conversation a subject")
    recipients = await _expand(repo, to)
    if caller.kind == "practitioner":
        mine = caller.fhir_user
    elif caller.kind == "patient":
        mine = caller.fhir_user
    else:
        patients = await me(repo)
        if about and about in patients:
            mine = about
        elif len(patients) == 1:
            mine = patients[0]
        else:
            raise BadRequest("Say for which of the patients you represent you are writing")
    participants = list(dict.fromkeys([mine, *recipients]))
    if len(participants) < 2:
        raise BadRequest("Choose at least one person to write to")
    with_patient = model.patient_of(participants)
    subject = with_patient[0] if with_patient else (about if about and about.startswith("Patient/") else None)
    names = await display_names(repo, participants + ([subject] if subject else []))
    if caller.kind == "proxy":
        names.setdefault(caller.fhir_user, caller.display or caller.fhir_user)
    me_display = names.get(caller.fhir_user) or caller.display or caller.fhir_user
    header = model.build_conversation(
        sender={"reference": caller.fhir_user, "display": me_display},
        recipients=[{"reference": r, "display": names.get(r) or r} for r in participants],
        topic=topic, subject={"reference": subject, "display": names.get(subject) or subject} if subject else None,
        now=repo.clock.now())
    created = (await repo.create("Communication", header)).stored
    first = None
    if text.strip() or uploads:
        first = await send(repo, created.id, text=text, uploads=uploads, header=created.resource(),
                           max_attachment_bytes=max_attachment_bytes)
    return Started(created, first)


def number_of(repo: Repository, message_id: str) -> int | None:
    """The number of a message this Repository's transaction sent (None: it sent no such message)."""
    return rule.number_of(repo, message_id)


async def send(repo: Repository, conversation_id: str, *, text: str = "", uploads: Sequence[Upload] = (),
               in_reply_to: str | None = None, header: dict | None = None, max_attachment_bytes: int) -> Stored:
    """Post a message in a conversation the caller takes part in. What the message repeats of
    its conversation (participants, subject line, patient) comes from the messaging tables when
    ``header`` is not given; the write itself goes through the caller's Repository: the access
    policy and the messaging rule decide on it."""
    if header is None:
        header = await _header_of(repo, conversation_id)
    if model.kind_of(header) != model.CONVERSATION:
        raise NotFound(f"No conversation {conversation_id}")
    text = text.strip()
    if not text and not uploads:
        raise BadRequest("Write a message or attach a file")
    now = repo.clock.now()
    files = []
    for u in uploads:
        checked = attachments.inspect(u.data, u.filename, max_bytes=max_attachment_bytes)
        files.append(attachments.to_attachment(u.data, checked, model.iso(now)))
    caller = repo.caller
    display = model.names(header).get(caller.fhir_user or "") or caller.display or caller.fhir_user
    message = model.build_message(conversation_id, header, sender={"reference": caller.fhir_user, "display": display},
                                  text=text, attachments=files, in_reply_to=in_reply_to or None, now=now)
    return (await repo.create("Communication", message)).stored


async def _header_of(repo: Repository, conversation_id: str) -> dict:
    """What a new message repeats of its conversation, for a participant (404 for anyone else)."""
    conv = await store.get_conversation(repo.conn, conversation_id)
    if conv is None or not set(await me(repo)) & set(conv.participants):
        raise NotFound(f"No conversation {conversation_id} of yours")
    rule.remember_conversation(repo, conv)  # the write rule checks the message against it
    header: dict[str, Any] = {"category": model.category(model.CONVERSATION), "topic": {"text": conv.topic},
                              "recipient": [{"reference": p, **({"display": conv.names[p]} if conv.names.get(p) else {})}
                                            for p in conv.participants]}
    if conv.patient:
        header["subject"] = {"reference": conv.patient, **({"display": conv.names[conv.patient]} if conv.names.get(conv.patient) else {})}
    return header


# -- reading -----------------------------------------------------------------------------------------

@dataclass
class InboxItem:
    id: str
    topic: str
    participants: list[tuple[str, str]]  # (reference, name), the reader's own first
    patient: tuple[str, str] | None
    last_message_at: datetime
    last_seq: int
    last_read_seq: int
    unread: int
    muted: bool


async def inbox(repo: Repository, *, patient: str | None = None, limit: int = 100) -> list[InboxItem]:
    """The caller's conversations, most recent first (``patient``: those about one patient,
    as listed under that patient's record for its participants)."""
    mine = await me(repo)
    rows = await store.memberships(repo.conn, mine, limit=limit, patient=patient)
    if not rows:
        return []
    headers = await _by_ids(repo, "Communication", [r.conversation_id for r in rows])
    out = []
    for r in rows:
        s = headers.get(r.conversation_id)
        if s is None:
            continue  # the policy says no (a patient who blocked a professional...)
        res = s.resource()
        names = model.names(res)
        parts = sorted(model.participants(res), key=lambda p: (p not in mine, p))
        subject = model.subject(res)
        out.append(InboxItem(s.id, model.topic(res), [(p, names.get(p, p)) for p in parts],
                             (subject, names.get(subject, subject)) if subject else None, r.last_message_at, r.last_seq,
                             r.last_read_seq, r.unread, r.muted))
    return out


async def unread_total(repo: Repository) -> int:
    return sum(i.unread for i in await store.memberships(repo.conn, await me(repo), limit=500) if not i.muted)


@dataclass
class MessageView:
    id: str
    seq: int
    sender: str
    sender_name: str
    sent: str
    texts: list[str]
    attachments: list[dict]  # without their data
    in_reply_to: list[str]
    resource: dict = field(repr=False, default_factory=dict)


def view_of(row: store.MessageRow, resource: dict) -> MessageView:
    sender = model.sender(resource) or row.sender
    return MessageView(
        id=row.message_id, seq=row.seq, sender=sender, sender_name=model.names(resource).get(sender, sender),
        sent=str(resource.get("sent") or model.iso(row.sent_at)), texts=model.texts(resource),
        attachments=[attachments.without_data(a) for a in model.attachments(resource)],
        in_reply_to=[r.split("/", 1)[1] for r in model.refs(resource.get("inResponseTo")) if r.startswith("Communication/")],
        resource=resource)


@dataclass
class ConversationView:
    id: str
    header: dict
    topic: str
    names: dict[str, str]
    participants: list[str]
    patient: str | None
    me: list[str]
    messages: list[MessageView]
    read_marks: dict[str, int]
    muted: bool
    last_seq: int  # the highest number shown: every earlier message is shown or older than the page
    unread: int


async def conversation(repo: Repository, conversation_id: str, *, limit: int = 100) -> ConversationView:
    header = (await repo.read("Communication", conversation_id)).resource()
    if model.kind_of(header) != model.CONVERSATION:
        raise NotFound(f"No conversation {conversation_id}")
    rows = await store.latest_messages(repo.conn, conversation_id, limit)
    found = await _by_ids(repo, "Communication", [r.message_id for r in rows])
    messages = [view_of(r, found[r.message_id].resource()) for r in rows if r.message_id in found]
    mine = await me(repo)
    membership = await store.memberships(repo.conn, mine, conversation_ids=[conversation_id], limit=1)
    marks = await store.read_marks(repo.conn, conversation_id)
    return ConversationView(conversation_id, header, model.topic(header), model.names(header), model.participants(header),
                            model.subject(header), mine, messages, marks,
                            muted=bool(membership and membership[0].muted),
                            last_seq=rows[-1].seq if rows else 0, unread=membership[0].unread if membership else 0)


async def messages_after(repo: Repository, conversation_id: str, after: int, *, limit: int = 500
                         ) -> tuple[list[tuple[store.MessageRow, MessageView | None]], bool]:
    """Catch-up: the messages of a conversation numbered after ``after``, each read
    through the caller's Repository (None: the policy refuses it: a gap to step over);
    and whether there are more than ``limit``."""
    await repo.read("Communication", conversation_id)  # participants only
    rows = await store.messages_after(repo.conn, conversation_id, max(0, after), limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    found = await _by_ids(repo, "Communication", [r.message_id for r in rows])
    return [(r, view_of(r, found[r.message_id].resource()) if r.message_id in found else None) for r in rows], more


async def _participating(repo: Repository, conversation_id: str) -> list[str]:
    mine = await me(repo)
    parts = (await store.participants_of(repo.conn, [conversation_id])).get(conversation_id, set())
    who = [m for m in mine if m in parts]
    if not who:
        raise NotFound(f"No conversation {conversation_id} of yours")
    return who


async def mark_read(repo: Repository, conversation_id: str, seq: int) -> int:
    """The caller read the conversation up to message ``seq`` (read receipt, announced to
    every server process at commit)."""
    who = await _participating(repo, conversation_id)
    mark = await store.mark_read(repo.conn, conversation_id, who, seq, repo.clock.now())
    for w in who:
        await store.announce_read(repo.conn, conversation_id, w, mark)
    return mark


async def mute(repo: Repository, conversation_id: str, muted: bool) -> None:
    """No e-mail notices for this conversation (and not counted in the unread total)."""
    who = await _participating(repo, conversation_id)
    await store.set_muted(repo.conn, conversation_id, who, muted)


@dataclass
class Hit:
    message_id: str
    conversation_id: str
    topic: str
    sender_name: str
    sent: str
    text: str


async def search(repo: Repository, query: str, *, limit: int = 50) -> list[Hit]:
    """Full-text search (French-aware) in the caller's own conversations: the access policy
    keeps every other message out of the results."""
    q = " ".join(query.split())[:200]
    if not q:
        return []
    found = await _search(repo, "Communication", [("_content", q), ("category", f"{model.SYSTEM}|{model.MESSAGE}"),
                                                  ("_sort", "-sent"), ("_count", str(limit))])
    out = []
    for s in found:
        res = s.resource()
        sender = model.sender(res) or ""
        out.append(Hit(s.id, model.conversation_of(res) or "", model.topic(res), model.names(res).get(sender, sender),
                       str(res.get("sent") or ""), " ".join(model.texts(res))[:300]))
    return out


@dataclass(frozen=True)
class File:
    data: bytes
    content_type: str
    title: str
    message: Stored


async def attachment(repo: Repository, message_id: str, index: int) -> File:
    """One file of a message, for a caller who may read the message (audited as a read)."""
    stored = await repo.read("Communication", message_id)
    files = model.attachments(stored.resource())
    if not 0 <= index < len(files):
        raise NotFound("No such attachment")
    a = files[index]
    return File(attachments.decode(a), str(a.get("contentType") or "application/octet-stream"), str(a.get("title") or "fichier"),
                stored)


async def file_into_record(platform: Any, repo: Repository, message_id: str, index: int, *, type_code: str | None = None,
                           language: str = "fr") -> Stored:
    """A professional copies a message's file into the record of the conversation's patient:
    a DocumentReference of the shared record (its content in the encrypted blob store),
    written through the caller's Repository (care relationship required, audited)."""
    from parcours.services.records import codes, documents, uploads

    if repo.caller.kind != "practitioner":
        raise Forbidden("Professionals file documents into a patient's record")
    f = await attachment(repo, message_id, index)
    patient = model.subject(f.message.resource())
    if not patient or not patient.startswith("Patient/"):
        raise BadRequest("This conversation is about no patient: there is no record to file into")
    new = documents.NewDocument(patient_id=patient.split("/", 1)[1], data=f.data, filename=f.title,
                                type_code=type_code or codes.TYPES["11488-4"].code, title=f.title, language=language)
    added = await documents.add(platform, repo, new, scanner=uploads.scanner_for(platform.settings.record_clamd_socket))
    return added.stored


# -- whom to write to --------------------------------------------------------------------------------

@dataclass
class Candidate:
    reference: str  # Practitioner/...
    name: str
    detail: str  # professions, specialties and practices
    reachable: bool = True  # for a patient: may write to them


def _concept(c: dict) -> str:
    if c.get("text"):
        return str(c["text"])
    for coding in c.get("coding") or []:
        if coding.get("display") or coding.get("code"):
            return str(coding.get("display") or coding.get("code"))
    return ""


async def find_professionals(repo: Repository, query: str, *, limit: int = 20) -> list[Candidate]:
    """Professionals of the directory by name (FHIR search ``Practitioner?name=``, with their
    roles and practices); for a patient, whether they may write to each."""
    q = " ".join(query.split())[:100]
    if len(q) < 2:
        return []
    res = await repo.search(repo.parse_search("Practitioner", [
        ("name", q), ("_count", str(limit)), ("_revinclude", "PractitionerRole:practitioner"),
        ("_include:iterate", "PractitionerRole:organization")]))
    roles: dict[str, list[dict]] = {}
    orgs: dict[str, dict] = {}
    for inc in res.includes:
        if inc.resource_type == "PractitionerRole":
            r = inc.resource()
            roles.setdefault(model.ref_of(r.get("practitioner")) or "", []).append(r)
        elif inc.resource_type == "Organization":
            orgs[f"Organization/{inc.id}"] = inc.resource()
    out = []
    for s in res.matches:
        ref = f"Practitioner/{s.id}"
        parts = []
        for r in roles.get(ref, []):
            what = ", ".join(x for x in [*(_concept(c) for c in r.get("specialty") or []), *(_concept(c) for c in r.get("code") or [])] if x)
            org = orgs.get(model.ref_of(r.get("organization")) or "", {}).get("name")
            parts.append(" — ".join(x for x in (what, org) if x))
        out.append(Candidate(ref, _pro_name(s.resource()) or ref, "; ".join(dict.fromkeys(p for p in parts if p))))
    if repo.caller.kind in ("patient", "proxy"):
        await _mark_reachable(repo, out)
    return out


async def _mark_reachable(repo: Repository, candidates: list[Candidate]) -> None:
    from parcours.security.caller import Caller
    from parcours.store import care

    patients = await me(repo)
    now = repo.clock.now()
    for c in candidates:
        ctx = await care.load(repo.conn, Caller(kind="practitioner", fhir_user=c.reference), now)
        blocked = bool(set(patients) & ctx.blocked_by)
        c.reachable = not blocked and (bool(set(patients) & ctx.patients) or await rule.accepts_patient_messages(repo, c.reference))


async def my_professionals(repo: Repository) -> list[Candidate]:
    """For a patient (or proxy): the professionals of their care teams and of their recent or
    coming appointments, whom they may write to."""
    patients = await me(repo)
    refs: list[str] = []
    since = (repo.clock.now() - timedelta(days=90)).date().isoformat()
    for p in patients:
        for team in await _search(repo, "CareTeam", [("patient", p), ("status", "active"), ("_count", "50")]):
            refs += [m for m in (model.ref_of((x or {}).get("member")) for x in team.resource().get("participant") or []) if m]
        for appt in await _search(repo, "Appointment", [("patient", p), ("date", f"ge{since}"), ("_count", "50")]):
            refs += [a for a in (model.ref_of((x or {}).get("actor")) for x in appt.resource().get("participant") or []) if a]
    pros = list(dict.fromkeys(r for r in refs if r.startswith("Practitioner/")))
    found = await _by_ids(repo, "Practitioner", _ids(pros, "Practitioner"))
    out = [Candidate(f"Practitioner/{i}", _pro_name(found[i].resource()), "") for i in _ids(pros, "Practitioner") if i in found]
    await _mark_reachable(repo, out)
    return [c for c in out if c.reachable]


async def my_patients(repo: Repository, query: str, *, limit: int = 20) -> list[tuple[str, str]]:
    """For a professional: patients they care for whose name matches (what the policy lets them find)."""
    q = " ".join(query.split())[:100]
    if len(q) < 2:
        return []
    found = await _search(repo, "Patient", [("name", q), ("_count", str(limit))])
    return [(f"Patient/{s.id}", fr_core.display_name(s.resource())) for s in found]


async def accepts_patients(repo: Repository) -> bool:
    return bool(repo.caller.fhir_user) and await rule.accepts_patient_messages(repo, repo.caller.fhir_user or "")


async def set_accepts_patients(repo: Repository, accepts: bool) -> int:
    """A professional says whether patients who are not (yet) theirs may write to them: the
    extension on each of their directory roles (their own entries, through their Repository)."""
    if repo.caller.kind != "practitioner" or not repo.caller.fhir_user:
        raise Forbidden("Professionals choose whether they accept messages from patients")
    roles = await _search(repo, "PractitionerRole", [("practitioner", repo.caller.fhir_user), ("_count", "50")])
    if not roles:
        raise BadRequest("You have no role in the directory: ask the directory administrators to add one")
    for s in roles:
        await repo.update("PractitionerRole", s.id, model.with_accepts_patient_messages(s.resource(), accepts))
    return len(roles)


__all__ = ["Candidate", "ConversationView", "File", "Gone", "Hit", "InboxItem", "MessageView", "Started", "Upload",
           "accepts_patients", "attachment", "conversation", "display_names", "file_into_record", "find_professionals", "inbox",
           "mark_read", "me", "messages_after", "mute", "my_patients", "number_of", "my_professionals", "search", "send", "set_accepts_patients",
           "start_conversation", "unread_total", "view_of"]
