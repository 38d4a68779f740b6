"""Parse a FHIR search query into a typed request (pure: no SQL here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from parcours.core.errors import InvalidSearch, Issue
from parcours.fhir.registry import RESULT_PARAMS, Registry, SearchParam

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
TOKEN_MODIFIERS = {"exact", "contains", "missing", "not", "text", "above", "below", "in", "not-in", "of-type", "identifier", "code-text"}
SPECIAL = {"_text", "_content", "_has", "_type", "_filter", "_query", "_list", "near", "_since"}
# Modifiers the parameters answered from columns accept (None: no modifier).
COLUMN_MODIFIERS = {
    "_id": {None, "not", "missing"},
    "_lastUpdated": {None, "missing"},
    "_text": {None},
    "_content": {None},
}


@dataclass
class Filter:
    """One AND-ed criterion; ``values`` are OR-ed."""

    code: str
    param: SearchParam | None  # None for _id, _lastUpdated, _text, _content, near
    modifier: str | None
    values: list[str]
    chain: "Chain | None" = None
    has: "Has | None" = None


@dataclass
class Chain:
    """``subject:Patient.name=x``: the target types of the reference and, for each,
    the inner filter parsed against that type (the same code can differ by type)."""

    links: list[tuple[str, Filter]]

    @property
    def target_types(self) -> list[str]:
        return [t for t, _ in self.links]


@dataclass
class Has:
    """``_has:Observation:patient:code=x``: resources referenced by matching others."""

    resource_type: str
    ref_param: SearchParam
    inner: Filter


@dataclass
class Include:
    source_type: str  # '*' (``_include=*``): any type
    param: str  # '*' for all
    target_type: str | None
    iterate: bool


@dataclass
class SearchRequest:
    resource_type: str | None  # None: whole-system search
    filters: list[Filter] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (code, descending)
    count: int = 20
    offset: int = 0
    total: str = "none"
    summary: str | None = None
    elements: list[str] | None = None
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    types: list[str] | None = None  # _type for system search
    ignored: list[str] = field(default_factory=list)
    contained: str = "false"
    query_string: str = ""  # the query as asked, for the audit trail


def split_or(value: str) -> list[str]:
    """Split on commas not escaped with a backslash; unescape ``\\,`` ``\\|`` ``\\$``."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i : i + 2])
            i += 2
            continue
        if ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(value: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", value)


def split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


class SearchParser:
    def __init__(self, registry: Registry, default_count: int = 20, max_count: int = 1000) -> None:
        self.registry = registry
        self.default_count = default_count
        self.max_count = max_count

    def parse(self, resource_type: str | None, items: list[tuple[str, str]], strict: bool = False) -> SearchRequest:
        from urllib.parse import urlencode

        req = SearchRequest(resource_type, count=self.default_count, query_string=urlencode(items)[:2000])
        for key, value in items:
            if key in RESULT_PARAMS or key.split(":")[0] in ("_include", "_revinclude"):
                self._result_param(req, key, value)
                continue
            if key == "_type":
                req.types = [t for t in value.split(",") if t]
                for t in req.types:
                    if not self.registry.is_type(t):
                        raise InvalidSearch(f"Unknown resource type in _type: {t}")
                continue
            # Unknown parameters are lenient; a known parameter used wrongly
            # (bad modifier, bad chain) is always an error, never ignored.
            f = self._filter(resource_type or "Resource", key, value)
            if f is not None and _empty(f):
                continue  # an empty criterion (``name=``, a blank form field) constrains nothing
            if f is None:
                if strict:
                    raise InvalidSearch(
                        f"Unknown search parameter '{key}' for {resource_type or 'system search'}",
                        [Issue("not-supported", f"PRC-1403: Unknown search parameter '{key}'", expression=(key,))],
                    )
                req.ignored.append(key)
                continue
            req.filters.append(f)
        return req

    def _result_param(self, req: SearchRequest, key: str, value: str) -> None:
        base = key.split(":")[0]
        if base == "_count":
            n = _int(value, "_count")
            if n < 0:
                raise InvalidSearch(f"_count must be zero or more, not {value!r}")
            req.count = min(n, self.max_count)
        elif base in ("_offset", "_page"):
            n = _int(value, base)
            if n < 0:
                raise InvalidSearch(f"{base} must be zero or more, not {value!r}")
            req.offset = n
        elif base == "_sort":
            req.sort = []  # the last _sort wins, as for the other result parameters
            for part in value.split(","):
                part = part.strip()
                if not part:
                    continue
                code = part[1:] if part.startswith("-") else part
                self._check_sort(req.resource_type, code)
                req.sort.append((code, part.startswith("-")))
        elif base == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise InvalidSearch(f"_total must be none, estimate or accurate, not {value!r}")
            req.total = value
        elif base == "_summary":
            if value not in ("true", "false", "text", "data", "count"):
                raise InvalidSearch(f"_summary must be true, false, text, data or count, not {value!r}")
            req.summary = value
        elif base == "_elements":
            req.elements = [e.strip() for e in value.split(",") if e.strip()]
        elif base in ("_include", "_revinclude"):
            modifier = key.partition(":")[2]
            if modifier not in ("", "iterate", "recurse"):
                raise InvalidSearch(f"Unknown modifier ':{modifier}' on {base}: only :iterate is defined")
            iterate = modifier in ("iterate", "recurse")
            for v in value.split(","):
                v = v.strip()
                if not v:
                    continue
                if v == "*":  # every reference of the matches (or, reversed, to them)
                    if base == "_revinclude":
                        raise InvalidSearch("_revinclude=* is not supported: name the source type, as in _revinclude=Observation:*")
                    inc = Include("*", "*", None, iterate)
                    req.includes.append(inc)
                    continue
                parts = v.split(":")
                if len(parts) < 2 or len(parts) > 3 or not self.registry.is_type(parts[0]):
                    raise InvalidSearch(f"Invalid {base} value {v!r}: expected Type:param[:TargetType]")
                inc = Include(parts[0], parts[1], parts[2] if len(parts) > 2 else None, iterate)
                if inc.param != "*":
                    sp = self.registry.get(inc.source_type, inc.param)
                    if sp is None or sp.type != "reference":
                        raise InvalidSearch(f"{base}: {parts[0]} has no reference parameter {parts[1]!r}")
                    if inc.target_type and sp.targets and inc.target_type not in sp.targets:
                        raise InvalidSearch(f"{base}: {parts[0]}:{parts[1]} cannot point at {inc.target_type}")
                elif inc.target_type and not self.registry.is_type(inc.target_type):
                    raise InvalidSearch(f"{base}: unknown target type {inc.target_type!r}")
                (req.includes if base == "_include" else req.revincludes).append(inc)
        elif base == "_contained":
            req.contained = value
        # _format/_pretty are handled by the HTTP layer.

    def _filter(self, rtype: str, key: str, value: str) -> Filter | None:
        if key.startswith("_has:"):
            return self._has(rtype, key, value)
        name, _, rest = key.partition(".")
        code, _, modifier = name.partition(":")
        mod = modifier or None
        if code in COLUMN_MODIFIERS:
            if rest:
                raise InvalidSearch(f"Parameter {code!r} is not a reference and cannot be chained")
            if mod not in COLUMN_MODIFIERS[code]:
                raise InvalidSearch(f"The modifier :{mod} is not valid on parameter {code!r}")
            return Filter(code, None, mod, split_or(value))
        if code == "near" and rtype == "Location":
            if mod or rest:
                raise InvalidSearch("near takes no modifier")
            return Filter("near", None, None, [value])
        sp = self.registry.get(rtype, code)
        if sp is None:
            return None
        if mod and mod not in TOKEN_MODIFIERS and not self.registry.is_type(mod):
            raise InvalidSearch(f"Unknown modifier ':{mod}' on parameter {code!r}")
        if mod and self.registry.is_type(mod):
            if sp.type != "reference":
                raise InvalidSearch(f"The type modifier :{mod} is only valid on reference parameters, not on {code!r}")
            if sp.targets and mod not in sp.targets:
                raise InvalidSearch(f"Parameter {code!r} of {rtype} cannot point at {mod} (targets: {', '.join(sp.targets)})")
        if rest:  # chained
            if sp.type != "reference":
                raise InvalidSearch(f"Parameter {code!r} is not a reference and cannot be chained")
            if mod and not self.registry.is_type(mod):
                raise InvalidSearch(f"Chained parameter {key!r}: only a resource type may qualify {code!r}")
            targets = [mod] if mod else [t for t in sp.targets if self.registry.is_type(t)]
            links: list[tuple[str, Filter]] = []
            error: InvalidSearch | None = None
            for t in targets:
                try:
                    f = self._filter(t, rest, value)
                except InvalidSearch as e:  # e.g. a value valid for one target type only
                    error = error or e
                    continue
                if f is not None:
                    links.append((t, f))
            if not links:
                if error is not None:
                    raise error
                inner_code = rest.split(".")[0].split(":")[0]
                raise InvalidSearch(f"Chained parameter {key!r}: no target type of {code!r} ({', '.join(targets) or 'none'}) has a parameter {inner_code!r}")
            return Filter(code, sp, mod, [], chain=Chain(links))
        return Filter(code, sp, mod, split_or(value))

    def _check_sort(self, rtype: str | None, code: str) -> None:
        if code in ("_id", "_lastUpdated") or (code == "near" and rtype == "Location"):
            return
        sp = self.registry.get(rtype or "Resource", code) if rtype else None
        if sp is None:
            raise InvalidSearch(f"Cannot sort by {code!r}: it is not a search parameter of {rtype or 'every type'}")
        if sp.type == "composite":
            raise InvalidSearch(f"Cannot sort by the composite parameter {code!r}")

    def _has(self, rtype: str, key: str, value: str) -> Filter:
        parts = key.split(":", 3)
        if len(parts) < 4:
            raise InvalidSearch(f"Invalid _has parameter {key!r}: expected _has:Type:reference:param")
        _, src_type, ref_code, rest = parts
        if not self.registry.is_type(src_type):
            raise InvalidSearch(f"_has: unknown resource type {src_type!r}")
        ref = self.registry.get(src_type, ref_code)
        if ref is None or ref.type != "reference":
            raise InvalidSearch(f"_has: {src_type} has no reference parameter {ref_code!r}")
        if self.registry.is_type(rtype) and ref.targets and rtype not in ref.targets:
            raise InvalidSearch(f"_has: {src_type}.{ref_code} cannot point at {rtype}")
        inner = self._filter(src_type, rest, value)
        if inner is None:
            raise InvalidSearch(f"_has: {src_type} has no search parameter {rest!r}")
        return Filter("_has", None, None, [], has=Has(src_type, ref, inner))


def _empty(f: Filter) -> bool:
    """True when a criterion carries no value at all (it is then ignored)."""
    if f.has is not None:
        return _empty(f.has.inner)
    if f.chain is not None:
        return all(_empty(inner) for _, inner in f.chain.links)
    return all(v == "" for v in f.values)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidSearch(f"{name} must be a whole number, not {value!r}") from None
