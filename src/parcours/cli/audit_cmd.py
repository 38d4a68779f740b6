"""``parcours audit``: seal and verify the tamper-evident audit trail."""

from __future__ import annotations

import psycopg
import typer
from rich.console import Console

from parcours.core.settings import Settings
from parcours.store import audit, db, migrate

app = typer.Typer(help="The audit trail.", no_args_is_help=True)
console = Console()


def _conn() -> psycopg.Connection:
    uri = db.libpq_url(Settings())
    migrate.upgrade(uri)
    return psycopg.connect(uri, autocommit=True)


@app.command("seal")
def seal_cmd() -> None:
    """Seal every entry that can be sealed now."""
    with _conn() as conn:
        total = 0
        while n := audit.seal(conn):
            total += n
    console.print(f"{total} entries sealed")


@app.command("verify")
def verify_cmd() -> None:
    """Recompute the hash chain; exit 1 and say where when an entry was changed, deleted or inserted."""
    with _conn() as conn:
        while audit.seal(conn):
            pass
        report = audit.verify(conn)
    if report.ok:
        console.print(f"[green]Audit trail intact[/]: {report.checked} entries verified")
        return
    console.print(f"[red]Audit trail damaged[/] ({report.checked} entries checked):")
    for p in report.problems:
        console.print(f"  - {p}")
    raise typer.Exit(1)
