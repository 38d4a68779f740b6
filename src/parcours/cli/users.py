"""``parcours user ...``: operator commands for accounts, and user tokens for ``parcours token --user``."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console

from parcours.core.errors import ParcoursError
from parcours.core.settings import Settings

app = typer.Typer(help="User accounts: patients, professionals, staff, administrators, proxies.", no_args_is_help=True)
console = Console(stderr=True)


async def _create(settings: Settings, new: object) -> str:
    from parcours.services import accounts
    from parcours.services.platform import Platform

    platform = await Platform.start(settings.model_copy(update={"db_pool_size": 2}))
    try:
        async with platform.pool.connection() as conn, conn.transaction():
            account = await accounts.create_account(platform, conn, new)  # type: ignore[arg-type]
        return account.id
    finally:
        await platform.close()


async def _token(settings: Settings, email: str, scopes: list[str] | None, lifetime: int) -> str:
    from parcours.services import accounts
    from parcours.services.platform import Platform

    platform = await Platform.start(settings.model_copy(update={"db_pool_size": 2}))
    try:
        async with platform.pool.connection() as conn, conn.transaction():
            return await accounts.issue_user_token(platform, conn, email, scopes, lifetime)
    finally:
        await platform.close()


def _fail(e: ParcoursError) -> None:
    console.print(f"[red]{e.code}[/]: {e.message}")
    raise typer.Exit(2 if e.status < 500 else 1)


def user_token(settings: Settings, email: str, scopes: list[str] | None, lifetime: int) -> str:
    """The bearer token of a user (sub = account id, kind = role, fhirUser, scopes)."""
    try:
        return asyncio.run(_token(settings, email, scopes, lifetime))
    except ParcoursError as e:
        _fail(e)
        raise  # unreachable: _fail exits


@app.command("create")
def create(
    role: Annotated[str, typer.Option(help="patient | practitioner | staff | admin | proxy")],
    email: Annotated[str, typer.Option(help="E-mail address, used to sign in")],
    password: Annotated[str, typer.Option(help="Initial password ('-' reads it from standard input)")],
    fhir: Annotated[str | None, typer.Option(help="Linked resource: Patient/ID, Practitioner/ID, PractitionerRole/ID or RelatedPerson/ID")] = None,
    totp_secret: Annotated[str | None, typer.Option(help="Base32 TOTP secret already in the user's authenticator")] = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: from the linked resource)")] = None,
    identity_status: Annotated[str | None, typer.Option(help="Patients: provisional | recovered | validated | qualified (also written on the Patient)")] = None,
    locale: Annotated[str | None, typer.Option(help="Preferred language: fr | en")] = None,
) -> None:
    """Create an account and print its id."""
    from parcours.services.accounts import NewAccount

    if password == "-":
        password = sys.stdin.readline().rstrip("\n")
    new = NewAccount(email=email, password=password, role=role, fhir_user=fhir, totp_secret=totp_secret,
                     display_name=name, identity_status=identity_status, locale=locale)
    try:
        print(asyncio.run(_create(Settings(), new)))
    except ParcoursError as e:
        _fail(e)
