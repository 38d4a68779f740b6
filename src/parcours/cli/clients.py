"""``parcours client ...``: register the SMART on FHIR applications that may ask for tokens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from parcours.core.errors import ParcoursError
from parcours.core.settings import Settings

app = typer.Typer(help="SMART on FHIR client applications (apps and backend services).", no_args_is_help=True)
console = Console(stderr=True)


async def _with_platform(fn):  # type: ignore[no-untyped-def]
    from parcours.services.platform import Platform

    platform = await Platform.start(Settings().model_copy(update={"db_pool_size": 2}))
    try:
        async with platform.pool.connection() as conn, conn.transaction():
            return await fn(platform, conn)
    finally:
        await platform.close()


def _fail(e: ParcoursError) -> None:
    console.print(f"[red]{e.code}[/]: {e.message}")
    raise typer.Exit(2 if e.status < 500 else 1)


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Name shown to users on the consent page")],
    type: Annotated[str, typer.Option("--type", help="public (PKCE, no secret) | confidential (secret) | backend (private_key_jwt)")],
    scope: Annotated[str, typer.Option(help="The most this client may be granted, e.g. 'openid fhirUser launch/patient offline_access patient/*.rs'")],
    redirect_uri: Annotated[list[str] | None, typer.Option(help="Redirect URI (repeat for several); not for backend services")] = None,
    jwks_url: Annotated[str | None, typer.Option(help="URL of the client's public JWKS (private_key_jwt)")] = None,
    jwks_file: Annotated[Path | None, typer.Option(help="File holding the client's public JWKS (private_key_jwt)")] = None,
) -> None:
    """Register a client; prints its client_id (and, for a confidential client, its secret, shown once)."""
    from parcours.services import smart

    if jwks_url and jwks_file:
        console.print("[red]Give --jwks-url or --jwks-file, not both[/]")
        raise typer.Exit(2)
    jwks = None
    if jwks_file is not None:
        try:
            jwks = json.loads(jwks_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            console.print(f"[red]Cannot read the JWKS file: {e}[/]")
            raise typer.Exit(2) from None
    new = smart.NewClient(name=name, client_type=type, redirect_uris=list(redirect_uri or []), scope=scope, jwks=jwks,
                          jwks_url=jwks_url)
    try:
        client, secret = asyncio.run(_with_platform(lambda p, conn: smart.register_client(p, conn, new, created_by="cli")))
    except ParcoursError as e:
        _fail(e)
        return
    print(f"client_id: {client.client_id}")
    if secret:
        print(f"client_secret: {secret}")
        console.print("Keep the secret now: only its hash is stored.")


@app.command("list")
def list_cmd() -> None:
    """Registered clients: client_id, type, status, name, scopes."""
    from parcours.services import smart

    for c in asyncio.run(_with_platform(lambda p, conn: smart.list_clients(conn))):
        print(f"{c.client_id}\t{c.client_type}\t{c.status}\t{c.name}\t{c.scope}")


@app.command("disable")
def disable(client_id: Annotated[str, typer.Argument(help="The client to disable (its tokens can no longer be refreshed)")]) -> None:
    """Disable a client: it gets no new token."""
    from parcours.services import smart

    try:
        asyncio.run(_with_platform(lambda p, conn: smart.set_client_active(p, conn, client_id, False)))
    except ParcoursError as e:
        _fail(e)
