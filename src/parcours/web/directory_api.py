"""Domain JSON API of the care-offer directory, under ``/api/directory``: a thin adapter.

* ``GET /search``: practitioner roles near a place, nearest first, with their distance;
* ``GET /places?q=``: commune autocomplete (name or postal code);
* ``GET /professions``, ``/specialties``, ``/offers``, ``/languages``: the nomenclatures, FR/EN labels.

Errors are the platform's JSON errors (``{"error": "PRC-xxxx", "message": ...}``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from parcours.core.errors import BadRequest
from parcours.services.directory import search as directory_search
from parcours.services.directory.geo import communes
from parcours.services.directory.nomenclatures import nomenclatures
from parcours.services.platform import Platform
from parcours.web.auth import caller_of

TRUE = {"true", "1", "yes", "on"}
# Shortcut flags for the usual offers (the generic form is offer=CODE, repeatable).
OFFER_FLAGS = {"teleconsultation": "teleconsultation", "unscheduled": "unscheduled-care", "home_visit": "home-visit",
               "vaccination": "vaccination", "tele_expertise": "tele-expertise"}


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in TRUE


def _float(request: Request, name: str, default: float | None = None) -> float | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {raw!r}") from None


def _lang(request: Request) -> str:
    lang = request.query_params.get("lang", "fr")
    return lang if lang in ("fr", "en") else "fr"


async def search(request: Request) -> JSONResponse:
    caller = caller_of(request)
    qp = request.query_params
    lat, lon = _float(request, "lat"), _float(request, "lon")
    place = None
    if lat is None or lon is None:
        if not qp.get("place"):
            raise BadRequest("Say where: place (INSEE code, postal code or commune name) or lat and lon")
        place = communes().resolve_place(qp["place"])
        lat, lon = place.lat, place.lon
    offers = list(dict.fromkeys([*qp.getlist("offer"), *(code for flag, code in OFFER_FLAGS.items() if _flag(request, flag))]))
    q = directory_search.DirectoryQuery(
        lat=lat, lon=lon, radius_km=_float(request, "radius", 10.0),  # type: ignore[arg-type]
        profession=qp.get("profession") or None, specialty=qp.get("specialty") or None, offers=tuple(offers),
        accepts_new_patients=_flag(request, "new_patients"), language=qp.get("language") or None,
        wheelchair=_flag(request, "wheelchair"), limit=_int(request, "limit", 20), offset=_int(request, "offset", 0),
        lang=_lang(request),
    )
    platform: Platform = request.app.state.platform
    slots = getattr(request.app.state, "directory_slots", None)  # booking's SlotsHook, when installed
    async with platform.transaction(caller) as repo:
        result = await directory_search.search(repo, q, slots=slots)
    body = result.as_json()
    if place is not None:
        body["place"] = place.as_json()
    return JSONResponse(body)


async def places(request: Request) -> JSONResponse:
    caller_of(request)
    found = communes().autocomplete(request.query_params.get("q", ""), limit=_int(request, "limit", 10),
                                    region=request.query_params.get("region") or None)
    geo = communes()
    return JSONResponse({"results": [{**c.as_json(), "label": f"{c.name} ({c.postal_code})",
                                      "departementName": geo.departement_name(c.departement)} for c in found]})


def _listing(kind: str):  # type: ignore[no-untyped-def]
    async def handler(request: Request) -> JSONResponse:
        caller_of(request)
        nom = nomenclatures()
        table = {"professions": nom.professions, "specialties": nom.specialties, "offers": nom.care_offers,
                 "languages": nom.languages}[kind]
        text = request.query_params.get("q", "")
        lang = _lang(request)
        concepts = table.search(text, limit=_int(request, "limit", 200)) if text else table.active()
        profession = request.query_params.get("profession")
        if kind == "specialties" and profession:
            concepts = [c for c in concepts if c.profession == profession]
        return JSONResponse({"system": table.system, "results": [c.as_json(lang) for c in concepts]})

    return handler


routes = [
    Route("/search", search, methods=["GET"]),
    Route("/places", places, methods=["GET"]),
    Route("/professions", _listing("professions"), methods=["GET"]),
    Route("/specialties", _listing("specialties"), methods=["GET"]),
    Route("/offers", _listing("offers"), methods=["GET"]),
    Route("/languages", _listing("languages"), methods=["GET"]),
]

__all__ = ["routes"]
