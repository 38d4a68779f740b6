"""Bulk Data ``$export`` (FHIR Bulk Data Access IG v2): kick-off, status, files and the job runner.

``check_request`` validates a kick-off; ``do_kick_off`` queues a durable job and
answers at once. Workers (``Worker``: one in each server process, any number of
``parcours worker`` on any node) share the queue in PostgreSQL: a job is claimed
with ``FOR UPDATE SKIP LOCKED`` and held by a lease renewed by heartbeats, so a
job whose worker died is taken up again by another one.

A job reads through the Repository of the caller who asked for it: the access
policy decides per resource type (what the caller may not read is left out,
with a warning when the client named the type in ``_type``). Each type is read
by one statement, so from one snapshot; ``transactionTime`` is the kick-off
instant and nothing changed after it is exported (the next export, with
``_since`` = this transactionTime, picks those changes up).

Files are NDJSON, one or more per type (a new file every ``file_lines``
resources), under ``$PARCOURS_HOME/exports/<job>/``. The directory is recorded
in the job, so any node that shares that storage serves the files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
import psycopg
from psycopg import AsyncConnection

from parcours.core.errors import BadRequest, Forbidden, Issue, NotFound
from parcours.core.ids import new_id
from parcours.core.settings import Settings
from parcours.fhir.datatypes import parse_date_range
from parcours.security.caller import Caller
from parcours.security.policy import may_export
from parcours.services.platform import Platform
from parcours.store import export_jobs as jobs
from parcours.store.repository import Stored

log = logging.getLogger(__name__)

OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
# Optional kick-off parameters of the IG this server does not implement: ignored
# with a warning, or a 400 under ``Prefer: handling=strict``.
UNSUPPORTED = frozenset({"_elements", "_typeFilter", "patient", "includeAssociatedData"})
NDJSON = "application/fhir+ndjson"

RETENTION = timedelta(hours=24)  # files of a finished job stay this long (or until DELETE)
LEASE = timedelta(seconds=60)  # a running job whose worker has not beaten for this long is taken over
BEAT_EVERY_S = 5.0  # heartbeat within a long type
BEAT_MIN_S = 1.0  # between types (so a cancel is seen within about a second)
MAX_ATTEMPTS = 3  # claims of one job (a job that kills its worker every time fails in the end)
PURGE_EVERY_S = 60.0


# -- kick-off ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportRequest:
    level: str  # system | patient | group
    group_id: str | None
    types: tuple[str, ...] | None  # None: every type the level covers
    since: datetime | None
    output_format: str
    request_url: str
    warnings: tuple[Issue, ...] = ()


def check_request(platform: Platform, level: str, params: list[tuple[str, str]], *, request_url: str,
                  respond_async: bool, strict: bool, group_id: str | None = None) -> ExportRequest:
    """Validate a kick-off request (400 with the reason when it cannot be accepted)."""
    if not respond_async:
        raise BadRequest("$export runs asynchronously: send the header 'Prefer: respond-async'")
    reg = platform.registry
    warnings: list[Issue] = []
    fmt, since, types = NDJSON, None, None
    for name, value in params:
        if name == "_outputFormat":
            # An unencoded '+' reaches us as a space.
            fmt = value.strip().replace(" ", "+")
            if fmt not in OUTPUT_FORMATS:
                raise BadRequest(f"_outputFormat {value!r} is not supported: use application/fhir+ndjson")
        elif name == "_since":
            value = value.strip().replace(" ", "+")  # an unencoded "+01:00" arrives as " 01:00"
            rng = parse_date_range(value) if value else None
            if rng is None:
                raise BadRequest(f"_since must be an instant such as 2024-01-01T00:00:00Z, got {value!r}")
            since = rng[0]
        elif name == "_type":
            types = (types or []) + [t.strip() for t in value.split(",") if t.strip()]
        elif name in ("_format", "_pretty"):
            continue
        else:
            what = "is not supported" if name in UNSUPPORTED else "is not a parameter of $export"
            if strict:
                raise BadRequest(f"{name} {what} (Prefer: handling=strict)")
            warnings.append(Issue("not-supported", f"The parameter {name} {what}; it was ignored", severity="warning"))
    if types is not None:
        unknown = [t for t in types if not reg.is_type(t)]
        if unknown:
            raise BadRequest(f"_type names unknown resource types: {', '.join(unknown)}")
        types = list(dict.fromkeys(types))
        if level != "system":
            outside = [t for t in types if t not in reg.patient_compartment]
            types = [t for t in types if t in reg.patient_compartment]
            if not types:
                raise BadRequest(f"A {level}-level export covers the Patient compartment; {', '.join(outside)} is not in it")
            if outside:
                warnings.append(Issue("not-supported", f"Not in the Patient compartment, so not exported: {', '.join(outside)}",
                                      severity="warning"))
    return ExportRequest(level, group_id, tuple(types) if types is not None else None, since, fmt, request_url, tuple(warnings))


async def do_kick_off(platform: Platform, caller: Caller, req: ExportRequest) -> str:
    """Queue the export job; returns its id. A Group export checks the Group now."""
    allowed = may_export(caller, req.level)
    if not allowed.allowed:
        raise Forbidden(allowed.reason)
    job = new_job(platform, caller, req)
    async with platform.transaction(caller) as repo:
        if req.level == "group":
            await repo.read("Group", req.group_id or "")
        await jobs.insert_job(repo.conn, job)
    return str(job["id"])


def new_job(platform: Platform, caller: Caller, req: ExportRequest) -> dict[str, Any]:
    """The row of a new job; its transactionTime is now."""
    now = platform.clock.now()
    return {
        "id": new_id(), "level": req.level, "group_id": req.group_id,
        "types": list(req.types) if req.types is not None else None, "since": req.since,
        "output_format": req.output_format, "request": req.request_url, "owner": _owner(caller),
        "caller": _caller_json(caller), "file_lines": platform.settings.export_file_lines,
        "transaction_time": now, "created": now, "progress": "queued",
        "issues": [i.to_fhir() for i in req.warnings],
    }


# -- status, files, cancel ----------------------------------------------------------------------
async def access_job(platform: Platform, caller: Caller, job_id: str) -> dict[str, Any]:
    """The job, for its owner only (another caller gets the same 404 as for no job)."""
    async with _tx(platform) as conn:
        job = await jobs.get_job(conn, job_id)
    if job is None or job["status"] == jobs.CANCELLED or job["owner"] != _owner(caller):
        raise NotFound(f"No export job {job_id}")
    return job


def manifest(job: dict[str, Any], base: str) -> dict[str, Any]:
    def url(name: str) -> str:
        return f"{base}/$export-file/{job['id']}/{name}"

    return {
        "transactionTime": _instant(job["transaction_time"]),
        "request": job["request"],
        "requiresAccessToken": True,
        "output": [{"type": f["type"], "url": url(f["file"]), "count": f["count"]} for f in job["output"]],
        "error": [{"type": "OperationOutcome", "url": url(f["file"])} for f in job["error"]],
    }


async def access_file(platform: Platform, caller: Caller, job_id: str, name: str) -> Path:
    job = await access_job(platform, caller, job_id)
    if job["status"] != jobs.DONE or name not in {f["file"] for f in job["output"] + job["error"]}:
        raise NotFound(f"Export job {job_id} has no file {name!r}")
    path = Path(job["directory"]) / name
    if not path.is_file():
        raise NotFound(f"The file {name!r} of export job {job_id} is no longer available")
    return path


async def do_cancel(platform: Platform, caller: Caller, job_id: str) -> None:
    """DELETE on the status URL: stop a job, or delete a finished one and its files."""
    now = platform.clock.now()
    async with _tx(platform) as conn:
        job = await jobs.get_job(conn, job_id, lock=True)
        if job is None or job["status"] == jobs.CANCELLED or job["owner"] != _owner(caller):
            raise NotFound(f"No export job {job_id}")
        if job["status"] == jobs.RUNNING:
            # Its worker sees this at its next heartbeat, stops and removes the files;
            # the purge removes what a dead worker left after its lease.
            await jobs.set_status(conn, job_id, jobs.CANCELLED, expires=now + LEASE)
            return
        await jobs.delete_job(conn, job_id)
    await _remove(job["directory"])


# -- workers ------------------------------------------------------------------------------------
class JobStopped(Exception):
    """The job was cancelled or taken over, or this worker is stopping."""


class Worker:
    """Claims jobs and runs them; many workers (tasks, processes, nodes) share one queue."""

    def __init__(self, platform: Platform, *, poll_interval: float = 5.0, name: str | None = None) -> None:
        self.platform = platform
        self.poll_interval = poll_interval
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        self.stop = asyncio.Event()
        self._next_purge = 0.0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run jobs until ``stop`` is set; woken by NOTIFY when a job is queued, polling as a fallback."""
        if stop is not None:
            self.stop = stop
        listener: AsyncConnection | None = None
        try:
            while not self.stop.is_set():
                try:
                    if listener is None or listener.closed:
                        # Listen before looking at the queue, so no job queued in between is missed.
                        listener = await psycopg.AsyncConnection.connect(self.platform.uri, autocommit=True)
                        await jobs.listen(listener)
                    if await self.run_once():
                        continue
                    if time.monotonic() >= self._next_purge:
                        await self.purge()
                        self._next_purge = time.monotonic() + PURGE_EVERY_S
                    await self._wait(listener)
                except Exception:
                    log.warning("Export worker %s: error, retrying shortly", self.name, exc_info=True)
                    if listener is not None:
                        await listener.close()
                    listener = None
                    await self._sleep(2.0)
        finally:
            if listener is not None:
                await listener.close()

    async def run_once(self) -> bool:
        """Claim one job and run it; False when none was waiting."""
        now = self.platform.clock.now()
        root = self.platform.settings.resolved_home() / "exports"
        async with _tx(self.platform) as conn:
            job = await jobs.claim(conn, self.name, now, now - LEASE, str(root))
        if job is None:
            return False
        if job["attempts"] > MAX_ATTEMPTS:
            await self._finish(job, jobs.FAILED, progress=f"failed: given up after {MAX_ATTEMPTS} attempts")
            return True
        try:
            output, errors = await self._export(job)
        except JobStopped:
            await self._abandon(job)
        except Exception as e:
            log.exception("Export job %s failed", job["id"])
            if not await self._finish(job, jobs.FAILED, progress=f"failed: {type(e).__name__}: {e}"):
                await self._abandon(job)
        else:
            if not await self._finish(job, jobs.DONE, progress="done", output=output, error=errors):
                await self._abandon(job)
        return True

    async def purge(self) -> None:
        """Delete expired jobs and their files."""
        async with _tx(self.platform) as conn:
            gone = await jobs.expired(conn, self.platform.clock.now())
        for _, directory in gone:
            await _remove(directory)

    # -- one job ---------------------------------------------------------------------------
    async def _export(self, job: dict[str, Any]) -> tuple[list[dict], list[dict]]:
        p, caller = self.platform, _caller_from(job["caller"])
        directory = Path(job["directory"])
        await asyncio.to_thread(_fresh_dir, directory)
        issues = [Issue(i["code"], i["diagnostics"], i.get("severity", "error")) for i in job["issues"]]
        patients: list[str] | None = None
        if job["level"] == "group":
            async with p.transaction(caller) as repo:
                patients = group_patients((await repo.read("Group", job["group_id"])).resource(), p.settings.fhir_base)
        named = job["types"] is not None
        types = list(job["types"]) if named else (
            list(p.registry.resource_types) if job["level"] == "system" else list(p.registry.patient_compartment))
        output: list[dict] = []
        total = 0
        # One read-committed transaction: each type is one statement, with its own snapshot
        # while it runs, so a long job holds back no vacuum.
        last_beat = 0.0
        async with p.transaction(caller) as repo:
            for n, rtype in enumerate(types):
                if self.stop.is_set() or time.monotonic() - last_beat > BEAT_MIN_S:
                    await self._beat(job, f"{n}/{len(types)} types, {total} resources")
                    last_beat = time.monotonic()
                files = _TypeFiles(directory, rtype, job["file_lines"])
                # aclosing: the server-side cursor is closed here, on this connection, even when
                # the loop is left early (cancel, error), not later by the garbage collector.
                batches = repo.export_iter(rtype, since=job["since"], until=job["transaction_time"], patients=patients,
                                           any_patient=job["level"] == "patient")
                try:
                    async with aclosing(batches):
                        async for batch in batches:
                            await files.write(batch)
                            total += len(batch)
                            if time.monotonic() - last_beat > BEAT_EVERY_S:
                                await self._beat(job, f"{n}/{len(types)} types ({rtype}), {total} resources")
                                last_beat = time.monotonic()
                except Forbidden as e:
                    # Refused before any statement ran. Types the client did not name and may
                    # not read are left out silently.
                    if named:
                        issues.append(Issue("forbidden", f"{rtype} was not exported: {e.message}", severity="warning"))
                finally:
                    files.close()
                output.extend(files.files)
        errors = []
        if issues:
            lines = [orjson.dumps({"resourceType": "OperationOutcome", "issue": [i.to_fhir()]}).decode() for i in issues]
            await asyncio.to_thread((directory / "OperationOutcome-1.ndjson").write_text, "\n".join(lines) + "\n", "utf-8")
            errors.append({"type": "OperationOutcome", "file": "OperationOutcome-1.ndjson", "count": len(lines)})
        return output, errors

    async def _beat(self, job: dict[str, Any], progress: str) -> None:
        if self.stop.is_set():
            raise JobStopped()
        async with _tx(self.platform) as conn:
            if not await jobs.beat(conn, job["id"], self.name, self.platform.clock.now(), progress):
                raise JobStopped()

    async def _finish(self, job: dict[str, Any], status: str, *, progress: str, output: list | None = None,
                      error: list | None = None) -> bool:
        now = self.platform.clock.now()
        values = {"status": status, "finished": now, "progress": progress, "expires": now + RETENTION,
                  "output": output or [], "error": error or []}
        async with _tx(self.platform) as conn:
            return await jobs.finish(conn, job["id"], self.name, values)

    async def _abandon(self, job: dict[str, Any]) -> None:
        """Leave a job this worker no longer runs: cancelled or gone (remove the files),
        taken over by another worker (leave them), or this worker stopping (requeue it)."""
        async with _tx(self.platform) as conn:
            if self.stop.is_set() and await jobs.release(conn, job["id"], self.name):
                return
            current = await jobs.get_job(conn, job["id"])
            if current is not None and current["status"] == jobs.CANCELLED:
                await jobs.delete_job(conn, job["id"])
        if current is None or current["status"] == jobs.CANCELLED:
            await _remove(job["directory"])

    async def _wait(self, listener: AsyncConnection) -> None:
        """Until a job is queued (NOTIFY), the poll interval passes, or the worker stops."""
        deadline = time.monotonic() + self.poll_interval
        while not self.stop.is_set() and time.monotonic() < deadline:
            async for _ in listener.notifies(timeout=min(0.5, self.poll_interval), stop_after=1):
                return

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass


