"""Bulk import of FHIR data from files (``parcours import``): fast and resumable.

What a file becomes:

* a **transaction** Bundle: all or nothing, as when it is POSTed to the API.
  ``urn:uuid`` fullUrls get new ids (or the id of a ``PUT Type/id``) and the
  references to them are rewritten; one invalid entry fails the whole Bundle.
  Bundles made only of plain creates and updates (Synthea's) take the bulk
  path; the others (conditional creates or updates, conditional references,
  deletes, patches, reads) are run by :mod:`parcours.services.bundles` itself,
  in the import's transaction;
* a **batch** Bundle: entries succeed or fail one by one;
* a **collection** or **searchset** Bundle, an **NDJSON** file (one resource a
  line, optionally gzip-compressed) or a JSON file holding one resource: each
  resource is stored under its own id (as ``PUT Type/id``: a new version if it
  exists) or, without one, a new id; a reference to the fullUrl of another entry
  of the same collection is rewritten. Invalid resources are reported and skipped;
* any other Bundle (document, message, history, responses) is one Bundle resource.

The work is split so that PostgreSQL is never kept waiting: parsing, validation,
indexing and the encoding of COPY rows are pure and run in a process pool
(``_prepare_*``); the main process only streams the encoded rows through the
caller's Repository (:meth:`Repository.bulk_writer`) and keeps the journal.
Results are grouped into transactions of about ``batch_size`` resources; the
journal row of each file is written in the transaction that writes its last
resources, so a rerun skips exactly what was committed. A Bundle or single
resource file is always inside one transaction; an NDJSON file is cut into
chunks whose progress (lines done) the journal records, so that a rerun goes on
after the last committed chunk without writing anything twice.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import multiprocessing
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from parcours.core.errors import Issue, ParcoursError
from parcours.core.ids import is_valid_id, new_id
from parcours.fhir.registry import registry
from parcours.fhir.validation import validate_resource
from parcours.security.caller import Caller
from parcours.services import bundles
from parcours.services.platform import Platform
from parcours.store.bulk import Batch, BatchBuilder, BulkWriter, ImportJournal
from parcours.store.repository import Repository

SUFFIXES = (".json", ".ndjson", ".ndjson.gz")
# Below this much input, starting worker processes costs more than it saves.
POOL_THRESHOLD_BYTES = 2 * 1024 * 1024
# Input handed to the workers and not yet written: bounds the memory in use.
MAX_BYTES_IN_FLIGHT = 48 * 1024 * 1024
_ENTRY_RE = re.compile(r"Bundle\.entry\[(\d+)\]")


# -- report ---------------------------------------------------------------------------------
@dataclass
class EntryError:
    """One rejected resource: its entry index (Bundle), line number (NDJSON), or
    None when the problem is the file itself."""

    index: int | None
    message: str


@dataclass
class FileReport:
    path: str
    sha256: str = ""
    size: int = 0
    status: str = "pending"  # imported | partial (some rejected) | failed | skipped | ignored
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[EntryError] = field(default_factory=list)
    note: str = ""

    @property
    def resources(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "status": self.status, "resources": self.resources,
                "counts": dict(sorted(self.counts.items())), "errors": [{"index": e.index, "message": e.message} for e in self.errors],
                "note": self.note}


@dataclass
class ImportReport:
    files: list[FileReport]
    elapsed: float
    validated: bool

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            for t, n in f.counts.items():
                out[t] = out.get(t, 0) + n
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def resources(self) -> int:
        return sum(f.resources for f in self.files)

    @property
    def errors(self) -> int:
        return sum(len(f.errors) for f in self.files)

    @property
    def failed(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "failed"]

    @property
    def ok(self) -> bool:
        """Nothing failed and nothing was rejected (the exit status of the command)."""
        return not self.failed and not self.errors

    @property
    def rate(self) -> float:
        return self.resources / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for f in self.files:
            by_status[f.status] = by_status.get(f.status, 0) + 1
        return {
            "files": [f.to_dict() for f in self.files],
            "totals": {"files": len(self.files), "by_status": by_status, "resources": self.resources, "counts": self.counts,
                       "errors": self.errors, "elapsed_s": round(self.elapsed, 3), "resources_per_s": round(self.rate, 1),
                       "validated": self.validated},
        }


# -- discovery --------------------------------------------------------------------------------
def find_files(paths: Sequence[Path]) -> list[Path]:
    """The files to import: those named, and in folders (recursively) every *.json,
    *.ndjson and *.ndjson.gz, in name order."""
    out: dict[Path, None] = {}
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name.endswith(SUFFIXES):
                    out[f] = None
        else:
            out[p] = None
    return list(out)


def _is_ndjson(path: Path) -> bool:
    return path.name.endswith((".ndjson", ".ndjson.gz"))


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# -- preparation: pure, runs in worker processes -------------------------------------------
@dataclass(frozen=True)
class _Context:
    base_url: str
    validate: bool
    last_updated: datetime
    # Types with write rules (booking keeps Slots in step with Appointments): the
    # Repository writes them one by one, running the rules; the bulk path would not.
    ruled: frozenset[str] = frozenset()


@dataclass
class _Unit:
    """What a worker made of one file, or of one chunk of an NDJSON file."""

    file: int  # index of the file in the run
    size: int = 0  # input bytes, for the progress bar
    batches: list[Batch] = field(default_factory=list)
    errors: list[EntryError] = field(default_factory=list)
    failed: bool = False  # nothing of it may be written
    ignored: str = ""  # not FHIR data: why
    note: str = ""
    transaction: list[dict] | None = None  # a transaction Bundle's entries for services.bundles
    batch_entries: list[tuple[int, dict]] = field(default_factory=list)  # batch entries for services.bundles
    ruled: list[tuple[int | None, str, str, str, dict]] = field(default_factory=list)  # (index, type, id, method, resource)
    atomic: bool = False  # a transaction: one refused entry fails it whole
    position: int = 0  # NDJSON: lines done once this unit is written
    last: bool = True  # the file's last unit

    @property
    def resources(self) -> int:
        return sum(len(b) for b in self.batches) + len(self.transaction or ()) + len(self.batch_entries) + len(self.ruled)


def _describe(issues: Sequence[Issue]) -> str:
    return "; ".join(
        f"{', '.join(i.expression)}: {i.diagnostics}" if i.expression and not i.diagnostics.startswith(i.expression[0]) else i.diagnostics
        for i in issues)


def _has_conditional_reference(node: Any) -> bool:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and _conditional(ref):
            return True
        return any(_has_conditional_reference(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_conditional_reference(v) for v in node)
    return False


def _request_problem(e: Any, i: int) -> str | None:
    req = e.get("request") if isinstance(e, dict) else None
    if not isinstance(req, dict) or req.get("method") not in bundles.ORDER or not isinstance(req.get("url"), str) or not req["url"].strip():
        return f"Bundle.entry[{i}].request must have a method (GET, HEAD, POST, PUT, PATCH, DELETE) and a url"
    return None


_REFERENCE_RE = re.compile(rb'"reference"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


def _references(data: bytes) -> set[str]:
    """Every ``reference`` string of a JSON document, found in its text: one scan of
    the file spares walking every resource when none can need it."""
    out = set()
    for raw in _REFERENCE_RE.findall(data):
        out.add(orjson.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode("utf-8", "replace"))
    return out


def _conditional(ref: str) -> bool:
    return "?" in ref and not ref.startswith(("http:", "https:", "urn:", "#"))


def _bulk_eligible(e: Any, conditional_refs: bool = True) -> bool:
    """A plain create or update: the import writes it as the API would (in bulk, or
    through the Repository for types with write rules). ``conditional_refs``: whether
    the file may hold conditional references at all."""
    if not isinstance(e.resource, dict) or (conditional_refs and _has_conditional_reference(e.resource)):
        return False
    if e.method == "POST":
        return len(e.path) == 1 and not e.query and not e.request.get("ifNoneExist")
    if e.method == "PUT":
        return len(e.path) == 2 and not e.query and not e.request.get("ifMatch")
    return False


class _Preparer:
    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.registry = registry()
        self.builder = BatchBuilder(self.registry, ctx.base_url, ctx.last_updated)
        self.errors: list[EntryError] = []
        self.ruled: list[tuple[int | None, str, str, str, dict]] = []

    def problems(self, rtype: Any, resource: Any) -> str | None:
        """Why ``resource`` cannot be stored as a ``rtype``, as Repository.prepare decides."""
        if not isinstance(resource, dict):
            return "The body must be a JSON object holding a FHIR resource"
        if not isinstance(rtype, str) or not self.registry.is_type(rtype):
            return f"Unknown resource type {rtype!r}"
        if resource.get("resourceType") != rtype:
            return f"resourceType must be {rtype!r}, got {resource.get('resourceType')!r}"
        if self.ctx.validate:
            issues = validate_resource(resource, expected_type=rtype)
            if issues:
                return _describe(issues)
        return None

    def own_id(self, resource: Any) -> tuple[str, str] | str:
        """(id, method) of a resource stored under its own id, or why it cannot be."""
        if not isinstance(resource, dict):
            return "The entry holds no resource (a JSON object)"
        rid = resource.get("id")
        if rid is None:
            return new_id(), "POST"
        if not isinstance(rid, str) or not is_valid_id(rid):
            return f"Invalid id {rid!r}: 1 to 64 of A-Z a-z 0-9 - ."
        return rid, "PUT"

    def add(self, index: int | None, rtype: str, rid: str, resource: dict, method: str) -> bool:
        problem = self.problems(rtype, resource)
        if problem is None and rtype in self.ctx.ruled:
            self.ruled.append((index, rtype, rid, method, resource))
            return True
        if problem is None:
            try:
                self.builder.add(rtype, rid, resource, method)
                return True
            except (ValueError, TypeError, OverflowError, KeyError) as e:  # a value PostgreSQL cannot hold
                problem = f"The resource cannot be stored: {e}"
        self.errors.append(EntryError(index, problem))
        return False

    def resources(self, items: list[tuple[int | None, Any]], *, full_urls: list[str | None] | None = None) -> None:
        """Resources each stored under its own id (collection, NDJSON, single file)."""
        planned: list[tuple[int | None, Any, str, str]] = []
        id_map: dict[str, str] = {}
        for n, (index, resource) in enumerate(items):
            got = self.own_id(resource)
            if isinstance(got, str):
                self.errors.append(EntryError(index, got))
                continue
            rid, method = got
            full = full_urls[n] if full_urls else None
            if full:
                id_map[full] = f"{resource.get('resourceType')}/{rid}"
            planned.append((index, resource, rid, method))
        for index, resource, rid, method in planned:
            if id_map:
                resource = bundles.rewrite_references(resource, id_map)
            self.add(index, resource.get("resourceType"), rid, resource, method)

    def transaction(self, unit: _Unit, entries: list[Any], refs: set[str]) -> None:
        for i, e in enumerate(entries):
            if (problem := _request_problem(e, i)) is not None:
                self.errors.append(EntryError(i, problem))
        if self.errors:
            unit.failed = True
            return
        try:
            parsed = [bundles.parse_entry(e, i, self.ctx.base_url) for i, e in enumerate(entries)]
            bundles.check_distinct(parsed)
        except ParcoursError as err:
            unit.failed = True
            self.errors.extend(_entry_errors(err))
            return
        conditional = any(_conditional(r) for r in refs)
        if not all(_bulk_eligible(e, conditional) for e in parsed):
            unit.transaction = entries
            return
        id_map: dict[str, str] = {}
        ids: dict[int, str] = {}
        for e in parsed:
            ids[e.index] = new_id() if e.method == "POST" else e.path[1]
            if e.full_url:
                id_map[e.full_url] = f"{e.rtype}/{ids[e.index]}"
        dangling = any(r.startswith("urn:uuid:") and r not in id_map for r in refs)
        for e in sorted(parsed, key=lambda e: bundles.ORDER[e.method]):
            resource = bundles.rewrite_references(e.resource, id_map)
            rid = ids[e.index]
            if e.method == "POST":
                resource = {k: v for k, v in resource.items() if k != "id"}  # the server assigns ids
            elif not is_valid_id(rid):
                self.errors.append(EntryError(e.index, f"Invalid id {rid!r}: 1 to 64 of A-Z a-z 0-9 - ."))
                continue
            elif resource.get("id") != rid:
                self.errors.append(EntryError(e.index, f"The resource id ({resource.get('id')!r}) must match the URL id ({rid!r})"))
                continue
            left = bundles.first_unresolved(resource, e.rtype) if dangling else None
            if left:
                self.errors.append(EntryError(e.index, f"{left[0]}: the reference {left[1]!r} matches no fullUrl of this transaction"))
                continue
            self.add(e.index, e.rtype, rid, resource, e.method)
        if self.errors:  # all or nothing
            unit.failed = True
            self.builder.batches()
            self.ruled = []
        unit.atomic = True

    def batch(self, unit: _Unit, entries: list[Any], refs: set[str]) -> None:
        conditional = any(_conditional(r) for r in refs)
        reads = 0
        for i, e in enumerate(entries):
            if (problem := _request_problem(e, i)) is not None:
                self.errors.append(EntryError(i, problem))
                continue
            if e["request"]["method"] in ("GET", "HEAD"):  # nothing to import; entries are independent
                reads += 1
                continue
            try:
                parsed = bundles.parse_entry(e, i, self.ctx.base_url)
            except ParcoursError as err:
                self.errors.extend(_entry_errors(err, i))
                continue
            if not _bulk_eligible(parsed, conditional):
                unit.batch_entries.append((i, e))
                continue
            resource = parsed.resource
            if parsed.method == "POST":
                rid = new_id()
                resource = {k: v for k, v in resource.items() if k != "id"}
            else:
                rid = parsed.path[1]
                if not is_valid_id(rid) or resource.get("id") != rid:
                    self.errors.append(EntryError(i, f"The resource id ({resource.get('id')!r}) must match the URL id ({rid!r})"))
                    continue
            self.add(i, parsed.rtype, rid, resource, parsed.method)
        if reads:
            unit.note = f"{reads} read entries (GET) passed over"


def _entry_errors(err: ParcoursError, default: int | None = None) -> list[EntryError]:
    """One error per issue, at the entry the issue names (the report gives the index)."""
    out = []
    for issue in err.issues or [Issue("processing", str(err))]:
        m = _ENTRY_RE.search(issue.diagnostics) or next((m for x in issue.expression if (m := _ENTRY_RE.search(x))), None)
        if m and issue.diagnostics.startswith(m.group(0) + ": "):
            issue = Issue(issue.code, issue.diagnostics[len(m.group(0)) + 2 :], issue.severity, issue.expression)
        out.append(EntryError(int(m.group(1)) if m else default, _describe([issue])))
    return out


def _prepare_file(file: int, path: str, ctx: _Context) -> _Unit:
    """A JSON file: one Bundle or one resource."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _unreadable(file, e)
    unit = _Unit(file, size=len(data))
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        unit.failed = True
        unit.errors.append(EntryError(None, f"Not valid JSON: {e}"))
        return unit
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        unit.ignored = "not FHIR data (no resourceType)"
        return unit
    p = _Preparer(ctx)
    btype = doc.get("type") if doc["resourceType"] == "Bundle" else None
    entries = doc.get("entry") or []
    if btype in ("transaction", "batch", "collection", "searchset") and not isinstance(entries, list):
        unit.failed = True
        unit.errors.append(EntryError(None, "Bundle.entry must be an array"))
        return unit
    if btype == "transaction":
        p.transaction(unit, entries, _references(data))
    elif btype == "batch":
        p.batch(unit, entries, _references(data))
    elif btype in ("collection", "searchset"):
        kept = [(i, e) for i, e in enumerate(entries)
                if not (isinstance(e, dict) and isinstance(e.get("search"), dict) and e["search"].get("mode") == "outcome")]
        p.resources([(i, e.get("resource") if isinstance(e, dict) else None) for i, e in kept],
                    full_urls=[e.get("fullUrl") if isinstance(e, dict) and isinstance(e.get("fullUrl"), str) else None for _, e in kept])
    else:
        p.resources([(None, doc)])
    unit.errors.extend(p.errors)
    unit.batches = [] if unit.failed else p.builder.batches()
    unit.ruled = p.ruled
    return unit


