"""``parcours directory ...`` and ``parcours demo-data ...``: thin adapters over
:mod:`parcours.services.directory`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from parcours.core.errors import ParcoursError
from parcours.core.settings import Settings

app = typer.Typer(help="The care-offer directory: imports, nomenclatures, search.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo data.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _run(work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Start the platform (migrating first), run ``work(platform)``, stop it."""
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


def _print_report(report: Any, as_json: bool) -> None:
    data = report.as_json()
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        t = Table("type", "created", "updated", "unchanged", "merged")
        types = sorted(set(data["created"]) | set(data["updated"]) | set(data["unchanged"]) | set(data["merged"]))
        for rt in types:
            t.add_row(rt, *(str(data[k].get(rt, 0)) for k in ("created", "updated", "unchanged", "merged")))
        out.print(t)
        if data["skipped"]:
            out.print("skipped (not directory resources): " + ", ".join(f"{k} {v}" for k, v in sorted(data["skipped"].items())))
        for w in data["warnings"]:
            err.print(f"[yellow]{w['where']}[/]: {w['message']}")
        for e in data["errors"]:
            err.print(f"[red]{e['where']}[/]: {e['message']}")
    if report.errors:
        raise typer.Exit(1)


@app.command("import-fhir")
def import_fhir_cmd(
    path: Annotated[Path, typer.Argument(help="A Bundle or resource (.json), NDJSON, or a folder of them", exists=True)],
    batch: Annotated[int, typer.Option(help="Resources per transaction")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Import Organization, Location, Practitioner, HealthcareService and PractitionerRole resources in the
    national directory's FHIR format (Annuaire Santé). Idempotent: matched by identifier (RPPS, FINESS...)."""
    from parcours.services.directory.importers import import_fhir, read_fhir

    report = _run(lambda p: import_fhir(p, read_fhir(path), batch=batch))
    _print_report(report, as_json)


@app.command("import-csv")
def import_csv_cmd(
    path: Annotated[Path, typer.Argument(help="CSV file (UTF-8, ';' or ',' separated); '-' for standard input")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Import practitioner roles from a CSV file (columns: `parcours directory csv-columns`). Idempotent; a bad row
    is reported with its line number and not stored. Exit status 1 when a row was rejected."""
    from parcours.services.directory.importers import import_csv

    text = sys.stdin.read() if str(path) == "-" else path.read_text("utf-8-sig")
    report = _run(lambda p: import_csv(p, text))
    _print_report(report, as_json)


@app.command("csv-columns")
def csv_columns_cmd() -> None:
    """Describe the columns of the CSV import."""
    from parcours.services.directory.importers import CSV_COLUMNS

    t = Table("column", "meaning")
    for k, v in CSV_COLUMNS.items():
        t.add_row(k, v)
    out.print(t)


@app.command("places")
def places_cmd(text: Annotated[str, typer.Argument(help="Start of a commune name or a postal code")],
               limit: Annotated[int, typer.Option(help="How many")] = 10) -> None:
    """Communes matching a name or a postal code (the autocomplete of the search)."""
    from parcours.services.directory.geo import communes

    for c in communes().autocomplete(text, limit=limit):
        out.print(f"{c.code}  {c.name} ({', '.join(c.postal_codes)})  {c.population:,} inhabitants  {c.lat:.4f},{c.lon:.4f}")


@app.command("codes")
def codes_cmd(kind: Annotated[str, typer.Argument(help="professions, specialties, offers or languages")],
              text: Annotated[str, typer.Argument(help="Filter by code or label")] = "",
              lang: Annotated[str, typer.Option(help="fr or en")] = "fr") -> None:
    """Look up the directory nomenclatures (TRE_G15 professions, TRE_R38 specialties, care offers, languages)."""
    from parcours.services.directory.nomenclatures import nomenclatures

    nom = nomenclatures()
    table = {"professions": nom.professions, "specialties": nom.specialties, "offers": nom.care_offers,
             "languages": nom.languages}.get(kind)
    if table is None:
        err.print("kind must be professions, specialties, offers or languages")
        raise typer.Exit(2)
    for c in (table.search(text, limit=200) if text else table.active()):
        out.print(f"{c.code:8} {c.label(lang)}")


@app.command("search")
def search_cmd(
    place: Annotated[str, typer.Option(help="INSEE code, postal code or commune name")] = "",
    lat: Annotated[float | None, typer.Option(help="Latitude, instead of --place")] = None,
    lon: Annotated[float | None, typer.Option(help="Longitude")] = None,
    radius: Annotated[float, typer.Option(help="Radius in km")] = 10.0,
    profession: Annotated[str | None, typer.Option(help="TRE_G15 code, e.g. 10")] = None,
    specialty: Annotated[str | None, typer.Option(help="TRE_R38 code, e.g. SM54")] = None,
    offer: Annotated[list[str] | None, typer.Option(help="Care offer that must be offered (repeatable)")] = None,
    new_patients: Annotated[bool, typer.Option("--new-patients", help="Only roles accepting new patients")] = False,
    language: Annotated[str | None, typer.Option(help="Language spoken, e.g. en")] = None,
    wheelchair: Annotated[bool, typer.Option("--wheelchair", help="Only wheelchair-accessible places")] = False,
    limit: Annotated[int, typer.Option(help="How many results")] = 20,
) -> None:
    """Search the directory around a place, nearest first."""
    from parcours.security.caller import SYSTEM
    from parcours.services.directory import search as directory_search
    from parcours.services.directory.geo import communes

    if lat is None or lon is None:
        if not place:
            err.print("give --place or --lat and --lon")
            raise typer.Exit(2)
        c = communes().resolve_place(place)
        lat, lon = c.lat, c.lon
    q = directory_search.DirectoryQuery(lat=lat, lon=lon, radius_km=radius, profession=profession, specialty=specialty,
                                        offers=tuple(offer or ()), accepts_new_patients=new_patients, language=language,
                                        wheelchair=wheelchair, limit=limit)

    async def work(p: Any) -> Any:
        async with p.transaction(SYSTEM) as repo:
            return await directory_search.search(repo, q)

    result = _run(work)
    for h in result.as_json()["results"]:
        what = ", ".join(s["label"] for s in h["specialties"]) or ", ".join(s["label"] for s in h["professions"])
        out.print(f"{h['distanceKm']:6.1f} km  {h['practitioner']['name']:30} {what:28} {h['location']['address']}")
    more = f" of {result.total}" if result.total is not None else ", more available" if result.has_more else ""
    out.print(f"{len(result.hits)} shown{more}")


@demo_app.command("generate")
def generate_cmd(
    region: Annotated[str, typer.Option(help="INSEE region code (32 Hauts-de-France, 28 Normandie, 11 Île-de-France...)")] = "32",
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same data")] = 1,
    roles: Annotated[int, typer.Option(help="About how many practitioner roles")] = 1500,
    patients: Annotated[int, typer.Option(help="How many patients")] = 25,
    dataset: Annotated[str | None, typer.Option(help="Dataset tag and id prefix (default demo-REGION-SEED)")] = None,
) -> None:
    """Generate a realistic directory for a region (practices, practitioners, roles, places, services, patients).
    Running it again with the same options replaces the same resources (ids are deterministic)."""
    from parcours.services.directory import demo

    started = time.perf_counter()
    region_data = demo.build_region(region, seed=seed, roles=roles, patients=patients, dataset=dataset)
    counts = _run(lambda p: demo.write_region(p, region_data))
    elapsed = time.perf_counter() - started
    out.print(f"Dataset [bold]{region_data.dataset}[/] for region {region}: "
              + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + f" in {elapsed:.1f} s")


__all__ = ["app", "demo_app"]
