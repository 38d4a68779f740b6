"""Batch and transaction Bundles (FHIR R4 3.1.0.11).

A transaction is all-or-nothing in one database transaction: ``urn:uuid``
full URLs and conditional references are resolved before anything is written,
entries run in the order the specification gives (DELETE, POST, PUT/PATCH,
GET), and any failure rolls everything back. A batch runs each entry in its own
savepoint and reports each outcome.
"""

from __future__ import annotations

import re
from datetime import UTC
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from parcours.core.errors import BadRequest, Issue, NotFound, ParcoursError, MultipleMatches, TooLarge
from parcours.core.ids import new_id
from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.store.repository import Repository, Stored

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_REF_KEY = "reference"


def _status(code: int) -> str:
    return {200: "200 OK", 201: "201 Created", 204: "204 No Content"}.get(code, str(code))


async def process(platform: Platform, caller: Caller, bundle: Any) -> dict:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest("POST to the base URL takes a Bundle of type batch or transaction")
    btype = bundle.get("type")
    if btype not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type must be batch or transaction, not {btype!r}")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array")
    if len(entries) > platform.settings.max_bundle_entries:
        raise TooLarge(f"The Bundle has {len(entries)} entries; the limit is {platform.settings.max_bundle_entries}")
    for i, e in enumerate(entries):
        req = e.get("request") if isinstance(e, dict) else None
        if not isinstance(req, dict) or req.get("method") not in ORDER or not isinstance(req.get("url"), str):
            raise BadRequest(f"Bundle.entry[{i}].request must have a method (GET, POST, PUT, PATCH, DELETE) and a url",
                             [Issue("required", f"Bundle.entry[{i}].request is missing or invalid", expression=(f"Bundle.entry[{i}].request",))])
    if btype == "transaction":
        async with platform.transaction(caller) as repo:
            responses = await _transaction(repo, entries)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}
    responses = []
    async with platform.pool.connection() as conn:
        repo = platform.repository(conn, caller)
        for i, e in enumerate(entries):
            try:
                async with conn.transaction():
                    responses.append(await _run(repo, e, {}, i))
            except ParcoursError as err:
                responses.append({"response": {"status": str(err.status), "outcome": {"resourceType": "OperationOutcome", "issue": [x.to_fhir() for x in err.issues]}}})
    return {"resourceType": "Bundle", "type": "batch-response", "entry": responses}


async def _transaction(repo: Repository, entries: list[dict]) -> list[dict]:
    id_map: dict[str, str] = {}
    # 1. Give every created resource its id up front so references can point at it.
    preset: dict[int, str] = {}
    for i, e in enumerate(entries):
        req = e["request"]
        full = e.get("fullUrl")
        if req["method"] == "POST":
            rtype = req["url"].split("?")[0].strip("/")
            if req.get("ifNoneExist"):
                try:
                    existing = await repo._conditional_match(rtype, req["ifNoneExist"], "create")
                except ParcoursError as err:
                    raise _at(err, i) from None
                if existing is not None:
                    preset[i] = "existing:" + existing.id
                    if full:
                        id_map[full] = f"{rtype}/{existing.id}"
                    continue
            rid = new_id()
            preset[i] = rid
            if full:
                id_map[full] = f"{rtype}/{rid}"
        elif req["method"] == "PUT" and full:
            url = req["url"].strip("/")
            if "?" not in url and url.count("/") == 1:
                id_map[full] = url
    # 2. Conditional references ("Patient?identifier=...") must match exactly one.
    for i, e in enumerate(entries):
        res = e.get("resource")
        if isinstance(res, dict):
            try:
                await _resolve_conditional_refs(repo, res, id_map)
            except ParcoursError as err:
                raise _at(err, i) from None
    order = sorted(range(len(entries)), key=lambda i: ORDER[entries[i]["request"]["method"]])
    responses: list[dict | None] = [None] * len(entries)
    for i in order:
        e = entries[i]
        if isinstance(e.get("resource"), dict):
            e = {**e, "resource": _rewrite(e["resource"], id_map)}
        if isinstance(e["request"].get("url"), str):
            e = {**e, "request": {**e["request"], "url": _rewrite_url(e["request"]["url"], id_map)}}
        try:
            responses[i] = await _run(repo, e, preset, i)
        except ParcoursError as err:
            raise _at(err, i) from None
    return [r or {} for r in responses]


def _at(err: ParcoursError, i: int) -> ParcoursError:
    err.issues = [Issue(x.code, f"Bundle.entry[{i}]: {x.diagnostics}", x.severity, x.expression) for x in err.issues]
    return err


