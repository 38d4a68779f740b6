"""The export worker as its own process: ``python -m parcours.jobs.worker [--concurrency N] [--once]``.

The same as ``parcours worker``; each server process also runs one worker (see
``parcours.services.export``). Any number of workers, on any node, share the
queue in PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from parcours.core.settings import Settings
from parcours.services import export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m parcours.jobs.worker", description="Run bulk $export jobs (as `parcours worker` does).")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs this process runs at once")
    parser.add_argument("--once", action="store_true", help="run the jobs waiting now, then exit")
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper())
    asyncio.run(export.serve_workers(settings, concurrency=args.concurrency, once=args.once))


if __name__ == "__main__":  # pragma: no cover
    main()
