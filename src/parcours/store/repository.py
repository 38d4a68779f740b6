"""The Repository of one caller: the only way to read or write resources.

Every method asks the access policy first and runs inside the transaction the
caller opened on ``conn`` (helpers never commit). Statements are SQLAlchemy Core
compiled once per resource type and run by psycopg, in pipeline mode for writes.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from psycopg import AsyncConnection
from sqlalchemy import delete as sa_delete
from sqlalchemy import bindparam, func, insert, literal_column, select, text, tuple_, update
from sqlalchemy import Text, and_, any_, literal
from sqlalchemy.dialects.postgresql import ARRAY

from parcours.core.clock import Clock
from parcours.core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    InvalidResource,
    InvalidSearch,
    MultipleMatches,
    NotFound,
    PreconditionFailed,
    UnknownType,
    Unprocessable,
)
from parcours.core.ids import is_valid_id, new_id
from parcours.fhir.indexing import PRESENT, SEP, IndexValues, index_resource
from parcours.fhir.registry import Registry, registry
from parcours.fhir.search import Filter, Include, SearchParser, SearchRequest
from parcours.fhir.validation import validate_resource
from parcours.security.caller import Caller
from parcours.security.policy import (
    ALL,
    PARCOURS_SECURITY,
    RESTRICTED_LABELS,
    CareContext,
    Scope,
    decide,
    may_access,
    search_scope,
)
from parcours.store import audit, care
from parcours.store.schema import TS_CONFIG, resource_log, tables
from parcours.store.search import Compiler
from parcours.store.sql import compile_stmt

if TYPE_CHECKING:
    from parcours.store.bulk import BulkWriter

MAX_FTS_CHARS = 200_000
# Index tokens of the security labels that restrict an item to its author and the patient.
MASKED = (PARCOURS_SECURITY, "masked")
RESTRICTED_TOKENS = [f"_security\x1f{system}|{code}" for system, code in RESTRICTED_LABELS]
READ_ACTIONS = frozenset({"read", "vread", "search", "history", "everything", "export"})


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
    method: str | None = None  # history: POST, PUT, PATCH or DELETE

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


class WriteRule(Protocol):
    """A domain rule run inside the transaction of every write of some resource types.

    ``before_write`` is called after the policy allowed the write and before the new
    version is stored, with the resource as it will be stored (``None`` for a delete)
    and the current version (``None`` for a creation); the current row is locked. It
    may raise a :class:`~parcours.core.errors.ParcoursError` to refuse the write, and
    write other resources through ``repo.as_platform()`` in the same transaction
    (booking keeps a Slot's status in step with its Appointments this way). Rules see
    every write of the Repository (REST, Bundles, domain services); the bulk writer does
    not run them, so ``parcours import`` writes these types through the Repository.

    A rule may also define ``async indexed_text(repo, rtype, rid, resource) -> str | None``:
    text indexed for ``_content`` with the resource when the write gave none (the shared
    record returns the text extracted from a document's content).
    """

    types: frozenset[str]

    async def before_write(self, repo: "Repository", rtype: str, rid: str, resource: dict | None,
                           previous: dict | None) -> None: ...


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_version(rtype: str, rid: str, resource: dict, version: int, now: datetime) -> tuple[dict, str]:
    """The resource as stored for one version, and its JSON text exactly as served
    (shared with the bulk path, ``parcours.store.bulk``)."""
    resource = dict(resource)
    resource["id"] = rid
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = _iso(now)
    resource["meta"] = meta
    # resourceType first, as people read it.
    ordered = {"resourceType": rtype, **{k: v for k, v in resource.items() if k != "resourceType"}}
    return ordered, orjson.dumps(ordered).decode()


@cache
def _stmts(rtype: str) -> dict[str, str]:
    """The fixed statements of one resource type, compiled once."""
    t = tables(rtype)
    m, h, i = t.main, t.history, t.idx
    p = bindparam
    out = {
        "read": select(m.c.content, m.c.version_id, m.c.last_updated, m.c.deleted).where(m.c.id == p("id")),
        # a read with what the access policy and the audit need, in one round trip
        "read_access": select(m.c.content, m.c.version_id, m.c.last_updated, m.c.deleted, m.c.compartments, m.c.author,
                              m.c.tokens.overlap(p("restricted", type_=ARRAY(Text)))).where(m.c.id == p("id")),
        "lock": select(m.c.version_id, m.c.deleted, m.c.content).where(m.c.id == p("id")).with_for_update(),
        # what the access policy needs to decide on one stored resource
        "access": select(m.c.compartments, m.c.author, m.c.tokens.overlap(p("restricted", type_=ARRAY(Text))), m.c.deleted).where(m.c.id == p("id")),
        # update and delete need the version only, not the (possibly large) content
        "lock_version": select(m.c.version_id, m.c.deleted).where(m.c.id == p("id")).with_for_update(),
        "vread": select(h.c.content, h.c.version_id, h.c.last_updated, h.c.deleted).where(h.c.id == p("id"), h.c.version_id == p("vid")),
        "insert": insert(m).values(
            id=p("id"), version_id=p("vid"), last_updated=p("lu"), deleted=False, content=p("content"),
            tokens=p("tokens"), refs=p("refs"), compartments=p("comp"), author=p("author"),
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


# Connections whose open transaction (or last one) had a read turn synchronous commit off
# (Repository._audit): a write resets it first. Per connection, as several Repositories may
# share one transaction (``as_platform``); a stale entry costs one needless reset.
_SYNC_OFF: weakref.WeakSet[AsyncConnection] = weakref.WeakSet()


@cache
def _write_sql(rtype: str, insert: bool, side_rows: bool, audited: bool) -> str:
    """One version written as one statement of data-modifying CTEs (one round trip, no
    pipeline bookkeeping). They share one snapshot: the search rows of the previous version
    are deleted while the new ones are inserted, which that delete cannot see."""
    s = _stmts(rtype)
    parts = [s["insert"] if insert else s["update"], s["history"]]
    if not insert:
        parts.append(s["idx_clear"])
    if side_rows:
        parts.append(s["idx_insert"].replace("SELECT %(id)s, *", "SELECT %(id)s::VARCHAR, *"))
    parts.append(s["log"])
    if audited:
        parts.append(audit.INSERT_SQL)
    sql = "WITH " + ", ".join(f"w{n} AS ({sql})" for n, sql in enumerate(parts)) + " SELECT 1"
    # Lists in binary: psycopg's text dumper escapes each element with a regular expression
    # (six times slower for the ~40 tokens of a Patient).
    return _ARRAY_PARAM.sub(r"%(\1)b", sql)


_ARRAY_PARAM = re.compile(r"%\((tokens|refs|comp|code|s|raw|lo|hi|nlo|nhi|sys|unit|patients)\)s")


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
        rules: Sequence[WriteRule] = (),
    ) -> None:
        self.conn = conn
        self.caller = caller
        self.base_url = base_url.rstrip("/")
        self.clock = clock or Clock()
        self.registry = reg or registry()
        self.parser = SearchParser(self.registry, default_count, max_count)
        self._care: CareContext | None = None
        self.attempt: tuple[str, str | None, str | None] | None = None  # for the audit of failures
        self.audit_enabled = True
        self.rules = tuple(rules)

    # -- policy ---------------------------------------------------------------------
    def check_type(self, rtype: str) -> None:
        if not self.registry.is_type(rtype):
            raise UnknownType(f"Unknown resource type '{rtype}'")

    def authorize(self, action: str, rtype: str, rid: str | None = None) -> None:
        self.attempt = (action, rtype, rid)
        self.check_type(rtype)
        d = decide(self.caller, action, rtype)
        if not d.allowed:
            raise Forbidden(d.reason)

    def use_care(self, ctx: CareContext) -> None:
        """Take the caller's care relationships as already known (a long-lived connection, such
        as the messaging hub, that keeps them until the change feed shows they changed)."""
        self._care = ctx

    async def care(self) -> CareContext:
        """The caller's care relationships, read once per Repository (one request)."""
        if self._care is None:
            self._care = await care.load(self.conn, self.caller, self.clock.now())
        return self._care

    async def scope(self, rtype: str) -> Scope:
        if self.caller.is_system:
            return ALL
        return search_scope(self.caller, rtype, await self.care())

    async def scope_where(self, rtype: str) -> Any:
        """The SQL condition that narrows every query on ``rtype`` for this caller:
        a search never reveals that a forbidden resource exists."""
        if self.caller.is_system:
            return self._scope_sql(rtype, tables(rtype).main, CareContext())
        return self._scope_sql(rtype, tables(rtype).main, await self.care())

    def _scope_sql(self, rtype: str, m: Any, ctx: CareContext) -> Any:
        """``scope_where`` on one (possibly aliased) table, the care context known."""
        from sqlalchemy import false, not_, or_, true

        sc = ALL if self.caller.is_system else search_scope(self.caller, rtype, ctx)
        if sc.everything:
            return true()
        if sc.nothing:
            return false()
        cond = m.c.compartments.overlap(literal(sorted(sc.patients), ARRAY(Text)))
        if sc.addressed_params:  # a message is not seen through the patient's record, only by its participants
            cond = and_(cond, not_(m.c.tokens.overlap(literal([PRESENT + p for p in sc.addressed_params], ARRAY(Text)))))
        idents = ctx.identities | sc.acting_for
        if sc.participant_params and idents:
            keys = sorted(f"{p}{SEP}{i}" for p in sc.participant_params for i in idents)
            cond = or_(cond, m.c.refs.overlap(literal(keys, ARRAY(Text))))
        if not sc.restricted_visible_to_patients:
            visible = not_(m.c.tokens.overlap(literal(RESTRICTED_TOKENS, ARRAY(Text))))
            if not sc.hide_restricted_except:
                cond = and_(cond, visible)
            else:
                mine = m.c.author == any_(literal(sorted(sc.hide_restricted_except), ARRAY(Text)))
                cond = or_(and_(cond, visible), mine) if sc.authored_anywhere else and_(cond, or_(visible, mine))
        if sc.blocked:
            cond = and_(cond, not_(m.c.compartments.overlap(literal(sorted(sc.blocked), ARRAY(Text)))))
        return cond

    async def subquery_scope(self) -> Callable[[str, Any], Any]:
        """What chained and ``_has`` criteria may look at, per type: what this caller may
        search, so that a criterion never tests a resource the caller may not see."""
        from sqlalchemy import false

        ctx = CareContext() if self.caller.is_system else await self.care()

        def scoped(rtype: str, m: Any) -> Any:
            if not decide(self.caller, "search", rtype).allowed:
                return false()
            return self._scope_sql(rtype, m, ctx)

        return scoped

    async def check_access(self, action: str, rtype: str, rid: str, *, compartments: list[str] | None = None,
                           author: str | None = None, restricted: bool | None = None) -> list[str]:
        """Instance-level decision on one stored resource; returns its compartments."""
        if compartments is None:
            row = await (await self.conn.execute(_stmts(rtype)["access"], {"id": rid, "restricted": RESTRICTED_TOKENS})).fetchone()
            if row is None:
                return []
            compartments, author, restricted = list(row[0]), row[1], bool(row[2])
        if self.caller.is_system:
            return compartments
        labels = list(RESTRICTED_LABELS[:1]) if restricted else []
        ctx = await self.care()
        participates = addressed = False
        sc = search_scope(self.caller, rtype, ctx)
        idents = ctx.identities | sc.acting_for
        if (sc.participant_params and idents) or sc.addressed_params:
            m = tables(rtype).main
            keys = sorted(f"{p}{SEP}{i}" for p in sc.participant_params for i in idents)
            present = [PRESENT + p for p in sc.addressed_params]
            sql, args = compile_stmt(select(m.c.refs.overlap(literal(keys, ARRAY(Text))),
                                            m.c.tokens.overlap(literal(present, ARRAY(Text)))).where(m.c.id == rid))
            row = await (await self.conn.execute(sql, args)).fetchone()
            if row is not None:
                participates, addressed = bool(row[0]), bool(row[1])
        d = may_access(self.caller, rtype, compartments, labels, author, ctx, action=action, target=f"{rtype}/{rid}",
                       participates=participates, addressed=addressed)
        if not d.allowed:
            raise Forbidden(d.reason)
        return compartments

    async def _check_new_content(self, rtype: str, resource: dict, iv: IndexValues, author: str | None, *, creating: bool,
                                 previous: list[str] | tuple[str, ...] = ()) -> None:
        """A write must leave the resource where the caller may reach it: a patient
        writes in their own compartment, a professional for a patient they care for.
        Authorship counts for registering a new Patient and for updates that leave the
        resource in the records it was in (``previous``), not for writing into (or
        moving something into) the record of a patient one has no relationship with."""
        if self.caller.is_system:
            return
        if rtype == "PractitionerRole" and self.caller.kind == "practitioner" and \
                f"practitioner{SEP}{self.caller.fhir_user}" not in iv.refs:
            raise Forbidden("A professional's directory entry must keep naming them")
        # What one creates, one wrote: a restricted label on it hides it from others, not from its author.
        labels = [] if creating else [(x.get("system"), x.get("code")) for x in (resource.get("meta") or {}).get("security") or []
                                      if isinstance(x, dict)]
        stays = not creating and set(iv.compartments) <= set(previous)
        counted_author = author if (stays or (creating and rtype == "Patient")) else None
        ctx = await self.care()
        sc = search_scope(self.caller, rtype, ctx)
        # A message lands where its participants see it: it is the caller's when it names them as its sender.
        addressed = any(PRESENT + p in iv.tokens for p in sc.addressed_params)
        sends = addressed and any(f"{sc.addressed_params[0]}{SEP}{i}" in iv.refs for i in ctx.identities | sc.acting_for)
        d = may_access(self.caller, rtype, iv.compartments, labels, counted_author, ctx, action="create",
                       participates=sends, addressed=addressed)
        if not d.allowed:
            raise Forbidden(d.reason)

    def _identity(self) -> str | None:
        return self.caller.fhir_user or (f"system:{self.caller.user_id}" if self.caller.user_id else None)

    async def _audit(self, action: str, rtype: str | None, rid: str | None = None, version: int | None = None, *,
                     patients: list[str] | tuple[str, ...] = (), query: str | None = None, outcome: str = audit.SUCCESS,
                     purpose: str | None = None, detail: dict | None = None) -> None:
        rec = self._audit_record(action, rtype, rid, version, patients=patients, query=query, outcome=outcome,
                                 purpose=purpose, detail=detail)
        if rec is None:
            return
        if action in READ_ACTIONS and self.conn.autocommit:
            # A read outside a transaction block (``Platform.reading``): its entry is a
            # transaction of its own, sent in one round trip, with group commit as below.
            async with self.conn.pipeline():
                await self.conn.execute("BEGIN")
                await self.conn.execute("SET LOCAL synchronous_commit TO OFF")
                await audit.record(self.conn, rec)
                await self.conn.execute("COMMIT")
        elif action in READ_ACTIONS:
            # A read commits only its audit entry: group commit is enough (a crash may
            # lose the last fraction of a second of read entries, never a write's). Not
            # when the transaction already wrote (it has a transaction id by then).
            async with self.conn.pipeline():
                await self.conn.execute(
                    "SELECT set_config('synchronous_commit', 'off', true) WHERE pg_current_xact_id_if_assigned() IS NULL")
                await audit.record(self.conn, rec)
            _SYNC_OFF.add(self.conn)
        else:
            # A read earlier in the same transaction turned synchronous commit off: a write is durable.
            await self.conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
            _SYNC_OFF.discard(self.conn)
            await audit.record(self.conn, rec)

    def _audit_record(self, action: str, rtype: str | None, rid: str | None = None, version: int | None = None, *,
                      patients: list[str] | tuple[str, ...] = (), query: str | None = None, outcome: str = audit.SUCCESS,
                      purpose: str | None = None, detail: dict | None = None) -> audit.AuditRecord | None:
        if not self.audit_enabled:
            return None
        c = self.caller
        return audit.AuditRecord(
            action=action, outcome=outcome, recorded=self.clock.now(), agent=c.user_id or c.display, agent_kind=c.kind,
            fhir_user=c.fhir_user, address=c.address, resource_type=rtype, resource_id=rid, version_id=version,
            patients=tuple(sorted(set(patients)))[:200], query=query, purpose=purpose, detail=detail)

    async def break_glass(self, patient_id: str, reason: str, minutes: int = 240) -> datetime:
        """Emergency access to a patient's record without a care relationship: time
        limited, with a stated reason, audited and shown to the patient."""
        self.attempt = ("emergency-access", "Patient", patient_id)
        if self.caller.kind != "practitioner" or not self.caller.fhir_user:
            raise Forbidden("Only professionals may use emergency access")
        if len(reason.strip()) < 10:
            raise BadRequest("State the reason for the emergency access (at least 10 characters)")
        row = await (await self.conn.execute(_stmts("Patient")["access"], {"id": patient_id, "restricted": RESTRICTED_TOKENS})).fetchone()
        if row is None or row[3]:
            raise NotFound(f"Patient/{patient_id} is not known")
        ctx = await self.care()
        if f"Patient/{patient_id}" in ctx.blocked_by:
            raise Forbidden("This patient has blocked your access to their record")
        until = await care.grant_emergency(self.conn, self.caller.fhir_user, f"Patient/{patient_id}", reason.strip(),
                                           self.clock.now(), max(1, min(minutes, 24 * 60)))
        self._care = None
        await self._audit("emergency-access", "Patient", patient_id, patients=[f"Patient/{patient_id}"],
                          purpose="BTG", detail={"reason": reason.strip(), "until": until.isoformat()})
        return until

    async def set_masked(self, rtype: str, rid: str, masked: bool) -> WriteResult:
        """A patient hides one of their documents from professionals (the ``masked``
        label: then only its author and the patient see it), or shows it again."""
        self.authorize("update", rtype, rid)
        self.attempt = ("mask", rtype, rid)
        if self.caller.kind not in ("patient", "proxy"):
            raise Forbidden("Only the patient hides a document of their record from professionals")
        row = await (await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})).fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if row[1]:
            raise Gone(f"{rtype}/{rid} was deleted", headers={"ETag": f'W/"{row[0]}"'})
        await self.check_access("mask", rtype, rid)
        resource = orjson.loads(row[2])
        meta = dict(resource.get("meta") or {})
        labels = [x for x in meta.get("security") or [] if not (isinstance(x, dict) and (x.get("system"), x.get("code")) == MASKED)]
        if masked:
            labels.append({"system": MASKED[0], "code": MASKED[1], "display": "masked by the patient"})
        if labels == (meta.get("security") or []):
            return WriteResult(await self.read(rtype, rid), created=False, changed=False)
        if labels:
            meta["security"] = labels
        else:
            meta.pop("security", None)
        stored = await self._write(rtype, rid, {**resource, "meta": meta}, version=row[0] + 1, method="PATCH", insert=False,
                                   action="mask")
        return WriteResult(stored, created=False)

    # -- reads ------------------------------------------------------------------------
    async def read(self, rtype: str, rid: str) -> Stored:
        self.authorize("read", rtype, rid)
        cur = await self.conn.execute(_stmts(rtype)["read_access"], {"id": rid, "restricted": RESTRICTED_TOKENS})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if row[3]:
            raise Gone(f"{rtype}/{rid} was deleted", headers={"ETag": f'W/"{row[1]}"'})
        patients = await self.check_access("read", rtype, rid, compartments=list(row[4]), author=row[5], restricted=bool(row[6]))
        await self._audit("read", rtype, rid, row[1], patients=patients)
        return Stored(rtype, rid, row[1], row[2], row[0])

    async def vread(self, rtype: str, rid: str, vid: str) -> Stored:
        self.authorize("vread", rtype, rid)
        if not re.fullmatch(r"[0-9]{1,9}", vid):  # versions are int4: anything else names none
            raise NotFound(f"{rtype}/{rid} has no version {vid!r}")
        cur = await self.conn.execute(_stmts(rtype)["vread"], {"id": rid, "vid": int(vid)})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} has no version {vid}")
        if row[3]:
            raise Gone(f"Version {vid} of {rtype}/{rid} is a deletion")
        patients = await self.check_access("vread", rtype, rid)
        await self._audit("vread", rtype, rid, row[1], patients=patients)
        return Stored(rtype, rid, row[1], row[2], row[0])

    # -- writes ---------------------------------------------------------------------------
    def prepare(self, rtype: str, resource: Any) -> dict:
        """Check a resource body before any write.

        400 when the body is not a resource of ``rtype`` at all (R4 3.1.0.3: could not
        be parsed or fails basic rules); 422 with one issue per problem when it is one
        but does not validate.
        """
        self._check_shape(rtype, resource)
        issues = validate_resource(resource, expected_type=rtype)
        if issues:
            raise InvalidResource(issues)
        return resource

    def _check_shape(self, rtype: str, resource: Any) -> None:
        if not isinstance(resource, dict):
            msg = "The body must be a JSON object holding a FHIR resource"
            raise BadRequest(msg, [_issue("structure", msg)])
        if resource.get("resourceType") != rtype:
            msg = f"resourceType must be {rtype!r}, got {resource.get('resourceType')!r}"
            raise BadRequest(msg, [_issue("invalid", msg, "resourceType")])

    async def create(self, rtype: str, resource: dict, *, if_none_exist: str | None = None, rid: str | None = None,
                     extra_text: str | None = None) -> WriteResult:
        """Create a resource; ``rid`` is for Bundles, which assign ids before writing.

        An ``id`` in the body is ignored (R4 3.1.0.8): the server assigns the id. With
        ``if_none_exist`` (conditional create) one match is returned as it is and
        several matches are a 412. ``extra_text`` is indexed for ``_content`` with the
        resource (the text of a document's content, which the JSON only points to).
        """
        self.authorize("create", rtype)
        if isinstance(resource, dict) and "id" in resource:
            resource = {k: v for k, v in resource.items() if k != "id"}
        resource = self.prepare(rtype, resource)
        if if_none_exist:
            existing = await self._conditional_match(rtype, if_none_exist, "create")
            if existing is not None:
                return WriteResult(existing, created=False, changed=False)
        rid = rid or new_id()
        stored = await self._write(rtype, rid, resource, version=1, method="POST", insert=True, extra_text=extra_text)
        return WriteResult(stored, created=True)

    async def update(self, rtype: str, rid: str, resource: dict, *, if_match: str | None = None,
                     extra_text: str | None = None) -> WriteResult:
        """Update, or create with the client's id (update as create, also after a delete).

        The body id must equal the URL id (400 otherwise, R4 3.1.0.4); ``if_match``
        (an ETag such as ``W/"3"``) makes the update version-aware: 412 when stale.
        """
        self.authorize("update", rtype, rid)
        expected = _parse_etag(if_match)
        if not is_valid_id(rid):
            raise BadRequest(f"Invalid id {rid!r}", [_issue("value", f"Invalid id {rid!r}: 1 to 64 of A-Z a-z 0-9 - .", f"{rtype}.id")])
        self._check_shape(rtype, resource)
        if resource.get("id") != rid:
            msg = (f"The resource has no id; an update needs the id {rid!r} of the URL in the body" if resource.get("id") is None
                   else f"The resource id ({resource.get('id')!r}) must match the URL id ({rid!r})")
            raise BadRequest(msg, [_issue("invalid", msg, f"{rtype}.id")])
        resource = self.prepare(rtype, resource)
        s = _stmts(rtype)
        row = await (await self.conn.execute(s["lock_version"], {"id": rid})).fetchone()
        if row is None:
            if expected is not None:
                raise PreconditionFailed(f"{rtype}/{rid} does not exist, so it cannot match If-Match {if_match}")
            # Two creates of one new id: the second waits here, then updates what the first wrote.
            await self._lock_key(f"{rtype}/{rid}")
            row = await (await self.conn.execute(s["lock_version"], {"id": rid})).fetchone()
            if row is None:
                stored = await self._write(rtype, rid, resource, version=1, method="PUT", insert=True, extra_text=extra_text)
                return WriteResult(stored, created=True)
        current_version, deleted = row[0], row[1]
        _check_version(rtype, rid, expected, current_version, deleted)
        stored = await self._write(rtype, rid, resource, version=current_version + 1, method="PUT", insert=False,
                                   extra_text=extra_text)
        # Writing over a deletion brings the resource back: that is a creation.
        return WriteResult(stored, created=bool(deleted))

    async def patch(self, rtype: str, rid: str, patch: Any, *, if_match: str | None = None, merge: bool = False) -> WriteResult:
        """Apply a JSON Patch (RFC 6902: a list of operations) or, with ``merge``, a
        JSON Merge Patch (RFC 7386: an object), then validate and store the result.

        A malformed patch document is a 400; a patch that cannot be applied (missing
        path, failed ``test``) or that gives an invalid resource is a 422.
        """
        import jsonpatch
        import jsonpointer

        self.authorize("patch", rtype, rid)
        expected = _parse_etag(if_match)
        ops: Any = None
        if merge:
            if not isinstance(patch, dict):
                raise BadRequest("A JSON Merge Patch body must be a JSON object", [_issue("structure", "A JSON Merge Patch body must be a JSON object")])
        else:
            if not isinstance(patch, list):
                raise BadRequest("A JSON Patch body must be an array of operations", [_issue("structure", "A JSON Patch body must be an array of operations")])
            try:
                ops = jsonpatch.JsonPatch(patch)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, AttributeError) as e:
                raise BadRequest(f"Invalid JSON Patch: {e}", [_issue("structure", f"Invalid JSON Patch: {e}")]) from None
        row = await (await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})).fetchone()
        if row is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        # A deleted resource has no version for If-Match to match: 412 then, else 410.
        _check_version(rtype, rid, expected, row[0], row[1])
        if row[1]:
            raise Gone(f"{rtype}/{rid} was deleted", headers={"ETag": f'W/"{row[0]}"'})
        current = orjson.loads(row[2])
        if merge:
            patched = _merge_patch(current, patch)
        else:
            try:
                patched = ops.apply(current)
            except jsonpatch.InvalidJsonPatch as e:
                raise BadRequest(f"Invalid JSON Patch: {e}", [_issue("structure", f"Invalid JSON Patch: {e}")]) from None
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, ValueError, IndexError) as e:
                msg = f"The patch cannot be applied to {rtype}/{rid}: {e}"
                raise Unprocessable(msg, [_issue("processing", msg)]) from None
        if not isinstance(patched, dict) or patched.get("resourceType") != rtype or patched.get("id") != rid:
            msg = "A patch may not change resourceType or id"
            raise Unprocessable(msg, [_issue("invalid", msg, f"{rtype}.id")])
        self.prepare(rtype, patched)
        stored = await self._write(rtype, rid, patched, version=row[0] + 1, method="PATCH", insert=False)
        return WriteResult(stored, created=False)

    async def delete(self, rtype: str, rid: str, *, if_match: str | None = None) -> int | None:
        """Delete: a new, empty version. Returns its version, or None when there was
        nothing to delete (not an error, R4 3.1.0.7)."""
        self.authorize("delete", rtype, rid)
        expected = _parse_etag(if_match)
        cur = await self.conn.execute(_stmts(rtype)["lock_version"], {"id": rid})
        row = await cur.fetchone()
        if row is None or row[1]:
            if expected is not None:
                raise PreconditionFailed(f"{rtype}/{rid} does not exist, so it cannot match If-Match {if_match}")
            return None
        _check_version(rtype, rid, expected, row[0], False)
        patients = await self.check_access("delete", rtype, rid)
        if self.rules:
            await self._run_rules(rtype, rid, None, previous_known=False)
        version, now = row[0] + 1, self.clock.now()
        s = _stmts(rtype)
        empty = {"id": rid, "vid": version, "lu": now, "deleted": True, "content": None, "tokens": [], "refs": [], "comp": [], "narr": "", "text": ""}
        async with self.conn.pipeline():
            await self.conn.execute(s["update"], empty)
            await self.conn.execute(s["history"], {**empty, "method": "DELETE"})
            await self.conn.execute(s["idx_clear"], {"id": rid})
            await self.conn.execute(s["log"], {"rtype": rtype, "id": rid, "vid": version, "lu": now, "method": "DELETE"})
            await self._audit("delete", rtype, rid, version, patients=patients)
        return version

    async def conditional_update(self, rtype: str, query: str, resource: dict, *, if_match: str | None = None,
                                 new_id: str | None = None) -> WriteResult:
        """PUT Type?criteria (R4 3.1.0.4.3): no match creates (with the body id if any,
        else ``new_id`` or a fresh one), one match is updated, several are a 412."""
        self.authorize("update", rtype)
        self._check_shape(rtype, resource)
        matches = await self._matches(rtype, query, limit=2, lock=True)
        if len(matches) > 1:
            raise MultipleMatches(f"The criteria {query!r} match more than one {rtype}")
        if not matches:
            rid = resource.get("id")
            if rid:
                return await self.update(rtype, rid, resource, if_match=if_match)
            if if_match:
                raise PreconditionFailed(f"No {rtype} matches {query!r}, so none can match If-Match {if_match}")
            return await self.create(rtype, resource, rid=new_id)
        rid = matches[0]
        if resource.get("id") not in (None, rid):
            msg = f"The resource id {resource.get('id')!r} differs from the id of the matching {rtype}/{rid}"
            raise BadRequest(msg, [_issue("invalid", msg, f"{rtype}.id")])
        return await self.update(rtype, rid, {**resource, "id": rid}, if_match=if_match)

    async def conditional_patch(self, rtype: str, query: str, patch: Any, *, if_match: str | None = None,
                                merge: bool = False) -> WriteResult:
        """PATCH Type?criteria: the one match is patched; none is a 404, several a 412."""
        self.authorize("patch", rtype)
        ids = await self._matches(rtype, query, limit=2, lock=True)
        if not ids:
            raise NotFound(f"No {rtype} matches {query!r}")
        if len(ids) > 1:
            raise MultipleMatches(f"The criteria {query!r} match more than one {rtype}")
        return await self.patch(rtype, ids[0], patch, if_match=if_match, merge=merge)

    async def conditional_delete(self, rtype: str, query: str, *, multiple: bool = False) -> int:
        """DELETE Type?criteria: no match is not an error; several matches are a 412
        unless ``multiple`` (the client asked to delete them all)."""
        self.authorize("delete", rtype)
        matches = await self._matches(rtype, query, limit=None if multiple else 2, lock=True)
        if len(matches) > 1 and not multiple:
            raise MultipleMatches(f"The criteria {query!r} match more than one {rtype}")
        for rid in matches:
            await self.delete(rtype, rid)
        return len(matches)

    def bulk_writer(self) -> BulkWriter:
        """The bulk write path (COPY, many resources per statement) on this caller's
        transaction; it asks the policy for each resource type it writes."""
        from parcours.store.bulk import BulkWriter

        return BulkWriter(self)

    async def _write(self, rtype: str, rid: str, resource: dict, *, version: int, method: str, insert: bool,
                     action: str | None = None, extra_text: str | None = None) -> Stored:
        now = self.clock.now()
        ordered, content = render_version(rtype, rid, resource, version, now)
        iv = index_resource(ordered, self.registry, self.base_url)
        action = action or {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "update")
        author = self._identity()
        if not self.caller.is_system:
            previous: list[str] = []
            if not insert:
                row = await (await self.conn.execute(_stmts(rtype)["access"], {"id": rid, "restricted": RESTRICTED_TOKENS})).fetchone()
                if row is not None and not row[3]:
                    previous = await self.check_access(action, rtype, rid, compartments=list(row[0]), author=row[1],
                                                       restricted=bool(row[2]))
                author = row[1] if row is not None else author
            await self._check_new_content(rtype, ordered, iv, author, creating=insert, previous=previous)
        if self.rules:
            await self._run_rules(rtype, rid, ordered, previous_known=insert)
            if extra_text is None:
                extra_text = await self._rules_text(rtype, rid, ordered)
        text = f"{iv.content}\n{extra_text}" if extra_text else iv.content
        params = {
            "id": rid, "vid": version, "lu": now, "deleted": False, "content": content,
            "tokens": iv.tokens, "refs": iv.refs, "comp": iv.compartments, "author": author,
            "narr": iv.narrative[:MAX_FTS_CHARS], "text": text[:MAX_FTS_CHARS],
        }
        rec = self._audit_record(action, rtype, rid, version, patients=iv.compartments)
        params.update(method=method, rtype=rtype)
        if iv.rows:
            params.update(_idx_params(rid, iv))
        if rec is not None:
            params.update(rec.params())
            if self.conn in _SYNC_OFF:  # a read earlier in this transaction turned synchronous commit off: a write is durable
                await self.conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
                _SYNC_OFF.discard(self.conn)
        # Main row, history, search rows, change log and audit entry: one statement.
        await self.conn.execute(_write_sql(rtype, insert, bool(iv.rows), rec is not None), params)
        return Stored(rtype, rid, version, now, content)

    async def _rules_text(self, rtype: str, rid: str, resource: dict) -> str | None:
        """Text a write rule indexes with the resource (``indexed_text``, optional): so that
        any write of a document (REST, Bundles, masking) keeps its content searchable."""
        parts = []
        for rule in self.rules:
            fn = getattr(rule, "indexed_text", None)
            if fn is not None and rtype in rule.types:
                found = await fn(self, rtype, rid, resource)
                if found:
                    parts.append(found)
        return "\n".join(parts) or None

    async def _run_rules(self, rtype: str, rid: str, resource: dict | None, *, previous_known: bool) -> None:
        """The write rules of ``rtype``; the current version is read only when one applies."""
        rules = [r for r in self.rules if rtype in r.types]
        if not rules:
            return
        previous = None
        if not previous_known:
            row = await (await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})).fetchone()
            if row is not None and not row[1] and row[2] is not None:
                previous = orjson.loads(row[2])
        for rule in rules:
            await rule.before_write(self, rtype, rid, resource, previous)

    def as_platform(self) -> Repository:
        """The platform's Repository on this same connection and transaction, with the same
        rules: what a write rule uses to keep other resources consistent whoever the caller
        is (a patient may book an Appointment, not write the Slot it takes). Its writes are
        audited as the platform's."""
        from parcours.security.caller import PLATFORM

        if self.caller.kind == "platform":
            return self
        repo = Repository(self.conn, PLATFORM, base_url=self.base_url, clock=self.clock, reg=self.registry,
                          default_count=self.parser.default_count, max_count=self.parser.max_count, rules=self.rules)
        repo.audit_enabled = self.audit_enabled
        return repo

    async def lock(self, rtype: str, rid: str) -> dict | None:
        """The current version of one resource, its row locked until the transaction ends
        (``SELECT ... FOR UPDATE``), or None when there is none. For the platform's write
        rules only: concurrent writers of the same row wait here, then see what the first
        one committed."""
        if self.caller.kind != "platform":
            raise Forbidden("Row locks are taken by the platform's write rules only")
        self.check_type(rtype)
        row = await (await self.conn.execute(_stmts(rtype)["lock"], {"id": rid})).fetchone()
        if row is None or row[1] or row[2] is None:
            return None
        return orjson.loads(row[2])

    async def _lock_key(self, key: str) -> None:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)
        await self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (h,))

    async def _matches(self, rtype: str, query: str, *, limit: int | None, lock: bool) -> list[str]:
        from urllib.parse import parse_qsl

        # Criteria may come as "a=b", "?a=b" or "Type?a=b" (some clients send the latter).
        head, sep, tail = query.strip().partition("?")
        items = parse_qsl(tail if sep and "=" not in head else query.strip(), keep_blank_values=True)
        if not items:
            raise InvalidSearch("Conditional interactions need search criteria")
        req = self.parser.parse(rtype, items, strict=True)
        if not req.filters:
            # Only result parameters (_count, _sort...) would match every resource of the type.
            raise InvalidSearch(f"Conditional interactions need search criteria that filter, got {query!r}")
        if lock:
            await self._lock_key(f"{rtype}?{sorted(items)}")
        t = tables(rtype)
        stmt = select(t.main.c.id).where(Compiler(self.base_url, self.clock.now(), await self.subquery_scope()).where(rtype, req.filters),
                                         await self.scope_where(rtype))
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
        """Versions, newest first: of one resource, one type, or all (``rtype`` None)."""
        if rtype is None:
            self.attempt = ("history", None, None)
            if not self.caller.is_system:
                raise Forbidden("The whole-system history is for system clients; ask for the history of a type or a resource")
            items = await self._system_history(since, count, offset)
            await self._audit("history", None, None, query=f"_since={since.isoformat()}" if since else None)
            return items
        self.authorize("history", rtype, rid)
        h = tables(rtype).history
        stmt = select(h.c.id, h.c.version_id, h.c.last_updated, h.c.deleted, h.c.content, h.c.method)
        patients: list[str] = []
        if rid is not None:
            stmt = stmt.where(h.c.id == rid)
            patients = await self.check_access("history", rtype, rid)
        elif not (await self.scope(rtype)).everything:
            m = tables(rtype).main
            stmt = stmt.where(h.c.id.in_(select(m.c.id).where(await self.scope_where(rtype))))
        if since is not None:
            stmt = stmt.where(h.c.last_updated >= since)
        stmt = stmt.order_by(h.c.last_updated.desc(), h.c.version_id.desc()).limit(count).offset(offset)
        sql, params = compile_stmt(stmt)
        rows = await (await self.conn.execute(sql, params)).fetchall()
        if rid is not None and not rows and offset == 0:
            found = await (await self.conn.execute(_stmts(rtype)["read"], {"id": rid})).fetchone()
            if found is None:
                raise NotFound(f"{rtype}/{rid} is not known")
        await self._audit("history", rtype, rid, patients=patients)
        return [Stored(rtype, r[0], r[1], r[2], r[4], r[3], method=r[5]) for r in rows]

    async def _system_history(self, since: datetime | None, count: int, offset: int) -> list[Stored]:
        lg = resource_log
        allowed = [t for t in self.registry.resource_types if decide(self.caller, "history", t).allowed]
        stmt = select(lg.c.resource_type, lg.c.id, lg.c.version_id)
        if len(allowed) < len(self.registry.resource_types):
            stmt = stmt.where(lg.c.resource_type == any_(literal(allowed, ARRAY(Text))))
        if since is not None:
            stmt = stmt.where(lg.c.last_updated >= since)
        stmt = stmt.order_by(lg.c.seq.desc()).limit(count).offset(offset)
        sql, params = compile_stmt(stmt)
        rows = await (await self.conn.execute(sql, params)).fetchall()
        # One query per resource type on the page, not one per version.
        wanted: dict[str, list[tuple[str, int]]] = {}
        for rtype, rid, vid in rows:
            wanted.setdefault(rtype, []).append((rid, vid))
        found: dict[tuple[str, str, int], Stored] = {}
        for rtype, keys in wanted.items():
            h = tables(rtype).history
            stmt = select(h.c.id, h.c.version_id, h.c.last_updated, h.c.deleted, h.c.content, h.c.method).where(
                tuple_(h.c.id, h.c.version_id).in_(keys))
            sql, params = compile_stmt(stmt)
            for r in await (await self.conn.execute(sql, params)).fetchall():
                found[(rtype, r[0], r[1])] = Stored(rtype, r[0], r[1], r[2], r[4], r[3], method=r[5])
        return [found[(t, i, v)] for t, i, v in rows if (t, i, v) in found]

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
        compiler = Compiler(self.base_url, self.clock.now(), await self.subquery_scope())
        matches: list[Stored] = []
        total: int | None = None
        has_more = False
        if req.resource_type:
            rtype = req.resource_type
            t = tables(rtype)
            where = and_(compiler.where(rtype, req.filters), await self.scope_where(rtype))
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
            if req.total in ("accurate", "estimate") or req.summary == "count" or req.count == 0:
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
                where = and_(compiler.where(rtype, req.filters), await self.scope_where(rtype))
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
        await self._audit("search", req.resource_type, None, query=req.query_string or None,
                          patients=await self._patients_of(matches + includes))
        return SearchResult(matches, includes, total, has_more, req)

    async def _patients_of(self, items: list[Stored]) -> list[str]:
        """The patients whose records a result touched, for their access history."""
        if not items:
            return []
        out: set[str] = set()
        by_type: dict[str, list[str]] = {}
        for it in items:
            if it.resource_type == "Patient":
                out.add(f"Patient/{it.id}")
            elif it.resource_type in self.registry.patient_compartment:
                by_type.setdefault(it.resource_type, []).append(it.id)
        for rtype, ids in by_type.items():
            m = tables(rtype).main
            sql, params = compile_stmt(select(func.unnest(m.c.compartments)).where(m.c.id == any_(literal(ids, ARRAY(Text)))))
            out.update(r[0] for r in await (await self.conn.execute(sql, params)).fetchall())
        return sorted(out)

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
                    if inc.source_type not in ("*", m.resource_type):
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
                        .where(t.main.c.id == any_(literal(sorted(ids), ARRAY(Text))), t.main.c.deleted.is_(False),
                               await self.scope_where(tt)))
                    for r in await (await self.conn.execute(sql, params)).fetchall():
                        if (tt, r[0]) not in seen:
                            seen.add((tt, r[0]))
                            new.append(Stored(tt, r[0], r[1], r[2], r[3], refs=list(r[4])))
            for inc in revincludes:
                if round_ > 0 and not inc.iterate:
                    continue
                if not decide(self.caller, "search", inc.source_type).allowed:
                    continue
                if inc.param == "*":  # any reference parameter of the source type
                    codes = [c for c, sp in self.registry.params(inc.source_type).items() if sp.type == "reference"]
                else:
                    codes = [inc.param]
                keys = [f"{code}\x1f{m.resource_type}/{m.id}" for code in codes for m in frontier
                        if inc.target_type in (None, m.resource_type)]
                if not keys:
                    continue
                t = tables(inc.source_type)
                sql, params = compile_stmt(
                    select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content, t.main.c.refs)
                    .where(t.main.c.refs.overlap(literal(keys, ARRAY(Text))), t.main.c.deleted.is_(False),
                           await self.scope_where(inc.source_type)).limit(10_000))
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
        """Patient/$everything: the patient and the current resources of its compartment."""
        self.authorize("everything", "Patient")
        for t in types or ():
            if not self.registry.is_type(t):
                raise InvalidSearch(f"Unknown resource type in _type: {t!r}", [_issue("not-supported", f"Unknown resource type {t!r}", "_type")])
        patient = await self.read("Patient", patient_id)
        out = [patient] if (not types or "Patient" in types) and (since is None or patient.last_updated >= since) else []
        key = f"Patient/{patient_id}"
        for rtype in self.registry.patient_compartment:
            if types and rtype not in types:
                continue
            if rtype == "Patient" or not decide(self.caller, "everything", rtype).allowed:
                continue
            t = tables(rtype)
            stmt = select(t.main.c.id, t.main.c.version_id, t.main.c.last_updated, t.main.c.content).where(
                t.main.c.compartments.contains([key]), t.main.c.deleted.is_(False), await self.scope_where(rtype))
            if since is not None:
                stmt = stmt.where(t.main.c.last_updated >= since)
            sql, params = compile_stmt(stmt.order_by(t.main.c.last_updated).limit(limit))
            for r in await (await self.conn.execute(sql, params)).fetchall():
                out.append(Stored(rtype, r[0], r[1], r[2], r[3]))
        self.attempt = ("everything", "Patient", patient_id)
        await self._audit("everything", "Patient", patient_id, patients=[key])
        return out


    # -- bulk export ------------------------------------------------------------------------
    async def export_iter(
        self, rtype: str, *, since: datetime | None = None, until: datetime | None = None,
        patients: Sequence[str] | None = None, any_patient: bool = False, batch: int = 1000,
    ) -> AsyncGenerator[list[Stored], None]:
        """The current resources of one type for $export, in batches from a server-side cursor.

        ``since``/``until`` bound lastUpdated (``since`` exclusive, as Bulk Data's
        _since); ``patients`` keeps the compartments of those patient ids,
        ``any_patient`` those of every patient. One statement, so one snapshot.
        """
        self.authorize("export", rtype)
        m = tables(rtype).main
        stmt = select(m.c.id, m.c.version_id, m.c.last_updated, m.c.content).where(m.c.deleted.is_(False), await self.scope_where(rtype))
        await self._audit("export", rtype, None, query=f"_since={since.isoformat()}" if since else None,
                          patients=[f"Patient/{p}" for p in patients or ()])
        if since is not None:
            stmt = stmt.where(m.c.last_updated > since)
        if until is not None:
            stmt = stmt.where(m.c.last_updated <= until)
        if patients is not None:
            stmt = stmt.where(m.c.compartments.overlap(literal([f"Patient/{p}" for p in patients], ARRAY(Text))))
        elif any_patient:
            stmt = stmt.where(func.cardinality(m.c.compartments) > 0)
        sql, params = compile_stmt(stmt)
        async with self.conn.cursor(name="parcours_export") as cur:
            await cur.execute(sql, params)
            while rows := await cur.fetchmany(batch):
                yield [Stored(rtype, r[0], r[1], r[2], r[3]) for r in rows]


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