async def _resolve_conditional_refs(repo: Repository, node: Any, id_map: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get(_REF_KEY)
        if isinstance(ref, str) and "?" in ref and not ref.startswith(("http", "urn:")) and ref not in id_map:
            rtype, _, query = ref.partition("?")
            repo.check_type(rtype)
            ids = await repo._matches(rtype, query, limit=2, lock=False)
            if len(ids) != 1:
                if not ids:
                    raise NotFound(f"The conditional reference {ref!r} matches no {rtype}")
                raise MultipleMatches(f"The conditional reference {ref!r} matches more than one {rtype}")
            id_map[ref] = f"{rtype}/{ids[0]}"
        for v in node.values():
            await _resolve_conditional_refs(repo, v, id_map)
    elif isinstance(node, list):
        for v in node:
            await _resolve_conditional_refs(repo, v, id_map)


def _rewrite(node: Any, id_map: dict[str, str]) -> Any:
    if not id_map:
        return node
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == _REF_KEY and isinstance(v, str) and v in id_map:
                out[k] = id_map[v]
            elif k == "div" and isinstance(v, str) and "urn:uuid:" in v:
                out[k] = re.sub(r'urn:uuid:[0-9a-fA-F\-]{36}', lambda m: id_map.get(m.group(0), m.group(0)), v)
            else:
                out[k] = _rewrite(v, id_map)
        return out
    if isinstance(node, list):
        return [_rewrite(v, id_map) for v in node]
    return node


def _rewrite_url(url: str, id_map: dict[str, str]) -> str:
    for k, v in id_map.items():
        if k.startswith("urn:") and k in url:
            url = url.replace(k, v.split("/", 1)[1] if "?" in url else v)
    return url


def _entry_response(s: Stored, status: int) -> dict:
    return {
        "status": _status(status),
        "location": f"{s.resource_type}/{s.id}/_history/{s.version_id}",
        "etag": s.etag,
        "lastModified": format_datetime(s.last_updated.astimezone(UTC), usegmt=True),
    }


async def _run(repo: Repository, e: dict, preset: dict[int, str], i: int) -> dict:
    req = e["request"]
    method, url = req["method"], req["url"].lstrip("/")
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme or not path:
        raise BadRequest(f"Bundle.entry[{i}].request.url must be relative, such as Patient/123, got {req['url']!r}")
    rtype = path[0]
    repo.check_type(rtype)
    body = e.get("resource")
    if method == "POST":
        p = preset.get(i)
        if p and p.startswith("existing:"):
            s = await repo.read(rtype, p.split(":", 1)[1])
            return {"response": _entry_response(s, 200)}
        if p is None and req.get("ifNoneExist"):
            r = await repo.create(rtype, body, if_none_exist=req["ifNoneExist"])
        else:
            r = await repo.create(rtype, body, rid=p)
        return {"response": _entry_response(r.stored, 201 if r.created else 200)}
    if method == "PUT":
        if parts.query:
            r = await repo.conditional_update(rtype, parts.query, body)
        elif len(path) == 2:
            r = await repo.update(rtype, path[1], body, if_match=req.get("ifMatch"))
        else:
            raise BadRequest(f"PUT needs Type/id or Type?criteria, got {url!r}")
        return {"response": _entry_response(r.stored, 201 if r.created else 200)}
    if method == "PATCH":
        ops = body
        if isinstance(body, dict) and body.get("resourceType") == "Binary" and body.get("data"):
            import base64
            import orjson

            ops = orjson.loads(base64.b64decode(body["data"]))
        if len(path) != 2:
            raise BadRequest(f"PATCH needs Type/id, got {url!r}")
        r = await repo.patch(rtype, path[1], ops, if_match=req.get("ifMatch"))
        return {"response": _entry_response(r.stored, 200)}
    if method == "DELETE":
        if parts.query:
            await repo.conditional_delete(rtype, parts.query)
        elif len(path) == 2:
            await repo.delete(rtype, path[1])
        else:
            raise BadRequest(f"DELETE needs Type/id or Type?criteria, got {url!r}")
        return {"response": {"status": "204 No Content"}}
    # GET / HEAD: read, vread or search
    if len(path) == 1:
        import orjson

        req_ = repo.parse_search(rtype, parse_qsl(parts.query, keep_blank_values=True))
        res = await repo.search(req_)
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": res.total if res.total is not None else len(res.matches),
                  "entry": [{"fullUrl": f"{repo.base_url}/{m.resource_type}/{m.id}", "resource": orjson.loads(m.content or "{}"), "search": {"mode": "match"}} for m in res.matches]}
        return {"resource": bundle, "response": {"status": "200 OK"}}
    if len(path) == 2:
        s = await repo.read(rtype, path[1])
    elif len(path) == 4 and path[2] == "_history":
        s = await repo.vread(rtype, path[1], path[3])
    else:
        raise BadRequest(f"Unsupported GET in a Bundle: {url!r}")
    return {"resource": s.resource(), "response": _entry_response(s, 200)}
