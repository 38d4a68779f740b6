"""The ASGI application: FHIR API, pages and domain APIs on one platform."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from parcours import __version__
from parcours.core.errors import Conflict, MethodNotAllowed, NotFound, ParcoursError
from parcours.core.settings import Settings
from parcours.events.runtime import Events
from parcours.services import export
from parcours.services import audit_trail
from parcours.services.booking import notify as booking_notify
from parcours.services.records import runtime as record_runtime
from parcours.services.platform import Platform
from parcours.web import access_pages, booking_api, booking_pages, directory_api, fhir, fhir_ws, oidc, pages, smart
from parcours.web import record_api, record_pages
from parcours.web import messaging_pages, messaging_ws
from parcours.services.messaging import hub as messaging_hub
from parcours.services.messaging import notify as messaging_notify
from parcours.web import telehealth_api, telehealth_pages, telehealth_ws
from parcours.web import expertise_pages
from parcours.web import stroke_pages
from parcours.services.telehealth.signaling import Signaling
from parcours.services.telehealth import expertise_reminders
from parcours.services.telehealth import stroke_jobs
from parcours.web.fhir_render import error_response

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, platform: Platform | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = platform is None
        app.state.platform = platform or await Platform.start(settings)
        stop_export_worker = export.start_in_background(app.state.platform)  # bulk $export jobs
        app.state.events = await Events.start(app.state.platform)  # change feed, Subscriptions
        app.state.telehealth = await Signaling.start(app.state.platform.uri, app.state.platform.pool)  # room signaling
        stop_audit = audit_trail.start_in_background(app.state.platform)  # seals, AuditEvents
        stop_booking = booking_notify.start_in_background(  # reminders and other booking notices
            app.state.platform, booking_api.notifier_of(app, app.state.platform))
        stop_record = await record_runtime.start(  # MLLP listener for lab results, notices of new documents
            app.state.platform, booking_api.notifier_of(app, app.state.platform).email)
        app.state.messaging = await messaging_hub.Hub.start(app.state.platform, app.state.events.feed)  # live messages
        stop_messaging = messaging_notify.start_in_background(  # e-mail notices of unread messages, retention
            app.state.platform, booking_api.notifier_of(app, app.state.platform).email)
        stop_expertise = expertise_reminders.start_in_background(  # due-date reminders of tele-expertise requests
            app.state.platform, booking_api.notifier_of(app, app.state.platform).email)
        stop_stroke = stroke_jobs.start_in_background(  # tele-stroke escalations, e-mail and SMS alerts
            app.state.platform, booking_api.notifier_of(app, app.state.platform))
        try:
            yield
        finally:
            await stop_stroke()
            await stop_expertise()
            await stop_messaging()
            await app.state.messaging.close()
            await stop_record()
            await stop_booking()
            await stop_audit()
            await app.state.telehealth.close()
            await app.state.events.close()
            await stop_export_worker()
            if own:
                await app.state.platform.close()

    app = FastAPI(title="Parcours", version=__version__, lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    if platform is not None:
        app.state.platform = platform

    # The FHIR base itself (batch/transaction POST, system search) without a redirect to /fhir/.
    app.router.routes.append(Route("/fhir", fhir.system_root, methods=["GET", "POST"]))
    app.router.routes.append(fhir_ws.route)  # before the /fhir mount, which would take it
    app.router.routes.append(Mount("/fhir", routes=fhir.routes))
    app.router.routes.append(Mount("/api/directory", routes=directory_api.routes))  # care-offer directory
    pages.install(app)  # sign-in, account settings, portal and workspace pages; session middleware
    access_pages.install(app)  # access history, privacy choices, emergency access
    smart.install(app, settings)  # SMART on FHIR authorization server, client registration
    oidc.install(app, settings)  # sign-in with external identity providers (Pro Santé Connect, FranceConnect)
    booking_api.install(app)  # /api/booking, FHIR $find and $book, private agenda feeds
    booking_pages.install(app)  # search with a map, booking, my appointments, the agenda
    record_api.install(app)  # shared record: uploads, content downloads, timeline, results, HL7 v2 over HTTP
    record_pages.install(app)  # shared record pages: documents, results, timeline, patients, lab reconciliation
    app.router.routes.append(telehealth_ws.route)  # signaling of the consultation rooms
    telehealth_pages.install(app)  # teleconsultation: list, device check, room, report
    telehealth_api.install(app)  # tele-expertise requests, workflow, opinions, threads
    expertise_pages.install(app)  # tele-expertise pages: requester and expert
    stroke_pages.install(app)  # tele-stroke: rosters, urgent requests, alerts (live socket), timeline
    app.router.routes.append(messaging_ws.route)  # live messages: /messages/ws
    messaging_pages.install(app)  # secure messaging: inbox, conversations, new conversation, /api/messaging

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
                return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}",
                                                       headers=dict(exc.headers or {})))
            return error_response(ParcoursError(str(exc.detail), status=exc.status_code))
        return JSONResponse({"error": f"HTTP-{exc.status_code}", "message": str(exc.detail)}, exc.status_code)

    async def write_conflict(request: Request, exc: Exception) -> Response:
        # Two transactions crossed (deadlock, same new key): nothing was written; retrying is safe.
        log.warning("Write conflict on %s %s: %s", request.method, request.url.path, exc)
        err = Conflict("The request conflicted with a concurrent one and was not carried out; retry it")
        if request.url.path.startswith("/fhir"):
            return error_response(err)
        return JSONResponse({"error": err.code, "message": err.message}, err.status)

    for kind in (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, psycopg.errors.UniqueViolation):
        app.add_exception_handler(kind, write_conflict)

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
