"""The FHIR R4 REST API at /fhir: a thin adapter from HTTP to the Repository."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from parcours.core.errors import (
    BadRequest,
    Issue,
    MethodNotAllowed,
    InvalidSearch,
    MalformedJson,
    NotAcceptable,
    NotFound,
    ParcoursError,
    TooLarge,
    UnsupportedMedia,
)
from parcours.fhir.datatypes import parse_date_range
from parcours.services import bundles, capability
from parcours.services import audit_trail
from parcours.services.platform import Platform
from parcours.store.repository import WriteResult
from parcours.web import fhir_access, fhir_export
from parcours.web.auth import caller_of
from parcours.web.fhir_render import (
    FHIR_JSON,
    error_response,
    fhir_response,
    history_bundle,
    info_outcome,
    outcome,
    searchset,
    version_headers,
)

JSON_TYPES = ("application/fhir+json", "application/json", "application/json-patch+json", "application/x-www-form-urlencoded")


def platform_of(request: Request) -> Platform:
    return request.app.state.platform


def base_of(request: Request) -> str:
    return platform_of(request).settings.fhir_base


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/fhir+json").split(";")[0].strip().lower()


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> Any:
    ctype = media_type(request)
    if ctype and not ctype.endswith("json"):
        if "xml" in ctype:
            raise UnsupportedMedia("This server accepts FHIR JSON only (application/fhir+json); XML is not supported")
        raise UnsupportedMedia(f"Unsupported content type {ctype!r}: send application/fhir+json")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"The body is {length} bytes; the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise TooLarge(f"The body is larger than the limit of {limit} bytes")
    if not body.strip():
        if allow_empty:
            return None
        raise MalformedJson("The request body is empty; a JSON document was expected")
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as e:
        raise MalformedJson(f"The body is not valid JSON: {e}") from None


async def read_patch(request: Request, limit: int) -> tuple[Any, bool]:
    """The patch document and whether it is a JSON Merge Patch (else a JSON Patch).

    application/json-patch+json carries a JSON Patch; application/merge-patch+json
    (and application/json with an object, as fhirpy sends) a JSON Merge Patch.
    FHIRPath Patch (a Parameters resource) is not supported: 415.
    """
    body = await read_json(request, limit)
    ctype = media_type(request)
    if isinstance(body, list):
        return body, False
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        raise UnsupportedMedia("FHIRPath Patch is not supported: send a JSON Patch (application/json-patch+json)")
    if isinstance(body, dict) and ctype in ("application/merge-patch+json", "application/json"):
        return body, True
    raise BadRequest("A JSON Patch (application/json-patch+json) body must be an array of operations")


def etag_matches(header: str, version: int) -> bool:
    """Whether an If-None-Match header (a list of ETags, or *) names ``version``."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.removeprefix("W/").strip('"') == str(version):
            return True
    return False


def not_modified_since(request: Request, last_updated: datetime) -> bool:
    from email.utils import parsedate_to_datetime

    value = request.headers.get("if-modified-since")
    if not value or request.headers.get("if-none-match"):
        return False
    try:
        since = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        return False
    return last_updated.replace(microsecond=0) <= since


def check_format(request: Request) -> None:
    fmt = request.query_params.get("_format")
    if fmt and "json" not in fmt:
        raise NotAcceptable(f"_format={fmt!r} is not supported: this server speaks FHIR JSON")
    accept = request.headers.get("accept", "")
    if accept and "json" not in accept and "*/*" not in accept and "xml" in accept:
        raise NotAcceptable("This server produces FHIR JSON only (application/fhir+json)")


def prefer(request: Request, key: str) -> str | None:
    for part in request.headers.get("prefer", "").split(";"):
        for item in part.split(","):
            k, _, v = item.strip().partition("=")
            if k.strip() == key:
                return v.strip().strip('"')
    return None


def write_response(request: Request, result: WriteResult, created_status: int = 201) -> Response:
    base = base_of(request)
    s = result.stored
    headers = version_headers(base, s)
    status = created_status if result.created else 200
    ret = prefer(request, "return") or "representation"
    if ret == "minimal":
        return Response(status_code=status, headers=headers)
    if ret == "OperationOutcome":
        return fhir_response(info_outcome(f"{s.resource_type}/{s.id} version {s.version_id} stored"), status, headers)
    return fhir_response(s.content or b"", status, headers)


