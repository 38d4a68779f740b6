"""``parcours keys`` (encryption keys of the shared record's content) and ``parcours record``
(HL7 v2 files, orphan content).

``parcours keys rotate`` makes a new key current and re-encrypts older content in the
background of the running servers: batches of ``--batch`` blobs, each in its own
transaction, rows locked ``SKIP LOCKED``. Servers keep serving: they read both keys
meanwhile, and write with the new one within ``PARCOURS_RECORD_KEY_REFRESH_SECONDS``.
Interrupted, it resumes where it was with ``parcours keys reencrypt``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from parcours.core.settings import Settings

keys_app = typer.Typer(help="Encryption keys of the shared record's content.", no_args_is_help=True)
record_app = typer.Typer(help="The shared record: HL7 v2 files, content housekeeping.", no_args_is_help=True)
console = Console()


async def _platform(settings: Settings):  # type: ignore[no-untyped-def]
    from parcours.services.platform import Platform

    return await Platform.start(settings.model_copy(update={"db_pool_size": 2}))


async def _reencrypt(batch: int) -> int:
    settings = Settings()
    platform = await _platform(settings)
    total = 0
    try:
        assert platform.blobs is not None
        while True:
            async with platform.pool.connection() as conn, conn.transaction():
                n = await platform.blobs.reencrypt_batch(conn, limit=batch)
            total += n
            if n == 0:
                break
            console.print(f"  {total} re-encrypted…")
        async with platform.pool.connection() as conn:
            left = await platform.blobs.pending_rotation(conn)
        console.print(f"Blobs per key now: {left}")
    finally:
        await platform.close()
    return total


async def _rotate(batch: int, reencrypt: bool) -> None:
    from parcours.store import blobs

    settings = Settings()
    platform = await _platform(settings)
    try:
        if settings.record_keys:
            console.print(f"Keys come from the settings; the current one is {settings.record_key_id!r}: re-encrypting older content")
        else:
            async with platform.pool.connection() as conn, conn.transaction():
                kid = await blobs.rotate_key(conn, settings)
            console.print(f"New current key [bold]{kid}[/]: servers write with it within "
                          f"{settings.record_key_refresh_seconds:g} s and read both meanwhile")
    finally:
        await platform.close()
    if reencrypt:
        n = await _reencrypt(batch)
        console.print(f"{n} blobs re-encrypted")


@keys_app.command("rotate")
def rotate(
    batch: Annotated[int, typer.Option(help="Blobs re-encrypted per transaction")] = 200,
    reencrypt: Annotated[bool, typer.Option(help="Re-encrypt older content now (else: `parcours keys reencrypt` later)")] = True,
) -> None:
    """Make a new key current and re-encrypt older content, without stopping the servers."""
    asyncio.run(_rotate(batch, reencrypt))


@keys_app.command("reencrypt")
def reencrypt_cmd(batch: Annotated[int, typer.Option(help="Blobs re-encrypted per transaction")] = 200) -> None:
    """Re-encrypt content still under an older key (resumes an interrupted rotation)."""
    console.print(f"{asyncio.run(_reencrypt(batch))} blobs re-encrypted")


@keys_app.command("status")
def status() -> None:
    """The current key, and how many blobs each key encrypts."""

    async def run() -> None:
        platform = await _platform(Settings())
        try:
            assert platform.blobs is not None
            async with platform.pool.connection() as conn:
                await platform.blobs.refresh(conn, force=True)
                console.print(f"Current key: {platform.blobs.keyring.current}")
                console.print(f"Blobs per key: {await platform.blobs.pending_rotation(conn)}")
        finally:
            await platform.close()

    asyncio.run(run())


@record_app.command("hl7")
def hl7_files(paths: Annotated[list[Path], typer.Argument(help="Files holding one HL7 v2 ORU^R01 message each")]) -> None:
    """Receive lab results from files, as if sent over MLLP; prints each ACK code."""
    from parcours.security.caller import SYSTEM
    from parcours.services.records import labs

    async def run() -> None:
        platform = await _platform(Settings())
        try:
            for path in paths:
                ack, outcome = await labs.receive(platform, SYSTEM, path.read_bytes(), source=f"file {path.name}")
                msa = next((s for s in ack.split("\r") if s.startswith("MSA")), "MSA|??")
                console.print(f"{path}: {msa.split('|')[1]} {outcome.status if outcome else ''} {msa.split('|')[3] if msa.count('|') > 2 else ''}")
        finally:
            await platform.close()

    asyncio.run(run())


@record_app.command("sweep")
def sweep(hours: Annotated[float, typer.Option(help="Only content older than this")] = 1.0) -> None:
    """Delete stored content no record names (uploads whose transaction rolled back, erased documents)."""
    from datetime import timedelta

    async def run() -> int:
        platform = await _platform(Settings())
        try:
            assert platform.blobs is not None
            async with platform.pool.connection() as conn:
                return await platform.blobs.sweep_orphans(conn, platform.clock.now(), timedelta(hours=hours))
        finally:
            await platform.close()

    console.print(f"{asyncio.run(run())} orphan objects deleted")
