"""The running platform: settings, database pool and shared secrets of one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from parcours.core.clock import Clock
from parcours.core.settings import Settings
from parcours.fhir.registry import Registry, registry
from parcours.security.caller import Caller
from parcours.store import db, migrate, secrets
from parcours.store.repository import Repository

TOKEN_KEY = "token-signing-key"


@dataclass
class Platform:
    settings: Settings
    uri: str
    pool: AsyncConnectionPool
    token_key: str
    clock: Clock
    registry: Registry

    @classmethod
    async def start(cls, settings: Settings, *, clock: Clock | None = None, run_migrations: bool = True) -> "Platform":
        uri = await asyncio.to_thread(db.libpq_url, settings)
        if run_migrations:
            await asyncio.to_thread(migrate.upgrade, uri)
        key = settings.secret_key or await asyncio.to_thread(secrets.get_or_create, uri, TOKEN_KEY)
        pool = await db.open_pool(uri, settings.db_pool_size)
        return cls(settings, uri, pool, key, clock or Clock(), registry())

    async def close(self) -> None:
        await self.pool.close()

    def repository(self, conn: AsyncConnection, caller: Caller) -> Repository:
        return Repository(
            conn, caller, base_url=self.settings.fhir_base, clock=self.clock, reg=self.registry,
            default_count=self.settings.default_page_size, max_count=self.settings.max_page_size,
        )

    @asynccontextmanager
    async def transaction(self, caller: Caller) -> AsyncIterator[Repository]:
        """One transaction, owned here at the edge: commit on success, roll back on error."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                yield self.repository(conn, caller)
