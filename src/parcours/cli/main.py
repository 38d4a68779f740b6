"""The ``parcours`` command: serve, migrate, token, import, ..."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from parcours.core.settings import Settings

app = typer.Typer(help="Parcours: territorial e-health and telehealth platform.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (production: one per core)")] = 1,
    log_level: Annotated[str, typer.Option(help="Log level")] = "warning",
) -> None:
    """Serve the platform (FHIR API at /fhir)."""
    import uvicorn

    from parcours.store import db, migrate

    settings = Settings()
    if "PARCOURS_BASE_URL" not in os.environ:
        os.environ["PARCOURS_BASE_URL"] = f"http://{host}:{port}"
    uri = db.libpq_url(settings)  # starts the embedded server once, for all workers
    migrate.upgrade(uri)
    console.print(f"[bold green]Parcours[/] on http://{host}:{port}  (FHIR base http://{host}:{port}/fhir, database {db.describe(uri)})")
    uvicorn.run("parcours.web.asgi:app", host=host, port=port, workers=workers, log_level=log_level,
                loop="uvloop", http="httptools", access_log=False, lifespan="on")


@app.command("migrate")
def migrate_cmd() -> None:
    """Apply database migrations."""
    from parcours.store import db, migrate

    uri = db.libpq_url(Settings())
    migrate.upgrade(uri)
    console.print(f"Database {db.describe(uri)} at revision {migrate.current(uri)}")


@app.command()
def token(
    scope: Annotated[str, typer.Option(help="Space-separated scopes, e.g. 'system/*.*'")] = "system/*.*",
    user: Annotated[str | None, typer.Option(help="E-mail of the user the token is for")] = None,
    lifetime: Annotated[int, typer.Option(help="Lifetime in seconds")] = 3600 * 24,
) -> None:
    """Print a bearer token for automation (or for a user)."""
    from parcours.security import tokens
    from parcours.services.platform import TOKEN_KEY
    from parcours.store import db, migrate, secrets

    settings = Settings()
    uri = db.libpq_url(settings)
    migrate.upgrade(uri)
    key = settings.secret_key or secrets.get_or_create(uri, TOKEN_KEY)
    if user:
        console.print("[red]User accounts are not available yet: use --scope with a system scope.[/]")
        raise typer.Exit(2)
    print(tokens.issue(key, subject="system", kind="system", scopes=scope.split(), lifetime_s=lifetime))


from parcours.cli import audit_cmd  # noqa: E402

app.add_typer(audit_cmd.app, name="audit")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
