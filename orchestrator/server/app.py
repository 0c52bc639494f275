"""The HTTP API (FastAPI): the app factory. Routes live one module per resource in `server.routes`, each
calling the service; this module holds what wraps them all.

- Lifespan: the `ControlPlane` (store, service, controller, MLflow mirror) built at startup, its controller
  and mirror started (unless `start_controller=False`, as tests do) and stopped at shutdown.
- Middleware: every route but the health check and the OpenAPI document wants `Bearer <token>`: the admin
  token (`LORAFLEET_API_TOKEN`) or a project token (`orchestrator.service.auth` says what each may do). The
  body's size is bounded, and the token checked, before the body is read.
- Errors users cause are 4xx JSON (`server.problems`), never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from orchestrator.server.problems import ERRORS, handlers, problem, unavailable
from orchestrator.server.routes import ROUTERS
from orchestrator.service.plane import ControlPlane
from orchestrator.settings import Settings
from orchestrator.store import DatabaseUnavailable

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a job spec of a thousand adapters is ~300 KB
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def create_app(settings: Settings | None = None, start_controller: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        plane = ControlPlane(settings=settings)
        app.state.plane = plane
        if not settings.api_token:
            log.warning("LORAFLEET_API_TOKEN is not set: this server is open to anyone who reaches it")
        if start_controller:
            plane.start()
        yield
        plane.stop()

    app = FastAPI(
        title="lorafleet", version="0.1.0", lifespan=lifespan, responses=ERRORS, exception_handlers=handlers()
    )
    app.middleware("http")(authenticate)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Before any body is read: bound its size, then know the caller (401 if unknown)."""
    if request.url.path in OPEN_PATHS:
        return await call_next(request)
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length")
        if length is None:
            return problem(411, "send a Content-Length header (chunked bodies are not accepted)")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return problem(413, f"request body over {MAX_BODY_BYTES} bytes; split the job")
    scheme, _, secret = (request.headers.get("authorization") or "").partition(" ")
    service = request.app.state.plane.service
    try:  # a project token is looked up in SQL; an exception here would escape the handlers as a 500
        principal = await run_in_threadpool(service.principal, secret if scheme.lower() == "bearer" else None)
    except DatabaseUnavailable as exc:
        return unavailable(exc)
    if principal is None:
        return problem(401, "missing or wrong API token: send `Authorization: Bearer <token>`")
    request.state.principal = principal
    if "\x00" in request.url.path:  # no id or name holds NUL (decoded: %00 arrives as NUL)
        return problem(404, "not found: a path with a NUL character names nothing")
    return await call_next(request)
