"""The running platform: settings, database pool and shared secrets of one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from psycopg import AsyncConnection, pq
from psycopg_pool import AsyncConnectionPool

from parcours.core.clock import Clock
from parcours.core.settings import Settings
from parcours.fhir.registry import Registry, registry
from parcours.security.caller import Caller
from parcours.core.errors import ParcoursError
from parcours.store import audit, db, migrate, secrets
from parcours.store.blobs import BlobStore
from parcours.store.repository import Repository, WriteRule

TOKEN_KEY = "token-signing-key"


@dataclass
class Platform:
    settings: Settings
    uri: str
    pool: AsyncConnectionPool
    token_key: str
    clock: Clock
    registry: Registry
    # Domain rules run in the transaction of every write (booking: Appointment <-> Slot).
    rules: tuple[WriteRule, ...] = ()
    # Encrypted content of the shared record's documents (keys and backend of this process).
    blobs: BlobStore | None = None

    @classmethod
    async def start(cls, settings: Settings, *, clock: Clock | None = None, run_migrations: bool = True) -> "Platform":
        uri = await asyncio.to_thread(db.libpq_url, settings)
        if run_migrations:
            await asyncio.to_thread(migrate.upgrade, uri)
        key = settings.secret_key or await asyncio.to_thread(secrets.get_or_create, uri, TOKEN_KEY)
        pool = await db.open_pool(uri, settings.db_pool_size)
        async with pool.connection() as conn, conn.transaction():
            blobs = await BlobStore.open(settings, conn)
        rules = write_rules(settings)
        for rule in rules:
            if hasattr(rule, "blobs"):  # the shared record's rule reads documents' text from the blob store
                rule.blobs = blobs
        return cls(settings, uri, pool, key, clock or Clock(), registry(), rules=rules, blobs=blobs)

    async def close(self) -> None:
        await self.pool.close()

    def repository(self, conn: AsyncConnection, caller: Caller) -> Repository:
        return Repository(
            conn, caller, base_url=self.settings.fhir_base, clock=self.clock, reg=self.registry,
            default_count=self.settings.default_page_size, max_count=self.settings.max_page_size, rules=self.rules,
        )

    @asynccontextmanager
    async def transaction(self, caller: Caller) -> AsyncIterator[Repository]:
        """One transaction, owned here at the edge: commit on success, roll back on error.

        A refused or failed interaction is rolled back with everything it did, so its
        audit entry is written afterwards in a transaction of its own.
        """
        async with self.pool.connection() as conn:
            repo = self.repository(conn, caller)
            try:
                async with conn.transaction():
                    yield repo
            except ParcoursError as err:
                if repo.attempt is not None and repo.audit_enabled:
                    await self._audit_failure(conn, caller, repo.attempt, err)
                raise

    @asynccontextmanager
    async def reading(self, caller: Caller) -> AsyncIterator[Repository]:
        """For interactions that only read (read, vread, search): no transaction block.
        Under READ COMMITTED every statement takes its own snapshot either way; without
        BEGIN and COMMIT a read is two round trips (the select, then its audit entry as a
        transaction of its own) instead of four. Refusals and failures are audited as in
        :meth:`transaction`."""
        async with self.pool.connection() as conn:
            repo = self.repository(conn, caller)
            await conn.set_autocommit(True)
            try:
                yield repo
            except ParcoursError as err:
                if repo.attempt is not None and repo.audit_enabled:
                    await self._audit_failure(conn, caller, repo.attempt, err)
                raise
            finally:
                if conn.info.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                    await conn.execute("ROLLBACK")  # a failed audit pipeline left its block open
                await conn.set_autocommit(False)

    async def _audit_failure(self, conn: AsyncConnection, caller: Caller, attempt: tuple[str, str | None, str | None],
                             err: ParcoursError) -> None:
        action, rtype, rid = attempt
        outcome = audit.MINOR_FAILURE if err.status < 500 else audit.SERIOUS_FAILURE
        async with conn.transaction():
            await audit.record(conn, audit.AuditRecord(
                action=action, outcome=outcome, recorded=self.clock.now(), agent=caller.user_id or caller.display,
                agent_kind=caller.kind, fhir_user=caller.fhir_user, address=caller.address, resource_type=rtype,
                resource_id=rid, patients=(f"Patient/{rid}",) if rtype == "Patient" and rid else (),
                detail={"status": err.status, "code": err.code, "message": err.message[:500]}))


def write_rules(settings: Settings) -> tuple[WriteRule, ...]:
    """The write rules the domain services register (imported here, at start-up, so that
    ``services.platform`` stays importable by every service)."""
    from parcours.services.booking.rules import BookingRule
    from parcours.services.messaging.rule import MessagingRule
    from parcours.services.records.rule import RecordRule

    return (BookingRule(reminder_hours=settings.booking_reminder_hours), RecordRule(settings), MessagingRule(settings))
