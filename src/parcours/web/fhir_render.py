"""Rendering FHIR answers: resources, Bundles, OperationOutcomes and headers."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.responses import Response

from parcours.core.errors import Issue, ParcoursError
from parcours.fhir.elements import apply_elements, apply_summary
from parcours.store.repository import SearchResult, Stored

FHIR_JSON = "application/fhir+json; charset=utf-8"


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    return Response(content, status_code=status, headers=headers, media_type=FHIR_JSON)


def outcome(issues: list[Issue]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


def error_response(err: ParcoursError) -> Response:
    return fhir_response(outcome(err.issues), err.status, err.headers or None)


def info_outcome(message: str, code: str = "informational") -> dict:
    return outcome([Issue(code, message, severity="information")])


def version_headers(base: str, s: Stored) -> dict[str, str]:
    return {
        "ETag": s.etag,
        "Last-Modified": format_datetime(s.last_updated.astimezone(UTC), usegmt=True),
        "Location": f"{base}/{s.resource_type}/{s.id}/_history/{s.version_id}",
    }


def fragment(s: Stored, summary: str | None = None, elements: list[str] | None = None) -> Any:
    """The resource as pre-serialized JSON, shaped by _summary/_elements when asked."""
    assert s.content is not None
    if summary in (None, "false") and not elements:
        return orjson.Fragment(s.content)
    res = orjson.loads(s.content)
    if summary and summary != "false":
        res = apply_summary(res, summary)
    if elements:
        res = apply_elements(res, elements)
    return res


def searchset(base: str, path: str, params: list[tuple[str, str]], result: SearchResult) -> bytes:
    req = result.request
    # Paging links repeat the criteria and carry one _count and one _offset.
    keep = [(k, v) for k, v in params if k not in ("_offset", "_page", "_count")]
    page = [("_count", str(req.count))]
    links = [{"relation": "self", "url": _url(base, path, keep + page + ([("_offset", str(req.offset))] if req.offset else []))}]
    if result.has_more:
        links.append({"relation": "next", "url": _url(base, path, keep + page + [("_offset", str(req.offset + req.count))])})
    if req.offset > 0:
        links.append({"relation": "previous", "url": _url(base, path, keep + page + [("_offset", str(max(0, req.offset - req.count)))])})
    entries = [
        {"fullUrl": f"{base}/{s.resource_type}/{s.id}", "resource": fragment(s, req.summary, req.elements), "search": {"mode": "match"}}
        for s in result.matches
    ]
    entries += [
        {"fullUrl": f"{base}/{s.resource_type}/{s.id}", "resource": fragment(s, req.summary, req.elements), "search": {"mode": "include"}}
        for s in result.includes
    ]
    if req.ignored:
        entries.append({"resource": info_outcome("Unknown search parameters were ignored: " + ", ".join(sorted(set(req.ignored)))), "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    bundle["link"] = links
    if req.summary != "count":
        bundle["entry"] = entries
    return orjson.dumps(bundle)


def history_bundle(base: str, path: str, items: list[Stored], params: list[tuple[str, str]], count: int, offset: int,
                   *, has_more: bool = False) -> bytes:
    """A history Bundle (R4 3.1.0.9): every entry has the request that made the
    version and the response it got; a deletion has no resource."""
    entries = []
    for s in items:
        e: dict[str, Any] = {"fullUrl": f"{base}/{s.resource_type}/{s.id}"}
        if s.content is not None and not s.deleted:
            e["resource"] = orjson.Fragment(s.content)
        method = "DELETE" if s.deleted else (s.method or ("POST" if s.version_id == 1 else "PUT"))
        created = method == "POST" or (method == "PUT" and s.version_id == 1)
        e["request"] = {"method": method, "url": s.resource_type if method == "POST" else f"{s.resource_type}/{s.id}"}
        response: dict[str, Any] = {"status": "204 No Content" if s.deleted else ("201 Created" if created else "200 OK")}
        if not s.deleted:
            response["location"] = f"{s.resource_type}/{s.id}/_history/{s.version_id}"
        response["etag"] = s.etag
        response["lastModified"] = instant(s.last_updated)
        e["response"] = response
        entries.append(e)
    keep = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    page = [("_count", str(count))]
    links = [{"relation": "self", "url": _url(base, path, keep + page + ([("_offset", str(offset))] if offset else []))}]
    if has_more:
        links.append({"relation": "next", "url": _url(base, path, keep + page + [("_offset", str(offset + count))])})
    if offset > 0:
        links.append({"relation": "previous", "url": _url(base, path, keep + page + [("_offset", str(max(0, offset - count)))])})
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "link": links, "entry": entries})


def instant(dt: datetime) -> str:
    """A FHIR instant in UTC with milliseconds, as meta.lastUpdated is written."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _url(base: str, path: str, params: list[tuple[str, str]]) -> str:
    q = urlencode(params)
    return f"{base}{path}" + (f"?{q}" if q else "")