def start_in_background(platform: Platform) -> Callable[[], Awaitable[None]]:
    """Run a worker in this (server) process; await the returned function to stop it.

    A job running at shutdown is put back in the queue for another worker."""
    if not platform.settings.export_worker:
        return _nothing
    worker = Worker(platform)
    task = asyncio.create_task(worker.run(), name=f"export-worker {worker.name}")

    async def stop() -> None:
        worker.stop.set()
        try:
            await asyncio.wait_for(task, 15)
        except TimeoutError:
            task.cancel()
        except Exception:
            log.exception("The export worker ended with an error")

    return stop


async def serve_workers(settings: Settings, *, concurrency: int = 1, once: bool = False) -> None:
    """``parcours worker``: run export jobs until SIGINT/SIGTERM (or, with ``once``, until the queue is empty)."""
    platform = await Platform.start(settings)
    try:
        if once:
            while await Worker(platform).run_once():
                pass
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await asyncio.gather(*(Worker(platform).run(stop) for _ in range(max(1, concurrency))))
    finally:
        await platform.close()


# -- helpers ------------------------------------------------------------------------------------
def group_patients(group: dict[str, Any], base: str) -> list[str]:
    """The ids of the patients a Group lists as active members."""
    out: list[str] = []
    for m in group.get("member") or []:
        if not isinstance(m, dict) or m.get("inactive") is True:
            continue
        ref = str((m.get("entity") or {}).get("reference") or "")
        if ref.startswith(base.rstrip("/") + "/"):
            ref = ref[len(base.rstrip("/")) + 1 :]
        kind, _, rid = ref.partition("/")
        if kind == "Patient" and rid and "/" not in rid:
            out.append(rid)
    return list(dict.fromkeys(out))