def _prepare_lines(file: int, lines: list[bytes], first: int, last: bool, ctx: _Context) -> _Unit:
    """Lines ``first``, ``first + 1``... (numbered from 1) of an NDJSON file."""
    unit = _Unit(file, size=sum(len(x) for x in lines), position=first + len(lines) - 1, last=last)
    p = _Preparer(ctx)
    items: list[tuple[int | None, Any]] = []
    for n, line in enumerate(lines, start=first):
        if not line.strip():
            continue
        try:
            items.append((n, orjson.loads(line)))
        except orjson.JSONDecodeError as e:
            p.errors.append(EntryError(n, f"Not valid JSON: {e}"))
    p.resources(items)
    unit.errors = p.errors
    unit.batches = p.builder.batches()
    unit.ruled = p.ruled
    return unit


def _unreadable(file: int, error: BaseException) -> _Unit:
    return _Unit(file, failed=True, errors=[EntryError(None, f"Cannot read the file: {error}")])


def _warm_worker() -> None:
    registry()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a server process that imported this module (and built the
    search registry) once: starting each by spawn re-did that, about a second of CPU
    each. Forking this process instead would copy its threads and open connections."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


# -- the import -------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, int], None]  # (bytes done, bytes in all, resources written)


@dataclass
class _File:
    index: int
    path: Path
    report: FileReport
    ndjson: bool
    start: int = 0  # NDJSON: lines already committed by an earlier run
    # Totals as the journal holds them (an earlier run's included), committed only.
    resources: int = 0
    errors: int = 0
    dropped: bool = False  # a chunk failed: the rest of the file waits for a rerun


