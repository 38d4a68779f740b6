"""Messaging's own tables (revision 0010_messaging): what a message is not.

Messages and conversations are FHIR Communications in the resource store, read and
written through the Repository. These tables hold the per-person state around them:

* ``messaging_conversation``: one row per conversation (its header Communication's
  id), with the patient it is about or with, who opened it, and its message counter.
  A new message takes the next number with ``UPDATE ... SET last_seq = last_seq + 1``:
  the row stays locked until the sending transaction ends, so the messages of one
  conversation are numbered without gaps *in commit order*. A client that saw number
  n has seen every earlier one, and "everything after n" is a complete catch-up.
* ``messaging_participant``: who is in it, how far each one read (read receipts and
  unread counts), whether they muted it.
* ``messaging_message``: the number, sender and time of each message.
* ``messaging_pending``: who has unread messages not yet announced by e-mail (one row
  per person and conversation, from its first unannounced message); the e-mail job
  reads due rows only, with ``FOR UPDATE SKIP LOCKED``, so several workers share it.
* ``messaging_mailbox``: when each person was last e-mailed (batching).
* ``messaging_presence``: which accounts have a live socket on which server process,
  refreshed while it lasts: "offline" is no fresh row.

Every function runs in the transaction its caller opened and never commits; times
come from the caller's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from psycopg import AsyncConnection
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    all_,
    and_,
    any_,
    bindparam,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from parcours.fhir.indexing import SEP
from parcours.store.schema import tables
from parcours.store.sql import compile_stmt

# The channel read receipts are announced on (payload: JSON, see ``announce_read``).
CHANNEL = "parcours_messaging"

# Not the resource schema's metadata: migration 0010_messaging writes these tables out.
_metadata = MetaData()

conversation = Table(
    "messaging_conversation",
    _metadata,
    Column("id", Text, primary_key=True),  # Communication id of the conversation's header
    Column("patient", Text),  # "Patient/123": the patient it is about, or with
    Column("topic", Text, nullable=False, server_default=text("''")),  # the header's subject line
    Column("started_by", Text, nullable=False),  # the header's sender
    Column("patient_started", Boolean, nullable=False, server_default=text("false")),  # opened by the patient or a proxy
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_message_at", DateTime(timezone=True), nullable=False),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
)
Index("messaging_conversation_last", conversation.c.last_message_at)
Index("messaging_conversation_patient", conversation.c.patient)

participant = Table(
    "messaging_participant",
    _metadata,
    Column("conversation_id", Text, ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
    Column("participant", Text, primary_key=True),  # "Practitioner/1" or "Patient/2"
    Column("display", Text, nullable=False, server_default=text("''")),  # their name, as the header gives it
    Column("last_read_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("last_read_at", DateTime(timezone=True)),
    Column("muted", Boolean, nullable=False, server_default=text("false")),
)
Index("messaging_participant_who", participant.c.participant)

message = Table(
    "messaging_message",
    _metadata,
    Column("conversation_id", Text, ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("message_id", Text, nullable=False, unique=True),  # Communication id
    Column("sender", Text, nullable=False),  # as written: Practitioner/1, Patient/2, RelatedPerson/3
    Column("sender_participant", Text, nullable=False),  # the participant the sender is, or acts for
    Column("sent_at", DateTime(timezone=True), nullable=False),
)

pending = Table(
    "messaging_pending",
    _metadata,
    Column("participant", Text, primary_key=True),
    Column("conversation_id", Text, ForeignKey("messaging_conversation.id", ondelete="CASCADE"), primary_key=True),
    Column("first_at", DateTime(timezone=True), nullable=False),
)
Index("messaging_pending_due", pending.c.first_at)

mailbox = Table(
    "messaging_mailbox",
    _metadata,
    Column("participant", Text, primary_key=True),
    Column("last_sent_at", DateTime(timezone=True), nullable=False),
)

presence = Table(
    "messaging_presence",
    _metadata,
    Column("account_id", Text, primary_key=True),
    Column("node", Text, primary_key=True),  # one server process
    Column("connections", Integer, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)
Index("messaging_presence_seen", presence.c.seen_at)


def _arr(values: list[str] | tuple[str, ...] | set[str] | frozenset[str]) -> Any:
    return literal(sorted(values), ARRAY(Text))


async def _rows(conn: AsyncConnection, stmt: Any) -> list[Any]:
    sql, params = compile_stmt(stmt)
    cur = await conn.execute(sql, params)
    return list(await cur.fetchall()) if cur.description else []


async def _one(conn: AsyncConnection, stmt: Any) -> Any:
    rows = await _rows(conn, stmt)
    return rows[0] if rows else None


@cache
def _fixed() -> dict[str, tuple[str, dict[str, Any]]]:
    """The statements each message runs (sending, delivering), built and compiled once;
    their values are bound per call."""
    b, arr, ts = bindparam, ARRAY(Text), DateTime(timezone=True)
    p, c, m = participant, conversation, message
    who = select(func.array_agg(p.c.participant)).where(p.c.conversation_id == c.c.id).scalar_subquery()
    names = select(func.array_agg(p.c.display)).where(p.c.conversation_id == c.c.id).scalar_subquery()
    cols = (m.c.conversation_id, m.c.seq, m.c.message_id, m.c.sender, m.c.sender_participant, m.c.sent_at)
    stmts = {
        "get_conversation": select(c.c.id, c.c.patient, c.c.started_by, c.c.patient_started, c.c.created_at,
                                   c.c.last_message_at, c.c.last_seq, c.c.topic, who, names).where(c.c.id == b("cid")),
        "next_seq": update(c).where(c.c.id == b("cid")).values(
            last_seq=c.c.last_seq + 1, last_message_at=func.greatest(c.c.last_message_at, b("now", type_=ts))
        ).returning(c.c.last_seq),
        "insert_message": pg_insert(m).values(conversation_id=b("cid"), seq=b("seq"), message_id=b("mid"), sender=b("sender"),
                                              sender_participant=b("me"), sent_at=b("now", type_=ts)),
        "read_own": update(p).where(p.c.conversation_id == b("cid"), p.c.participant == b("me")).values(
            last_read_seq=func.greatest(p.c.last_read_seq, b("seq")), last_read_at=b("now", type_=ts)),
        "clear_own": delete(pending).where(pending.c.conversation_id == b("cid"), pending.c.participant == b("me")),
        "queue_notices": pg_insert(pending).from_select(
            ["participant", "conversation_id", "first_at"],
            select(p.c.participant, b("cid", type_=Text), b("now", type_=ts))
            .where(p.c.conversation_id == b("cid"), p.c.participant == any_(b("notify", type_=arr)), p.c.muted.is_(False)),
        ).on_conflict_do_nothing(),
        "messages_by_id": select(*cols).where(m.c.message_id == any_(b("ids", type_=arr))),
        "messages_after": select(*cols).where(m.c.conversation_id == b("cid"), m.c.seq > b("after"))
        .order_by(m.c.seq).limit(b("limit")),
        "participants_of": select(p.c.conversation_id, p.c.participant).where(p.c.conversation_id == any_(b("ids", type_=arr))),
        "existing": select(c.c.id).where(c.c.id == any_(b("ids", type_=arr))),
        # The participants of the conversations that ids name (headers) or that messages of ids belong to.
        "participants_around": select(p.c.conversation_id, p.c.participant).where(or_(
            p.c.conversation_id == any_(b("ids", type_=arr)),
            p.c.conversation_id.in_(select(m.c.conversation_id).where(m.c.message_id == any_(b("ids", type_=arr)))))),
    }
    return {k: compile_stmt(v) for k, v in stmts.items()}


async def _fixed_rows(conn: AsyncConnection, name: str, **values: Any) -> list[Any]:
    sql, params = _fixed()[name]
    cur = await conn.execute(sql, {**params, **values})
    return list(await cur.fetchall()) if cur.description else []


# -- conversations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    id: str
    patient: str | None
    started_by: str
    patient_started: bool
    created_at: datetime
    last_message_at: datetime
    last_seq: int
    topic: str = ""
    participants: tuple[str, ...] = ()
    names: dict[str, str] = field(default_factory=dict)  # participant -> display name


async def open_conversation(conn: AsyncConnection, conversation_id: str, *, patient: str | None, started_by: str,
                            patient_started: bool, participants: list[str], now: datetime, topic: str = "",
                            names: dict[str, str] | None = None) -> None:
    await _rows(conn, pg_insert(conversation).values(
        id=conversation_id, patient=patient, topic=topic, started_by=started_by, patient_started=patient_started,
        created_at=now, last_message_at=now, last_seq=0).on_conflict_do_nothing())
    for who in dict.fromkeys(participants):
        await _rows(conn, pg_insert(participant).values(conversation_id=conversation_id, participant=who,
                                                        display=(names or {}).get(who, ""))
                    .on_conflict_do_nothing())


async def get_conversation(conn: AsyncConnection, conversation_id: str) -> Conversation | None:
    rows = await _fixed_rows(conn, "get_conversation", cid=conversation_id)
    if not rows:
        return None
    *head, who, names = rows[0]
    return Conversation(*head, participants=tuple(sorted(who or ())), names=dict(zip(who or (), names or ())))


async def next_seq(conn: AsyncConnection, conversation_id: str, now: datetime) -> int | None:
    """The next message number of a conversation; its row stays locked until the caller's
    transaction ends (messages are numbered in commit order). None: no such conversation."""
    rows = await _fixed_rows(conn, "next_seq", cid=conversation_id, now=now)
    return int(rows[0][0]) if rows else None


async def add_message(conn: AsyncConnection, conversation_id: str, message_id: str, *, sender: str,
                      sender_participant: str, sent_at: datetime, notify: list[str]) -> int | None:
    """Number and record a message (``next_seq``), and queue an e-mail notice for ``notify``
    (the other participants, unless they muted the conversation). Returns its number (None:
    no such conversation). Two round trips: the number, then the rest in one pipeline."""
    seq = await next_seq(conn, conversation_id, sent_at)
    if seq is None:
        return None
    values = {"cid": conversation_id, "seq": seq, "mid": message_id, "sender": sender, "me": sender_participant, "now": sent_at}
    async with conn.pipeline():
        await _fixed_rows(conn, "insert_message", **values)
        await _fixed_rows(conn, "read_own", **values)  # the sender has read what they wrote
        await _fixed_rows(conn, "clear_own", **values)
        if notify:
            await _fixed_rows(conn, "queue_notices", **values, notify=sorted(notify))
    return seq


@dataclass(frozen=True)
class MessageRow:
    conversation_id: str
    seq: int
    message_id: str
    sender: str
    sender_participant: str
    sent_at: datetime


_MSG_COLS = (message.c.conversation_id, message.c.seq, message.c.message_id, message.c.sender, message.c.sender_participant,
             message.c.sent_at)


async def messages_by_id(conn: AsyncConnection, message_ids: list[str]) -> list[MessageRow]:
    if not message_ids:
        return []
    return [MessageRow(*r) for r in await _fixed_rows(conn, "messages_by_id", ids=sorted(set(message_ids)))]


async def messages_after(conn: AsyncConnection, conversation_id: str, after: int, limit: int) -> list[MessageRow]:
    return [MessageRow(*r) for r in await _fixed_rows(conn, "messages_after", cid=conversation_id, after=after, limit=limit)]


async def latest_messages(conn: AsyncConnection, conversation_id: str, limit: int) -> list[MessageRow]:
    rows = await _rows(conn, select(*_MSG_COLS).where(message.c.conversation_id == conversation_id)
                       .order_by(message.c.seq.desc()).limit(limit))
    return [MessageRow(*r) for r in reversed(rows)]


async def participants_of(conn: AsyncConnection, conversation_ids: list[str]) -> dict[str, set[str]]:
    if not conversation_ids:
        return {}
    rows = await _fixed_rows(conn, "participants_of", ids=sorted(set(conversation_ids)))
    out: dict[str, set[str]] = {}
    for cid, who in rows:
        out.setdefault(cid, set()).add(who)
    return out


async def changed(conn: AsyncConnection, ids: list[str]) -> tuple[list[MessageRow], set[str], dict[str, set[str]]]:
    """For Communications that changed: the messages among them, the conversation headers
    among them, and the participants of both. One round trip (a pipeline)."""
    values = {"ids": sorted(set(ids))}
    async with conn.pipeline():
        sql, params = _fixed()["messages_by_id"]
        msgs = await conn.execute(sql, {**params, **values})
        sql, params = _fixed()["existing"]
        heads = await conn.execute(sql, {**params, **values})
        sql, params = _fixed()["participants_around"]
        parts = await conn.execute(sql, {**params, **values})
        rows = [MessageRow(*r) for r in await msgs.fetchall()]
        headers = {r[0] for r in await heads.fetchall()}
        who: dict[str, set[str]] = {}
        for cid, ref in await parts.fetchall():
            who.setdefault(cid, set()).add(ref)
    return rows, headers, who


async def existing_conversations(conn: AsyncConnection, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    return {r[0] for r in await _fixed_rows(conn, "existing", ids=sorted(set(ids)))}


# -- what each participant sees ----------------------------------------------------------------

@dataclass(frozen=True)
class Membership:
    """One conversation as one participant sees it in their inbox."""

    conversation_id: str
    participant: str
    patient: str | None
    last_message_at: datetime
    last_seq: int
    last_read_seq: int
    muted: bool
    unread: int


async def memberships(conn: AsyncConnection, me: list[str], *, limit: int = 100, patient: str | None = None,
                      conversation_ids: list[str] | None = None) -> list[Membership]:
    """The conversations of ``me`` (the participant references a caller is, or acts for),
    most recent first, with unread counts (messages of others after the read mark)."""
    if not me:
        return []
    p, c, m = participant, conversation, message
    unread = (select(func.count()).select_from(m)
              .where(m.c.conversation_id == p.c.conversation_id, m.c.seq > p.c.last_read_seq,
                     m.c.sender_participant != p.c.participant).scalar_subquery())
    stmt = (select(p.c.conversation_id, p.c.participant, c.c.patient, c.c.last_message_at, c.c.last_seq, p.c.last_read_seq,
                   p.c.muted, unread)
            .select_from(p.join(c, c.c.id == p.c.conversation_id))
            .where(p.c.participant == any_(_arr(me))))
    if patient is not None:
        stmt = stmt.where(c.c.patient == patient)
    if conversation_ids is not None:
        stmt = stmt.where(p.c.conversation_id == any_(_arr(conversation_ids)))
    stmt = stmt.order_by(c.c.last_message_at.desc(), c.c.id).limit(limit)
    seen: dict[str, Membership] = {}
    for r in await _rows(conn, stmt):
        if r[0] not in seen:  # a proxy acting for two participants of one conversation: once
            seen[r[0]] = Membership(*r)
    return list(seen.values())


async def read_marks(conn: AsyncConnection, conversation_id: str) -> dict[str, int]:
    """How far each participant read: read receipts."""
    rows = await _rows(conn, select(participant.c.participant, participant.c.last_read_seq)
                       .where(participant.c.conversation_id == conversation_id))
    return {r[0]: int(r[1]) for r in rows}


async def mark_read(conn: AsyncConnection, conversation_id: str, who: list[str], seq: int, now: datetime) -> int:
    """Move ``who``'s read mark forward to ``seq`` (never past the last message, never back);
    their pending e-mail notices for it go. Returns the mark."""
    p, c = participant, conversation
    bounded = select(func.least(literal(seq), c.c.last_seq)).where(c.c.id == conversation_id).scalar_subquery()
    rows = await _rows(conn, update(p).where(p.c.conversation_id == conversation_id, p.c.participant == any_(_arr(who)))
                       .values(last_read_seq=func.greatest(p.c.last_read_seq, bounded), last_read_at=now)
                       .returning(p.c.last_read_seq))
    await _rows(conn, delete(pending).where(pending.c.conversation_id == conversation_id,
                                            pending.c.participant == any_(_arr(who))))
    return max((int(r[0]) for r in rows), default=0)


async def announce_read(conn: AsyncConnection, conversation_id: str, who: str, seq: int) -> None:
    """Tell every server process (at commit) that ``who`` read up to ``seq``."""
    payload = orjson.dumps({"c": conversation_id, "p": who, "s": seq}).decode()
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def set_muted(conn: AsyncConnection, conversation_id: str, who: list[str], muted: bool) -> int:
    rows = await _rows(conn, update(participant).where(participant.c.conversation_id == conversation_id,
                                                       participant.c.participant == any_(_arr(who)))
                       .values(muted=muted).returning(participant.c.participant))
    if muted:
        await _rows(conn, delete(pending).where(pending.c.conversation_id == conversation_id,
                                                pending.c.participant == any_(_arr(who))))
    return len(rows)


# -- e-mail notices --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Due:
    participant: str
    conversations: int
    messages: int


async def claim_due(conn: AsyncConnection, due_before: datetime, limit: int) -> list[Due]:
    """People with unannounced unread messages older than ``due_before``; their rows are
    locked (others' workers skip them) until the caller's transaction ends. Counts only
    what is still unread (a message read meanwhile is not announced)."""
    locked = await _rows(conn, select(pending.c.participant, pending.c.conversation_id)
                         .where(pending.c.first_at <= due_before)
                         .order_by(pending.c.first_at).limit(limit).with_for_update(skip_locked=True))
    by_who: dict[str, list[str]] = {}
    for who, cid in locked:
        by_who.setdefault(who, []).append(cid)
    out = []
    p, m = participant, message
    for who, cids in by_who.items():
        rows = await _rows(conn, select(p.c.conversation_id, func.count(m.c.seq))
                           .select_from(p.join(m, and_(m.c.conversation_id == p.c.conversation_id, m.c.seq > p.c.last_read_seq,
                                                       m.c.sender_participant != p.c.participant)))
                           .where(p.c.participant == who, p.c.conversation_id == any_(_arr(cids)), p.c.muted.is_(False))
                           .group_by(p.c.conversation_id))
        total = sum(int(r[1]) for r in rows)
        out.append(Due(who, len(rows), total))
    return out


async def clear_pending(conn: AsyncConnection, who: str, due_before: datetime) -> None:
    await _rows(conn, delete(pending).where(pending.c.participant == who, pending.c.first_at <= due_before))


async def last_mailed(conn: AsyncConnection, who: str) -> datetime | None:
    row = await _one(conn, select(mailbox.c.last_sent_at).where(mailbox.c.participant == who))
    return row[0] if row else None


async def set_mailed(conn: AsyncConnection, who: str, now: datetime) -> None:
    await _rows(conn, pg_insert(mailbox).values(participant=who, last_sent_at=now)
                .on_conflict_do_update(index_elements=[mailbox.c.participant], set_={"last_sent_at": now}))


# -- presence --------------------------------------------------------------------------------------

async def set_presence(conn: AsyncConnection, node: str, counts: dict[str, int], now: datetime) -> None:
    """This process's live sockets per account (accounts no longer connected here are dropped).
    Two statements whatever the number of accounts."""
    await _rows(conn, delete(presence).where(presence.c.node == node,
                                             presence.c.account_id != all_(_arr(list(counts)))))
    if not counts:
        return
    ids = list(counts)
    await conn.execute(
        "INSERT INTO messaging_presence (account_id, node, connections, seen_at) "
        "SELECT a, %(node)s, n, %(now)s FROM unnest(%(ids)s::text[], %(ns)s::int[]) AS u(a, n) "
        "ON CONFLICT (account_id, node) DO UPDATE SET connections = excluded.connections, seen_at = excluded.seen_at",
        {"node": node, "now": now, "ids": ids, "ns": [counts[i] for i in ids]})


async def clear_presence(conn: AsyncConnection, node: str) -> None:
    await _rows(conn, delete(presence).where(presence.c.node == node))


async def online(conn: AsyncConnection, account_ids: list[str], since: datetime) -> set[str]:
    if not account_ids:
        return set()
    rows = await _rows(conn, select(presence.c.account_id).where(presence.c.account_id == any_(_arr(account_ids)),
                                                                 presence.c.seen_at >= since, presence.c.connections > 0))
    return {r[0] for r in rows}


# -- the directory, as the messaging rule needs it -------------------------------------------------

async def live_ids(conn: AsyncConnection, rtype: str, ids: list[str]) -> set[str]:
    """Which of ``ids`` name a current (not deleted) resource of ``rtype``."""
    if not ids:
        return set()
    m = tables(rtype).main
    return {r[0] for r in await _rows(conn, select(m.c.id).where(m.c.id == any_(_arr(ids)), m.c.deleted.is_(False)))}


async def contents(conn: AsyncConnection, rtype: str, ids: list[str]) -> dict[str, dict]:
    """Current resources by id (directory entries: public, read for the rule's checks)."""
    if not ids:
        return {}
    m = tables(rtype).main
    rows = await _rows(conn, select(m.c.id, m.c.content).where(m.c.id == any_(_arr(ids)), m.c.deleted.is_(False)))
    return {r[0]: orjson.loads(r[1]) for r in rows}


async def roles_of(conn: AsyncConnection, practitioner_ref: str) -> list[dict]:
    """The current PractitionerRoles of a practitioner."""
    m = tables("PractitionerRole").main
    rows = await _rows(conn, select(m.c.content).where(m.c.refs.contains(_arr([f"practitioner{SEP}{practitioner_ref}"])),
                                                       m.c.deleted.is_(False)).limit(100))
    return [orjson.loads(r[0]) for r in rows]


# -- retention ----------------------------------------------------------------------------------------

async def expired_conversations(conn: AsyncConnection, before: datetime, limit: int) -> list[str]:
    rows = await _rows(conn, select(conversation.c.id).where(conversation.c.last_message_at < before)
                       .order_by(conversation.c.last_message_at).limit(limit))
    return [r[0] for r in rows]


async def message_ids_of(conn: AsyncConnection, conversation_id: str) -> list[str]:
    rows = await _rows(conn, select(message.c.message_id).where(message.c.conversation_id == conversation_id))
    return [r[0] for r in rows]


async def forget_conversation(conn: AsyncConnection, conversation_id: str) -> None:
    await _rows(conn, delete(conversation).where(conversation.c.id == conversation_id))


async def expunge_history(conn: AsyncConnection, communication_ids: list[str]) -> int:
    """Past versions of purged Communications: their content goes, the deletion version
    stays (so history says when they went). Run after the Repository deleted them."""
    if not communication_ids:
        return 0
    h = tables("Communication").history
    rows = await _rows(conn, delete(h).where(h.c.id == any_(_arr(communication_ids)), h.c.deleted.is_(False))
                       .returning(h.c.id))
    return len(rows)


__all__ = ["CHANNEL", "Conversation", "Due", "Membership", "MessageRow"]
