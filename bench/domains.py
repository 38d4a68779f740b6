"""The domain benchmarks of ``make bench``: directory and booking, shared record, messaging.

Each runs as its own script (``bench/booking_bench.py``, ``bench/record_bench.py``,
``bench/messaging_bench.py``) on a fresh database, prints one JSON document, and is saved as
``bench/out/<stamp>/<domain>.json``. The report (``docs/benchmarks.md``) shows for each domain
the most recent result found under ``bench/out/`` with its date, so that one domain can be
measured again (``bench/run.py --only-domains record``) without running everything.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"

# domain -> (script, full-size arguments, smoke arguments, title)
DOMAINS: dict[str, tuple[str, list[str], list[str], str]] = {
    "booking": ("booking_bench.py", [], ["--roles", "5000", "--slots", "100000", "--searches", "50", "--bookings", "100"],
                "Directory search and booking (national size)"),
    "record": ("record_bench.py", [], ["--documents", "500", "--events", "500", "--requests", "20"],
               "Shared record: document ingest and the patient timeline"),
    "messaging": ("messaging_bench.py", [], ["--conversations", "100", "--seconds", "5"],
                  "Messaging: live delivery to WebSocket clients"),
}
TIMEOUT_S = {"booking": 3600.0, "record": 1200.0, "messaging": 1200.0}


def run(name: str, outdir: Path, quick: bool, log: Callable[[str], None]) -> dict:
    """Run one domain benchmark; its JSON (or the failure) is saved in ``outdir``."""
    script, full, smoke, _ = DOMAINS[name]
    cmd = [sys.executable, str(BENCH / script), *(smoke if quick else full)]
    log(f"{name}: {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(outdir / f"{name}.log", "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=TIMEOUT_S[name])
            result = json.loads(proc.stdout) if proc.returncode == 0 else {
                "failed": f"exit status {proc.returncode}, see bench/out/{outdir.name}/{name}.log"}
        except subprocess.TimeoutExpired:
            result = {"failed": f"stopped after {TIMEOUT_S[name]:.0f} s"}
        except json.JSONDecodeError as e:
            result = {"failed": f"no JSON on stdout ({e})"}
    result["quick"] = quick
    result["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"{name}: done in {time.time() - t0:.0f} s")
    (outdir / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def latest(name: str) -> tuple[str, dict] | None:
    """The newest full-size result of a domain under ``bench/out/`` (stamp folder, result)."""
    for f in sorted(OUT.glob(f"*/{name}.json"), key=lambda p: p.parent.name, reverse=True):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not data.get("quick") and "failed" not in data:
            return f.parent.name, data
    return None


def _g(d: dict, *path: str) -> object:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _f(v: object, nd: int = 1) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}"
    return str(v)


def verdicts(results: dict[str, tuple[str, dict]]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met?) for each domain target; None when not measured."""
    rows: list[tuple[str, str, bool | None]] = []
    b = results.get("booking", ("", {}))[1]
    p95 = _g(b, "search", "p95_ms")
    rows.append(("geolocated search, national directory: p95 ≤ 50 ms", f"{_f(p95)} ms" if p95 is not None else "not measured",
                 None if p95 is None else float(p95) <= 50))  # type: ignore[arg-type]
    c = _g(b, "contention") or {}
    rows.append(("booking contention: exactly one winner of " + _f(_g(c, "attempts")),  # type: ignore[arg-type]
                 f"{_f(_g(c, 'winners'))} winner(s), {_f(_g(c, 'slot_taken'))} \"slot already taken\"" if c else "not measured",
                 None if not c else _g(c, "winners") == 1 and _g(c, "winners") + _g(c, "slot_taken") == _g(c, "attempts")))  # type: ignore[operator]
    r = results.get("record", ("", {}))[1]
    dps = _g(r, "ingest", "documents_per_s")
    rows.append(("document ingest (DocumentReference + 50 KB PDF): ≥ 1,000/s", f"{_f(dps)} documents/s" if dps is not None else "not measured",
                 None if dps is None else float(dps) >= 1000))  # type: ignore[arg-type]
    tp95 = _g(r, "timeline", "p95_ms")
    rows.append((f"patient timeline of {_f(_g(r, 'timeline', 'events') or 5000)} events: p95 ≤ 150 ms",
                 f"{_f(tp95)} ms" if tp95 is not None else "not measured", None if tp95 is None else float(tp95) <= 150))  # type: ignore[arg-type]
    m = results.get("messaging", ("", {}))[1]
    p99, lost = _g(m, "delivery_ms", "p99"), _g(m, "lost")
    rows.append((f"messaging, {_f(_g(m, 'clients') or 2000)} WebSocket clients, 100 msg/s: p99 ≤ 200 ms, none lost",
                 f"p99 {_f(p99)} ms, {_f(lost)} lost" if p99 is not None else "not measured",
                 None if p99 is None else float(p99) <= 200 and lost == 0))  # type: ignore[arg-type]
    return rows


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list):
            out[key] = ", ".join(_f(x) for x in v[:12]) + (" …" if len(v) > 12 else "")
        else:
            out[key] = v
    return out


def sections(results: dict[str, tuple[str, dict]]) -> list[str]:
    """Markdown: one section per domain with every figure of its latest result."""
    L: list[str] = []
    for name, (script, _, _, title) in DOMAINS.items():
        L += [f"## {title}", ""]
        if name not in results:
            L += [f"Not measured yet: `bench/run.py --only-domains {name}` (or `make bench`) runs `bench/{script}`.", ""]
            continue
        stamp, data = results[name]
        L += [f"`bench/{script}` (its docstring says what is measured), {data.get('date', stamp)}, raw result "
              f"`bench/out/{stamp}/{name}.json`:", "", "| measure | value |", "| --- | --- |"]
        L += [f"| {k} | {_f(v)} |" for k, v in _flat(data).items() if k not in ("date", "quick")] + [""]
    return L
