"""Compile a parsed SearchRequest into SQLAlchemy Core expressions.

The encodings read here are written by ``parcours.fhir.indexing``; both follow
the storage kind the registry gives each parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    and_,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy import Numeric, Text, any_
from sqlalchemy.dialects.postgresql import ARRAY

from parcours.core.errors import InvalidSearch
from parcours.fhir.datatypes import implicit_range, normalize_text, parse_date_range, parse_decimal
from parcours.fhir.indexing import PRESENT, SEP
from parcours.fhir.search import Filter, split_prefix, unescape
from parcours.store.schema import TS_CONFIG, tables

EARTH_RADIUS_KM = 6371.0088
UNIT_KM = {"km": 1.0, "m": 0.001, "mi": 1.609344, "[mi_i]": 1.609344, "[mi_us]": 1.609347}


class SearchTables(NamedTuple):
    """The tables one criterion reads: the resource rows and their side rows."""

    rtype: str
    main: Any
    idx: Any


def base_tables(rtype: str) -> SearchTables:
    t = tables(rtype)
    return SearchTables(rtype, t.main, t.idx)


def aliased(rtype: str) -> SearchTables:
    """Aliases for a subquery (chain, ``_has``), so that it never correlates with
    an outer query over the same type."""
    t = tables(rtype)
    return SearchTables(rtype, t.main.alias(), t.idx.alias())


class Compiler:
    def __init__(self, base_url: str | None, now: datetime | None = None,
                 scope: Callable[[str, Any], ColumnElement[bool]] | None = None) -> None:
        self.base_url = (base_url or "").rstrip("/")
        self.now = now or datetime.now(UTC)
        # What the caller may see of a type (``Repository.subquery_scope``): chains and
        # ``_has`` look at nothing else, so a criterion never reveals a forbidden resource.
        self.scope = scope

    def _in_scope(self, t: SearchTables) -> ColumnElement[bool]:
        return self.scope(t.rtype, t.main) if self.scope is not None else true()

    # -- entry point -------------------------------------------------------------
    def where(self, rtype: str, filters: list[Filter]) -> ColumnElement[bool]:
        t = base_tables(rtype)
        clauses: list[ColumnElement[bool]] = [t.main.c.deleted.is_(False)]
        for f in filters:
            clauses.append(self.filter(t, f))
        return and_(*clauses)

    def filter(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        if f.has is not None:
            return self._has(t, f)
        if f.chain is not None:
            return self._chain(t, f)
        if f.modifier == "missing":
            present = t.main.c.tokens.contains([PRESENT + f.code])
            if f.code in ("_id", "_lastUpdated"):
                present = true()
            want_missing = _bool(f.values[0] if f.values else "")
            return not_(present) if want_missing else present
        if f.code == "_id":
            ids = [unescape(v) for v in f.values]
            c = t.main.c.id == any_(_text_array(ids))
            return not_(c) if f.modifier == "not" else c
        if f.code == "_lastUpdated":
            lu = t.main.c.last_updated
            return or_(*[self._date_cond(lu, lu + timedelta(microseconds=1), v) for v in f.values if v])
        if f.code in ("_text", "_content"):
            col = t.main.c.fts_text if f.code == "_text" else t.main.c.fts_content
            return or_(*[col.op("@@")(func.websearch_to_tsquery(TS_CONFIG, unescape(v))) for v in f.values if v])
        if f.code == "near":
            return self._near(t, f.values[0])
        assert f.param is not None
        kind = f.param.type
        if kind == "token":
            return self._token(t, f)
        if kind == "reference":
            return self._reference(t, f)
        if kind == "composite":
            return self._composite(t, f)
        return self._side(t, f)

    # -- tokens --------------------------------------------------------------------
    def token_entry(self, code: str, value: str) -> str:
        parts = _unescaped_split(value, "|", 1)
        if len(parts) == 2:
            system, code_value = unescape(parts[0]), unescape(parts[1])
            return f"{code}{SEP}{system}|{code_value if code_value != '' else '*'}"
        return f"{code}{SEP}*|{unescape(value)}"

    def _token(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        code, mod = f.code, f.modifier
        if mod == "text":
            # Any word of the display or text starts with the value.
            words = [normalize_text(unescape(v)) for v in f.values if v]
            return self._exists_side(t, code + ":text", or_(*[
                or_(prefix_condition(t.idx.c.s, w), t.idx.c.s.contains(" " + w, autoescape=True)) for w in words]))
        if mod == "of-type":
            entries = []
            for v in f.values:
                parts = _unescaped_split(v, "|", 2)
                if len(parts) != 3:
                    raise InvalidSearch(f"{code}:of-type expects system|code|value, got {v!r}")
                entries.append(f"{code}:of-type{SEP}{unescape(parts[0])}|{unescape(parts[1])}|{unescape(parts[2])}")
            return t.main.c.tokens.overlap(_text_array(entries))
        if mod in ("above", "below", "in", "not-in"):
            raise InvalidSearch(f"The modifier :{mod} needs terminology services, which this server does not offer on {code!r}")
        if mod not in (None, "not", "exact", "code-text"):
            raise InvalidSearch(f"The modifier :{mod} is not valid on token parameter {code!r}")
        entries = [self.token_entry(code, v) for v in f.values if v != ""]
        if not entries:
            raise InvalidSearch(f"Parameter {code!r} needs a value")
        cond = t.main.c.tokens.overlap(_text_array(entries))
        return not_(cond) if mod == "not" else cond

    # -- references ------------------------------------------------------------------
    def ref_entry(self, code: str, value: str, type_modifier: str | None) -> str:
        v = unescape(value)
        if self.base_url and v.startswith(self.base_url + "/"):
            v = v[len(self.base_url) + 1 :]
        if type_modifier and "/" not in v:
            v = f"{type_modifier}/{v}"
        if "/_history/" in v:
            v = v.split("/_history/")[0]
        return f"{code}{SEP}{v}"

    def _reference(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        code, mod = f.code, f.modifier
        if mod == "identifier":
            entries = []
            for v in f.values:
                parts = _unescaped_split(v, "|", 1)
                entries.append(f"{code}:identifier{SEP}{unescape(parts[0])}|{unescape(parts[1])}" if len(parts) == 2 else f"{code}:identifier{SEP}*|{unescape(v)}")
            return t.main.c.tokens.overlap(_text_array(entries))
        if mod in ("above", "below", "not", "text", "exact", "contains"):
            raise InvalidSearch(f"The modifier :{mod} is not supported on reference parameter {code!r}")
        entries = [self.ref_entry(code, v, mod) for v in f.values if v]
        if not entries:
            raise InvalidSearch(f"Parameter {code!r} needs a value")
        return t.main.c.refs.overlap(_text_array(entries))

    def _chain(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        """The references of ``t`` overlap the (uncorrelated) set of matching targets:
        one GIN probe, the target set computed once. Target tables are aliased so
        that a chain back to the same type (``Organization?partof.name=x``) is not
        correlated with the outer row."""
        assert f.chain is not None
        ors = []
        for target, inner_filter in f.chain.links:
            tt = aliased(target)
            inner = and_(tt.main.c.deleted.is_(False), self.filter(tt, inner_filter), self._in_scope(tt))
            ids = select(func.array_agg(literal(f"{f.code}{SEP}{target}/") + tt.main.c.id)).where(inner).scalar_subquery()
            ors.append(t.main.c.refs.overlap(ids))
        return or_(*ors)

    def _has(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        """``id IN (ids referenced by the matching sources)``: the inner criterion
        drives (its own indexes), then a semi-join on the primary key, rather than
        one GIN probe of the source table per candidate row."""
        assert f.has is not None
        src = aliased(f.has.resource_type)
        prefix = f"{f.has.ref_param.code}{SEP}{t.rtype}/"
        ref = func.unnest(src.main.c.refs).table_valued("value").render_derived()
        referenced = (
            select(func.substr(ref.c.value, len(prefix) + 1))
            .select_from(src.main)
            .join(ref, true())
            .where(
                src.main.c.deleted.is_(False),
                self.filter(src, f.has.inner),
                self._in_scope(src),
                func.left(ref.c.value, len(prefix)) == prefix,
            )
        )
        return t.main.c.id.in_(referenced)

    # -- side table: string, uri, date, number, quantity ---------------------------------
    def _exists_side(self, t: SearchTables, code: str, cond: ColumnElement[bool]) -> ColumnElement[bool]:
        idx = t.idx
        return exists(select(literal(1)).select_from(idx).where(idx.c.resource_id == t.main.c.id, idx.c.code == code, cond))

    def _side(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        kind, code, mod, idx = f.param.type, f.code, f.modifier, t.idx  # type: ignore[union-attr]
        conds: list[ColumnElement[bool]] = []
        for raw in f.values:
            if raw == "":
                continue
            v = unescape(raw) if kind in ("string", "uri") else raw
            if kind == "string":
                if mod == "exact":
                    conds.append(idx.c.raw == v)
                elif mod == "contains":
                    conds.append(idx.c.s.contains(normalize_text(v), autoescape=True))
                elif mod in (None, "text"):
                    conds.append(prefix_condition(idx.c.s, normalize_text(v)))
                else:
                    raise InvalidSearch(f"The modifier :{mod} is not valid on string parameter {code!r}")
            elif kind == "uri":
                if mod is None or mod == "exact":
                    conds.append(idx.c.raw == v)
                elif mod == "below":  # the stored uri starts with the value
                    conds.append(func.starts_with(idx.c.raw, literal(v, Text)))
                elif mod == "above":  # the value starts with the stored uri
                    conds.append(func.starts_with(literal(v, Text), idx.c.raw))
                else:
                    raise InvalidSearch(f"The modifier :{mod} is not valid on uri parameter {code!r}")
            elif kind == "date":
                if mod:
                    raise InvalidSearch(f"The modifier :{mod} is not valid on date parameter {code!r}")
                conds.append(self._date_cond(idx.c.lo, idx.c.hi, v))
            elif kind in ("number", "quantity"):
                if mod:
                    raise InvalidSearch(f"The modifier :{mod} is not valid on {kind} parameter {code!r}")
                conds.append(self._quantity_cond(idx, v, kind))
        if not conds:
            raise InvalidSearch(f"Parameter {code!r} needs a value")
        return self._exists_side(t, code, or_(*conds))

    def _date_cond(self, lo: Any, hi: Any, value: str) -> ColumnElement[bool]:
        """R4 date comparison of the stored range [lo, hi) with the value's implicit
        range [qlo, qhi) (search.html, "Prefixes"): eq = contained, gt = overlaps
        the range above, ge = gt or eq, and so on."""
        prefix, v = split_prefix(value)
        # An unencoded '+' of a time zone arrives as a space.
        r = parse_date_range(v.replace(" ", "+"))
        if r is None:
            raise InvalidSearch(f"Invalid date {v!r}: expected YYYY, YYYY-MM, YYYY-MM-DD or a dateTime such as 2024-05-01T10:00:00Z")
        qlo, qhi = r
        contained = and_(lo >= qlo, hi <= qhi)
        if prefix == "eq":
            return contained
        if prefix == "ne":
            return not_(contained)
        if prefix == "gt":
            return hi > qhi
        if prefix == "lt":
            return lo < qlo
        # ge and le imply hi > qlo and lo < qhi: stated first, so the btree can range-scan.
        if prefix == "ge":
            return and_(hi > qlo, or_(hi > qhi, contained))
        if prefix == "le":
            return and_(lo < qhi, or_(lo < qlo, contained))
        if prefix == "sa":
            return lo >= qhi
        if prefix == "eb":
            return hi <= qlo
        # ap: within 10% of the distance between the value and now (at least a day)
        gap = abs((self.now - qlo).total_seconds()) * 0.1
        d = timedelta(seconds=max(gap, 86400))
        return and_(lo < qhi + d, hi > qlo - d)

    def _quantity_cond(self, idx: Any, value: str, kind: str) -> ColumnElement[bool]:
        prefix, v = split_prefix(value)
        parts = _unescaped_split(v, "|", 2)
        number = parse_decimal(parts[0])
        if number is None:
            raise InvalidSearch(f"Invalid number {parts[0]!r}")
        extra: list[ColumnElement[bool]] = []
        if kind == "quantity" and len(parts) == 3:
            system, unit = unescape(parts[1]), unescape(parts[2])
            if system:
                extra.append(idx.c.sys == system)
            if unit:
                extra.append(idx.c.unit == unit)
        return and_(self._number_cond(idx.c.nlo, idx.c.nhi, number, prefix), *extra)

    def _number_cond(self, nlo: Any, nhi: Any, q: Decimal, prefix: str) -> ColumnElement[bool]:
        qlo, qhi = implicit_range(q)
        if prefix == "eq":
            return and_(nlo >= qlo, nhi < qhi)
        if prefix == "ne":
            return not_(and_(nlo >= qlo, nhi < qhi))
        if prefix in ("gt", "sa"):
            return nhi > q
        if prefix in ("lt", "eb"):
            return nlo < q
        if prefix == "ge":
            return nhi >= q
        if prefix == "le":
            return nlo <= q
        d = abs(q) * Decimal("0.1")
        return and_(nlo <= q + d, nhi >= q - d)

    # -- composite --------------------------------------------------------------------
    def _composite(self, t: SearchTables, f: Filter) -> ColumnElement[bool]:
        sp = f.param
        assert sp is not None
        if len(sp.components) != 2:
            raise InvalidSearch(f"Composite parameter {f.code!r} is not supported")
        second = sp.components[1]
        ors: list[ColumnElement[bool]] = []
        for v in f.values:
            parts = _unescaped_split(v, "$", 1)
            if len(parts) != 2:
                raise InvalidSearch(f"Composite parameter {f.code!r} expects two values joined by '$', got {v!r}")
            first_tok = self.token_entry("", parts[0])[1:]
            if second.type == "token":
                second_tok = self.token_entry("", parts[1])[1:]
                ors.append(t.main.c.tokens.contains([f"{f.code}{SEP}{first_tok}${second_tok}"]))
            elif second.type == "quantity":
                ors.append(self._exists_side(t, f.code, and_(t.idx.c.raw == first_tok, self._quantity_cond(t.idx, parts[1], "quantity"))))
            elif second.type == "date":
                ors.append(self._exists_side(t, f.code, and_(t.idx.c.raw == first_tok, self._date_cond(t.idx.c.lo, t.idx.c.hi, parts[1]))))
            elif second.type == "string":
                ors.append(self._exists_side(t, f.code, and_(t.idx.c.raw == first_tok, prefix_condition(t.idx.c.s, normalize_text(unescape(parts[1]))))))
            else:
                raise InvalidSearch(f"Composite parameter {f.code!r} is not supported")
        return or_(*ors)

    # -- near ---------------------------------------------------------------------------
    def _near(self, t: SearchTables, value: str) -> ColumnElement[bool]:
        lat, lon, km = parse_near(value)
        # A bounding box the btree index (code, nlo) can use, then the exact
        # great-circle test. Bounds are numeric like the column: a float bound
        # would cast the column and lose the index.
        idx = t.idx
        box: list[ColumnElement[bool]] = []
        for (lat_lo, lat_hi), lon_ranges in bounding_box(lat, lon, km):
            lat_cond = idx.c.nlo.between(_num(lat_lo), _num(lat_hi))
            if lon_ranges is None:
                box.append(lat_cond)
            else:
                box.append(and_(lat_cond, or_(*[idx.c.nhi.between(_num(a), _num(b)) for a, b in lon_ranges])))
        return self._exists_side(t, "near", and_(or_(*box), great_circle_km(idx.c.nlo, idx.c.nhi, lat, lon) <= km))

    # -- sort ---------------------------------------------------------------------------
    def order_by(self, rtype: str, sort: list[tuple[str, bool]], registry: Any, near: tuple[float, float] | None = None) -> list[Any]:
        t = tables(rtype)
        out: list[Any] = []
        for code, desc in sort:
            expr: Any
            if code == "_id":
                expr = t.main.c.id
            elif code == "_lastUpdated":
                expr = t.main.c.last_updated
            elif code == "near" and near is not None:
                idx = t.idx
                expr = select(func.min(great_circle_km(idx.c.nlo, idx.c.nhi, near[0], near[1]))).where(
                    idx.c.resource_id == t.main.c.id, idx.c.code == "near").scalar_subquery()
            else:
                sp = registry.get(rtype, code)
                if sp is None:
                    raise InvalidSearch(f"Unknown sort parameter {code!r} for {rtype}")
                idx = t.idx
                if sp.type == "string":
                    col = func.max(idx.c.s) if desc else func.min(idx.c.s)
                elif sp.type == "date":
                    col = func.max(idx.c.hi) if desc else func.min(idx.c.lo)
                elif sp.type in ("number", "quantity"):
                    col = func.max(idx.c.nhi) if desc else func.min(idx.c.nlo)
                elif sp.type == "uri":
                    col = func.max(idx.c.raw) if desc else func.min(idx.c.raw)
                else:
                    arr = t.main.c.tokens if sp.type == "token" else t.main.c.refs
                    elem = func.unnest(arr).table_valued("x").alias("x")
                    prefix = f"{code}{SEP}*|" if sp.type == "token" else f"{code}{SEP}"
                    agg = func.max if desc else func.min
                    expr = select(agg(elem.c.x)).select_from(elem).where(elem.c.x.startswith(prefix, autoescape=True)).scalar_subquery()
                    out.append(expr.desc().nulls_last() if desc else expr.asc().nulls_last())
                    continue
                expr = select(col).where(idx.c.resource_id == t.main.c.id, idx.c.code == code).scalar_subquery()
            out.append(expr.desc().nulls_last() if desc else expr.asc().nulls_last())
        out.append(t.main.c.id.asc())
        return out


def parse_near(value: str) -> tuple[float, float, float]:
    """``latitude|longitude|distance|unit`` -> (lat, lon, radius in km)."""
    parts = value.split("|")
    try:
        lat, lon = float(parts[0]), float(parts[1])
        dist = float(parts[2]) if len(parts) > 2 and parts[2] else 10.0
    except (ValueError, IndexError):
        raise InvalidSearch(f"near expects latitude|longitude|distance|unit, got {value!r}") from None
    unit = parts[3] if len(parts) > 3 and parts[3] else "km"
    if unit not in UNIT_KM:
        raise InvalidSearch(f"near: unknown distance unit {unit!r} (use km, m, mi or [mi_i])")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or not math.isfinite(dist) or dist < 0:
        raise InvalidSearch(f"near: invalid position or distance in {value!r}")
    return lat, lon, dist * UNIT_KM[unit]


def bounding_box(lat: float, lon: float, km: float) -> list[tuple[tuple[float, float], list[tuple[float, float]] | None]]:
    """Latitude range and longitude ranges (None: all) holding every point within
    ``km`` of (lat, lon), split at the antimeridian."""
    r = km / EARTH_RADIUS_KM  # angular radius
    lat_lo, lat_hi = lat - math.degrees(r), lat + math.degrees(r)
    if lat_lo <= -90 or lat_hi >= 90 or r >= math.pi / 2:
        return [((max(lat_lo, -90.0), min(lat_hi, 90.0)), None)]  # a pole is inside: any longitude
    # Widest longitude span of the circle (reached north or south of lat, not at lat).
    dlon = math.degrees(math.asin(min(1.0, math.sin(r) / math.cos(math.radians(lat)))))
    lo, hi = lon - dlon, lon + dlon
    if lo < -180:
        ranges = [(-180.0, hi), (lo + 360, 180.0)]
    elif hi > 180:
        ranges = [(lo, 180.0), (-180.0, hi - 360)]
    else:
        ranges = [(lo, hi)]
    return [((lat_lo, lat_hi), ranges)]


def _num(x: float) -> Any:
    return literal(Decimal(repr(x)), Numeric())


def prefix_condition(col: Any, prefix: str) -> ColumnElement[bool]:
    """``col`` starts with ``prefix``, written as the range
    ``prefix <= col < successor(prefix)`` in the byte order of ``text_pattern_ops``
    (``~>=~``/``~<~``): the ``<Type>_idx_s`` btree serves it in custom and generic
    plans alike, which ``LIKE $1 || '%' ESCAPE '/'`` does not."""
    if prefix == "":
        return col.isnot(None)
    lower = col.op("~>=~", is_comparison=True)(literal(prefix, Text))
    upper = _successor(prefix)
    if upper is None:
        return and_(lower, func.starts_with(col, literal(prefix, Text)))
    return and_(lower, col.op("~<~", is_comparison=True)(literal(upper, Text)))


def _successor(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``
    (UTF-8 byte order is code-point order)."""
    chars = list(prefix)
    while chars:
        cp = ord(chars[-1]) + 1
        if 0xD800 <= cp <= 0xDFFF:
            cp = 0xE000
        if cp <= 0x10FFFF:
            chars[-1] = chr(cp)
            return "".join(chars)
        chars.pop()
    return None


def great_circle_km(lat_col: Any, lon_col: Any, lat: float, lon: float) -> Any:
    """Haversine distance in km between a stored position and a point."""
    rlat = math.radians(lat)
    dlat = func.radians(lat_col) - rlat
    dlon = func.radians(lon_col) - math.radians(lon)
    a = func.power(func.sin(dlat / 2), 2) + math.cos(rlat) * func.cos(func.radians(lat_col)) * func.power(func.sin(dlon / 2), 2)
    return 2 * EARTH_RADIUS_KM * func.asin(func.least(1.0, func.sqrt(a)))


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def _text_array(values: list[str]) -> Any:
    """One text[] parameter, whatever the number of values (one prepared plan)."""
    return literal(list(values), ARRAY(Text))


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise InvalidSearch(f":missing expects true or false, got {value!r}")
    return value == "true"


def _unescaped_split(value: str, sep: str, maxsplit: int = -1) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i : i + 2])
            i += 2
            continue
        if ch == sep and (maxsplit < 0 or len(parts) < maxsplit):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


__all__ = ["Compiler", "great_circle_km", "haversine_km", "false"]
