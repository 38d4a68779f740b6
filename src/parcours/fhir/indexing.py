"""Extract the search-index values of a resource, as the registry defines them.

Encodings (read by the search compiler in ``parcours.store.search``):

* tokens (GIN text array on the resource row), for a value ``system|code`` of
  parameter ``p``: ``p␟system|code``, ``p␟*|code`` (any system) and
  ``p␟system|*`` (system only); a value without system is stored with an empty
  system. ``␞p`` marks that ``p`` has at least one value (``:missing``).
  Identifier types are stored as ``p:of-type␟tsys|tcode|value``; references
  holding an identifier as ``p:identifier␟system|value``.
* references (GIN text array): ``p␟Type/id`` and ``p␟id``; absolute URLs as is.
* side rows (one table per type): ``(code, s, raw, lo, hi, nlo, nhi, sys, unit)``
  for string (``s`` normalized, ``raw`` exact), uri (``raw``), date (``lo``/``hi``
  range, ``hi`` exclusive), number and quantity (``nlo``/``nhi``, ``sys``/``unit``).
  Token ``:text`` values are side rows with code ``p:text``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from parcours.fhir.datatypes import MAX_DT, MIN_DT, normalize_text, parse_date_range, parse_decimal
from parcours.fhir.registry import Path, Registry, SearchParam, Step

SEP = "\x1f"
PRESENT = "\x1e"

_REF_RE = re.compile(r"^(?:(?P<base>.*)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")

SideRow = tuple[str, str | None, str | None, datetime | None, datetime | None, Decimal | None, Decimal | None, str | None, str | None]


@dataclass
class IndexValues:
    tokens: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    rows: list[SideRow] = field(default_factory=list)
    compartments: list[str] = field(default_factory=list)
    narrative: str = ""
    content: str = ""


def _children(node: Any, step: Step) -> Iterator[Any]:
    if not isinstance(node, dict):
        return
    if step.choice_types:
        values = []
        for ct in step.choice_types:
            v = node.get(step.name + ct)
            if v is not None:
                values.append(v)
    else:
        v = node.get(step.name)
        if v is None:
            # Unnamed choice element (Observation.effective -> effectiveDateTime...)
            prefix = step.name
            values = [val for key, val in node.items() if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper()]
        else:
            values = [v]
    for v in values:
        items = v if isinstance(v, list) else [v]
        if step.index is not None:
            items = items[step.index : step.index + 1]
        for item in items:
            if step.where_field is not None and not (isinstance(item, dict) and item.get(step.where_field) == step.where_value):
                continue
            if step.resolve_is is not None:
                ref = item.get("reference") if isinstance(item, dict) else None
                m = _REF_RE.match(ref or "")
                if not m or m["type"] != step.resolve_is:
                    continue
            yield item


def evaluate(node: Any, path: Path) -> list[Any]:
    current = [node]
    for step in path.steps:
        nxt: list[Any] = []
        for n in current:
            nxt.extend(_children(n, step))
        current = nxt
        if not current:
            break
    return current


def _token_entries(code: str, system: str | None, value: str) -> list[str]:
    sys = system or ""
    out = [f"{code}{SEP}{sys}|{value}", f"{code}{SEP}*|{value}"]
    if sys:
        out.append(f"{code}{SEP}{sys}|*")
    return out


def token_values(code: str, value: Any, iv: IndexValues) -> bool:
    """Add token entries for one value; True when something was indexed."""
    added = False
    if isinstance(value, bool):
        iv.tokens.extend(_token_entries(code, None, "true" if value else "false"))
        return True
    if isinstance(value, (str, int)):
        iv.tokens.extend(_token_entries(code, None, str(value)))
        return True
    if not isinstance(value, dict):
        return False
    if "coding" in value or "text" in value and "code" not in value and "value" not in value:
        texts = []
        for c in value.get("coding") or []:
            if isinstance(c, dict) and c.get("code") is not None:
                iv.tokens.extend(_token_entries(code, c.get("system"), str(c["code"])))
                added = True
            if isinstance(c, dict) and c.get("display"):
                texts.append(c["display"])
        if value.get("text"):
            texts.append(value["text"])
        for t in texts:
            if isinstance(t, str):
                iv.rows.append((code + ":text", normalize_text(t), t, None, None, None, None, None, None))
                added = True
        return added
    if "code" in value and ("system" in value or "display" in value or "version" in value or len(value) == 1):
        iv.tokens.extend(_token_entries(code, value.get("system"), str(value["code"])))
        if value.get("display"):
            iv.rows.append((code + ":text", normalize_text(value["display"]), value["display"], None, None, None, None, None, None))
        return True
    if "value" in value:  # Identifier, ContactPoint
        v = value.get("value")
        if v is None:
            return False
        iv.tokens.extend(_token_entries(code, value.get("system"), str(v)))
        typ = value.get("type")
        if isinstance(typ, dict):
            for c in typ.get("coding") or []:
                if isinstance(c, dict) and c.get("code"):
                    iv.tokens.append(f"{code}:of-type{SEP}{c.get('system') or ''}|{c['code']}|{v}")
            if typ.get("text"):
                iv.rows.append((code + ":text", normalize_text(typ["text"]), typ["text"], None, None, None, None, None, None))
        return True
    if "code" in value:  # Quantity used as token
        iv.tokens.extend(_token_entries(code, value.get("system"), str(value["code"])))
        return True
    return False


def _strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        # HumanName and Address: every textual part is searchable.
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country", "value", "display"):
            v = value.get(key)
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield from (x for x in v if isinstance(x, str))


def _date_ranges(value: Any) -> Iterator[tuple[datetime | None, datetime | None]]:
    if isinstance(value, str):
        r = parse_date_range(value)
        if r:
            yield r
    elif isinstance(value, dict):
        if "start" in value or "end" in value:  # Period: open ends are unbounded
            lo = parse_date_range(value["start"])[0] if isinstance(value.get("start"), str) and parse_date_range(value["start"]) else None
            end = parse_date_range(value["end"]) if isinstance(value.get("end"), str) else None
            yield lo or MIN_DT, end[1] if end else MAX_DT
        elif "event" in value or "repeat" in value:  # Timing: events and the repeat bounds
            for e in value.get("event") or []:
                if isinstance(e, str) and (r := parse_date_range(e)):
                    yield r
            bounds = (value.get("repeat") or {}).get("boundsPeriod")
            if isinstance(bounds, dict):
                yield from _date_ranges(bounds)


def _quantity_rows(code: str, value: Any) -> Iterator[SideRow]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        d = parse_decimal(value)
        if d is not None:
            yield (code, None, None, None, None, d, d, None, None)
    elif isinstance(value, dict):
        if "low" in value or "high" in value:  # Range: a missing end is unbounded
            low, high = value.get("low") or {}, value.get("high") or {}
            lo = parse_decimal(low.get("value")) if "value" in low else None
            hi = parse_decimal(high.get("value")) if "value" in high else None
            lo = Decimal("-Infinity") if lo is None else lo
            hi = Decimal("Infinity") if hi is None else hi
            q = low or high
            yield (code, None, None, None, None, lo, hi, q.get("system"), q.get("code") or q.get("unit"))
        elif "value" in value:
            d = parse_decimal(value["value"])
            if d is not None:
                unit = value.get("code") or value.get("unit")
                yield (code, None, None, None, None, d, d, value.get("system"), unit)
                if value.get("unit") and value.get("code") and value["unit"] != value["code"]:
                    yield (code, None, None, None, None, d, d, None, value["unit"])


def reference_values(code: str, value: Any, iv: IndexValues, base_url: str | None) -> bool:
    if isinstance(value, str):  # canonical / uri used as reference
        iv.refs.append(f"{code}{SEP}{value}")
        if "|" in value:  # canonical|version: the url alone matches every version
            iv.refs.append(f"{code}{SEP}{value.split('|', 1)[0]}")
        return True
    if not isinstance(value, dict):
        return False
    added = False
    ref = value.get("reference")
    if isinstance(ref, str):
        m = _REF_RE.match(ref)
        if m and (m["base"] is None or (base_url and m["base"].rstrip("/") == base_url.rstrip("/"))):
            iv.refs.append(f"{code}{SEP}{m['type']}/{m['id']}")
            iv.refs.append(f"{code}{SEP}{m['id']}")
        else:
            iv.refs.append(f"{code}{SEP}{ref}")
        added = True
    ident = value.get("identifier")
    if isinstance(ident, dict) and ident.get("value") is not None:
        sys = ident.get("system") or ""
        iv.tokens.append(f"{code}:identifier{SEP}{sys}|{ident['value']}")
        iv.tokens.append(f"{code}:identifier{SEP}*|{ident['value']}")
        added = True
    return added


def _index_param(sp: SearchParam, values: list[Any], iv: IndexValues, base_url: str | None) -> bool:
    code, kind, added = sp.code, sp.type, False
    for v in values:
        if kind == "token":
            added |= token_values(code, v, iv)
        elif kind == "reference":
            added |= reference_values(code, v, iv, base_url)
        elif kind == "string":
            for s in _strings_of(v):
                iv.rows.append((code, normalize_text(s), s, None, None, None, None, None, None))
                added = True
        elif kind == "uri":
            if isinstance(v, str):
                iv.rows.append((code, None, v, None, None, None, None, None, None))
                if "|" in v:  # canonical|version: the url alone matches every version
                    iv.rows.append((code, None, v.split("|", 1)[0], None, None, None, None, None, None))
                added = True
        elif kind == "date":
            for lo, hi in _date_ranges(v):
                iv.rows.append((code, None, None, lo, hi, None, None, None, None))
                added = True
        elif kind in ("number", "quantity"):
            for row in _quantity_rows(code, v):
                iv.rows.append(row)
                added = True
    return added


def _index_composite(sp: SearchParam, resource: dict, iv: IndexValues) -> bool:
    """Composite values tie components found under the same element together."""
    added = False
    for root in [n for p in sp.paths for n in evaluate(resource, p)]:
        first, second = sp.components[0], sp.components[1] if len(sp.components) > 1 else None
        if second is None:
            continue
        firsts = [v for p in first.paths for v in evaluate(root, p)]
        seconds = [v for p in second.paths for v in evaluate(root, p)]
        ftoks: list[str] = []
        for f in firsts:
            tmp = IndexValues()
            token_values("", f, tmp)
            ftoks.extend(t[1:] for t in tmp.tokens if t.startswith(SEP))
        for s in seconds:
            if second.type == "token":
                tmp = IndexValues()
                token_values("", s, tmp)
                for ft in ftoks:
                    for st in tmp.tokens:
                        if st.startswith(SEP):
                            iv.tokens.append(f"{sp.code}{SEP}{ft}${st[1:]}")
                            added = True
            elif second.type == "quantity":
                for row in _quantity_rows(sp.code, s):
                    for ft in ftoks:
                        iv.rows.append((row[0], None, ft, None, None, row[5], row[6], row[7], row[8]))
                        added = True
            elif second.type == "date":
                for lo, hi in _date_ranges(s):
                    for ft in ftoks:
                        iv.rows.append((sp.code, None, ft, lo, hi, None, None, None, None))
                        added = True
            elif second.type == "string":
                for text in _strings_of(s):
                    for ft in ftoks:
                        iv.rows.append((sp.code, normalize_text(text), ft, None, None, None, None, None, None))
                        added = True
    return added


def _collect_text(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k in ("div", "reference", "system", "url", "fullUrl", "id", "meta", "data"):
                continue
            _collect_text(v, out)
    elif isinstance(node, list):
        for v in node:
            _collect_text(v, out)


_TAG_RE = re.compile(r"<[^>]+>")


def index_resource(resource: dict, registry: Registry, base_url: str | None = None) -> IndexValues:
    rtype = resource["resourceType"]
    iv = IndexValues()
    for code, sp in registry.params(rtype).items():
        if code in ("_id", "_lastUpdated"):
            continue
        if sp.type == "composite":
            added = _index_composite(sp, resource, iv)
        else:
            values: list[Any] = []
            for path in sp.paths:
                found = evaluate(resource, path)
                if path.deceased_special:
                    found = [bool(v) if isinstance(v, bool) else True for v in found]
                    if not found:
                        found = [False]
                values.extend(found)
            added = _index_param(sp, values, iv, base_url) if values else False
        if added:
            iv.tokens.append(PRESENT + code)
    if rtype == "Location":
        pos = resource.get("position")
        if isinstance(pos, dict):
            lat, lon = parse_decimal(pos.get("latitude", "x")), parse_decimal(pos.get("longitude", "x"))
            if lat is not None and lon is not None:
                # near: latitude in nlo, longitude in nhi (see store.search)
                iv.rows.append(("near", None, None, None, None, lat, lon, None, None))
    # Patient compartment: the patients this resource belongs to.
    if rtype == "Patient" and resource.get("id"):
        iv.compartments.append(f"Patient/{resource['id']}")
    else:
        for pcode in registry.patient_compartment.get(rtype, ()):
            prefix = f"{pcode}{SEP}Patient/"
            for r in iv.refs:
                if r.startswith(prefix):
                    iv.compartments.append(r[len(pcode) + 1 :])
    iv.tokens = list(dict.fromkeys(iv.tokens))
    iv.rows = list(dict.fromkeys(iv.rows))
    iv.refs = list(dict.fromkeys(iv.refs))
    iv.compartments = list(dict.fromkeys(iv.compartments))
    div = (resource.get("text") or {}).get("div") if isinstance(resource.get("text"), dict) else None
    if isinstance(div, str):
        iv.narrative = html.unescape(_TAG_RE.sub(" ", div))  # &eacute; -> é before the text search
    parts: list[str] = []
    _collect_text({k: v for k, v in resource.items() if k != "text"}, parts)
    iv.content = " ".join(parts)
    return iv