def if_none_exist(request: Request) -> str | None:
    """Conditional create criteria: the If-None-Exist header or, as Aidbox and fhirpy
    do, the query string of the POST."""
    header = request.headers.get("if-none-exist")
    if header:
        return header
    criteria = query_items(request)
    return urlencode(criteria) if criteria else None


def query_items(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in parse_qsl(request.url.query, keep_blank_values=True) if k not in ("_format", "_pretty")]


def strict(request: Request) -> bool:
    return prefer(request, "handling") == "strict"


# -- handlers -------------------------------------------------------------------------------
async def metadata(request: Request) -> Response:
    return fhir_response(capability.capability_statement(platform_of(request)))


async def system_root(request: Request) -> Response:
    p = platform_of(request)
    caller = caller_of(request)
    if request.method == "POST":
        body = await read_json(request, p.settings.max_bundle_bytes)
        result = await bundles.process(p, caller, body, prefer_return=prefer(request, "return"))
        return fhir_response(result)
    return await _search(request, None, query_items(request))


async def type_root(request: Request) -> Response:
    p, rtype = platform_of(request), request.path_params["type"]
    caller = caller_of(request)
    if request.method == "GET":
        return await _search(request, rtype, query_items(request))
    if request.method == "POST":
        body = await read_json(request, p.settings.max_resource_bytes)
        async with p.transaction(caller) as repo:
            result = await repo.create(rtype, body, if_none_exist=if_none_exist(request))
        return write_response(request, result)
    query = request.url.query
    if not query:
        # Without criteria the type endpoint has no PUT, PATCH or DELETE.
        raise MethodNotAllowed(f"{request.method} on /{rtype} needs search criteria (conditional {request.method.lower()})",
                               headers={"Allow": "GET, POST"})
    if request.method == "PUT":
        body = await read_json(request, p.settings.max_resource_bytes)
        async with p.transaction(caller) as repo:
            result = await repo.conditional_update(rtype, query, body, if_match=request.headers.get("if-match"))
        return write_response(request, result)
    if request.method == "DELETE":
        multiple = prefer(request, "handling") == "multiple" or request.headers.get("x-conditional-delete") == "multiple"
        async with p.transaction(caller) as repo:
            n = await repo.conditional_delete(rtype, query, multiple=multiple)
        return fhir_response(info_outcome(f"{n} {rtype} deleted"), 200)
    if request.method == "PATCH":
        body, merge = await read_patch(request, p.settings.max_resource_bytes)
        async with p.transaction(caller) as repo:
            result = await repo.conditional_patch(rtype, query, body, if_match=request.headers.get("if-match"), merge=merge)
        return write_response(request, result)
    raise BadRequest(f"Method {request.method} is not supported here")


async def type_search_post(request: Request) -> Response:
    rtype = request.path_params["type"]
    form = await request.form()
    items = query_items(request) + [(k, str(v)) for k, v in form.multi_items()]
    return await _search(request, rtype, items)


async def system_search_post(request: Request) -> Response:
    form = await request.form()
    items = query_items(request) + [(k, str(v)) for k, v in form.multi_items()]
    return await _search(request, None, items)


async def _search(request: Request, rtype: str | None, items: list[tuple[str, str]]) -> Response:
    p = platform_of(request)
    caller = caller_of(request)
    check_format(request)
    if rtype == "AuditEvent":
        # The trail is searched as it stands: turn the latest entries into AuditEvents first.
        await audit_trail.materialize(p)
    async with p.reading(caller) as repo:
        req = repo.parse_search(rtype, items, strict=strict(request))
        result = await repo.search(req)
    path = f"/{rtype}" if rtype else ""
    return fhir_response(searchset(base_of(request), path, items, result))


