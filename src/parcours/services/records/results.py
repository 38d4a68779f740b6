"""Lab results over time: one series per analyte, and its trend chart as SVG.

The chart is drawn on the server (no JavaScript chart library): a line through the values,
the reference range shaded, the points that fall outside it marked, an accessible name and
description; the page shows the same values in a table beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from html import escape

from parcours.store.repository import Repository


@dataclass
class Point:
    when: str  # FHIR dateTime
    value: float
    unit: str
    low: float | None
    high: float | None
    flag: str | None
    obs_id: str

    @property
    def outside(self) -> bool:
        return (self.low is not None and self.value < self.low) or (self.high is not None and self.value > self.high)


@dataclass
class Series:
    code: str
    label: str
    unit: str
    points: list[Point] = field(default_factory=list)
    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (when, value, obs id) of non-numeric results

    @property
    def latest(self) -> Point | None:
        return self.points[-1] if self.points else None

    @property
    def range(self) -> tuple[float | None, float | None]:
        for p in reversed(self.points):
            if p.low is not None or p.high is not None:
                return p.low, p.high
        return None, None


def _when(obs: dict) -> str:
    return str(obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("start") or obs.get("issued") or "")


async def series_of(repo: Repository, patient_id: str, *, limit: int = 2000) -> list[Series]:
    res = await repo.search(repo.parse_search("Observation", [
        ("subject", f"Patient/{patient_id}"), ("category", "laboratory"), ("_sort", "date"), ("_count", str(limit))]))
    by_code: dict[str, Series] = {}
    for m in res.matches:
        obs = m.resource()
        if obs.get("status") in ("entered-in-error", "cancelled"):
            continue
        coding = ((obs.get("code") or {}).get("coding") or [{}])[0]
        code = str(coding.get("code") or "")
        if not code:
            continue
        label = str((obs.get("code") or {}).get("text") or coding.get("display") or code)
        vq = obs.get("valueQuantity")
        s = by_code.setdefault(code, Series(code, label, str((vq or {}).get("unit") or "")))
        when = _when(obs)
        if vq and isinstance(vq.get("value"), (int, float)):
            rr = (obs.get("referenceRange") or [{}])[0]
            flag = (((obs.get("interpretation") or [{}])[0].get("coding") or [{}])[0]).get("code")
            s.points.append(Point(when, float(vq["value"]), str(vq.get("unit") or ""), (rr.get("low") or {}).get("value"),
                                  (rr.get("high") or {}).get("value"), flag, m.id))
            s.unit = s.unit or str(vq.get("unit") or "")
        else:
            text = obs.get("valueString") or (obs.get("valueCodeableConcept") or {}).get("text") or ""
            s.texts.append((when, str(text), m.id))
    out = list(by_code.values())
    for s in out:
        s.points.sort(key=lambda p: p.when)
    out.sort(key=lambda s: (not s.points, s.label.lower()))
    return out


def _parse(when: str) -> float:
    try:
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp() if "T" in when else \
            datetime.fromisoformat(when[:10]).timestamp()
    except ValueError:
        return 0.0


def _fmt(v: float) -> str:
    return f"{v:.6g}".replace(".", ",") if abs(v) < 1e6 else f"{v:.3g}"


def svg(series: Series, *, title: str, description: str, width: int = 360, height: int = 150) -> str:
    """The trend chart of one series (numeric points), or an empty string."""
    pts = series.points
    if not pts:
        return ""
    low, high = series.range
    values = [p.value for p in pts] + [v for v in (low, high) if v is not None]
    vmin, vmax = min(values), max(values)
    pad = (vmax - vmin) * 0.1 or abs(vmax) * 0.1 or 1.0
    vmin, vmax = vmin - pad, vmax + pad
    left, right, top, bottom = 48, 10, 10, 26
    w, h = width - left - right, height - top - bottom
    times = [_parse(p.when) for p in pts]
    t0, t1 = min(times), max(times)
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return left + (w / 2 if t1 == t0 else (t - t0) / span * w)

    def y(v: float) -> float:
        return top + (vmax - v) / (vmax - vmin) * h

    uid = "c" + series.code.replace("-", "").replace(".", "")[:20]
    parts = [f'<svg class="trend" viewBox="0 0 {width} {height}" role="img" aria-labelledby="{uid}-t {uid}-d" '
             f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
             f'<title id="{uid}-t">{escape(title)}</title><desc id="{uid}-d">{escape(description)}</desc>',
             f'<rect class="plot" x="{left}" y="{top}" width="{w}" height="{h}"/>']
    if low is not None or high is not None:
        y_hi = y(high) if high is not None else top
        y_lo = y(low) if low is not None else top + h
        parts.append(f'<rect class="range" x="{left}" y="{y_hi:.1f}" width="{w}" height="{max(0.0, y_lo - y_hi):.1f}"/>')
    for v in (vmax - pad, vmin + pad):
        parts.append(f'<text class="axis" x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{escape(_fmt(v))}</text>')
    parts.append(f'<text class="axis" x="{left}" y="{height - 8}">{escape(pts[0].when[:10])}</text>')
    if len(pts) > 1:
        parts.append(f'<text class="axis" x="{left + w}" y="{height - 8}" text-anchor="end">{escape(pts[-1].when[:10])}</text>')
        line = " ".join(f"{x(t):.1f},{y(p.value):.1f}" for t, p in zip(times, pts))
        parts.append(f'<polyline class="line" points="{line}"/>')
    for t, p in zip(times, pts):
        cls = "point out" if p.outside else "point"
        parts.append(f'<circle class="{cls}" cx="{x(t):.1f}" cy="{y(p.value):.1f}" r="{4 if p.outside else 3}"/>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["Point", "Series", "series_of", "svg"]
