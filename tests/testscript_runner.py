"""A small runner for FHIR R4 TestScript resources, over real HTTP.

It interprets the JSON of a TestScript as the specification describes it
(http://hl7.org/fhir/R4/testscript.html): fixtures, variables, then setup, each
test and teardown. An ``operation`` becomes one HTTP call (``type.code``,
``resource``, ``params``/``url``/``targetId``, ``sourceId`` as body,
``responseId``/``requestId`` to keep the exchange); an ``assert`` checks the last
(or a named) exchange. A failed assert in setup skips the tests; in a test it
ends that test, unless the runner is told to keep going. Teardown always runs.

This server speaks JSON only: with ``xml_as_json`` an operation that asks for XML
is sent as JSON (the assert that checks for XML then fails, as it should). XPath
``path`` expressions (``fhir:Patient/fhir:name/fhir:family/@value``) are mapped
to FHIRPath (``Patient.name.family``), keeping XPath's meaning for a comparison:
the first value found. Profiles can only be the base ones
(``http://hl7.org/fhir/StructureDefinition/<Type>``); the server's ``$validate``
checks them.

Where the spec leaves room, this runner follows it rather than the Ruby
``testscript_engine``: ``navigationLinks`` checks that the links a Bundle gives
are valid (a self link, and every other one answers with a Bundle of the same
type), not that first, last and next are all there, which an empty or
one-page result cannot give.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models

R4 = models["r4"]
MIME = {"json": "application/fhir+json", "xml": "application/fhir+xml", "ttl": "text/turtle", "none": None}
RESPONSE_CODES = {
    "okay": 200, "created": 201, "noContent": 204, "notModified": 304, "bad": 400, "forbidden": 403,
    "notFound": 404, "methodNotAllowed": 405, "conflict": 409, "gone": 410, "preconditionFailed": 412,
    "unprocessable": 422,
}
METHODS = {
    "read": "GET", "vread": "GET", "search": "GET", "history": "GET", "capabilities": "GET", "create": "POST",
    "update": "PUT", "updateCreate": "PUT", "patch": "PATCH", "delete": "DELETE", "deleteCondSingle": "DELETE",
    "deleteCondMultiple": "DELETE", "batch": "POST", "transaction": "POST", "validate": "POST",
}
# The assertion an assert makes, by the first of these elements it has.
ASSERT_KINDS = ("response", "responseCode", "contentType", "headerField", "resource", "validateProfileId", "minimumId",
                "navigationLinks", "requestURL", "requestMethod", "expression", "path")
_VAR = re.compile(r"\$\{([A-Za-z0-9_\-.]+)\}")
BASE_PROFILE = "http://hl7.org/fhir/StructureDefinition/"


class AssertFailed(Exception):
    pass


class Unsupported(Exception):
    pass


@dataclass
class Outcome:
    section: str  # "setup", a test id, "teardown"
    action: int  # position in its section, from 1
    kind: str  # operation | assert
    label: str
    result: str  # pass | fail | warning | error | skip
    message: str = ""

    def __str__(self) -> str:
        return f"[{self.result}] {self.section} #{self.action} {self.kind} {self.label}: {self.message}"


@dataclass
class Report:
    script: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result in ("fail", "error")]

    def summary(self) -> str:
        return "\n".join(str(o) for o in self.outcomes)


@dataclass
class Exchange:
    method: str
    url: str
    request_headers: dict[str, str]
    payload: Any
    status: int
    headers: httpx.Headers
    body: Any  # parsed JSON, or None


class TestScriptRunner:
    __test__ = False  # not a pytest class

    def __init__(self, base_url: str, *, fixtures_dir: Path, token: str | None = None, variables: dict[str, str] | None = None,
                 id_suffix: str | None = None, xml_as_json: bool = True, keep_going: bool = False, timeout: float = 15.0) -> None:
        self.base = base_url.rstrip("/")
        self.fixtures_dir = fixtures_dir
        self.given = dict(variables or {})
        self.id_suffix = id_suffix
        self.xml_as_json = xml_as_json
        self.keep_going = keep_going
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    # -- a script --------------------------------------------------------------------------
    def run(self, script: dict, tests: list[str] | None = None) -> Report:
        self.script = script
        self.report = Report(script.get("id", "?"))
        self.fixtures: dict[str, Any] = {}
        self.exchanges: dict[str, Exchange] = {}  # by responseId / requestId
        self.last: Exchange | None = None
        self.ids: dict[str, str] = {}  # fixture or response id -> server id
        self.variables = {v["name"]: v for v in script.get("variable", [])}
        self.profiles = {p["id"]: p.get("reference", "") for p in script.get("profile", [])}
        self._load_fixtures()
        autodelete = []
        for fx in script.get("fixture", []):
            if fx.get("autocreate") and fx["id"] in self.fixtures:
                self._section("setup", [{"operation": {"type": {"code": "create"}, "sourceId": fx["id"], "label": f"autocreate {fx['id']}"}}])
            if fx.get("autodelete"):
                autodelete.append({"operation": {"type": {"code": "delete"}, "targetId": fx["id"], "label": f"autodelete {fx['id']}"}})
        ok = self._section("setup", script.get("setup", {}).get("action", []))
        for test in script.get("test", []):
            tid = test.get("id") or test.get("name") or "test"
            if tests is not None and tid not in tests:
                continue
            if not ok:
                self.report.outcomes.append(Outcome(tid, 0, "test", tid, "skip", "setup failed"))
                continue
            self._section(tid, test.get("action", []))
        self._section("teardown", script.get("teardown", {}).get("action", []) + autodelete, teardown=True)
        return self.report

    def _section(self, name: str, actions: list[dict], *, teardown: bool = False) -> bool:
        """Run actions; False when one failed (the rest of the section is skipped)."""
        for n, action in enumerate(actions, 1):
            kind = "operation" if "operation" in action else "assert"
            body = action.get(kind) or {}
            label = body.get("label") or body.get("description", "")[:60]
            try:
                message = self._operation(body) if kind == "operation" else self._assert(body)
                self.report.outcomes.append(Outcome(name, n, kind, label, "pass", message))
            except AssertFailed as e:
                result = "warning" if body.get("warningOnly") else "fail"
                self.report.outcomes.append(Outcome(name, n, kind, label, result, str(e)))
                if result == "fail" and not teardown and not self.keep_going:
                    self._skip(name, actions, n)
                    return False
            except (Unsupported, httpx.HTTPError, KeyError, ValueError, TypeError) as e:
                self.report.outcomes.append(Outcome(name, n, kind, label, "error", f"{type(e).__name__}: {e}"))
                if not teardown:
                    self._skip(name, actions, n)
                    return False
        return not any(o.result in ("fail", "error") for o in self.report.outcomes if o.section == name)

    def _skip(self, name: str, actions: list[dict], n: int) -> None:
        for m, action in enumerate(actions[n:], n + 1):
            kind = "operation" if "operation" in action else "assert"
            self.report.outcomes.append(Outcome(name, m, kind, (action.get(kind) or {}).get("label", ""), "skip", "after a failure"))

    # -- fixtures and variables ------------------------------------------------------------------
    def _load_fixtures(self) -> None:
        for fx in self.script.get("fixture", []):
            ref = (fx.get("resource") or {}).get("reference", "")
            if ref.startswith("#"):
                found = [r for r in self.script.get("contained", []) if r.get("id") == ref[1:]]
                resource = copy.deepcopy(found[0]) if found else None
            elif ref.startswith("http") or re.match(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]+$", ref):
                r = self.http.get(ref if ref.startswith("http") else f"{self.base}/{ref}", headers={"Accept": MIME["json"]})
                resource = r.json() if r.status_code == 200 else None
            else:
                path = self.fixtures_dir / ref
                resource = json.loads(path.read_text("utf-8")) if path.is_file() else None
            if resource is None:
                raise Unsupported(f"fixture {fx.get('id')}: cannot load {ref!r}")
            if self.id_suffix and isinstance(resource, dict) and resource.get("id"):
                # Unique ids keep runs apart in a shared database.
                resource["id"] = f"{resource['id']}-{self.id_suffix}"[:64]
            self.fixtures[fx["id"]] = resource

    def subst(self, text: str | None) -> str | None:
        if not text or "${" not in text:
            return text

        def one(m: re.Match) -> str:
            value = self.variable(m.group(1))
            if value is None:
                raise Unsupported(f"variable {m.group(1)!r} has no value (give it to the runner)")
            return value

        return _VAR.sub(one, text)

    def variable(self, name: str) -> str | None:
        if name in self.given:
            return self.given[name]
        var = self.variables.get(name)
        if var is None:
            return None
        value: Any = None
        if var.get("expression"):
            values = self._fhirpath(var["expression"], self.resource(var.get("sourceId")))
            value = _text(values[0]) if values else None
        elif var.get("path"):
            values = self._fhirpath(xpath_to_fhirpath(var["path"]), self.resource(var.get("sourceId")))
            value = _text(values[0]) if values else None
        elif var.get("headerField"):
            ex = self.exchanges.get(var.get("sourceId", "")) if var.get("sourceId") else self.last
            value = ex.headers.get(var["headerField"]) if ex else None
        return value if value is not None else var.get("defaultValue")

    def resource(self, source_id: str | None, *, request: bool = False) -> Any:
        """The body named by ``source_id`` (a response/request id or a fixture), or the last one."""
        if source_id:
            if source_id in self.exchanges:
                ex = self.exchanges[source_id]
                return ex.payload if request else ex.body
            if source_id in self.fixtures:
                return self.fixtures[source_id]
            raise Unsupported(f"no fixture or response named {source_id!r}")
        if self.last is None:
            return None
        return self.last.payload if request else self.last.body

    # -- operations ------------------------------------------------------------------------------
    def _operation(self, op: dict) -> str:
        code = (op.get("type") or {}).get("code", "")
        method = (op.get("method") or METHODS.get(code, "GET")).upper()
        note = ""
        accept, content_type = self._mime(op.get("accept")), self._mime(op.get("contentType"))
        if "xml" in (op.get("accept", "") + op.get("contentType", "")) and self.xml_as_json:
            note = " (asked for XML: sent as JSON)"
        headers = {"Accept": accept or MIME["json"]}
        for h in op.get("requestHeader", []):
            headers[h["field"]] = self.subst(h["value"]) or ""
        payload = None
        if op.get("sourceId") and method in ("POST", "PUT", "PATCH"):
            payload = self.resource(op["sourceId"])
            headers["Content-Type"] = content_type or MIME["json"]
        url = self._url(op, code, payload)
        content = json.dumps(payload).encode() if payload is not None else None
        r = self.http.request(method, url, headers=headers, content=content)
        try:
            body = r.json() if r.content else None
        except ValueError:
            body = None
        ex = Exchange(method, str(r.request.url), headers, payload, r.status_code, r.headers, body)
        self.last = ex
        for key in ("responseId", "requestId"):
            if op.get(key):
                self.exchanges[op[key]] = ex
        self._note_ids(op, ex)
        return f"{method} {ex.url} -> {r.status_code}{note}"

    def _mime(self, code: str | None) -> str | None:
        if not code:
            return None
        mime = MIME.get(code, code)
        if mime and "xml" in mime and self.xml_as_json:
            return MIME["json"]
        return mime

    def _url(self, op: dict, code: str, payload: Any) -> str:
        if op.get("url"):
            return urljoin(self.base + "/", self.subst(op["url"]) or "")
        rtype = op.get("resource")
        if code == "capabilities":
            return f"{self.base}/metadata"
        if code in ("batch", "transaction"):
            return self.base
        if op.get("params"):
            return f"{self.base}/{rtype or ''}{self.subst(op['params'])}"
        if op.get("targetId"):
            target = self.resource(op["targetId"]) if op["targetId"] in self.exchanges or op["targetId"] in self.fixtures else None
            rtype = rtype or (target or {}).get("resourceType")
            rid = self.ids.get(op["targetId"]) or (target or {}).get("id")
            if not rid:
                raise Unsupported(f"targetId {op['targetId']!r} names no resource with an id")
            url = f"{self.base}/{rtype}/{rid}"
            if code == "vread":
                url += f"/_history/{((target or {}).get('meta') or {}).get('versionId', '')}"
            elif code == "history":
                url += "/_history"
            return url
        if code in ("update", "updateCreate") and isinstance(payload, dict) and payload.get("id"):
            return f"{self.base}/{rtype or payload['resourceType']}/{payload['id']}"
        rtype = rtype or (payload or {}).get("resourceType", "")
        if code == "history":
            return f"{self.base}/{rtype}/_history"
        if code == "validate":
            return f"{self.base}/{rtype}/$validate"
        return f"{self.base}/{rtype}"

    def _note_ids(self, op: dict, ex: Exchange) -> None:
        """Remember the server's id of what an operation created or read, for later targetIds."""
        if op.get("targetId") and ex.method == "DELETE" and ex.status in (200, 202, 204):
            self.ids.pop(op["targetId"], None)
            return
        rid = ex.body.get("id") if isinstance(ex.body, dict) and ex.body.get("resourceType") not in (None, "OperationOutcome", "Bundle") else None
        if rid is None and ex.headers.get("location"):
            m = re.search(r"/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/|$)", ex.headers["location"])
            rid = m.group(2) if m else None
        if rid:
            for key in ("responseId", "sourceId"):
                if op.get(key):
                    self.ids[op[key]] = rid

    # -- asserts -----------------------------------------------------------------------------------
    def _assert(self, a: dict) -> str:
        kind = next((k for k in ASSERT_KINDS if k in a), None)
        if kind is None:
            raise Unsupported(f"assert without a known assertion: {sorted(a)}")
        request = a.get("direction") == "request"
        ex = self.exchanges.get(a["sourceId"]) if a.get("sourceId") in self.exchanges else self.last
        op = a.get("operator")
        if kind in ("response", "responseCode"):
            _need(ex)
            if kind == "response":
                expected_code = RESPONSE_CODES.get(a["response"])
                if expected_code is None:
                    raise Unsupported(f"response code name {a['response']!r}")
                return _compare("response", str(ex.status), op, str(expected_code))
            return _compare("responseCode", str(ex.status), op, a["responseCode"])
        if kind == "contentType":
            _need(ex)
            got = (ex.request_headers.get("Content-Type") if request else ex.headers.get("content-type")) or ""
            got = got.split(";")[0].strip().lower()
            want = MIME.get(a["contentType"], a["contentType"])
            return _compare("contentType", got, op, want)
        if kind == "headerField":
            _need(ex)
            got = ex.request_headers.get(a["headerField"]) if request else ex.headers.get(a["headerField"])
            return _compare(f"header {a['headerField']}", got, op, self.subst(a.get("value")))
        if kind == "requestURL":
            _need(ex)
            return _compare("requestURL", ex.url, op, self.subst(a["requestURL"]))
        if kind == "requestMethod":
            _need(ex)
            return _compare("requestMethod", ex.method.lower(), op, a["requestMethod"].lower())
        res = self.resource(a.get("sourceId"), request=request)
        if kind == "resource":
            got = res.get("resourceType") if isinstance(res, dict) else None
            return _compare("resource", got, op, a["resource"])
        if kind == "validateProfileId":
            return self._validate(res, a["validateProfileId"])
        if kind == "minimumId":
            missing = _minimum(self.fixtures.get(a["minimumId"]) or self.resource(a["minimumId"]), res, "")
            if missing:
                raise AssertFailed(f"minimumId: content of {a['minimumId']!r} missing at {', '.join(missing)}")
            return f"minimumId: all content of {a['minimumId']!r} is present"
        if kind == "navigationLinks":
            return self._links(res) if a["navigationLinks"] else "navigationLinks: not asked for"
        # expression / path: FHIRPath (XPath mapped) on the resource
        xpath = kind == "path"
        expr = xpath_to_fhirpath(a["path"]) if xpath else a["expression"]
        values = self._fhirpath(expr, res)
        expected = self.subst(a.get("value"))
        if expected is None and (a.get("compareToSourceExpression") or a.get("compareToSourcePath")):
            other = self.resource(a.get("compareToSourceId"))
            cexpr = a.get("compareToSourceExpression") or xpath_to_fhirpath(a["compareToSourcePath"])
            found = self._fhirpath(cexpr, other)
            if not found:
                raise AssertFailed(f"{kind}: {cexpr} gives nothing on {a.get('compareToSourceId')!r}")
            if len(found) > 1 and not a.get("compareToSourcePath"):
                raise AssertFailed(f"{kind}: {cexpr} gives {len(found)} values on {a.get('compareToSourceId')!r}, not one")
            expected = _text(found[0])
        if op in ("empty", "notEmpty"):
            return _compare(kind, values, op, None)
        if expected is None and op in (None, "equals"):
            # A boolean expression with nothing to compare it to must be true.
            if values != [True]:
                raise AssertFailed(f"{kind}: {expr} is {values}, not true")
            return f"{kind}: {expr} is true"
        if not values:
            raise AssertFailed(f"{kind}: {expr} gives no value")
        if len(values) > 1 and not xpath:
            raise AssertFailed(f"{kind}: {expr} gives {len(values)} values, not one: {values}")
        # XPath's comparison of a node set takes the first node.
        return _compare(f"{kind} {expr}", _text(values[0]), op, expected)

    def _fhirpath(self, expression: str, resource: Any) -> list:
        if resource is None:
            raise AssertFailed(f"no resource to evaluate {expression!r} on")
        try:
            return list(fhirpath(resource, expression, {}, R4))
        except Exception as e:  # fhirpathpy raises plain exceptions on bad expressions
            raise Unsupported(f"FHIRPath {expression!r}: {e}") from None

    def _validate(self, resource: Any, profile_id: str) -> str:
        ref = self.profiles.get(profile_id, "")
        if not ref.startswith(BASE_PROFILE):
            raise Unsupported(f"profile {ref!r}: only the base profiles can be checked")
        rtype = ref[len(BASE_PROFILE):]
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            raise AssertFailed(f"validateProfileId: a {rtype} was expected, got {(resource or {}).get('resourceType')!r}")
        r = self.http.post(f"{self.base}/{rtype}/$validate", json=resource, headers={"Content-Type": MIME["json"]})
        issues = (r.json() or {}).get("issue", []) if r.content else []
        errors = [i for i in issues if i.get("severity") in ("error", "fatal")]
        if r.status_code >= 400 or errors:
            raise AssertFailed(f"validateProfileId: not a valid {rtype}: " + "; ".join(i.get("diagnostics", "") for i in errors))
        return f"validateProfileId: a valid {rtype}"

    def _links(self, bundle: Any) -> str:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise AssertFailed("navigationLinks: the response is not a Bundle")
        links = {link.get("relation"): link.get("url") for link in bundle.get("link", [])}
        if not links.get("self"):
            raise AssertFailed("navigationLinks: the Bundle has no self link")
        for rel, url in links.items():
            if rel == "self":
                continue
            r = self.http.get(url, headers={"Accept": MIME["json"]})
            body = r.json() if r.status_code == 200 else {}
            if body.get("resourceType") != "Bundle" or body.get("type") != bundle.get("type"):
                raise AssertFailed(f"navigationLinks: the {rel} link {url} answers {r.status_code}, not a {bundle.get('type')} Bundle")
        return f"navigationLinks: valid ({', '.join(sorted(links))})"


