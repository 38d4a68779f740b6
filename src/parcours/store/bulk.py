"""The bulk write path: thousands of resources per statement, for ``parcours import``.

Two halves, so that the expensive work runs in worker processes:

* :class:`BatchBuilder` is pure. It renders each version exactly as the
  Repository does (:func:`~parcours.store.repository.render_version`), indexes it
  (:func:`~parcours.fhir.indexing.index_resource`) and encodes the rows in
  PostgreSQL's binary COPY format. The :class:`Batch` it returns is plain bytes,
  cheap to send between processes.
* :class:`BulkWriter`, obtained from :meth:`Repository.bulk_writer`, asks the
  policy for every resource type it writes and streams batches into the
  caller's open transaction (it never commits):

  1. one COPY of every pending resource into a temporary staging table;
  2. per type, ``INSERT ... SELECT`` into ``"<Type>"`` — COPY cannot call
     functions, and the full-text vectors must come from ``to_tsvector`` with
     the platform's text search configuration — then into ``"<Type>_history"``
     (the JSON text crosses the wire once);
  3. per type, one COPY of the search rows straight into ``"<Type>_idx"``;
  4. one ``INSERT ... SELECT`` into ``resource_log``, in the order resources came.

  Measured on the Synthea set, staging then ``INSERT ... SELECT`` beats COPY into
  ``"<Type>"`` followed by an ``UPDATE`` of the vectors: the update writes every
  row and all five GIN entries twice.

Resources with an id chosen by the client (``PUT``) may exist already: the
writer locks those rows, makes the staged copy the next version (re-rendering
``meta.versionId``) and replaces the current row, as ``Repository.update`` does.

The journal of ``parcours import`` (revision 0002) lives here too: it is written
in the same transactions as the resources it records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any

import orjson
from psycopg import AsyncConnection
from psycopg.adapt import PyFormat, Transformer
from psycopg.postgres import types as pg_types
from psycopg.pq import Format
from sqlalchemy import (
    BigInteger, Column, DateTime, Identity, Integer, MetaData, Table, Text, any_, bindparam, case, delete, false, func, insert,
    literal_column, select, update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert as pg_insert
from sqlalchemy.schema import CreateTable

from parcours.core.errors import Forbidden
from parcours.fhir.indexing import IndexValues, index_resource
from parcours.fhir.registry import Registry
from parcours.store import audit
from parcours.store.repository import MAX_FTS_CHARS, render_version
from parcours.store.schema import TS_CONFIG, resource_log, tables
from parcours.store.sql import DIALECT, compile_stmt

if TYPE_CHECKING:
    from parcours.store.repository import Repository

# Staging rows; the identity column keeps the order resources came in.
_local = MetaData()
stage = Table(
    "parcours_bulk_stage",
    _local,
    Column("ord", BigInteger, Identity()),
    Column("rtype", Text), Column("id", Text), Column("version_id", Integer),
    Column("last_updated", DateTime(timezone=True)), Column("method", Text), Column("content", Text),
    Column("narr", Text), Column("txt", Text),
    Column("tokens", ARRAY(Text)), Column("refs", ARRAY(Text)), Column("compartments", ARRAY(Text)),
    prefixes=["TEMPORARY"],
    # Staged rows are read once: rows up to a page stay inline, larger values go out of
    # line, and none is compressed (pglz costs more than the copy it saves here).
    postgresql_with={"toast_tuple_target": 8160},
)
_UNCOMPRESSED = ("content", "narr", "txt", "tokens", "refs", "compartments")
# The three text[] columns come last: they are encoded by _text_array, not by psycopg.
_STAGE_COLUMNS = ("rtype", "id", "version_id", "last_updated", "method", "content", "narr", "txt", "tokens", "refs", "compartments")
_STAGE_TYPES = ("text", "text", "int4", "timestamptz", "text", "text", "text", "text")
_IDX_COLUMNS = ("resource_id", "code", "s", "raw", "lo", "hi", "nlo", "nhi", "sys", "unit")
_IDX_TYPES = ("text", "text", "text", "text", "timestamptz", "timestamptz", "numeric", "numeric", "text", "text")

# The journal of revision 0002. Kept out of ``schema.metadata``: revision 0001
# creates whatever that holds, and this table belongs to a later revision.
import_journal = Table(
    "import_journal",
    _local,
    Column("sha256", Text, primary_key=True),
    Column("path", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("resources", BigInteger, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)

_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # header, no flags, no extension
_COPY_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_INT4 = struct.Struct(">i").pack


class _RowEncoder:
    """Binary COPY tuples for a fixed list of column types, using psycopg's dumpers;
    ``arrays`` more text[] columns follow."""

    def __init__(self, types: tuple[str, ...], arrays: int = 0) -> None:
        oids = [pg_types.get(t).oid for t in types]  # type: ignore[union-attr]
        self._tx = Transformer()
        self._tx.set_dumper_types(oids, Format.BINARY)
        self._formats = [PyFormat.BINARY] * len(types)
        self._head = struct.pack(">h", len(types) + arrays)

    def encode(self, row: tuple[Any, ...], out: bytearray, *arrays: list[str]) -> None:
        out += self._head
        for value in self._tx.dump_sequence(row, self._formats):
            if value is None:
                out += _NULL
            else:
                out += _INT4(len(value))
                out += value
        for items in arrays:
            _text_array(items, out)


_ARRAY_HEAD = struct.Struct(">iiiiii").pack  # field length, ndim, flags, element oid, length, lower bound
_EMPTY_ARRAY = struct.pack(">iiii", 12, 0, 0, 25)


def _text_array(items: list[str], out: bytearray) -> None:
    """A text[] in binary COPY format: twice as fast as psycopg's generic list dumper,
    which is written in Python."""
    if not items:
        out += _EMPTY_ARRAY
        return
    encoded = [s.encode() for s in items]
    out += _ARRAY_HEAD(20 + 4 * len(encoded) + sum(map(len, encoded)), 1, 0, 25, len(encoded), 1)
    for b in encoded:
        out += _INT4(len(b))
        out += b


@dataclass
class Batch:
    """Encoded rows of many resources, ready to stream (plain data: it crosses processes).

    ``keys`` are (type, id, method) in order. ``contents`` keeps the JSON text of
    resources written with the client's id, in case one exists already and must
    become its next version.
    """

    last_updated: datetime
    keys: list[tuple[str, str, str]] = field(default_factory=list)
    rows: bytearray = field(default_factory=bytearray)
    idx: dict[str, bytearray] = field(default_factory=dict)
    contents: dict[tuple[str, str], str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rtype, _, _ in self.keys:
            out[rtype] = out.get(rtype, 0) + 1
        return out


class BatchBuilder:
    """Renders, indexes and encodes resources into batches; pure, no database.

    A resource already in the current batch (same type and id) starts a new
    batch, so that each batch holds one version per resource.
    """

    def __init__(self, registry: Registry, base_url: str, last_updated: datetime) -> None:
        self.registry = registry
        self.base_url = base_url.rstrip("/")
        self.last_updated = last_updated
        self._stage = _RowEncoder(_STAGE_TYPES, arrays=3)
        self._idx = _RowEncoder(_IDX_TYPES)
        self._done: list[Batch] = []
        self._batch = Batch(last_updated)
        self._seen: set[tuple[str, str]] = set()

    def add(self, rtype: str, rid: str, resource: dict, method: str, extra_text: str | None = None) -> None:
        """Add version 1 of ``resource`` under ``rid``. ``method`` is POST (a new id
        the server chose) or PUT (the client's id, which may exist already).
        ``extra_text`` is indexed for ``_content`` too, as ``Repository.create`` does."""
        ordered, content = render_version(rtype, rid, resource, 1, self.last_updated)
        iv = index_resource(ordered, self.registry, self.base_url)
        # Encoded aside first: a value that cannot be encoded leaves the batch as it was.
        row, idx = bytearray(), bytearray()
        text = f"{iv.content}\n{extra_text}" if extra_text else iv.content
        self._stage.encode(
            (rtype, rid, 1, self.last_updated, method, content, iv.narrative[:MAX_FTS_CHARS], text[:MAX_FTS_CHARS]),
            row, iv.tokens, iv.refs, iv.compartments)
        for side in iv.rows:
            self._idx.encode((rid, *side), idx)
        if (rtype, rid) in self._seen:
            self._done.append(self._batch)
            self._batch, self._seen = Batch(self.last_updated), set()
        self._seen.add((rtype, rid))
        b = self._batch
        b.keys.append((rtype, rid, method))
        b.rows += row
        if idx:
            b.idx.setdefault(rtype, bytearray()).extend(idx)
        if method == "PUT":
            b.contents[(rtype, rid)] = content

    def batches(self) -> list[Batch]:
        """Everything added so far; the builder starts afresh."""
        out = [*self._done, self._batch] if self._batch.keys else self._done
        self._done, self._batch, self._seen = [], Batch(self.last_updated), set()
        return out


def _quote(name: str) -> str:
    return DIALECT.identifier_preparer.quote(name)


_TSCONFIG = literal_column(f"'{TS_CONFIG}'::regconfig")


def _sql(stmt: Any) -> str:
    """The SQL text of a fixed statement whose values are given at each execution."""
    return str(stmt.compile(dialect=DIALECT))


@cache
def _stage_sql() -> dict[str, str]:
    s = stage
    return {
        "create": str(CreateTable(s, if_not_exists=True).compile(dialect=DIALECT)),
        "storage": f"ALTER TABLE {_quote(s.name)} " + ", ".join(f"ALTER COLUMN {c} SET STORAGE EXTERNAL" for c in _UNCOMPRESSED),
        "copy": f"COPY {_quote(s.name)} ({', '.join(_STAGE_COLUMNS)}) FROM STDIN (FORMAT BINARY)",
        "clear": f"TRUNCATE {_quote(s.name)}",
        "log": _sql(insert(resource_log).from_select(
            ["resource_type", "id", "version_id", "last_updated", "method"],
            select(s.c.rtype, s.c.id, s.c.version_id, s.c.last_updated, s.c.method).order_by(s.c.ord))),
        # One audit entry per resource, as Repository._audit writes for every write.
        "audit": _sql(insert(audit.audit_log).from_select(
            ["recorded", "action", "outcome", "agent", "agent_kind", "fhir_user", "address", "resource_type", "resource_id",
             "version_id", "patients"],
            select(bindparam("recorded", type_=DateTime(timezone=True)),
                   case((s.c.method == literal_column("'POST'"), literal_column("'create'")), else_=literal_column("'update'")),
                   literal_column(f"'{audit.SUCCESS}'"),
                   bindparam("agent", type_=Text), bindparam("agent_kind", type_=Text), bindparam("fhir_user", type_=Text),
                   bindparam("address", type_=Text), s.c.rtype, s.c.id, s.c.version_id,
                   literal_column(f"{s.name}.compartments[1:200]", ARRAY(Text)))
            .order_by(s.c.ord))),
    }


@cache
def _type_sql(rtype: str) -> dict[str, str]:
    """The statements that move one type's staged rows into its tables."""
    t, s = tables(rtype), stage
    m, h, i = t.main, t.history, t.idx
    mine = s.c.rtype == bindparam("rtype")
    ids = bindparam("ids", type_=ARRAY(Text))
    versions = func.unnest(ids, bindparam("vids", type_=ARRAY(Integer)), bindparam("contents", type_=ARRAY(Text))).table_valued(
        "id", "vid", "content").render_derived(name="v")
    return {
        "main": _sql(insert(m).from_select(
            ["id", "version_id", "last_updated", "deleted", "content", "tokens", "refs", "compartments", "fts_text", "fts_content",
             "author"],
            select(s.c.id, s.c.version_id, s.c.last_updated, false(), s.c.content, s.c.tokens, s.c.refs, s.c.compartments,
                   func.to_tsvector(_TSCONFIG, s.c.narr), func.to_tsvector(_TSCONFIG, s.c.txt),
                   bindparam("author", type_=Text)).where(mine))),
        "history": _sql(insert(h).from_select(
            ["id", "version_id", "last_updated", "deleted", "method", "content"],
            select(s.c.id, s.c.version_id, s.c.last_updated, false(), s.c.method, s.c.content).where(mine))),
        "idx": f"COPY {_quote(i.name)} ({', '.join(_IDX_COLUMNS)}) FROM STDIN (FORMAT BINARY)",
        "lock": _sql(select(m.c.id, m.c.version_id).where(m.c.id == any_(ids)).with_for_update()),
        "restage": _sql(update(s).where(mine, s.c.id == versions.c.id).values(
            version_id=versions.c.vid, content=versions.c.content)),
        "drop_main": _sql(delete(m).where(m.c.id == any_(ids))),
        "drop_idx": _sql(delete(i).where(i.c.resource_id == any_(ids))),
    }


class BulkWriter:
    """Streams :class:`Batch` es into the transaction open on the Repository's connection.

    ``add`` keeps batches until ``flush``; nothing is visible before a flush and
    nothing is committed by the writer.
    """

    def __init__(self, repo: Repository) -> None:
        # No per-resource checks here (care relationships, labels, authorship, write
        # rules): the bulk path is the platform's own, for imports by an operator.
        if not repo.caller.is_system:
            raise Forbidden("Bulk writes are for the platform's own imports")
        self.repo = repo
        self.conn: AsyncConnection = repo.conn
        self._pending: list[Batch] = []
        self._client_ids: set[tuple[str, str]] = set()
        self._allowed: set[str] = set()
        self._staging_ready = False
        self.pending = 0  # resources added and not yet flushed
        self.written = 0

    async def add(self, batch: Batch) -> None:
        for rtype in batch.counts():
            if rtype not in self._allowed:
                self.repo.authorize("create", rtype)
                self._allowed.add(rtype)
        # Two versions of one resource: the first must be written before the second is staged.
        if batch.contents and not self._client_ids.isdisjoint(batch.contents):
            await self.flush()
        self._pending.append(batch)
        self._client_ids.update(batch.contents)
        self.pending += len(batch)

    async def flush(self) -> int:
        """Write every pending resource; returns how many."""
        batches, self._pending = self._pending, []
        self._client_ids = set()
        n, self.pending = self.pending, 0
        if not n:
            return 0
        sql = _stage_sql()
        async with self.conn.cursor() as cur:
            if not self._staging_ready:
                await cur.execute(sql["create"])
                await cur.execute(sql["storage"])
                self._staging_ready = True
            async with cur.copy(sql["copy"]) as copy:
                await copy.write(_COPY_SIGNATURE)
                for b in batches:
                    await copy.write(b.rows)
                await copy.write(_COPY_TRAILER)
            order: dict[str, None] = {}
            for b in batches:
                order.update(dict.fromkeys(b.counts()))
            await self._next_versions(cur, batches)
            author = self.repo._identity()  # noqa: SLF001 - what Repository._write stores
            for rtype in order:
                ts = _type_sql(rtype)
                await cur.execute(ts["main"], {"rtype": rtype, "author": author})
                await cur.execute(ts["history"], {"rtype": rtype})
                chunks = [b.idx[rtype] for b in batches if rtype in b.idx]
                if chunks:
                    async with cur.copy(ts["idx"]) as copy:
                        await copy.write(_COPY_SIGNATURE)
                        for c in chunks:
                            await copy.write(c)
                        await copy.write(_COPY_TRAILER)
            await cur.execute(sql["log"])
            if self.repo.audit_enabled:
                c = self.repo.caller
                await cur.execute(sql["audit"], {"recorded": self.repo.clock.now(), "agent": c.user_id or c.display,
                                                 "agent_kind": c.kind, "fhir_user": c.fhir_user, "address": c.address})
            await cur.execute(sql["clear"])
        self.written += n
        return n

    async def _next_versions(self, cur: Any, batches: list[Batch]) -> None:
        """Staged resources with a client id that exist already become their next version."""
        wanted: dict[str, list[str]] = {}
        contents: dict[tuple[str, str], tuple[str, datetime]] = {}
        for b in batches:
            for key, content in b.contents.items():
                wanted.setdefault(key[0], []).append(key[1])
                contents[key] = (content, b.last_updated)
        for rtype, ids in wanted.items():
            ts = _type_sql(rtype)
            await cur.execute(ts["lock"], {"ids": ids})
            existing = await cur.fetchall()
            if not existing:
                continue
            self.repo.authorize("update", rtype)
            gone, vids, texts = [], [], []
            for rid, version in existing:
                content, at = contents[(rtype, rid)]
                _, text = render_version(rtype, rid, orjson.loads(content), version + 1, at)
                gone.append(rid)
                vids.append(version + 1)
                texts.append(text)
            await cur.execute(ts["restage"], {"rtype": rtype, "ids": gone, "vids": vids, "contents": texts})
            await cur.execute(ts["drop_idx"], {"ids": gone})
            await cur.execute(ts["drop_main"], {"ids": gone})


@cache
def _new_sql(rtype: str) -> str:
    t = tables(rtype)
    q = _quote
    return (
        "WITH v AS (SELECT * FROM json_to_recordset(%(items)s::json) "
        "AS v(ord int, id text, content text, tokens text[], refs text[], comps text[], narr text, txt text)), "
        f"m AS (INSERT INTO {q(t.main.name)} (id, version_id, last_updated, deleted, content, tokens, refs, compartments, "
        "fts_text, fts_content, author) "
        f"SELECT id, 1, %(lu)s, false, content, tokens, refs, comps, to_tsvector({_TSCONFIG}, narr), "
        f"to_tsvector({_TSCONFIG}, txt), %(author)s FROM v ORDER BY ord ON CONFLICT (id) DO NOTHING RETURNING id), "
        f"h AS (INSERT INTO {q(t.history.name)} (id, version_id, last_updated, deleted, method, content) "
        "SELECT v.id, 1, %(lu)s, false, %(method)s, v.content FROM v JOIN m ON m.id = v.id), "
        f"i AS (INSERT INTO {q(t.idx.name)} ({', '.join(_IDX_COLUMNS)}) "
        f"SELECT {', '.join('x.' + c for c in _IDX_COLUMNS)} FROM json_to_recordset(%(rows)s::json) "
        "AS x(resource_id text, code text, s text, raw text, lo timestamptz, hi timestamptz, nlo numeric, nhi numeric, sys text, unit text) "
        "WHERE x.resource_id IN (SELECT id FROM m)) "
        "INSERT INTO resource_log (resource_type, id, version_id, last_updated, method) "
        "SELECT %(rtype)s, v.id, 1, %(lu)s, %(method)s FROM v JOIN m ON m.id = v.id ORDER BY v.ord"
    )


def _json_default(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)  # numeric reads "Infinity" too
    raise TypeError(type(value).__name__)


async def write_new(repo: Repository, rtype: str, items: list[tuple[str, str, IndexValues]], last_updated: datetime,
                    method: str = "POST") -> None:
    """Version 1 of resources with ids nobody else writes (the platform's own, e.g. AuditEvents
    from the audit log), already rendered (:func:`render_version`) and indexed, as
    ``(id, JSON text, index values)``: main rows, history, search rows and the change log
    in one statement, whatever their number. An id that exists already is left as it is.

    The values travel as two JSON documents (``orjson``, in C): psycopg's list dumpers
    escape each element of a text list in Python, which costs more than all the rest.
    The caller's transaction; the platform only (no per-resource checks), like :class:`BulkWriter`.
    """
    if not repo.caller.is_system:
        raise Forbidden("Bulk writes are for the platform's own imports")
    repo.authorize("create", rtype)
    if not items:
        return
    docs = [{"ord": n, "id": rid, "content": content, "tokens": iv.tokens, "refs": iv.refs, "comps": iv.compartments,
             "narr": iv.narrative[:MAX_FTS_CHARS], "txt": iv.content[:MAX_FTS_CHARS]} for n, (rid, content, iv) in enumerate(items)]
    side = [dict(zip(_IDX_COLUMNS, (rid, *row))) for rid, _, iv in items for row in iv.rows]
    await repo.conn.execute(_new_sql(rtype), {
        "items": orjson.dumps(docs).decode(), "rows": orjson.dumps(side, default=_json_default).decode(),
        "lu": last_updated, "author": repo._identity(), "method": method, "rtype": rtype,  # as Repository._write
    })


@dataclass
class JournalEntry:
    sha256: str
    path: str
    status: str  # running | complete
    position: int
    resources: int
    errors: int
    finished_at: datetime | None


class ImportJournal:
    """What ``parcours import`` has loaded: one row per file content (sha256).

    Written in the transaction that writes the file's resources, so the journal
    and the data never disagree.
    """

    COMPLETE = "complete"
    RUNNING = "running"

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def lookup(self, digests: Iterable[str]) -> dict[str, JournalEntry]:
        j = import_journal
        sql, params = compile_stmt(
            select(j.c.sha256, j.c.path, j.c.status, j.c.position, j.c.resources, j.c.errors, j.c.finished_at)
            .where(j.c.sha256 == any_(bindparam("digests", list(digests), type_=ARRAY(Text)))))
        rows = await (await self.conn.execute(sql, params)).fetchall()
        return {r[0]: JournalEntry(*r) for r in rows}

    async def record(self, sha256: str, *, path: str, size: int, status: str, position: int,
                     resources: int, errors: int, now: datetime) -> None:
        j = import_journal
        stmt = pg_insert(j).values(
            sha256=sha256, path=path, bytes=size, status=status, position=position, resources=resources,
            errors=errors, started_at=now, finished_at=now if status == self.COMPLETE else None)
        stmt = stmt.on_conflict_do_update(index_elements=[j.c.sha256], set_={
            "path": stmt.excluded.path, "status": stmt.excluded.status, "position": stmt.excluded.position,
            "resources": stmt.excluded.resources, "errors": stmt.excluded.errors, "finished_at": stmt.excluded.finished_at,
        })
        sql, params = compile_stmt(stmt)
        await self.conn.execute(sql, params)