async def instance(request: Request) -> Response:
    p, rtype, rid = platform_of(request), request.path_params["type"], request.path_params["id"]
    caller = caller_of(request)
    if rid.startswith(("_", "$")):
        # /Type/_history, /Type/_search, /Type/$op: endpoints, not resources (ids never start so).
        allow = {"_history": "GET", "_search": "POST"}.get(rid)
        raise MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}", headers={"Allow": allow} if allow else {})
    if request.method == "GET":
        check_format(request)
        async with p.reading(caller) as repo:
            s = await repo.read(rtype, rid)
        headers = version_headers(base_of(request), s)
        del headers["Location"]
        inm = request.headers.get("if-none-match")
        if (inm and etag_matches(inm, s.version_id)) or not_modified_since(request, s.last_updated):
            return Response(status_code=304, headers=headers)
        summary, elements = request.query_params.get("_summary"), request.query_params.get("_elements")
        if summary or elements:
            from parcours.web.fhir_render import fragment

            return fhir_response(orjson.dumps(fragment(s, summary, elements.split(",") if elements else None)), 200, headers)
        return fhir_response(s.content or b"", 200, headers)
    if request.method == "PUT":
        body = await read_json(request, p.settings.max_resource_bytes)
        async with p.transaction(caller) as repo:
            result = await repo.update(rtype, rid, body, if_match=request.headers.get("if-match"))
        return write_response(request, result)
    if request.method == "PATCH":
        body, merge = await read_patch(request, p.settings.max_resource_bytes)
        async with p.transaction(caller) as repo:
            result = await repo.patch(rtype, rid, body, if_match=request.headers.get("if-match"), merge=merge)
        return write_response(request, result)
    if request.method == "DELETE":
        async with p.transaction(caller) as repo:
            version = await repo.delete(rtype, rid, if_match=request.headers.get("if-match"))
        headers = {"ETag": f'W/"{version}"'} if version else {}
        return fhir_response(info_outcome(f"{rtype}/{rid} deleted" if version else f"{rtype}/{rid} was not there"), 200, headers)
    raise BadRequest(f"Method {request.method} is not supported here")


async def vread(request: Request) -> Response:
    p = platform_of(request)
    async with p.reading(caller_of(request)) as repo:
        s = await repo.vread(request.path_params["type"], request.path_params["id"], request.path_params["vid"])
    headers = version_headers(base_of(request), s)
    del headers["Location"]
    return fhir_response(s.content or b"", 200, headers)


def _since(request: Request) -> datetime | None:
    since = request.query_params.get("_since")
    if not since:
        return None
    r = parse_date_range(since)
    if r is None:
        raise InvalidSearch(f"_since must be an instant such as 2024-01-01T00:00:00Z, got {since!r}")
    return r[0]


def _count(request: Request, default: int) -> tuple[int, int]:
    p = platform_of(request)
    try:
        count = int(request.query_params.get("_count", default))
        offset = int(request.query_params.get("_offset", 0))
    except ValueError:
        raise InvalidSearch("_count and _offset must be whole numbers") from None
    return max(1, min(count, p.settings.max_page_size)), max(0, min(offset, 2**31 - 1))


async def history(request: Request) -> Response:
    p = platform_of(request)
    rtype, rid = request.path_params.get("type"), request.path_params.get("id")
    count, offset = _count(request, p.settings.default_page_size)
    since = _since(request)
    async with p.transaction(caller_of(request)) as repo:
        if rtype:
            repo.check_type(rtype)
        items = await repo.history(rtype, rid, since=since, count=count + 1, offset=offset)
    path = "".join(f"/{x}" for x in (rtype, rid) if x) + "/_history"
    return fhir_response(history_bundle(base_of(request), path, items[:count], query_items(request), count, offset,
                                        has_more=len(items) > count))


async def everything(request: Request) -> Response:
    p = platform_of(request)
    types = request.query_params.get("_type")
    async with p.transaction(caller_of(request)) as repo:
        items = await repo.everything(request.path_params["id"], since=_since(request),
                                      types=[t for t in types.split(",") if t] if types else None)
    base = base_of(request)
    bundle = {
        "resourceType": "Bundle", "type": "searchset", "total": len(items),
        "link": [{"relation": "self", "url": str(request.url)}],
        "entry": [{"fullUrl": f"{base}/{s.resource_type}/{s.id}", "resource": orjson.Fragment(s.content or b"{}"), "search": {"mode": "match"}} for s in items],
    }
    return fhir_response(orjson.dumps(bundle))


