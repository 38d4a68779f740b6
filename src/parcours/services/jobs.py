"""Periodic background jobs of a server process.

Each job (notifications, reminders, escalations, retention) is a coroutine run every few
seconds on the process's event loop; a failing round is logged and retried at the next, so
that a database or SMTP hiccup never stops the loop. State lives in the database, so several
processes may run the same job: each round takes its rows under lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

Stopper = Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def every(seconds: float | Callable[[], float], job: Callable[[], Awaitable[object]], *, name: str,
          enabled: bool = True, log: logging.Logger | None = None) -> Stopper:
    """Run ``job`` now and then every ``seconds`` (a number, or a function read each round)
    in a task of this event loop; returns the function that stops it (a no-op when not
    ``enabled``)."""
    if not enabled:
        return _nothing
    logger = log or logging.getLogger(__name__)
    interval = seconds if callable(seconds) else (lambda: seconds)

    async def loop() -> None:
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive a database or SMTP hiccup
                logger.exception("Background job %s failed; retrying", name)
            await asyncio.sleep(interval())

    task = asyncio.create_task(loop(), name=name)

    async def stop() -> None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping, whatever the last round did
            pass

    return stop
