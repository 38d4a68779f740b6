"""The Repository of one caller: the only way to read or write resources.

Every method asks the access policy first and runs inside the transaction the
caller opened on ``conn`` (helpers never commit). Statements are SQLAlchemy Core
compiled once per resource type and run by psycopg, in pipeline mode for writes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from psycopg import AsyncConnection
from sqlalchemy import delete as sa_delete
from sqlalchemy import bindparam, func, insert, literal_column, select, text, update
from sqlalchemy import Text, and_, any_, literal
from sqlalchemy.dialects.postgresql import ARRAY

from parcours.core.clock import Clock
from parcours.core.errors import (
    Conflict,
    Forbidden,
    Gone,
    InvalidResource,
    InvalidSearch,
    MultipleMatches,
    NotFound,
    PreconditionFailed,
    UnknownType,
)
from parcours.core.ids import is_valid_id, new_id
from parcours.fhir.indexing import IndexValues, index_resource
from parcours.fhir.registry import Registry, registry
from parcours.fhir.search import Filter, Include, SearchParser, SearchRequest
from parcours.fhir.validation import validate_resource
from parcours.security.caller import Caller
from parcours.security.policy import decide
from parcours.store.schema import TS_CONFIG, resource_log, tables
from parcours.store.search import Compiler
from parcours.store.sql import compile_stmt

MAX_FTS_CHARS = 200_000


@dataclass
class Stored:
    """One stored version: the JSON text exactly as served, and its metadata."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    content: str | None  # None when the version is a deletion
    deleted: bool = False
    refs: list[str] = field(default_factory=list)

    def resource(self) -> dict:
        assert self.content is not None
        return orjson.loads(self.content)

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'


@dataclass
class SearchResult:
    matches: list[Stored]
    includes: list[Stored]
    total: int | None
    has_more: bool
    request: SearchRequest


@dataclass
class WriteResult:
    stored: Stored
    created: bool
    changed: bool = True


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@cache
def _stmts(rtype: str) -> dict[str, str]:
    """The fixed statements of one resource type, compiled once."""
    t = tables(rtype)
    m, h, i = t.main, t.history, t.idx
    p = bindparam
    out = {
        "read": select(m.c.content, m.c.version_id, m.c.last_updated, m.c.deleted).where(m.c.id == p("id")),
        "lock": select(m.c.version_id, m.c.deleted, m.c.content).where(m.c.id == p("id")).with_for_update(),
        "vread": select(h.c.content, h.c.version_id, h.c.last_updated, h.c.deleted).where(h.c.id == p("id"), h.c.version_id == p("vid")),
        "insert": insert(m).values(
            id=p("id"), version_id=p("vid"), last_updated=p("lu"), deleted=False, content=p("content"),
            tokens=p("tokens"), refs=p("refs"), compartments=p("comp"),
            fts_text=func.to_tsvector(literal_column(f"'{TS_CONFIG}'::regconfig"), p("narr")),
            fts_content=func.to_tsvector(literal_column(f"'{TS_CONFIG}'::regconfig"), p("text")),
        ),
        "update": update(m).where(m.c.id == p("id")).values(
            version_id=p("vid"), last_updated=p("lu"), deleted=p("deleted"), content=p("content"),
            tokens=p("tokens"), refs=p("refs"), compartments=p("comp"),
            fts_text=func.to_tsvector(literal_column(f"'{TS_CONFIG}'::regconfig"), p("narr")),
            fts_content=func.to_tsvector(literal_column(f"'{TS_CONFIG}'::regconfig"), p("text")),
        ),
        "history": insert(h).values(id=p("id"), version_id=p("vid"), last_updated=p("lu"), deleted=p("deleted"), method=p("method"), content=p("content")),
        "idx_clear": sa_delete(i).where(i.c.resource_id == p("id")),
        "log": insert(resource_log).values(resource_type=p("rtype"), id=p("id"), version_id=p("vid"), last_updated=p("lu"), method=p("method")),
    }
    compiled = {k: compile_stmt(v)[0] for k, v in out.items()}
    q = _quote
    # Side rows go in one statement whatever their number: parallel arrays unnested.
    compiled["idx_insert"] = (
        f"INSERT INTO {q(i.name)} (resource_id, code, s, raw, lo, hi, nlo, nhi, sys, unit) "
        "SELECT %(id)s, * FROM unnest(%(code)s::text[], %(s)s::text[], %(raw)s::text[], %(lo)s::timestamptz[], "
        "%(hi)s::timestamptz[], %(nlo)s::numeric[], %(nhi)s::numeric[], %(sys)s::text[], %(unit)s::text[])"
    )
    return compiled