VALIDATE_MODES = ("create", "update", "delete")


async def validate(request: Request) -> Response:
    """$validate at type and instance level (R4 Resource-validate): the body is the
    resource, or a Parameters with ``resource`` (and ``mode``); the answer is 200
    with an OperationOutcome listing the issues, whatever they are."""
    p = platform_of(request)
    caller = caller_of(request)
    rtype, rid = request.path_params["type"], request.path_params.get("id")
    body = await read_json(request, p.settings.max_resource_bytes, allow_empty=rid is not None)
    resource, mode = body, None
    if isinstance(body, dict) and body.get("resourceType") == "Parameters" and (rtype != "Parameters" or _has_param(body, "resource")):
        params = body.get("parameter") if isinstance(body.get("parameter"), list) else []
        resource = next((x.get("resource") for x in params if isinstance(x, dict) and x.get("name") == "resource"), None)
        mode = next((x.get("valueCode") for x in params if isinstance(x, dict) and x.get("name") == "mode"), None)
    if mode is not None and mode not in VALIDATE_MODES:
        raise BadRequest(f"$validate mode must be one of {', '.join(VALIDATE_MODES)}, got {mode!r}",
                         [Issue("value", f"Unknown mode {mode!r}", expression=("Parameters.parameter.where(name='mode')",))])
    async with p.transaction(caller) as repo:
        repo.check_type(rtype)
        if rid is not None:
            stored = await repo.read(rtype, rid)  # 404 / 410 when there is nothing at that id
            if mode == "delete":
                return fhir_response(info_outcome(f"{rtype}/{rid} can be deleted"), 200)
            if resource is None:
                resource = stored.resource()
        if resource is None:
            raise BadRequest("$validate needs a resource: the body, or a Parameters with a 'resource' parameter")
        issues: list[Issue] = []
        if rid is not None and isinstance(resource, dict) and resource.get("id") not in (None, rid):
            issues.append(Issue("invalid", f"The resource id must be {rid!r} for an update of {rtype}/{rid}", expression=(f"{rtype}.id",)))
        if mode == "update" and isinstance(resource, dict) and not resource.get("id"):
            issues.append(Issue("required", "An update needs the resource id", expression=(f"{rtype}.id",)))
        try:
            repo.prepare(rtype, resource)
        except ParcoursError as e:
            issues.extend(e.issues)
    if issues:
        return fhir_response(outcome(issues), 200)
    return fhir_response(info_outcome("The resource is valid", "informational"), 200)


def _has_param(params: dict, name: str) -> bool:
    return any(isinstance(x, dict) and x.get("name") == name for x in params.get("parameter") or [])


async def not_found(request: Request) -> Response:
    return error_response(NotFound(f"No FHIR endpoint at {request.url.path}"))


routes = [
    Route("/metadata", metadata, methods=["GET"]),
    *fhir_export.routes,  # bulk $export: before the generic /{type}/{id} routes
    *fhir_access.routes,  # $emergency-access, $hide, $unhide: before them too
    Route("/", system_root, methods=["GET", "POST"]),
    Route("/_search", system_search_post, methods=["POST"]),
    Route("/_history", history, methods=["GET"]),
    Route("/{type}/_search", type_search_post, methods=["POST"]),
    Route("/{type}/_history", history, methods=["GET"]),
    Route("/{type}/$validate", validate, methods=["POST"]),
    Route("/{type}/{id}/$validate", validate, methods=["POST"]),
    Route("/Patient/{id}/$everything", everything, methods=["GET"]),
    Route("/{type}/{id}/_history", history, methods=["GET"]),
    Route("/{type}/{id}/_history/{vid}", vread, methods=["GET"]),
    Route("/{type}", type_root, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    Route("/{type}/{id}", instance, methods=["GET", "PUT", "PATCH", "DELETE"]),
]

__all__ = ["routes", "FHIR_JSON", "urlencode"]