def xpath_to_fhirpath(path: str) -> str:
    """``fhir:Patient/fhir:name/fhir:family/@value`` (or ``Patient/id``) -> ``Patient.name.family``."""
    if path.startswith("$") or "[" in path or "(" in path:
        raise Unsupported(f"path {path!r}: only simple XPath steps are understood")
    steps = []
    for step in path.strip("/").split("/"):
        if not step or step == "@value":
            continue
        if step.startswith("@"):
            raise Unsupported(f"path {path!r}: attribute {step}")
        steps.append(step.removeprefix("fhir:"))
    return ".".join(steps)


def _need(ex: Exchange | None) -> None:
    if ex is None:
        raise AssertFailed("no operation ran before this assert")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _compare(what: str, got: Any, operator: str | None, expected: Any) -> str:
    op = operator or "equals"
    if op == "equals":
        ok = got == expected
    elif op == "notEquals":
        ok = got != expected
    elif op in ("in", "notIn"):
        ok = (got in [x.strip() for x in str(expected).split(",")]) == (op == "in")
    elif op in ("greaterThan", "lessThan"):
        a, b = _number(got), _number(expected)
        ok = a is not None and b is not None and (a > b if op == "greaterThan" else a < b)
    elif op in ("empty", "notEmpty"):
        ok = (not got) == (op == "empty")
    elif op in ("contains", "notContains"):
        ok = got is not None and (str(expected) in str(got)) == (op == "contains")
    else:
        raise Unsupported(f"operator {op!r}")
    if not ok:
        raise AssertFailed(f"{what}: expected {op} {expected!r}, got {got!r}")
    return f"{what}: {op} {expected!r} (got {got!r})"


def _minimum(spec: Any, actual: Any, path: str) -> list[str]:
    """Where ``spec`` has content ``actual`` lacks (arrays match in any order)."""
    if isinstance(spec, dict):
        if not isinstance(actual, dict):
            return [path or "/"]
        return [m for k, v in spec.items() for m in _minimum(v, actual.get(k), f"{path}.{k}" if path else k)]
    if isinstance(spec, list):
        if not isinstance(actual, list):
            return [path]
        left, missing = list(actual), []
        for i, item in enumerate(spec):
            match = next((j for j, cand in enumerate(left) if not _minimum(item, cand, "")), None)
            if match is None:
                missing.append(f"{path}[{i}]")
            else:
                left.pop(match)
        return missing
    return [] if spec == actual else [path]
