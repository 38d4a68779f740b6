"""What the shared record runs in each server process: the MLLP listener (when a port is
configured) and the notices runner (unless turned off). Started in the app lifespan."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from parcours.services.booking.notify import EmailChannel
from parcours.services.platform import Platform
from parcours.services.records import mllp, notices


async def start(platform: Platform, email: EmailChannel) -> Callable[[], Awaitable[None]]:
    settings = platform.settings
    server = await mllp.MllpServer(platform, settings.mllp_host, settings.mllp_port).start() if settings.mllp_port else None
    stop_notices = notices.start_in_background(platform, email) if settings.record_notices_worker else None

    async def stop() -> None:
        if stop_notices is not None:
            await stop_notices()
        if server is not None:
            await server.close()

    return stop
