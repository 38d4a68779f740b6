"""``parcours import PATH...``: bulk load FHIR Bundles and NDJSON files (a thin adapter
over :mod:`parcours.services.importer`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from parcours.core.settings import Settings

if TYPE_CHECKING:
    from parcours.services.importer import ImportReport

MAX_ERRORS_SHOWN = 20  # per file; the JSON report (--report) has them all


def import_files(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders: *.json (a Bundle or a resource), *.ndjson, *.ndjson.gz; folders are read recursively", exists=True)],
    force: Annotated[bool, typer.Option("--force", help="Import again the files the journal says were imported")] = False,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Validate every resource as the API does (0.3 to 1 ms each, the largest cost of an import). --no-validate is for trusted sources only, such as an $export of another Parcours: invalid resources would be stored as they are")] = True,
    workers: Annotated[int | None, typer.Option(help="Processes that parse, validate and index (default: one per core, none for small imports)")] = None,
    batch_size: Annotated[int, typer.Option(help="Resources per transaction")] = 5000,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the whole report, every error included, as JSON to this file")] = None,
    summary: Annotated[bool, typer.Option("--summary", help="Print the totals and the files with problems only, not one line per file")] = False,
) -> None:
    """Import FHIR data: transaction, batch, collection and searchset Bundles, single resources, NDJSON.

    Resumable: a journal in the database records each imported file (by sha256), so a rerun skips it (unless --force); a file interrupted half-way is done again without duplicates.

    Exit status 1 when a file failed or a resource was rejected.
    """
    from parcours.security.caller import SYSTEM
    from parcours.services.importer import import_paths
    from parcours.services.platform import Platform
    from parcours.store import db, migrate

    out = Console()
    err = Console(stderr=True)
    settings = Settings()
    uri = db.libpq_url(settings)
    migrate.upgrade(uri)
    started = time.perf_counter()
    with Progress(
        SpinnerColumn(), TextColumn("[bold]Importing"), BarColumn(), DownloadColumn(),
        TextColumn("{task.fields[resources]:>9,} resources"), TextColumn("{task.fields[rate]:>8,.0f} res/s"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as bar:
        task = bar.add_task("import", total=None, resources=0, rate=0.0)

        def progress(done: int, total: int, resources: int) -> None:
            elapsed = time.perf_counter() - started
            bar.update(task, completed=done, total=total, resources=resources, rate=resources / elapsed if elapsed else 0.0)

        async def run() -> ImportReport:
            platform = await Platform.start(settings.model_copy(update={"database_url": uri}), run_migrations=False)
            try:
                return await import_paths(platform, SYSTEM, paths, validate=validate, force=force, workers=workers,
                                          batch_size=batch_size, progress=progress)
            finally:
                await platform.close()

        result = asyncio.run(run())
    if report is not None:
        report.write_bytes(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2))
    _print(out, result, summary)
    raise typer.Exit(0 if result.ok else 1)


_STYLE = {"imported": "green", "partial": "yellow", "skipped": "dim", "ignored": "dim", "failed": "bold red"}


def _print(out: Console, result: ImportReport, summary: bool) -> None:
    table = Table(title="Import", show_lines=False, expand=False)
    for name, kw in (("file", {"overflow": "fold"}), ("status", {}), ("resources", {"justify": "right"}),
                     ("by type", {"overflow": "fold"}), ("rejected", {"justify": "right"})):
        table.add_column(name, **kw)  # type: ignore[arg-type]
    for f in result.files:
        if summary and f.status != "failed" and not f.errors:
            continue
        by_type = ", ".join(f"{t} {n}" for t, n in sorted(f.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        status = f"[{_STYLE.get(f.status, 'default')}]{f.status}[/]" + (f" [dim]({escape(f.note)})[/]" if f.note else "")
        table.add_row(escape(f.path), status, f"{f.resources:,}", by_type, str(len(f.errors)) if f.errors else "")
    if table.rows:
        out.print(table)
    for f in result.files:
        if not f.errors:
            continue
        out.print(f"[bold]{escape(f.path)}[/]: {len(f.errors)} rejected")
        for e in f.errors[:MAX_ERRORS_SHOWN]:
            where = "file" if e.index is None else (f"line {e.index}" if f.path.endswith((".ndjson", ".ndjson.gz")) else f"entry {e.index}")
            out.print(f"  {where}: {escape(e.message)}", soft_wrap=True)
        if len(f.errors) > MAX_ERRORS_SHOWN:
            out.print(f"  ... and {len(f.errors) - MAX_ERRORS_SHOWN} more (--report FILE lists them all)")
    statuses: dict[str, int] = {}
    for f in result.files:
        statuses[f.status] = statuses.get(f.status, 0) + 1
    out.print(
        f"[bold]{len(result.files)} files[/] ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
        f"[bold]{result.resources:,} resources[/] in {result.elapsed:.1f} s ({result.rate:,.0f} resources/s, "
        f"validation {'on' if result.validated else 'off'}); {result.errors} rejected")
    if result.counts:
        out.print("  " + ", ".join(f"{t} {n:,}" for t, n in result.counts.items()), soft_wrap=True)
