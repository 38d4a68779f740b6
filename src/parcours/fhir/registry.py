"""The search-parameter registry: the one source of truth for search.

The official R4 SearchParameter definitions (compacted by
``scripts/gen_search_params.py``) are analysed once: every FHIRPath expression is
compiled into small path programs, and every parameter gets a storage kind that
decides where the indexer writes its values and how the search compiler reads
them. The schema, the indexer, the SQL compiler and the CapabilityStatement all
read this registry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

# Storage kinds. Tokens and references live in GIN-indexed text arrays on the
# resource row; strings, dates, numbers, quantities and uris in the per-type
# side table with typed, btree-indexed columns.
TOKEN_KINDS = {"token"}
REF_KINDS = {"reference"}
SIDE_KINDS = {"string", "date", "number", "quantity", "uri"}

# Parameters that every resource has and that the store answers from columns.
COLUMN_PARAMS = {"_id", "_lastUpdated"}
# Result parameters: they shape the answer rather than filter it.
RESULT_PARAMS = {
    "_sort", "_count", "_include", "_revinclude", "_summary", "_elements", "_total",
    "_contained", "_containedType", "_format", "_pretty", "_offset", "_page",
}


@dataclass(frozen=True)
class Step:
    """One step of a compiled path: a field name, optionally narrowed."""

    name: str
    choice_types: tuple[str, ...] = ()  # for ``value as Quantity``: valueQuantity
    where_field: str | None = None  # ``.where(system='phone')``
    where_value: str | None = None
    resolve_is: str | None = None  # ``.where(resolve() is Patient)``
    index: int | None = None  # ``[0]`` / ``.first()``


@dataclass(frozen=True)
class Path:
    steps: tuple[Step, ...]
    deceased_special: bool = False


@dataclass(frozen=True)
class Component:
    code: str
    type: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    resource_type: str
    expression: str
    url: str
    paths: tuple[Path, ...]
    targets: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()

    @property
    def kind(self) -> str:
        return self.type


_AS_RE = re.compile(r"^\(?(.+?)\s+as\s+([A-Za-z]+)\)?$")
_AS_FN_RE = re.compile(r"^(.+?)\.as\(([A-Za-z]+)\)$")


def _split_top(expression: str) -> list[str]:
    """Split a FHIRPath union on ``|`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in expression:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur).strip())
    return [p for p in parts if p]


def _split_dots(path: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in path:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "." and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _compile_part(part: str, base_types: set[str]) -> tuple[str, Path] | None:
    """Compile one union member into (resource type, Path); None when unsupported."""
    part = part.strip()
    while part.startswith("(") and part.endswith(")") and part.count("(") == part.count(")"):
        inner = part[1:-1]
        if inner.count("(") != inner.count(")"):
            break
        part = inner.strip()
    if part.endswith(".exists() and Patient.deceased != false"):
        return "Patient", Path((Step("deceased", ("Boolean", "DateTime")),), deceased_special=True)
    trailing: list[str] = []
    choice: str | None = None
    m = _AS_RE.match(part)
    if m and "where(" not in m.group(2):
        part, choice = m.group(1).strip(), m.group(2)
    else:
        # "(Observation.value as CodeableConcept).text"
        m2 = re.match(r"^\((.+?)\s+as\s+([A-Za-z]+)\)\.(.+)$", part)
        if m2:
            part, choice, trailing = m2.group(1), m2.group(2), m2.group(3).split(".")
        else:
            m3 = _AS_FN_RE.match(part)
            if m3:
                part, choice = m3.group(1), m3.group(2)
    if part.startswith("("):
        part = part.lstrip("(")
    tokens = _split_dots(part)
    rtype = tokens[0]
    if rtype not in base_types and rtype not in {"Resource", "DomainResource"}:
        return None
    steps: list[Step] = []
    for tok in tokens[1:]:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(\[(\d+)\])?$", tok)
        if m:
            steps.append(Step(m.group(1), index=int(m.group(3)) if m.group(3) else None))
            continue
        m = re.match(r"^where\(resolve\(\) is ([A-Za-z]+)\)$", tok)
        if m and steps:
            prev = steps[-1]
            steps[-1] = Step(prev.name, prev.choice_types, prev.where_field, prev.where_value, m.group(1), prev.index)
            continue
        m = re.match(r"^where\(([A-Za-z]+)\s*=\s*'([^']*)'\)$", tok)
        if m and steps:
            prev = steps[-1]
            steps[-1] = Step(prev.name, prev.choice_types, m.group(1), m.group(2), prev.resolve_is, prev.index)
            continue
        if tok == "first()" and steps:
            prev = steps[-1]
            steps[-1] = Step(prev.name, prev.choice_types, prev.where_field, prev.where_value, prev.resolve_is, 0)
            continue
        return None  # extension('...'), resolve(), functions we do not index
    if choice and steps:
        prev = steps[-1]
        ctype = choice[0].upper() + choice[1:]
        steps[-1] = Step(prev.name, (ctype,), prev.where_field, prev.where_value, prev.resolve_is, prev.index)
    for t in trailing:
        steps.append(Step(t))
    return rtype, Path(tuple(steps))


@dataclass(eq=False)
class Registry:
    resource_types: tuple[str, ...]
    by_type: dict[str, dict[str, SearchParam]] = field(default_factory=dict)
    patient_compartment: dict[str, tuple[str, ...]] = field(default_factory=dict)

    common: dict[str, SearchParam] = field(default_factory=dict)  # parameters of every type

    def get(self, resource_type: str, code: str) -> SearchParam | None:
        if resource_type == "Resource":
            return self.common.get(code)
        return self.by_type.get(resource_type, {}).get(code)

    def params(self, resource_type: str) -> dict[str, SearchParam]:
        return self.by_type.get(resource_type, {})

    def is_type(self, name: str) -> bool:
        return name in self._type_set

    def __post_init__(self) -> None:
        self._type_set = frozenset(self.resource_types)


def _build(raw: dict) -> Registry:
    types = tuple(raw["resourceTypes"])
    type_set = set(types)
    reg = Registry(types)
    for rtype in types:
        reg.by_type[rtype] = {}
    for row in raw["searchParameters"]:
        if row["type"] == "special":
            continue
        bases = row["base"]
        applies = types if any(b in ("Resource", "DomainResource") for b in bases) else [b for b in bases if b in type_set]
        compiled: dict[str, list[Path]] = {}
        for part in _split_top(row["expression"]):
            c = _compile_part(part, set(bases))
            if c is None:
                continue
            rtype, path = c
            if rtype in ("Resource", "DomainResource"):
                for t in applies:
                    compiled.setdefault(t, []).append(path)
            else:
                compiled.setdefault(rtype, []).append(path)
        comps: tuple[Component, ...] = ()
        if row["type"] == "composite":
            clist = []
            for comp in row.get("component", []):
                cpaths = []
                for part in _split_top(comp["expression"]):
                    c = _compile_part("X." + part if not part.startswith("(") else part, {"X"})
                    if c is not None:
                        cpaths.append(c[1])
                clist.append(Component(comp["code"], comp["type"], tuple(cpaths)))
            comps = tuple(clist)
        for rtype in applies:
            paths = compiled.get(rtype)
            if not paths:
                continue
            reg.by_type[rtype][row["code"]] = SearchParam(
                code=row["code"], type=row["type"], resource_type=rtype, expression=row["expression"],
                url=row["url"], paths=tuple(paths), targets=tuple(row.get("target", [])), components=comps,
            )
        if any(b in ("Resource", "DomainResource") for b in bases) and applies and row["code"] in reg.by_type[applies[0]]:
            # Whole-system searches (``GET /fhir?_tag=...``) resolve the common
            # parameters under the pseudo type "Resource" (not a resource type).
            reg.common[row["code"]] = replace(reg.by_type[applies[0]][row["code"]], resource_type="Resource")
    reg.patient_compartment = {k: tuple(v) for k, v in raw.get("patientCompartment", {}).items()}
    return reg


@cache
def registry() -> Registry:
    """The process-wide registry, built once from the shipped table."""
    data = resources.files("parcours.fhir").joinpath("data/search_parameters.json").read_text()
    return _build(json.loads(data))