# ``If-Match: *``: any current version will do.
ANY_VERSION = -1
_ETAG_RE = re.compile(r'^(?:W/)?"?([0-9]{1,9})"?$')


def _parse_etag(value: str | None) -> int | None:
    """The version an If-Match header names; a malformed one is a 400, not a 412."""
    if value is None or not value.strip():
        return None
    v = value.strip()
    if v == "*":
        return ANY_VERSION
    m = _ETAG_RE.match(v)
    if not m:
        msg = f'If-Match must name a version such as W/"3", got {value!r}'
        raise BadRequest(msg, [_issue("invalid", msg)])
    return int(m.group(1))


def _check_version(rtype: str, rid: str, expected: int | None, current: int, deleted: bool) -> None:
    """If-Match (RFC 9110 13.1.1): a deleted resource matches no version, not even *."""
    if expected is None:
        return
    if deleted:
        raise PreconditionFailed(f"{rtype}/{rid} is deleted, so it does not match If-Match")
    if expected != ANY_VERSION and expected != current:
        raise PreconditionFailed(f"{rtype}/{rid} is at version {current}, not {expected}: reload it and try again")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


def _issue(code: str, message: str, expression: str | None = None):  # type: ignore[no-untyped-def]
    from parcours.core.errors import Issue

    return Issue(code, message, expression=(expression,) if expression else ())


__all__ = ["Repository", "Stored", "SearchResult", "WriteResult", "WriteRule", "Conflict", "text", "and_"]
