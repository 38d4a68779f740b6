"""``parcours booking ...``: opening rules, slot generation, free slots and the notification
queue from the command line. Thin adapters over :mod:`parcours.services.booking`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from parcours.core.errors import ParcoursError
from parcours.core.settings import Settings

app = typer.Typer(help="Booking: opening rules, slots, notifications.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _run(work: Callable[[Any], Awaitable[Any]]) -> Any:
    from parcours.services.platform import Platform

    async def main() -> Any:
        platform = await Platform.start(Settings())
        try:
            return await work(platform)
        finally:
            await platform.close()

    try:
        return asyncio.run(main())
    except ParcoursError as e:
        err.print(f"[red]{e.code}[/]: {e.message}")
        raise typer.Exit(2) from None


@app.command("schedule")
def schedule(
    role: Annotated[str, typer.Argument(help="PractitionerRole id")],
    rule: Annotated[list[str], typer.Option("--rule", help="An opening: 'mon-fri 08:30-12:00 consultation 20 [video|home] [new|known]'")],
    location: Annotated[str | None, typer.Option(help="Location id (default: the role's first place)")] = None,
    leave: Annotated[list[str] | None, typer.Option("--leave", help="'2026-12-24 2026-12-31 reason' (whole days)")] = None,
    cancel_hours: Annotated[int, typer.Option(help="Patients cancel no later than this many hours before")] = 24,
    horizon_days: Annotated[int, typer.Option(help="Slots this many days ahead")] = 28,
    notice_minutes: Annotated[int, typer.Option(help="Online booking closes this many minutes before")] = 60,
) -> None:
    """Set the opening rules of a practitioner role at a place and generate its slots."""
    from parcours.security.caller import SYSTEM
    from parcours.services.booking import model, service

    av = model.Availability([model.parse_rule(r) for r in rule], model.parse_leaves("\n".join(leave or [])),
                            model.Policy(cancel_hours, horizon_days, notice_minutes))

    async def work(platform: Any) -> Any:
        async with platform.transaction(SYSTEM) as repo:
            return await service.define(repo, role, location, av)

    sid, report = _run(work)
    print(json.dumps({"schedule": sid, "slots": report.as_json()}))


@app.command("roll")
def roll(limit: Annotated[int, typer.Option(help="At most this many schedules")] = 1000) -> None:
    """Extend the slots of every schedule whose rolling horizon is behind."""
    from parcours.services.booking import generation

    n = _run(lambda platform: generation.roll(platform, limit=limit))
    out.print(f"{n} schedule(s) rolled forward")


@app.command("slots")
def slots(
    role: Annotated[str | None, typer.Option(help="PractitionerRole id")] = None,
    practitioner: Annotated[str | None, typer.Option(help="Practitioner id")] = None,
    offer: Annotated[str | None, typer.Option(help="Care offer (consultation, teleconsultation...)")] = None,
    limit: Annotated[int, typer.Option()] = 10,
) -> None:
    """The next free slots."""
    from parcours.security.caller import SYSTEM
    from parcours.services.booking import model, service

    async def work(platform: Any) -> Any:
        async with platform.transaction(SYSTEM) as repo:
            q = service.SlotQuery(start=platform.clock.now(), roles=[role] if role else [], practitioner=practitioner,
                                  offer=offer, limit=limit)
            return [(s.id, s.resource()) for s in await service.find(repo, q)]

    for sid, s in _run(work):
        v = model.slot_visit(s)
        out.print(f"{s['start']}  {v.offer:<16} {v.minutes:>3} min  {v.mode}  Slot/{sid}")


@app.command("run-jobs")
def run_jobs(limit: Annotated[int, typer.Option(help="At most this many jobs")] = 1000) -> None:
    """Send the notifications that are due (the servers do it every few seconds too)."""
    from parcours.services.booking import notify

    n = _run(lambda platform: notify.run_due(platform, notify.Notifier.from_settings(platform.settings), limit=limit))
    out.print(f"{n} notification job(s) run")


__all__ = ["app"]
