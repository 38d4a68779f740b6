"""Rendering FHIR answers: resources, Bundles, OperationOutcomes and headers."""

from __future__ import annotations

from datetime import UTC
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
    keep = [(k, v) for k, v in params if k not in ("_offset", "_page")]
    links = [{"relation": "self", "url": _url(base, path, keep + ([("_offset", str(req.offset))] if req.offset else []))}]
    if result.has_more:
        links.append({"relation": "next", "url": _url(base, path, keep + [("_count", str(req.count)), ("_offset", str(req.offset + req.count))])})
    if req.offset > 0:
        links.append({"relation": "previous", "url": _url(base, path, keep + [("_count", str(req.count)), ("_offset", str(max(0, req.offset - req.count)))])})
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


def history_bundle(base: str, path: str, items: list[Stored], params: list[tuple[str, str]], count: int, offset: int) -> bytes:
    entries = []
    for s in items:
        e: dict[str, Any] = {"fullUrl": f"{base}/{s.resource_type}/{s.id}"}
        if s.content is not None and not s.deleted:
            e["resource"] = orjson.Fragment(s.content)
        method = "DELETE" if s.deleted else ("POST" if s.version_id == 1 else "PUT")
        e["request"] = {"method": method, "url": f"{s.resource_type}/{s.id}" if method != "POST" else s.resource_type}
        e["response"] = {"status": "204" if s.deleted else ("201" if s.version_id == 1 else "200"), "etag": s.etag,
                         "lastModified": s.last_updated.isoformat()}
        entries.append(e)
    keep = [(k, v) for k, v in params if k not in ("_offset",)]
    links = [{"relation": "self", "url": _url(base, path, params)}]
    if len(items) == count:
        links.append({"relation": "next", "url": _url(base, path, keep + [("_offset", str(offset + count))])})
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "link": links, "entry": entries})


def _url(base: str, path: str, params: list[tuple[str, str]]) -> str:
    q = urlencode(params)
    return f"{base}{path}" + (f"?{q}" if q else "")
