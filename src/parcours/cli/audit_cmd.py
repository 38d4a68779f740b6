"""``parcours audit``: seal and verify the tamper-evident audit trail."""

from __future__ import annotations

import asyncio

import psycopg
import typer
from rich.console import Console

from parcours.core.settings import Settings
from parcours.store import audit, db, migrate

app = typer.Typer(help="The audit trail.", no_args_is_help=True)
console = Console()


async def _seal_all(uri: str) -> int:
    total = 0
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        while n := await audit.seal(conn):
            total += n
    return total


def _uri() -> str:
    uri = db.libpq_url(Settings())
    migrate.upgrade(uri)
    return uri


@app.command("seal")
def seal_cmd() -> None:
    """Seal every entry that can be sealed now."""
    console.print(f"{asyncio.run(_seal_all(_uri()))} entries sealed")


@app.command("verify")
def verify_cmd() -> None:
    """Recompute the hash chain; exit 1 and say where when an entry was changed, deleted or inserted."""
    uri = _uri()
    asyncio.run(_seal_all(uri))
    with psycopg.connect(uri, autocommit=True) as conn:
        report = audit.verify(conn)
    if report.ok:
        console.print(f"[green]Audit trail intact[/]: {report.checked} entries verified")
        return
    console.print(f"[red]Audit trail damaged[/] ({report.checked} entries checked):")
    for p in report.problems:
        console.print(f"  - {p}")
    raise typer.Exit(1)
