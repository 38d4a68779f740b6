"""The ASGI application: FHIR API, pages and domain APIs on one platform."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount

from parcours import __version__
from parcours.core.errors import MethodNotAllowed, NotFound, ParcoursError
from parcours.core.settings import Settings
from parcours.services.platform import Platform
from parcours.web import fhir
from parcours.web.fhir_render import error_response

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, platform: Platform | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = platform is None
        app.state.platform = platform or await Platform.start(settings)
        try:
            yield
        finally:
            if own:
                await app.state.platform.close()

    app = FastAPI(title="Parcours", version=__version__, lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    if platform is not None:
        app.state.platform = platform

    app.router.routes.append(Mount("/fhir", routes=fhir.routes))

    @app.exception_handler(ParcoursError)
    async def parcours_error(request: Request, exc: ParcoursError) -> Response:
        if request.url.path.startswith("/fhir"):
            return error_response(exc)
        return JSONResponse({"error": exc.code, "message": exc.message}, exc.status, headers=exc.headers or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/fhir"):
            if exc.status_code == 404:
                return error_response(NotFound(f"No FHIR endpoint at {request.url.path}"))
            if exc.status_code == 405:
                return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"))
            return error_response(ParcoursError(str(exc.detail), status=exc.status_code))
        return JSONResponse({"error": f"HTTP-{exc.status_code}", "message": str(exc.detail)}, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        err = ParcoursError("Internal error: the request was not carried out", status=500, code="PRC-1500", fhir_code="exception")
        if request.url.path.startswith("/fhir"):
            return error_response(err)
        return JSONResponse({"error": err.code, "message": err.message}, 500)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    return app