def _quote(name: str) -> str:
    from parcours.store.sql import DIALECT

    return DIALECT.identifier_preparer.quote(name)


class Repository:
    def __init__(
        self,
        conn: AsyncConnection,
        caller: Caller,
        *,
        base_url: str,
        clock: Clock | None = None,
        reg: Registry | None = None,
        default_count: int = 20,
        max_count: int = 1000,
    ) -> None:
        self.conn = conn
        self.caller = caller
        self.base_url = base_url.rstrip("/")
        self.clock = clock or Clock()
        self.registry = reg or registry()
        self.parser = SearchParser(self.registry, default_count, max_count)

    # -- policy ---------------------------------------------------------------------
    def check_type(self, rtype: str) -> None:
        if not self.registry.is_type(rtype):
            raise UnknownType(f"Unknown resource type '{rtype}'")

    def authorize(self, action: str, rtype: str) -> None:
        self.check_type(rtype)
        d = decide(self.caller, action, rtype)
        if not d.allowed:
            raise Forbidden(d.reason)

    # -- reads ------------------------------------------------------------------------
    async def read(self, rtype: str, rid: str) -> Stored:
        self.authorize("read", rtype)
        cur = await self.conn.execute(_stmts(rtype)["read"], {"id": rid})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if row[3]:
            raise Gone(f"{rtype}/{rid} was deleted", headers={"ETag": f'W/"{row[1]}"'})
        return Stored(rtype, rid, row[1], row[2], row[0])

    async def vread(self, rtype: str, rid: str, vid: str) -> Stored:
        self.authorize("vread", rtype)
        if not vid.isdigit():
            raise NotFound(f"{rtype}/{rid} has no version {vid!r}")
        cur = await self.conn.execute(_stmts(rtype)["vread"], {"id": rid, "vid": int(vid)})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} has no version {vid}")
        if row[3]:
            raise Gone(f"Version {vid} of {rtype}/{rid} is a deletion")
        return Stored(rtype, rid, row[1], row[2], row[0])

    # -- writes ---------------------------------------------------------------------------
    def prepare(self, rtype: str, resource: Any) -> dict:
        """Check a resource body before any write; raise InvalidResource with every issue."""
        if not isinstance(resource, dict):
            raise InvalidResource([_issue("structure", "The body must be a JSON object holding a FHIR resource")])
        if resource.get("resourceType") != rtype:
            raise InvalidResource([_issue("invalid", f"resourceType must be {rtype!r}, got {resource.get('resourceType')!r}", "resourceType")])
        issues = validate_resource(resource, expected_type=rtype)
        if issues:
            raise InvalidResource(issues)
        return resource

    async def create(self, rtype: str, resource: dict, *, if_none_exist: str | None = None, rid: str | None = None) -> WriteResult:
        self.authorize("create", rtype)
        resource = self.prepare(rtype, resource)
        if if_none_exist:
            existing = await self._conditional_match(rtype, if_none_exist, "create")
            if existing is not None:
                return WriteResult(existing, created=False, changed=False)
        rid = rid or new_id()
        stored = await self._write(rtype, rid, resource, version=1, method="POST", insert=True)
        return WriteResult(stored, created=True)

    async def update(self, rtype: str, rid: str, resource: dict, *, if_match: str | None = None) -> WriteResult:
        self.authorize("update", rtype)
        if not is_valid_id(rid):
            raise InvalidResource([_issue("value", f"Invalid id {rid!r}", "id")])
        resource = self.prepare(rtype, resource)
        if resource.get("id") != rid:
            raise InvalidResource([_issue("invalid", f"The resource id ({resource.get('id')!r}) must match the URL id ({rid!r})", f"{rtype}.id")])
        cur = await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})
        row = await cur.fetchone()
        expected = _parse_etag(if_match) if if_match else None
        if row is None:
            if expected is not None:
                raise PreconditionFailed(f"{rtype}/{rid} does not exist, so it cannot be at version {expected}")
            await self._lock_key(f"{rtype}/{rid}")
            cur = await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})
            row = await cur.fetchone()
            if row is None:
                stored = await self._write(rtype, rid, resource, version=1, method="PUT", insert=True)
                return WriteResult(stored, created=True)
        current_version = row[0]
        if expected is not None and expected != current_version:
            raise PreconditionFailed(f"{rtype}/{rid} is at version {current_version}, not {expected}: reload it and try again")
        stored = await self._write(rtype, rid, resource, version=current_version + 1, method="PUT", insert=False)
        return WriteResult(stored, created=False)

    async def patch(self, rtype: str, rid: str, operations: Any, *, if_match: str | None = None) -> WriteResult:
        import jsonpatch

        self.authorize("patch", rtype)
        cur = await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if row[1]:
            raise Gone(f"{rtype}/{rid} was deleted")
        expected = _parse_etag(if_match) if if_match else None
        if expected is not None and expected != row[0]:
            raise PreconditionFailed(f"{rtype}/{rid} is at version {row[0]}, not {expected}")
        if not isinstance(operations, list):
            raise InvalidResource([_issue("structure", "A JSON Patch body must be an array of operations")])
        try:
            patched = jsonpatch.JsonPatch(operations).apply(orjson.loads(row[2]))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError, ValueError) as e:
            raise InvalidResource([_issue("processing", f"The patch cannot be applied: {e}")]) from None
        if not isinstance(patched, dict) or patched.get("id") != rid or patched.get("resourceType") != rtype:
            raise InvalidResource([_issue("invalid", "A patch may not change resourceType or id")])
        self.prepare(rtype, patched)
        stored = await self._write(rtype, rid, patched, version=row[0] + 1, method="PATCH", insert=False)
        return WriteResult(stored, created=False)

    async def delete(self, rtype: str, rid: str) -> int | None:
        """Delete (a new, empty version). Returns the deletion's version or None if absent."""
        self.authorize("delete", rtype)
        cur = await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})
        row = await cur.fetchone()
        if row is None or row[1]:
            return None
        version, now = row[0] + 1, self.clock.now()
        s = _stmts(rtype)
        empty = {"id": rid, "vid": version, "lu": now, "deleted": True, "content": None, "tokens": [], "refs": [], "comp": [], "narr": "", "text": ""}
        async with self.conn.pipeline():
            await self.conn.execute(s["update"], empty)
            await self.conn.execute(s["history"], {**empty, "method": "DELETE"})
            await self.conn.execute(s["idx_clear"], {"id": rid})
            await self.conn.execute(s["log"], {"rtype": rtype, "id": rid, "vid": version, "lu": now, "method": "DELETE"})
        return version

    async def conditional_update(self, rtype: str, query: str, resource: dict) -> WriteResult:
        self.authorize("update", rtype)
        matches = await self._matches(rtype, query, limit=2, lock=True)
        if len(matches) > 1:
            raise MultipleMatches(f"The criteria {query!r} match more than one {rtype}")
        if not matches:
            rid = resource.get("id") if isinstance(resource, dict) else None
            if rid:
                return await self.update(rtype, rid, resource)
            return await self.create(rtype, resource)
        rid = matches[0]
        if isinstance(resource, dict) and resource.get("id") not in (None, rid):
            raise InvalidResource([_issue("invalid", f"The resource id {resource.get('id')!r} differs from the matched {rtype}/{rid}", f"{rtype}.id")])
        body = {**resource, "id": rid} if isinstance(resource, dict) else resource
        return await self.update(rtype, rid, body)

    async def conditional_delete(self, rtype: str, query: str, *, multiple: bool = False) -> int:
        self.authorize("delete", rtype)
        matches = await self._matches(rtype, query, limit=None if multiple else 2, lock=True)
        if len(matches) > 1 and not multiple:
            raise MultipleMatches(f"The criteria {query!r} match more than one {rtype}")
        for rid in matches:
            await self.delete(rtype, rid)
        return len(matches)

    async def _write(self, rtype: str, rid: str, resource: dict, *, version: int, method: str, insert: bool) -> Stored:
        now = self.clock.now()
        resource = dict(resource)
        resource["id"] = rid
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = _iso(now)
        resource["meta"] = meta
        # resourceType first, as people read it.
        ordered = {"resourceType": rtype, **{k: v for k, v in resource.items() if k != "resourceType"}}
        content = orjson.dumps(ordered).decode()
        iv = index_resource(ordered, self.registry, self.base_url)
        s = _stmts(rtype)
        params = {
            "id": rid, "vid": version, "lu": now, "deleted": False, "content": content,
            "tokens": iv.tokens, "refs": iv.refs, "comp": iv.compartments,
            "narr": iv.narrative[:MAX_FTS_CHARS], "text": iv.content[:MAX_FTS_CHARS],
        }
        async with self.conn.pipeline():
            await self.conn.execute(s["insert"] if insert else s["update"], params)
            await self.conn.execute(s["history"], {"id": rid, "vid": version, "lu": now, "deleted": False, "method": method, "content": content})
            if not insert:
                await self.conn.execute(s["idx_clear"], {"id": rid})
            if iv.rows:
                await self.conn.execute(s["idx_insert"], _idx_params(rid, iv))
            await self.conn.execute(s["log"], {"rtype": rtype, "id": rid, "vid": version, "lu": now, "method": method})
        return Stored(rtype, rid, version, now, content)

    async def _lock_key(self, key: str) -> None:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)
        await self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (h,))

    async def _matches(self, rtype: str, query: str, *, limit: int | None, lock: bool) -> list[str]:
        from urllib.parse import parse_qsl

        items = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not items:
            raise InvalidSearch("Conditional interactions need search criteria")
        req = self.parser.parse(rtype, items, strict=True)
        if lock:
            await self._lock_key(f"{rtype}?{sorted(items)}")
        t = tables(rtype)
        stmt = select(t.main.c.id).where(Compiler(self.base_url, self.clock.now()).where(rtype, req.filters))
        if limit:
            stmt = stmt.limit(limit)
        sql, params = compile_stmt(stmt)
        cur = await self.conn.execute(sql, params)
        return [r[0] for r in await cur.fetchall()]

    async def _conditional_match(self, rtype: str, query: str, what: str) -> Stored | None:
        ids = await self._matches(rtype, query, limit=2, lock=True)
        if len(ids) > 1:
            raise MultipleMatches(f"Conditional {what}: the criteria {query!r} match more than one {rtype}")
        if ids:
            return await self.read(rtype, ids[0])
        return None

    # -- history ----------------------------------------------------------------------------
    async def history(self, rtype: str | None, rid: str | None, *, since: datetime | None, count: int, offset: int = 0) -> list[Stored]:
        if rtype is None:
            return await self._system_history(since, count, offset)
        self.authorize("history", rtype)
        h = tables(rtype).history
        stmt = select(h.c.id, h.c.version_id, h.c.last_updated, h.c.deleted, h.c.content, h.c.method)
        if rid is not None:
            stmt = stmt.where(h.c.id == rid)
        if since is not None:
            stmt = stmt.where(h.c.last_updated >= since)
        stmt = stmt.order_by(h.c.last_updated.desc(), h.c.version_id.desc()).limit(count).offset(offset)
        sql, params = compile_stmt(stmt)
        rows = await (await self.conn.execute(sql, params)).fetchall()
        if rid is not None and not rows and offset == 0:
            await self.read(rtype, rid)  # raises the right 404
        return [Stored(rtype, r[0], r[1], r[2], r[4], r[3]) for r in rows]

    async def _system_history(self, since: datetime | None, count: int, offset: int) -> list[Stored]:
        lg = resource_log
        stmt = select(lg.c.resource_type, lg.c.id, lg.c.version_id)
        if since is not None:
            stmt = stmt.where(lg.c.last_updated >= since)
        stmt = stmt.order_by(lg.c.seq.desc()).limit(count).offset(offset)
        sql, params = compile_stmt(stmt)
        rows = await (await self.conn.execute(sql, params)).fetchall()
        out: list[Stored] = []
        for rtype, rid, vid in rows:
            if not decide(self.caller, "history", rtype).allowed:
                continue
            h = tables(rtype).history
            sql, params = compile_stmt(select(h.c.last_updated, h.c.deleted, h.c.content).where(h.c.id == rid, h.c.version_id == vid))
            r = await (await self.conn.execute(sql, params)).fetchone()
            if r:
                out.append(Stored(rtype, rid, vid, r[0], r[2], r[1]))
        return out

    # -- search ---------------------------------------------------------------------------
    def parse_search(self, rtype: str | None, items: list[tuple[str, str]], *, strict: bool = False) -> SearchRequest:
        if rtype is not None:
            self.check_type(rtype)
        return self.parser.parse(rtype, items, strict=strict)

    async def search(self, req: SearchRequest) -> SearchResult:
        rtypes = [req.resource_type] if req.resource_type else (req.types or list(self.registry.resource_types))
        for rt in rtypes:
            if req.resource_type or req.types:
                self.authorize("search", rt)
        rtypes = [rt for rt in rtypes if decide(self.caller, "search", rt).allowed]
        compiler = Compiler(self.base_url, self.clock.now())
        matches: list[Stored] = []
        total: int | None = None
        has_more = False
        if req.resource_type:
            rtype = req.resource_type
            t = tables(rtype)
            where = compiler.where(rtype, req.filters)
            near = _near_point(req.filters)
            sort = req.sort or ([("near", False)] if near else [])
            if req.summary != "count" and req.count > 0:
                stmt = (
                    select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content, t.main.c.refs)
                    .where(where)
                    .order_by(*compiler.order_by(rtype, sort, self.registry, near))
                    .limit(req.count + 1)
                    .offset(req.offset)
                )
                sql, params = compile_stmt(stmt)
                rows = await (await self.conn.execute(sql, params)).fetchall()
                has_more = len(rows) > req.count
                matches = [Stored(rtype, r[0], r[1], r[2], r[3], refs=list(r[4])) for r in rows[: req.count]]
            if req.total == "accurate" or req.summary == "count" or req.total == "estimate":
                sql, params = compile_stmt(select(func.count()).select_from(t.main).where(where))
                total = (await (await self.conn.execute(sql, params)).fetchone())[0]
            elif not has_more and (req.offset == 0 or matches):
                total = req.offset + len(matches)
        else:
            # Whole-system search: the common parameters over every allowed type.
            pending = req.offset + req.count + 1
            collected: list[Stored] = []
            counted = 0
            for rtype in rtypes:
                t = tables(rtype)
                where = compiler.where(rtype, req.filters)
                stmt = select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content, t.main.c.refs).where(where)
                stmt = stmt.order_by(t.main.c.last_updated.desc()).limit(pending)
                sql, params = compile_stmt(stmt)
                for r in await (await self.conn.execute(sql, params)).fetchall():
                    collected.append(Stored(rtype, r[0], r[1], r[2], r[3], refs=list(r[4])))
                if req.total == "accurate":
                    sql, params = compile_stmt(select(func.count()).select_from(t.main).where(where))
                    counted += (await (await self.conn.execute(sql, params)).fetchone())[0]
            collected.sort(key=lambda s: (s.last_updated, s.resource_type, s.id), reverse=True)
            page = collected[req.offset : req.offset + req.count + 1]
            has_more = len(page) > req.count
            matches = page[: req.count]
            total = counted if req.total == "accurate" else (None if has_more else req.offset + len(matches))
        includes = await self._includes(matches, req.includes, req.revincludes)
        return SearchResult(matches, includes, total, has_more, req)

    async def _includes(self, matches: list[Stored], includes: list[Include], revincludes: list[Include]) -> list[Stored]:
        if not matches or not (includes or revincludes):
            return []
        seen = {(m.resource_type, m.id) for m in matches}
        found: list[Stored] = []
        frontier = matches
        for round_ in range(4):  # :iterate follows up to this depth
            new: list[Stored] = []
            for inc in includes:
                if round_ > 0 and not inc.iterate:
                    continue
                wanted: dict[str, set[str]] = {}
                for m in frontier:
                    if m.resource_type != inc.source_type:
                        continue
                    for r in m.refs:
                        code, _, ref = r.partition("\x1f")
                        if (inc.param == "*" or code == inc.param) and "/" in ref and not ref.startswith(("http", "urn:")):
                            tt, _, tid = ref.partition("/")
                            if (inc.target_type is None or tt == inc.target_type) and self.registry.is_type(tt) and (tt, tid) not in seen:
                                wanted.setdefault(tt, set()).add(tid)
                for tt, ids in wanted.items():
                    if not decide(self.caller, "read", tt).allowed:
                        continue
                    t = tables(tt)
                    sql, params = compile_stmt(
                        select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content, t.main.c.refs)
                        .where(t.main.c.id == any_(literal(sorted(ids), ARRAY(Text))), t.main.c.deleted.is_(False)))
                    for r in await (await self.conn.execute(sql, params)).fetchall():
                        if (tt, r[0]) not in seen:
                            seen.add((tt, r[0]))
                            new.append(Stored(tt, r[0], r[1], r[2], r[3], refs=list(r[4])))
            for inc in revincludes:
                if round_ > 0 and not inc.iterate:
                    continue
                if not decide(self.caller, "search", inc.source_type).allowed:
                    continue
                keys = [f"{inc.param}\x1f{m.resource_type}/{m.id}" for m in frontier]
                if inc.param == "*":
                    continue
                t = tables(inc.source_type)
                sql, params = compile_stmt(
                    select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content, t.main.c.refs)
                    .where(t.main.c.refs.overlap(literal(keys, ARRAY(Text))), t.main.c.deleted.is_(False)).limit(10_000))
                for r in await (await self.conn.execute(sql, params)).fetchall():
                    if (inc.source_type, r[0]) not in seen:
                        seen.add((inc.source_type, r[0]))
                        new.append(Stored(inc.source_type, r[0], r[1], r[2], r[3], refs=list(r[4])))
            found.extend(new)
            frontier = new
            if not new:
                break
        return found

    # -- compartment -------------------------------------------------------------------------
    async def everything(self, patient_id: str, *, since: datetime | None = None, types: list[str] | None = None, limit: int = 10_000) -> list[Stored]:
        self.authorize("everything", "Patient")
        patient = await self.read("Patient", patient_id)
        out = [patient]
        key = f"Patient/{patient_id}"
        for rtype in self.registry.patient_compartment:
            if types and rtype not in types:
                continue
            if rtype == "Patient" or not decide(self.caller, "everything", rtype).allowed:
                continue
            t = tables(rtype)
            stmt = select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content).where(
                t.main.c.compartments.contains([key]), t.main.c.deleted.is_(False))
            if since is not None:
                stmt = stmt.where(t.main.c.last_updated >= since)
            sql, params = compile_stmt(stmt.order_by(t.main.c.last_updated).limit(limit))
            for r in await (await self.conn.execute(sql, params)).fetchall():
                out.append(Stored(rtype, r[0], r[1], r[2], r[3]))
        if types and "Patient" not in types:
            out = out[1:]
        return out


def _idx_params(rid: str, iv: IndexValues) -> dict[str, Any]:
    cols = list(zip(*iv.rows))
    names = ("code", "s", "raw", "lo", "hi", "nlo", "nhi", "sys", "unit")
    out: dict[str, Any] = {"id": rid}
    for name, col in zip(names, cols):
        out[name] = list(col)
    return out


def _near_point(filters: list[Filter]) -> tuple[float, float] | None:
    for f in filters:
        if f.code == "near" and f.values:
            parts = f.values[0].split("|")
            try:
                return float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                return None
    return None


def _parse_etag(value: str) -> int:
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not v.isdigit():
        raise PreconditionFailed(f"If-Match must name a version such as W/\"3\", got {value!r}")
    return int(v)


def _issue(code: str, message: str, expression: str | None = None):  # type: ignore[no-untyped-def]
    from parcours.core.errors import Issue

    return Issue(code, message, expression=(expression,) if expression else ())


__all__ = ["Repository", "Stored", "SearchResult", "WriteResult", "Conflict", "text", "and_"]