class _Refused(Exception):
    """An entry of a transaction Bundle refused by the Repository: the Bundle fails whole."""

    def __init__(self, errors: list[EntryError]) -> None:
        super().__init__(errors[0].message if errors else "refused")
        self.errors = errors


@dataclass
class _Outcome:
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[EntryError] = field(default_factory=list)
    failed: bool = False


class Importer:
    """Imports files through the Repository of ``caller``."""

    def __init__(self, platform: Platform, caller: Caller, *, validate: bool = True, force: bool = False,
                 workers: int | None = None, batch_size: int = 5000, progress: ProgressFn | None = None) -> None:
        self.platform = platform
        self.caller = caller
        self.validate = validate
        self.force = force
        self.workers = workers
        self.batch_size = max(1, batch_size)
        self.chunk_lines = max(1, min(self.batch_size, 2000))
        self.progress = progress
        self.base_url = platform.settings.fhir_base
        self._bytes_total = 0
        self._bytes_done = 0
        self._written = 0

    async def run(self, paths: Sequence[Path]) -> ImportReport:
        started = time.perf_counter()
        files = [_File(i, p, FileReport(str(p)), _is_ndjson(p)) for i, p in enumerate(find_files(paths))]
        workers = self.workers
        if workers is None:
            size = sum(p.stat().st_size for p in (f.path for f in files) if p.is_file())
            workers = 0 if size < POOL_THRESHOLD_BYTES else max(1, min(os.cpu_count() or 1, 4))
        pool = None
        if workers > 0:
            pool = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_warm_worker)
            for _ in range(workers):  # start them now: they load while the files are digested
                pool.submit(_warm_worker)
        try:
            todo = await self._plan(files)
            self._bytes_total = sum(f.report.size for f in todo)
            self._tick()
            async with self.platform.pool.connection() as conn:
                await self._pipeline(conn, files, todo, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for f in files:
            r = f.report
            if r.status == "pending":
                r.status = "failed" if f.dropped or (r.errors and not r.counts) else "partial" if r.errors else "imported"
        return ImportReport([f.report for f in files], time.perf_counter() - started, self.validate)

    async def _plan(self, files: list[_File]) -> list[_File]:
        """Digest every file and consult the journal: what is done, what resumes."""
        for f in files:
            try:
                f.report.sha256, f.report.size = await asyncio.to_thread(_digest, f.path)
            except OSError as e:
                f.report.status = "failed"
                f.report.errors.append(EntryError(None, f"Cannot read the file: {e.strerror or e}"))
        async with self.platform.pool.connection() as conn:
            done = await ImportJournal(conn).lookup([f.report.sha256 for f in files if f.report.sha256])
        todo: list[_File] = []
        first_of: dict[str, str] = {}
        for f in files:
            r = f.report
            if r.status == "failed":
                continue
            if r.sha256 in first_of:
                r.status, r.note = "skipped", f"same content as {first_of[r.sha256]}"
                continue
            first_of[r.sha256] = r.path
            entry = done.get(r.sha256)
            if entry is not None and not self.force:
                if entry.status == ImportJournal.COMPLETE:
                    when = entry.finished_at.isoformat(timespec="seconds") if entry.finished_at else "earlier"
                    r.status, r.note = "skipped", f"imported {when}: {entry.resources} resources, {entry.errors} rejected"
                    continue
                if f.ndjson and entry.position > 0:
                    f.start, f.resources, f.errors = entry.position, entry.resources, entry.errors
                    r.note = f"resumed after line {entry.position}"
            todo.append(f)
        return todo

    def _jobs(self, todo: list[_File], ctx: Callable[[], _Context]) -> Iterator[tuple[int, Callable[[], _Unit]]]:
        """(input bytes, work) for every unit, files in order."""
        for f in todo:
            if not f.ndjson:
                yield f.report.size, functools.partial(_prepare_file, f.index, str(f.path), ctx())
                continue
            previous: tuple[list[bytes], int] | None = None
            try:
                for chunk in self._chunks(f):
                    if previous is not None:
                        yield sum(map(len, previous[0])), functools.partial(_prepare_lines, f.index, *previous, False, ctx())
                    previous = chunk
            except (OSError, EOFError, zlib.error) as e:  # unreadable, or a truncated .gz: what came before stays
                if previous is not None:
                    yield sum(map(len, previous[0])), functools.partial(_prepare_lines, f.index, *previous, False, ctx())
                yield 0, functools.partial(_unreadable, f.index, e)
                continue
            assert previous is not None
            yield sum(map(len, previous[0])), functools.partial(_prepare_lines, f.index, *previous, True, ctx())

    def _chunks(self, f: _File) -> Iterator[tuple[list[bytes], int]]:
        """(lines, number of the first) after the lines an earlier run committed; the
        last chunk may be empty, so that there always is one to mark the end."""
        opener: Any = gzip.open if f.path.name.endswith(".gz") else open
        with opener(f.path, "rb") as stream:
            chunk: list[bytes] = []
            first = f.start + 1
            for number, line in enumerate(stream, start=1):
                if number <= f.start:
                    continue
                chunk.append(line)
                if len(chunk) >= self.chunk_lines:
                    yield chunk, first
                    chunk, first = [], number + 1
            yield chunk, first

    async def _pipeline(self, conn: Any, files: list[_File], todo: list[_File], pool: ProcessPoolExecutor | None) -> None:
        loop = asyncio.get_running_loop()
        ruled = frozenset(t for rule in self.platform.repository(conn, self.caller).rules for t in rule.types)
        ctx = lambda: _Context(self.base_url, self.validate, self.platform.clock.now(), ruled)  # noqa: E731
        jobs = self._jobs(todo, ctx)
        inflight: deque[tuple[int, asyncio.Future[_Unit]]] = deque()
        in_bytes = 0

        def submit() -> None:
            nonlocal in_bytes
            while in_bytes < MAX_BYTES_IN_FLIGHT or not inflight:
                job = next(jobs, None)
                if job is None:
                    return
                size, work = job
                if pool is None:
                    fut: asyncio.Future[_Unit] = loop.create_future()
                    fut.set_result(work())
                else:
                    fut = loop.run_in_executor(pool, work)
                inflight.append((size, fut))
                in_bytes += size
                if pool is None:
                    return

        group: list[_Unit] = []
        grouped = 0
        submit()
        while inflight:
            size, fut = inflight.popleft()
            unit = await fut
            in_bytes -= size
            submit()
            if unit.ignored:
                r = files[unit.file].report
                r.status, r.note = "ignored", unit.ignored
                self._bytes_done += unit.size
                continue
            if unit.note:
                r = files[unit.file].report
                r.note = "; ".join(x for x in (r.note, unit.note) if x)
            group.append(unit)
            grouped += unit.resources
            if grouped >= self.batch_size:
                await self._write(conn, files, group)
                group, grouped = [], 0
        if group:
            await self._write(conn, files, group)

    async def _write(self, conn: Any, files: list[_File], group: list[_Unit]) -> None:
        """One transaction for the group; if it fails, each unit alone, to find the culprit."""
        try:
            outcomes = await self._transaction(conn, files, group)
        except (psycopg.Error, ParcoursError, _Refused) as err:
            if len(group) > 1:
                for unit in group:
                    await self._write(conn, files, [unit])
                return
            outcomes = [_Outcome(errors=err.errors if isinstance(err, _Refused) else _db_errors(err), failed=True)]
        for unit, out in zip(group, outcomes):
            f = files[unit.file]
            r = f.report
            self._bytes_done += unit.size
            if out is None:
                continue
            r.errors.extend(out.errors)
            if out.failed:
                r.status = "failed"
                f.dropped = f.ndjson
                continue
            for t, n in out.counts.items():
                r.counts[t] = r.counts.get(t, 0) + n
            f.resources += sum(out.counts.values())
            f.errors += len(out.errors)
            self._written += sum(out.counts.values())
        self._tick()

    async def _transaction(self, conn: Any, files: list[_File], group: list[_Unit]) -> list[_Outcome | None]:
        outcomes: list[_Outcome | None] = []
        async with conn.transaction():
            repo = self.platform.repository(conn, self.caller)
            writer = repo.bulk_writer()
            journal = ImportJournal(conn)
            for unit in group:
                f = files[unit.file]
                outcomes.append(None if f.dropped or f.report.status == "failed" else await self._apply(repo, writer, unit))
            await writer.flush()
            # Types with write rules, one by one through the Repository, once everything the
            # group wrote in bulk is there for the rules to see.
            for unit, out in zip(group, outcomes):
                if out is not None and not out.failed:
                    await self._apply_ruled(repo, unit, out)
            running: dict[int, tuple[int, int]] = {}  # file -> journal totals, this transaction included
            for unit, out in zip(group, outcomes):
                f = files[unit.file]
                if out is None or out.failed:
                    continue
                resources, errors = running.get(unit.file, (f.resources, f.errors))
                resources, errors = resources + sum(out.counts.values()), errors + len(out.errors)
                running[unit.file] = (resources, errors)
                if not f.ndjson and errors and not resources:
                    continue  # nothing of it could be stored: a rerun tries it again
                await journal.record(
                    f.report.sha256, path=str(f.path), size=f.report.size,
                    status=ImportJournal.COMPLETE if unit.last else ImportJournal.RUNNING,
                    position=unit.position, resources=resources, errors=errors, now=self.platform.clock.now())
        return outcomes

    async def _apply(self, repo: Repository, writer: BulkWriter, unit: _Unit) -> _Outcome:
        out = _Outcome(errors=list(unit.errors), failed=unit.failed)
        if unit.failed:
            return out
        try:
            for rtype in {t for b in unit.batches for t in b.counts()}:
                repo.authorize("create", rtype)
        except ParcoursError as err:  # this file is refused; the others go on
            return _Outcome(errors=_entry_errors(err), failed=True)
        if unit.transaction is not None or unit.batch_entries:
            await writer.flush()  # what came before is visible to conditional matches
        if unit.transaction is not None:
            try:
                async with repo.conn.transaction():
                    parsed = [bundles.parse_entry(e, i, self.base_url) for i, e in enumerate(unit.transaction)]
                    responses = await bundles.run_transaction(repo, parsed)
            except ParcoursError as err:
                return _Outcome(errors=_entry_errors(err), failed=True)
            for e, resp in zip(parsed, responses):
                if e.method in ("POST", "PUT", "PATCH") and "location" in (resp.get("response") or {}):
                    out.counts[e.rtype] = out.counts.get(e.rtype, 0) + 1
        for i, raw in unit.batch_entries:
            try:
                async with repo.conn.transaction():
                    entry = bundles.parse_entry(raw, i, self.base_url)
                    resp = await bundles.run_batch_entry(repo, entry)
            except ParcoursError as err:
                out.errors.extend(_entry_errors(err, i))
                continue
            if entry.method in ("POST", "PUT", "PATCH") and "location" in (resp.get("response") or {}):
                out.counts[entry.rtype] = out.counts.get(entry.rtype, 0) + 1
        for b in unit.batches:
            await writer.add(b)
            for t, n in b.counts().items():
                out.counts[t] = out.counts.get(t, 0) + n
        return out

    async def _apply_ruled(self, repo: Repository, unit: _Unit, out: _Outcome) -> None:
        for index, rtype, rid, method, resource in unit.ruled:
            try:
                async with repo.conn.transaction():
                    if method == "PUT":
                        await repo.update(rtype, rid, resource)
                    else:
                        await repo.create(rtype, resource, rid=rid)
            except ParcoursError as err:
                if unit.atomic:  # the group rolls back; alone, this Bundle fails whole
                    raise _Refused(_entry_errors(err, index)) from None
                out.errors.extend(_entry_errors(err, index))
                continue
            out.counts[rtype] = out.counts.get(rtype, 0) + 1

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self._bytes_done, self._bytes_total, self._written)


def _db_errors(err: Exception) -> list[EntryError]:
    if isinstance(err, ParcoursError):
        return _entry_errors(err)
    diag = getattr(err, "diag", None)
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return [EntryError(None, f"The database refused the data: {first}" + (f" ({detail})" if detail else ""))]


async def import_paths(platform: Platform, caller: Caller, paths: Sequence[Path], **options: Any) -> ImportReport:
    """Import files or folders; see :class:`Importer` for the options."""
    return await Importer(platform, caller, **options).run(paths)
