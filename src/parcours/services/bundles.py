"""Batch and transaction Bundles (FHIR R4 3.1.0.11).

A transaction is all-or-nothing in one database transaction. It runs in the order
the specification gives: DELETE first; then every created resource gets its id
(conditional creates are matched at this point, after the deletes) so that any
entry can point at it; conditional references (``Patient?identifier=s|v``) are
resolved; then POST, PUT/PATCH and GET run with ``urn:uuid`` references rewritten.
Any failure rolls everything back and is reported with the entry it came from.

A batch runs each entry in its own database transaction; entries fail
independently and each failure becomes that entry's OperationOutcome.

The response has one entry per request entry, in the request's order.
"""

from __future__ import annotations

import base64
import logging
import re
from dataclasses import dataclass
from datetime import UTC
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from parcours.core.errors import BadRequest, Issue, MultipleMatches, NotFound, ParcoursError, TooLarge, UnsupportedMedia
from parcours.core.ids import new_id
from parcours.security.caller import Caller
from parcours.services.platform import Platform
from parcours.store.repository import Repository, Stored

log = logging.getLogger(__name__)

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_URN_RE = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _status(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _instant(s: Stored) -> str:
    """entry.response.lastModified is a FHIR instant, not an HTTP date."""
    return s.last_updated.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Entry:
    """One request entry, parsed once."""

    index: int
    method: str
    rtype: str
    path: list[str]  # [Type], [Type, id] or [Type, id, _history, vid]
    query: str
    request: dict
    resource: Any
    full_url: str | None


async def process(platform: Platform, caller: Caller, bundle: Any, *, prefer_return: str | None = None) -> dict:
    """Run a batch or transaction Bundle; ``prefer_return`` is the Prefer header's
    ``return`` (``representation`` puts each written resource in its response entry,
    ``OperationOutcome`` an outcome; the default is the response alone)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BadRequest("POST to the base URL takes a Bundle of type batch or transaction",
                         [Issue("invalid", "POST to the base URL takes a Bundle of type batch or transaction", expression=("resourceType",))])
    btype = bundle.get("type")
    if btype not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type must be batch or transaction, not {btype!r}",
                         [Issue("value", f"Bundle.type must be batch or transaction, not {btype!r}", expression=("Bundle.type",))])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be an array", [Issue("structure", "Bundle.entry must be an array", expression=("Bundle.entry",))])
    if len(entries) > platform.settings.max_bundle_entries:
        raise TooLarge(f"The Bundle has {len(entries)} entries; the limit is {platform.settings.max_bundle_entries}")
    for i, e in enumerate(entries):
        req = e.get("request") if isinstance(e, dict) else None
        if not isinstance(req, dict) or req.get("method") not in ORDER or not isinstance(req.get("url"), str) or not req["url"].strip():
            msg = f"Bundle.entry[{i}].request must have a method (GET, HEAD, POST, PUT, PATCH, DELETE) and a url"
            raise BadRequest(msg, [Issue("required", msg, expression=(f"Bundle.entry[{i}].request",))])
    base = platform.settings.fhir_base
    if btype == "transaction":
        parsed = [_parse(e, i, base) for i, e in enumerate(entries)]
        async with platform.transaction(caller) as repo:
            responses = await _transaction(repo, parsed, prefer_return)
        return {"resourceType": "Bundle", "id": new_id(), "type": "transaction-response", "entry": responses}
    out: list[dict] = []
    for i, e in enumerate(entries):
        try:
            entry = _parse(e, i, base)
            async with platform.transaction(caller) as repo:
                if isinstance(entry.resource, dict):
                    refs: dict[str, str] = {}
                    await _resolve_conditional_refs(repo, entry.resource, refs, entry.rtype)
                    entry.resource = _rewrite(entry.resource, refs)
                out.append(await _run(repo, entry, {}, {}, prefer_return))
        except ParcoursError as err:
            out.append(_failure(err))
        except Exception:  # one broken entry must not take the others down
            log.exception("Batch entry %s failed", i)
            out.append(_failure(ParcoursError("Internal error: the entry was not carried out", status=500, code="PRC-1500", fhir_code="exception")))
    return {"resourceType": "Bundle", "id": new_id(), "type": "batch-response", "entry": out}


def _failure(err: ParcoursError) -> dict:
    return {"response": {"status": _status(err.status), "outcome": {"resourceType": "OperationOutcome", "issue": [x.to_fhir() for x in err.issues]}}}


def _parse(e: dict, i: int, base: str) -> _Entry:
    req = e["request"]
    url = req["url"].strip()
    if url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    parts = urlsplit(url.lstrip("/"))
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme or parts.netloc or not path:
        msg = f"Bundle.entry[{i}].request.url must be relative to the base, such as Patient/123, got {req['url']!r}"
        raise BadRequest(msg, [Issue("value", msg, expression=(f"Bundle.entry[{i}].request.url",))])
    full = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None
    return _Entry(i, req["method"], path[0], path, parts.query, req, e.get("resource"), full)


async def _transaction(repo: Repository, entries: list[_Entry], ret: str | None) -> list[dict]:
    _check_distinct(entries)
    id_map: dict[str, str] = {}
    preset: dict[int, str] = {}  # entry -> id its create will use
    matched: dict[int, Stored] = {}  # conditional creates that found their resource
    first: dict[tuple[str, str], int] = {}  # conditional create criteria -> the entry that creates
    alias: dict[int, int] = {}  # a repeated conditional create -> the entry that creates for it
    responses: list[dict | None] = [None] * len(entries)
    # 1. Deletes.
    for e in entries:
        if e.method == "DELETE":
            responses[e.index] = await _at(e, _run(repo, e, preset, matched, ret))
    # 2. Ids of everything the transaction creates, and of what conditional entries match.
    for e in entries:
        try:
            if e.method == "POST":
                repo.check_type(e.rtype)
                if e.request.get("ifNoneExist"):
                    found = await repo._conditional_match(e.rtype, e.request["ifNoneExist"], "create")
                    if found is not None:
                        matched[e.index] = found
                        if e.full_url:
                            id_map[e.full_url] = f"{e.rtype}/{found.id}"
                        continue
                    key = (e.rtype, e.request["ifNoneExist"])
                    if key in first:  # the same criteria twice: one resource, created once
                        alias[e.index] = first[key]
                        if e.full_url:
                            id_map[e.full_url] = f"{e.rtype}/{preset[first[key]]}"
                        continue
                    first[key] = e.index
                preset[e.index] = new_id()
                if e.full_url:
                    id_map[e.full_url] = f"{e.rtype}/{preset[e.index]}"
            elif e.method == "PUT" and e.full_url:
                repo.check_type(e.rtype)
                if e.query:
                    ids = await repo._matches(e.rtype, e.query, limit=2, lock=True)
                    if len(ids) > 1:
                        raise MultipleMatches(f"The criteria {e.query!r} match more than one {e.rtype}")
                    body_id = e.resource.get("id") if isinstance(e.resource, dict) else None
                    rid = ids[0] if ids else (body_id or new_id())
                    if not ids and not body_id:
                        preset[e.index] = rid
                    id_map[e.full_url] = f"{e.rtype}/{rid}"
                elif len(e.path) == 2:
                    id_map[e.full_url] = f"{e.rtype}/{e.path[1]}"
        except ParcoursError as err:
            raise _locate(err, e.index) from None
    # 3. Conditional references: each must match exactly one resource.
    for e in entries:
        if isinstance(e.resource, dict) and e.method in ("POST", "PUT"):
            try:
                await _resolve_conditional_refs(repo, e.resource, id_map, e.rtype)
            except ParcoursError as err:
                raise _locate(err, e.index) from None
    # 4. Creates, updates and patches, then reads, with placeholders rewritten.
    for e in sorted((e for e in entries if e.method != "DELETE"), key=lambda e: ORDER[e.method]):
        if isinstance(e.resource, dict) and e.method in ("POST", "PUT"):
            e.resource = _rewrite(e.resource, id_map)
            left = _unresolved(e.resource, e.rtype)
            if left:
                path, ref = left
                msg = f"The reference {ref!r} matches no fullUrl of this transaction"
                raise BadRequest(f"Bundle.entry[{e.index}]: {msg}", [Issue("not-found", f"Bundle.entry[{e.index}]: {msg}",
                                                                          expression=(_resource_path(path, e.index),))])
        if e.query and "urn:" in e.query:
            e.query = _rewrite_query(e.query, id_map)
        responses[e.index] = await _at(e, _run(repo, e, preset, matched, ret, alias))
    return [r or {} for r in responses]


def _check_distinct(entries: list[_Entry]) -> None:
    """One transaction may not touch one resource twice, nor repeat a fullUrl."""
    seen: dict[str, int] = {}
    urls: dict[str, int] = {}
    for e in entries:
        if e.method in ("PUT", "PATCH", "DELETE") and len(e.path) == 2 and not e.query:
            key = f"{e.rtype}/{e.path[1]}"
            if key in seen:
                msg = f"Bundle.entry[{e.index}] and Bundle.entry[{seen[key]}] both change {key}"
                raise BadRequest(msg, [Issue("invalid", msg, expression=(f"Bundle.entry[{e.index}].request.url",))])
            seen[key] = e.index
        if e.full_url and e.method in ("POST", "PUT"):
            if e.full_url in urls:
                msg = f"Bundle.entry[{e.index}] repeats the fullUrl of Bundle.entry[{urls[e.full_url]}]"
                raise BadRequest(msg, [Issue("invalid", msg, expression=(f"Bundle.entry[{e.index}].fullUrl",))])
            urls[e.full_url] = e.index


async def _at(e: _Entry, work: Any) -> dict:
    try:
        return await work
    except ParcoursError as err:
        raise _locate(err, e.index) from None


def _locate(err: ParcoursError, i: int) -> ParcoursError:
    """Point the error's issues at the entry they come from."""
    err.issues = [
        Issue(x.code, x.diagnostics if x.diagnostics.startswith("Bundle.entry[") else f"Bundle.entry[{i}]: {x.diagnostics}",
              x.severity, tuple(_resource_path(p, i) for p in x.expression) or (f"Bundle.entry[{i}]",))
        for x in err.issues
    ]
    return err


def _resource_path(expr: str, i: int) -> str:
    if expr.startswith("Bundle."):
        return expr
    head, _, tail = expr.partition(".")
    if head[:1].isupper():  # rooted at the resource: Patient.name[0].given
        return f"Bundle.entry[{i}].resource" + (f".{tail}" if tail else "")
    if expr == "resourceType":
        return f"Bundle.entry[{i}].resource.resourceType"
    return f"Bundle.entry[{i}].request.url"  # a search parameter of the url or ifNoneExist


async def _resolve_conditional_refs(repo: Repository, node: Any, id_map: dict[str, str], path: str) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "?" in ref and not ref.startswith(("http:", "https:", "urn:", "#")) and ref not in id_map:
            rtype, _, query = ref.partition("?")
            where = f"{path}.reference"
            try:
                repo.check_type(rtype)
                ids = await repo._matches(rtype, query, limit=2, lock=False)
            except ParcoursError as err:
                err.issues = [Issue(x.code, x.diagnostics, x.severity, (where,)) for x in err.issues]
                raise
            if len(ids) != 1:
                msg = (f"The conditional reference {ref!r} matches no {rtype}" if not ids
                       else f"The conditional reference {ref!r} matches more than one {rtype}")
                kind = NotFound if not ids else MultipleMatches
                raise kind(msg, [Issue("not-found" if not ids else "multiple-matches", msg, expression=(where,))])
            id_map[ref] = f"{rtype}/{ids[0]}"
        for k, v in node.items():
            await _resolve_conditional_refs(repo, v, id_map, f"{path}.{k}")
    elif isinstance(node, list):
        for n, v in enumerate(node):
            await _resolve_conditional_refs(repo, v, id_map, f"{path}[{n}]")


def _rewrite(node: Any, id_map: dict[str, str]) -> Any:
    if not id_map:
        return node
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in id_map:
                out[k] = id_map[v]
            elif k == "div" and isinstance(v, str) and "urn:uuid:" in v:
                out[k] = _URN_RE.sub(lambda m: id_map.get(m.group(0), m.group(0)), v)
            else:
                out[k] = _rewrite(v, id_map)
        return out
    if isinstance(node, list):
        return [_rewrite(v, id_map) for v in node]
    return node


def _unresolved(node: Any, path: str) -> tuple[str, str] | None:
    """The first ``urn:uuid`` reference left once placeholders are rewritten."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.startswith("urn:uuid:"):
            return f"{path}.reference", ref
        for k, v in node.items():
            if k != "contained":
                found = _unresolved(v, f"{path}.{k}")
                if found:
                    return found
    elif isinstance(node, list):
        for n, v in enumerate(node):
            found = _unresolved(v, f"{path}[{n}]")
            if found:
                return found
    return None


def _rewrite_query(query: str, id_map: dict[str, str]) -> str:
    from urllib.parse import urlencode

    items = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, id_map.get(v, v)) for k, v in items])


def _written(s: Stored, status: int, ret: str | None) -> dict:
    out: dict[str, Any] = {
        "response": {
            "status": _status(status),
            "location": f"{s.resource_type}/{s.id}/_history/{s.version_id}",
            "etag": s.etag,
            "lastModified": _instant(s),
        }
    }
    if ret == "representation" and s.content is not None:
        out["resource"] = orjson.Fragment(s.content)
    elif ret == "OperationOutcome":
        out["response"]["outcome"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "information", "code": "informational", "diagnostics": f"{s.resource_type}/{s.id} version {s.version_id} stored"}]}
    return out


def _patch_document(body: Any) -> tuple[Any, bool]:
    """A Bundle carries a JSON Patch as a Binary (base64 data); a bare array is taken too."""
    if isinstance(body, dict) and body.get("resourceType") == "Binary" and body.get("data"):
        try:
            return orjson.loads(base64.b64decode(body["data"])), False
        except (ValueError, orjson.JSONDecodeError) as e:
            raise BadRequest(f"The Binary of a PATCH entry must hold a JSON Patch: {e}") from None
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        raise UnsupportedMedia("FHIRPath Patch is not supported: send a JSON Patch in a Binary (application/json-patch+json)")
    if isinstance(body, list):
        return body, False
    raise BadRequest("A PATCH entry needs a JSON Patch: a Binary with contentType application/json-patch+json")


async def _run(repo: Repository, e: _Entry, preset: dict[int, str], matched: dict[int, Stored], ret: str | None,
               alias: dict[int, int] | None = None) -> dict:
    rtype, path, query, req, body = e.rtype, e.path, e.query, e.request, e.resource
    repo.check_type(rtype)
    if e.method == "POST":
        if len(path) != 1:
            raise BadRequest(f"POST needs a type such as Patient, got {req['url']!r}")
        if e.index in matched:
            return _written(matched[e.index], 200, ret)
        if alias and e.index in alias:
            return _written(await repo.read(rtype, preset[alias[e.index]]), 200, ret)
        if e.index in preset:
            r = await repo.create(rtype, body, rid=preset[e.index])
        else:
            r = await repo.create(rtype, body, if_none_exist=req.get("ifNoneExist"))
        return _written(r.stored, 201 if r.created else 200, ret)
    if e.method == "PUT":
        if query:
            r = await repo.conditional_update(rtype, query, body, if_match=req.get("ifMatch"), new_id=preset.get(e.index))
        elif len(path) == 2:
            r = await repo.update(rtype, path[1], body, if_match=req.get("ifMatch"))
        else:
            raise BadRequest(f"PUT needs Type/id or Type?criteria, got {req['url']!r}")
        return _written(r.stored, 201 if r.created else 200, ret)
    if e.method == "PATCH":
        ops, merge = _patch_document(body)
        if query:
            r = await repo.conditional_patch(rtype, query, ops, if_match=req.get("ifMatch"), merge=merge)
        elif len(path) == 2:
            r = await repo.patch(rtype, path[1], ops, if_match=req.get("ifMatch"), merge=merge)
        else:
            raise BadRequest(f"PATCH needs Type/id or Type?criteria, got {req['url']!r}")
        return _written(r.stored, 200, ret)
    if e.method == "DELETE":
        out: dict[str, Any] = {"status": _status(204)}
        if query:
            await repo.conditional_delete(rtype, query)
        elif len(path) == 2:
            version = await repo.delete(rtype, path[1], if_match=req.get("ifMatch"))
            if version:
                out["etag"] = f'W/"{version}"'
        else:
            raise BadRequest(f"DELETE needs Type/id or Type?criteria, got {req['url']!r}")
        return {"response": out}
    # GET / HEAD: search, read or vread.
    if len(path) == 1:
        sreq = repo.parse_search(rtype, parse_qsl(query, keep_blank_values=True))
        res = await repo.search(sreq)
        entries = [{"fullUrl": f"{repo.base_url}/{m.resource_type}/{m.id}", "resource": orjson.Fragment(m.content or "{}"), "search": {"mode": mode}}
                   for mode, group in (("match", res.matches), ("include", res.includes)) for m in group]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if res.total is not None:
            bundle["total"] = res.total
        bundle["entry"] = entries
        return {"resource": bundle, "response": {"status": _status(200)}}
    if len(path) == 2:
        s = await repo.read(rtype, path[1])
    elif len(path) == 4 and path[2] == "_history":
        s = await repo.vread(rtype, path[1], path[3])
    else:
        raise BadRequest(f"Unsupported GET in a Bundle: {req['url']!r}")
    if req.get("ifNoneMatch") and req["ifNoneMatch"].removeprefix("W/").strip('"') == str(s.version_id):
        return {"response": {"status": _status(304), "etag": s.etag}}
    resp = _written(s, 200, None)
    resp["response"].pop("location")
    return {"resource": orjson.Fragment(s.content or "{}"), **resp}


# -- Shared with the importer (services/importer.py): the same rules for Bundles
# read from files, on a transaction the importer owns. ---------------------------
parse_entry = _parse
check_distinct = _check_distinct
rewrite_references = _rewrite
first_unresolved = _unresolved


async def run_transaction(repo: Repository, entries: list[_Entry]) -> list[dict]:
    """A transaction's parsed entries on ``repo``'s open transaction; the caller
    rolls back when this raises."""
    return await _transaction(repo, entries, None)


async def run_batch_entry(repo: Repository, entry: _Entry) -> dict:
    """One parsed batch entry on ``repo``'s open transaction, as ``process`` runs it."""
    if isinstance(entry.resource, dict):
        refs: dict[str, str] = {}
        await _resolve_conditional_refs(repo, entry.resource, refs, entry.rtype)
        entry.resource = _rewrite(entry.resource, refs)
    return await _run(repo, entry, {}, {}, None)
