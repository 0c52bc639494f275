"""The HTTP API (FastAPI): a thin skin over the service layer, plus the controller when run as a server.

Errors users cause are 4xx JSON: `{"detail": {"message": ..., "problems": [{"field": ..., "message": ...}]}}`,
never a 500. When `LORAFLEET_API_TOKEN` is set, every route but the health check wants `Bearer <token>`.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from orchestrator.embedded import EmbeddedBackend
from orchestrator.settings import Settings
from orchestrator.spec import BranchSpec, SpecError
from orchestrator.store import Conflict, NotFound, StoreError
from orchestrator.views import AdapterView, EventView, JobView, LineageNode, RegistryView


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str | None = None
    force: bool = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_new_tokens: int = Field(default=16, gt=0, le=1024)


def _backend(request: Request) -> EmbeddedBackend:
    return request.app.state.backend


# Module level, not inside create_app: FastAPI resolves these string annotations in the module namespace.
Backend = Annotated[EmbeddedBackend, Depends(_backend)]


def _problem(status: int, message: str, problems: list[tuple[str, str]] | None = None) -> JSONResponse:
    body = {"message": message, "problems": [{"field": f, "message": m} for f, m in problems or []]}
    return JSONResponse(status_code=status, content={"detail": body})


def create_app(settings: Settings | None = None, start_controller: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = EmbeddedBackend(settings=settings)
        app.state.backend = backend
        if start_controller:
            backend.ensure_running()
        yield
        backend.close()

    app = FastAPI(title="lorafleet", version="0.1.0", lifespan=lifespan)

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.api_token and not (
            authorization and secrets.compare_digest(authorization, f"Bearer {settings.api_token}")
        ):
            raise HTTPException(
                401,
                {
                    "message": "missing or wrong API token: send `Authorization: Bearer <token>`",
                    "problems": [],
                },
            )

    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, exc: SpecError) -> JSONResponse:
        return _problem(422, "invalid job spec", exc.problems)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [(".".join(str(p) for p in e["loc"] if p != "body"), e["msg"]) for e in exc.errors()]
        return _problem(422, "invalid request", problems)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _problem(404, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return _problem(409, str(exc))

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        return _problem(400, str(exc))

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return _problem(400, str(exc))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    guarded = [Depends(authorize)]

    @app.post("/v1/jobs", status_code=201, dependencies=guarded)
    def submit(
        body: dict[str, Any],
        b: Backend,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JobView:
        return b.submit(body, idempotency_key)

    @app.get("/v1/jobs", dependencies=guarded)
    def jobs(b: Backend, project: str | None = None) -> list[JobView]:
        return b.jobs(project)

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    def job(job_id: str, b: Backend) -> JobView:
        return b.job(job_id)

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded)
    def events(job_id: str, b: Backend, after: int = 0) -> list[EventView]:
        return b.events(job_id, after)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=guarded)
    def cancel(job_id: str, b: Backend) -> JobView:
        return b.cancel(job_id)

    @app.get("/v1/adapters", dependencies=guarded)
    def adapters(b: Backend, project: str | None = None, job_id: str | None = None) -> list[AdapterView]:
        return b.adapters(project, job_id)

    @app.get("/v1/adapters/{project}/{name}", dependencies=guarded)
    def adapter(project: str, name: str, b: Backend) -> AdapterView:
        return b.adapter(project, name)

    @app.get("/v1/adapters/{project}/{name}/lineage", dependencies=guarded)
    def lineage(project: str, name: str, b: Backend) -> LineageNode:
        return b.lineage(project, name)

    @app.post("/v1/adapters/{project}/{name}/branch", status_code=201, dependencies=guarded)
    def branch(project: str, name: str, body: BranchSpec, b: Backend) -> JobView:
        return b.branch(project, name, body)

    @app.post("/v1/adapters/{project}/{name}/promote", dependencies=guarded)
    def promote(project: str, name: str, body: PromoteRequest, b: Backend) -> RegistryView:
        return b.promote(project, name, body.alias, body.force)

    @app.post("/v1/adapters/{project}/{name}/generate", dependencies=guarded)
    def generate(project: str, name: str, body: GenerateRequest, b: Backend) -> dict[str, str]:
        return {"text": b.generate(project, name, body.prompt, body.max_new_tokens)}

    @app.get("/v1/adapters/{project}/{name}/export", dependencies=guarded)
    def export(project: str, name: str, b: Backend, merged: bool = False) -> FileResponse:
        """The export as a zip: the PEFT adapter directory, or the merged model (`?merged=true`)."""
        work = Path(tempfile.mkdtemp(prefix="lorafleet-export-"))
        out = b.export(project, name, work / name, merged)
        archive = shutil.make_archive(str(work / name), "zip", root_dir=out)
        suffix = "-merged" if merged else ""
        return FileResponse(
            archive,
            filename=f"{project}.{name}{suffix}.zip",
            media_type="application/zip",
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )

    return app
