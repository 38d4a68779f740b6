"""FHIR primitive helpers shared by the indexer and the search parser."""

from __future__ import annotations

import calendar
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2})(:(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)

MIN_DT = datetime(1, 1, 1, tzinfo=UTC)
MAX_DT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def parse_date_range(value: str) -> tuple[datetime, datetime] | None:
    """The implicit range [lo, hi) of a FHIR date, dateTime or instant.

    ``2020`` covers the whole year; ``2020-05-03T10:00:00Z`` one second.
    A time without zone is read as UTC, the server's zone.
    """
    m = _DATE_RE.match(value.strip())
    if not m:
        return None
    try:
        y = int(m["y"])
        tz = UTC
        if m["tz"] and m["tz"] != "Z":
            sign = 1 if m["tz"][0] == "+" else -1
            hh, mm = int(m["tz"][1:3]), int(m["tz"][4:6])
            tz = timezone(sign * timedelta(hours=hh, minutes=mm))
        if m["m"] is None:
            lo = datetime(y, 1, 1, tzinfo=UTC)
            return lo, _add_years(lo, 1)
        mo = int(m["m"])
        if m["d"] is None:
            lo = datetime(y, mo, 1, tzinfo=UTC)
            days = calendar.monthrange(y, mo)[1]
            return lo, lo + timedelta(days=days)
        d = int(m["d"])
        if m["H"] is None:
            lo = datetime(y, mo, d, tzinfo=UTC)
            return lo, lo + timedelta(days=1)
        H = int(m["H"])
        if m["M"] is None:
            lo = datetime(y, mo, d, H, tzinfo=tz)
            return lo.astimezone(UTC), (lo + timedelta(hours=1)).astimezone(UTC)
        M = int(m["M"])
        if m["S"] is None:
            lo = datetime(y, mo, d, H, M, tzinfo=tz)
            return lo.astimezone(UTC), (lo + timedelta(minutes=1)).astimezone(UTC)
        S = int(m["S"])
        if m["f"]:
            frac = m["f"][1:]
            micro = int((frac + "000000")[:6])
            lo = datetime(y, mo, d, H, M, S, micro, tzinfo=tz)
            step = timedelta(microseconds=max(1, 10 ** (6 - min(len(frac), 6))))
            return lo.astimezone(UTC), (lo + step).astimezone(UTC)
        lo = datetime(y, mo, d, H, M, S, tzinfo=tz)
        return lo.astimezone(UTC), (lo + timedelta(seconds=1)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _add_years(dt: datetime, n: int) -> datetime:
    try:
        return dt.replace(year=dt.year + n)
    except ValueError:
        return MAX_DT


def parse_decimal(value: str | int | float) -> Decimal | None:
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def implicit_range(value: Decimal) -> tuple[Decimal, Decimal]:
    """Precision range of a search number: ``100`` means [99.5, 100.5)."""
    exp = value.as_tuple().exponent
    assert isinstance(exp, int)
    half = Decimal(5).scaleb(exp - 1)
    return value - half, value + half


def normalize_text(value: str) -> str:
    """Case- and accent-insensitive form used by string search (Hélène -> helene)."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.casefold().strip()
