#!/usr/bin/env python3
"""Bulk import against raw COPY, on the Synthea set (``make bench`` runs this).

1. Import ``synthea-r4-smart`` (114 transaction Bundles, 15,994 resources) with the
   import service (``parcours import`` without its terminal output) into a fresh,
   migrated database: without validation (``--no-validate``) ``--runs`` times, then
   with validation once. Each run gets its own database, cloned from a migrated
   template so that migrations are not timed.
2. COPY the same resources (their JSON as in the files, compact) as ``jsonb`` rows into
   a one-column table, ``--runs`` times: what PostgreSQL alone does with this data.
3. Print one JSON object: the medians, and the ratio of import to COPY speed (the
   target is a third).

The server is ``DATABASE_URL`` when set (databases are created and dropped there),
otherwise an embedded PostgreSQL in a temporary folder. ``--data`` points at another
folder of Bundles or NDJSON files.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import orjson  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from parcours.core.settings import Settings  # noqa: E402
from parcours.security.caller import SYSTEM  # noqa: E402
from parcours.services.importer import find_files, import_paths  # noqa: E402
from parcours.services.platform import Platform  # noqa: E402
from parcours.store import db, migrate  # noqa: E402

SYNTHEA = ROOT.parent / "shared" / "data" / "synthea-r4-smart"
TARGET_RATIO = 1 / 3


def _with_db(uri: str, name: str) -> str:
    return urlparse(uri)._replace(path="/" + name).geturl()


def _create(admin: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        q = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            q = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(q)


def _drop(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _import(uri: str, data: Path, validate: bool, workers: int | None) -> dict:
    settings = Settings(database_url=uri, db_pool_size=2)
    p = await Platform.start(settings, run_migrations=False)
    try:
        started = time.perf_counter()
        report = await import_paths(p, SYSTEM, [data], validate=validate, force=True, workers=workers)
        wall = time.perf_counter() - started
    finally:
        await p.close()
    if report.failed or report.errors:
        raise SystemExit(f"the import failed: {len(report.failed)} files failed, {report.errors} resources rejected")
    return {"resources": report.resources, "seconds": round(wall, 3), "resources_per_s": round(report.resources / wall, 1)}


def _resources(data: Path) -> list[str]:
    """The JSON text of every resource the import stores, compact, as COPY gets it."""
    out: list[str] = []
    for f in find_files([data]):
        if f.name.endswith((".ndjson", ".ndjson.gz")):
            text = (gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()).decode()
            out += [line for line in text.splitlines() if line.strip()]
            continue
        doc = orjson.loads(f.read_bytes())
        if not isinstance(doc, dict) or "resourceType" not in doc:
            continue
        entries = doc.get("entry") if doc["resourceType"] == "Bundle" and doc.get("type") in ("transaction", "batch", "collection", "searchset") else None
        for r in [e.get("resource") for e in entries or []] if entries is not None else [doc]:
            if isinstance(r, dict):
                out.append(orjson.dumps(r).decode())
    return out


def _raw_copy(uri: str, rows: list[str]) -> dict:
    with psycopg.connect(uri) as conn:
        conn.execute("CREATE TABLE raw_copy (content jsonb)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY raw_copy (content) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((r,))
        conn.commit()
        seconds = time.perf_counter() - started
        conn.execute("DROP TABLE raw_copy")
        conn.commit()
    return {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_s": round(len(rows) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SYNTHEA)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="import worker processes (default: the importer's choice)")
    ap.add_argument("--no-validated-run", action="store_true", help="skip the run with validation")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(json.dumps({"skipped": f"{args.data} is not there"}))
        return
    admin = os.environ.get("DATABASE_URL")
    if admin:
        admin = _with_db(admin, "postgres")
    else:
        tmp = tempfile.TemporaryDirectory(prefix="parcours-import-bench-")
        # atexit runs last-registered first: the embedded server stops, then its folder goes.
        atexit.register(tmp.cleanup)
        admin = _with_db(db.start_embedded(Path(tmp.name)), "postgres")
    tag = uuid.uuid4().hex[:8]
    template = f"import_bench_tpl_{tag}"
    made: list[str] = []
    try:
        _create(admin, template)
        made.append(template)
        migrate.upgrade(_with_db(admin, template))

        def fresh(kind: str, n: int) -> str:
            name = f"import_bench_{kind}_{n}_{tag}"
            _create(admin, name, template)
            made.append(name)
            return _with_db(admin, name)

        plain = [asyncio.run(_import(fresh("plain", n), args.data, False, args.workers)) for n in range(args.runs)]
        validated = None if args.no_validated_run else asyncio.run(_import(fresh("validated", 0), args.data, True, args.workers))
        rows = _resources(args.data)
        copy_uri = fresh("copy", 0)
        copies = [_raw_copy(copy_uri, rows) for _ in range(args.runs)]
    finally:
        for name in reversed(made):
            _drop(admin, name)
    import_rate = statistics.median(r["resources_per_s"] for r in plain)
    copy_rate = statistics.median(c["rows_per_s"] for c in copies)
    out = {
        "ratio_import_to_copy": round(import_rate / copy_rate, 3),
        "target_ratio_to_copy": round(TARGET_RATIO, 3),
        "import_resources_per_s": import_rate,
        "raw_copy_rows_per_s": copy_rate,
        "validated_import_resources_per_s": validated["resources_per_s"] if validated else None,
        "validated_ratio_to_copy": round(validated["resources_per_s"] / copy_rate, 3) if validated else None,
        "resources": plain[0]["resources"],
        "data": str(args.data),
        "runs": {"import_no_validate": plain, "import_validated": validated, "raw_copy": copies},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "server": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded"},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