class _TypeFiles:
    """The NDJSON files of one resource type: a new file every ``lines`` resources."""

    def __init__(self, directory: Path, rtype: str, lines: int) -> None:
        self.directory, self.rtype, self.lines = directory, rtype, max(1, lines)
        self.files: list[dict[str, Any]] = []
        self._fh: IO[str] | None = None

    async def write(self, batch: list[Stored]) -> None:
        await asyncio.to_thread(self._write, [s.content for s in batch if s.content])

    def _write(self, contents: list[str]) -> None:
        i = 0
        while i < len(contents):
            if self._fh is None or self.files[-1]["count"] >= self.lines:
                self.close()
                name = f"{self.rtype}-{len(self.files) + 1}.ndjson"
                self._fh = open(self.directory / name, "w", encoding="utf-8")
                self.files.append({"type": self.rtype, "file": name, "count": 0})
            part = contents[i : i + self.lines - self.files[-1]["count"]]
            # Stored JSON is one line: orjson never writes raw newlines.
            self._fh.write("\n".join(part) + "\n")
            self.files[-1]["count"] += len(part)
            i += len(part)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@asynccontextmanager
async def _tx(platform: Platform) -> AsyncIterator[AsyncConnection]:
    """A short transaction for the job queue (not resource data: that goes through a Repository)."""
    async with platform.pool.connection() as conn:
        async with conn.transaction():
            yield conn


def _owner(caller: Caller) -> str:
    return f"{caller.kind}:{caller.user_id or caller.display}"


def _caller_json(caller: Caller) -> dict[str, Any]:
    return {"kind": caller.kind, "user_id": caller.user_id, "fhir_user": caller.fhir_user,
            "scopes": sorted(caller.scopes), "display": caller.display}


def _caller_from(data: dict[str, Any]) -> Caller:
    return Caller(kind=data["kind"], user_id=data.get("user_id"), fhir_user=data.get("fhir_user"),
                  scopes=frozenset(data.get("scopes") or ()), display=data.get("display") or "")


def _instant(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fresh_dir(directory: Path) -> None:
    # A job taken over after a crash starts again from nothing.
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


async def _remove(directory: str | None) -> None:
    if directory:
        await asyncio.to_thread(shutil.rmtree, directory, True)


async def _nothing() -> None:
    return None
