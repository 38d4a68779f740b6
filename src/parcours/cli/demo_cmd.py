"""``parcours demo``: load the demo region and accounts, print the logins, serve."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

import typer
from rich.console import Console

from parcours.core.settings import Settings

console = Console()


def demo(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    region: Annotated[str, typer.Option(help="INSEE region code of the demo region")] = "32",
    roles: Annotated[int, typer.Option(help="About how many practitioner roles")] = 1500,
    load_only: Annotated[bool, typer.Option("--load-only", help="Load the demo data and exit")] = False,
) -> None:
    """Start Parcours with a realistic demo region (Hauts-de-France by default)."""
    from parcours.services import demo as demo_data
    from parcours.services.platform import Platform
    from parcours.store import db, migrate

    os.environ.setdefault("PARCOURS_BASE_URL", f"http://{host}:{port}")
    settings = Settings()
    uri = db.libpq_url(settings)
    migrate.upgrade(uri)

    async def load() -> tuple[list, dict]:
        platform = await Platform.start(settings.model_copy(update={"database_url": uri}), run_migrations=False)
        try:
            return await demo_data.load(platform, region=region, roles=roles)
        finally:
            await platform.close()

    started = time.perf_counter()
    with console.status("Loading the demo region…"):
        logins, counts = asyncio.run(load())
    if counts:
        console.print(f"Demo region {region} loaded in {time.perf_counter() - started:.0f} s: "
                      + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    console.print(f"\n[bold]Parcours demo[/] — open http://{host}:{port}/\n")
    console.print("Demo logins:")
    for login in logins:
        factor = "  + TOTP code" if login.totp else ""
        console.print(f"  {login.role:<13} {login.email:<32} {login.who}{factor}", soft_wrap=True)
    console.print(f"Password for every demo account: [bold]{demo_data.PASSWORD}[/]")
    console.print(f"Professional accounts also ask for a TOTP code: add the secret {demo_data.DEMO_TOTP_SECRET} "
                  "to an authenticator app, or run `oathtool --totp -b SECRET`.", soft_wrap=True)
    console.print(f"FHIR API: http://{host}:{port}/fhir  (token: `parcours token --scope 'system/*.*'`)")
    if load_only:
        return
    from parcours.cli.main import serve

    serve(host=host, port=port, workers=1, log_level="warning")
