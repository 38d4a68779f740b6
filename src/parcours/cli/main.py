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
    mllp_port: Annotated[int | None, typer.Option(help="Also receive HL7 v2 lab results over MLLP on this port")] = None,
) -> None:
    """Serve the platform (FHIR API at /fhir)."""
    import uvicorn

    from parcours.store import db, migrate

    settings = Settings()
    if "PARCOURS_BASE_URL" not in os.environ:
        os.environ["PARCOURS_BASE_URL"] = f"http://{host}:{port}"
    if mllp_port is not None:  # every worker listens (SO_REUSEPORT); read by the app's settings
        os.environ["PARCOURS_MLLP_PORT"] = str(mllp_port)
        os.environ.setdefault("PARCOURS_MLLP_HOST", host)
    uri = db.libpq_url(settings)  # starts the embedded server once, for all workers
    migrate.upgrade(uri)
    console.print(f"[bold green]Parcours[/] on http://{host}:{port}  (FHIR base http://{host}:{port}/fhir, database {db.describe(uri)})")
    if os.environ.get("PARCOURS_HTTP_SERVER", "uvicorn") == "granian":  # for comparisons (bench/run.py)
        _serve_granian(host, port, workers, log_level)
        return
    uvicorn.run("parcours.web.asgi:app", host=host, port=port, workers=workers, log_level=log_level,
                loop="uvloop", http="httptools", access_log=False, lifespan="on")


def _serve_granian(host: str, port: int, workers: int, log_level: str) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    Granian("parcours.web.asgi:app", address=host, port=port, interface=Interfaces.ASGI, workers=workers,
            loop=Loops.uvloop, http=HTTPModes.http1, log_level=log_level, log_access=False).serve()


@app.command("migrate")
def migrate_cmd() -> None:
    """Apply database migrations."""
    from parcours.store import db, migrate

    uri = db.libpq_url(Settings())
    migrate.upgrade(uri)
    console.print(f"Database {db.describe(uri)} at revision {migrate.current(uri)}")


@app.command()
def token(
    scope: Annotated[str | None, typer.Option(help="Space-separated scopes (default: 'system/*.*', or the user's role scopes)")] = None,
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
        from parcours.cli import users

        print(users.user_token(settings, user, scope.split() if scope else None, lifetime))
        return
    print(tokens.issue(key, subject="system", kind="system", scopes=(scope or "system/*.*").split(), lifetime_s=lifetime))


from parcours.cli import audit_cmd  # noqa: E402

app.add_typer(audit_cmd.app, name="audit")

from parcours.cli import users  # noqa: E402

app.add_typer(users.app, name="user")

from parcours.cli import clients  # noqa: E402

app.add_typer(clients.app, name="client")

from parcours.cli import import_cmd  # noqa: E402

app.command("import")(import_cmd.import_files)

from parcours.cli import directory_cmd  # noqa: E402

app.add_typer(directory_cmd.app, name="directory")
app.add_typer(directory_cmd.demo_app, name="demo-data")

from parcours.cli import record_cmd  # noqa: E402

app.add_typer(record_cmd.keys_app, name="keys")
app.add_typer(record_cmd.record_app, name="record")

from parcours.cli import demo_cmd  # noqa: E402

app.command("demo")(demo_cmd.demo)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs this process runs at once")] = 1,
    once: Annotated[bool, typer.Option(help="Run the jobs waiting now, then exit")] = False,
) -> None:
    """Run bulk $export jobs beside the servers (which run them too); workers on any node share the queue."""
    from parcours.services import export

    asyncio.run(export.serve_workers(Settings(), concurrency=concurrency, once=once))

@app.command("expertise-reminders")
def expertise_reminders() -> None:
    """Send the due-date reminders of open tele-expertise requests once (the servers do it every minute too)."""
    from parcours.services.booking.notify import Notifier
    from parcours.services.platform import Platform
    from parcours.services.telehealth import expertise_reminders as reminders

    async def run() -> int:
        platform = await Platform.start(Settings())
        try:
            return await reminders.run_due(platform, Notifier.from_settings(platform.settings).email)
        finally:
            await platform.close()

    typer.echo(f"{asyncio.run(run())} reminder e-mail(s) sent")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

from parcours.cli import booking_cmd  # noqa: E402

app.add_typer(booking_cmd.app, name="booking")
