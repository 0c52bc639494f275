"""The HTTP API (FastAPI): a thin skin over the service layer, plus the controller when run as a server.

Errors users cause are 4xx JSON: `{"detail": {"message": ..., "problems": [{"field": ..., "message": ...}]}}`,
never a 500. Every route but the health check and the OpenAPI document wants `Bearer <token>`: the admin
token (`LORAFLEET_API_TOKEN`) or a project token (`orchestrator.service.auth` says what each may do). The
token is checked, and the body's size bounded, before the body is read.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from orchestrator.service.auth import ADMIN, Forbidden, Principal, require_admin, require_change
from orchestrator.service.backend import EmbeddedBackend
from orchestrator.service.operations import MAX_PAGE
from orchestrator.settings import Settings
from orchestrator.spec.job import ALIAS_PATTERN, BranchSpec, SpecError, check_alias
from orchestrator.spec.views import AdapterView, EventView, JobView, LineageNode, RegistryView, TokenView
from orchestrator.store import Conflict, DatabaseUnavailable, NotFound, StoreError
from workers import storage
from workers.contract.plan import check_name

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a job spec of a thousand adapters is ~300 KB
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
MAX_EVENT_ID = 2**62
NEXT_PAGE_HEADER = "X-Next-After"
RETRY_AFTER_S = 5  # told to clients while the database is unreachable (a restart takes a few seconds)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: Annotated[str | None, Field(pattern=ALIAS_PATTERN, max_length=63)] = None
    force: bool = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=100_000)]
    max_new_tokens: int = Field(default=16, gt=0, le=1024)
    raw: bool = Field(
        default=False, description="Feed the prompt as is, not in the adapter's training format."
    )


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: Annotated[str, Field(min_length=1, max_length=100)]
    role: Annotated[str, Field(pattern="^(reader|member)$")] = "member"
    name: Annotated[str | None, Field(max_length=200)] = None

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        return check_name(value, "token `project`")


class NewToken(TokenView):
    token: str = Field(description="The token itself: shown this once, kept only as a hash.")


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path of the field at fault, e.g. `adapters.0.data.path`.")
    message: str


class ProblemDetail(BaseModel):
    message: str
    problems: list[FieldProblem]


class Problem(BaseModel):
    """The body of every error answer: what went wrong, and each field at fault (possibly none)."""

    detail: ProblemDetail


# Declared on the app, so the OpenAPI document describes the errors as they are sent (and FastAPI does not
# document its own HTTPValidationError shape for 422, which this API never sends).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description}
    for status, description in {
        400: "A value the server cannot use, or a body that is not JSON",
        401: "Missing or wrong API token",
        403: "The token may not do this",
        404: "Not found (or in a project the token may not see)",
        409: "Conflicts with existing data: a taken name, an idempotency key used for another job",
        411: "No Content-Length header",
        413: "Body too large",
        422: "Invalid request or job spec; every problem is listed",
        502: "The MLflow tracking server refused",
        503: "The database is unreachable, or storage is read-only, for now; retry (after `Retry-After`)",
        507: "Storage is full (or over quota); retry once space is freed",
    }.items()
}


def _backend(request: Request) -> EmbeddedBackend:
    return request.app.state.backend


def _caller(request: Request) -> Principal:
    return request.state.principal


# Module level, not inside create_app: FastAPI resolves these string annotations in the module namespace.
Backend = Annotated[EmbeddedBackend, Depends(_backend)]
Caller = Annotated[Principal, Depends(_caller)]


def _problem(status: int, message: str, problems: list[tuple[str, str]] | None = None) -> JSONResponse:
    body = {
        "message": _utf8(message),
        "problems": [{"field": _utf8(f), "message": _utf8(m)} for f, m in problems or []],
    }
    return JSONResponse(status_code=status, content={"detail": body})


def _unavailable(exc: DatabaseUnavailable) -> JSONResponse:
    """503, not 400 or 500: nothing is wrong with the request, and the same one will work once the
    database is back, which `Retry-After` tells clients to wait for (`Client` and `--wait` do)."""
    response = _problem(503, f"the database is unreachable, try again shortly: {str(exc)[:500]}")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _utf8(text: str) -> str:
    """Text that UTF-8 can carry: a lone surrogate a JSON body smuggled in (`"\\ud800"`) and a message
    echoes back would otherwise fail to encode the answer itself."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _job_for(b: EmbeddedBackend, caller: Principal, job_id: str) -> JobView:
    """The job, or the very 404 an unknown id gets if it belongs to a project the caller cannot see."""
    view = b.job(job_id)
    if not caller.sees(view.project):
        raise NotFound(f"job {job_id!r} not found")
    return view


def _visible(caller: Principal, project: str, name: str) -> None:
    if not caller.sees(project):
        raise NotFound(f"adapter {project}/{name} not found")


@contextmanager
def _named(b: EmbeddedBackend, caller: Principal, project: str, name: str) -> Iterator[None]:
    """Routes that address an adapter by name: the name checked visible, and a name not found in
    `project` answered with the projects the caller may read where it does exist."""
    try:
        _visible(caller, project, name)
        yield
    except NotFound as exc:
        if str(exc) != f"adapter {project}/{name} not found":
            raise
        raise b.service.missing_adapter(project, name, caller) from None


def create_app(settings: Settings | None = None, start_controller: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = EmbeddedBackend(settings=settings)
        app.state.backend = backend
        if not settings.api_token:
            log.warning("LORAFLEET_API_TOKEN is not set: this server is open to anyone who reaches it")
        if start_controller:
            backend.ensure_running()
        yield
        backend.close()

    app = FastAPI(title="lorafleet", version="0.1.0", lifespan=lifespan, responses=ERRORS)

    def principal_of(authorization: str | None, request: Request) -> Principal | None:
        if not settings.api_token:
            return ADMIN
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        if secrets.compare_digest(secret, settings.api_token):
            return ADMIN
        token = request.app.state.backend.store.find_token(secret)
        if token is None:
            return None
        return Principal(token.role, token.project, token.id)  # type: ignore[arg-type]

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Before any body is read: bound its size, then know the caller (401 if unknown)."""
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return _problem(411, "send a Content-Length header (chunked bodies are not accepted)")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                return _problem(413, f"request body over {MAX_BODY_BYTES} bytes; split the job")
        try:  # a project token is looked up in SQL; an exception here would escape the handlers as a 500
            principal = await run_in_threadpool(principal_of, request.headers.get("authorization"), request)
        except DatabaseUnavailable as exc:
            return _unavailable(exc)
        if principal is None:
            return _problem(401, "missing or wrong API token: send `Authorization: Bearer <token>`")
        request.state.principal = principal
        if "\x00" in request.url.path:  # no id or name holds NUL (decoded: %00 arrives as NUL)
            return _problem(404, "not found: a path with a NUL character names nothing")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        """FastAPI's and Starlette's own refusals (a body that is not JSON, an unknown path or method)
        in the same shape as every other error."""
        response = _problem(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(SpecError)
    async def _spec_error(_: Request, exc: SpecError) -> JSONResponse:
        return _problem(422, "invalid job spec", exc.problems)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            (".".join(str(p) for p in e["loc"] if p != "body"), str(e["msg"])[:500]) for e in exc.errors()
        ]
        return _problem(422, "invalid request", problems)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _problem(404, str(exc)[:1000])

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return _problem(403, str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return _problem(409, str(exc)[:1000])

    @app.exception_handler(DatabaseUnavailable)
    async def _database_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return _unavailable(exc)

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        return _problem(400, str(exc)[:1000])

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return _problem(400, str(exc)[:1000])

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        """Storage that refuses writes is the operator's to fix, not a bug: 507 when it is full (a
        retry after freeing space works), 503 while it is read-only; JSON, never a plain-text 500."""
        fault = storage.storage_fault(exc)
        if fault is None:
            raise exc
        status = 503 if fault.errno in storage.READ_ONLY_ERRNOS else 507
        return _problem(status, storage.describe_fault(fault))

    from mlflow.exceptions import MlflowException

    @app.exception_handler(MlflowException)
    async def _mlflow_error(_: Request, exc: MlflowException) -> JSONResponse:
        return _problem(502, f"the MLflow tracking server refused: {str(exc)[:500]}")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/jobs", status_code=201)
    def submit(
        body: dict[str, Any],
        b: Backend,
        caller: Caller,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> JobView:
        project = body.get("project", "default")
        if isinstance(project, str):
            require_change(caller, project)
        elif not caller.admin:  # not a name: the spec check reports it, but never into another project
            raise Forbidden(f"this token can only submit into project {caller.project!r}")
        return b.submit(body, idempotency_key, caller)

    @app.get("/v1/jobs")
    def jobs(
        b: Backend, caller: Caller, project: Annotated[str | None, Query(max_length=100)] = None
    ) -> list[JobView]:
        if project is not None and not caller.sees(project):
            return []
        return b.jobs(caller.scope(project))

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str, b: Backend, caller: Caller) -> JobView:
        return _job_for(b, caller, job_id)

    @app.get("/v1/jobs/{job_id}/events")
    def events(
        job_id: str,
        b: Backend,
        caller: Caller,
        after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
    ) -> list[EventView]:
        _job_for(b, caller, job_id)
        return b.events(job_id, after)

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, b: Backend, caller: Caller) -> JobView:
        require_change(caller, _job_for(b, caller, job_id).project)
        return b.cancel(job_id)

    @app.post("/v1/jobs/{job_id}/retry")
    def retry(job_id: str, b: Backend, caller: Caller) -> JobView:
        """Train the job's failed adapters again (once the cause is fixed), each from its newest
        complete checkpoint; 409 if none failed."""
        require_change(caller, _job_for(b, caller, job_id).project)
        return b.retry(job_id)

    @app.get("/v1/adapters")
    def adapters(
        b: Backend,
        caller: Caller,
        response: Response,
        project: Annotated[str | None, Query(max_length=100)] = None,
        job_id: Annotated[str | None, Query(max_length=100)] = None,
        after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="The cursor of a page.")] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ) -> list[AdapterView]:
        """A page of adapters, first come first. When more may follow, the `X-Next-After` header holds
        the `after` of the next page (the client follows it)."""
        if project is not None and not caller.sees(project):
            return []
        page = b.adapters(caller.scope(project), job_id, after, limit)
        if page.next_after is not None:
            response.headers[NEXT_PAGE_HEADER] = str(page.next_after)
        return [a for a in page.adapters if caller.sees(a.project)]

    @app.get("/v1/adapters/{project}/{name}")
    def adapter(project: str, name: str, b: Backend, caller: Caller) -> AdapterView:
        with _named(b, caller, project, name):
            return b.adapter(project, name)

    @app.delete("/v1/adapters/{project}/{name}")
    def delete_adapter(project: str, name: str, b: Backend, caller: Caller) -> AdapterView:
        """Delete the adapter (its rows, its files, its MLflow run), freeing its name; answers what it
        was. 409 with the reason if it is promoted, queued or training (cancel first), or a parent.
        Its events stay in its job's log; the job stays."""
        with _named(b, caller, project, name):
            require_change(caller, project)
            return b.delete_adapter(project, name)

    @app.post("/v1/adapters/{project}/{name}/retry")
    def retry_adapter(project: str, name: str, b: Backend, caller: Caller) -> AdapterView:
        """Train a failed or cancelled adapter again under its name (409 for any other): from its
        newest complete checkpoint, or from step 0 if its data changed since that attempt began."""
        with _named(b, caller, project, name):
            require_change(caller, project)
            return b.retry_adapter(project, name)

    @app.get("/v1/adapters/{project}/{name}/lineage")
    def lineage(project: str, name: str, b: Backend, caller: Caller) -> LineageNode:
        with _named(b, caller, project, name):
            return _visible_tree(b.lineage(project, name), caller, f"{project}/{name}")

    @app.post("/v1/adapters/{project}/{name}/branch", status_code=201)
    def branch(project: str, name: str, body: BranchSpec, b: Backend, caller: Caller) -> JobView:
        with _named(b, caller, project, name):
            require_change(caller, project)
            return b.branch(project, name, body, caller)

    @app.post("/v1/adapters/{project}/{name}/promote")
    def promote(project: str, name: str, body: PromoteRequest, b: Backend, caller: Caller) -> RegistryView:
        with _named(b, caller, project, name):
            require_change(caller, project)
            if body.alias is not None:
                check_alias(body.alias)
            return b.promote(project, name, body.alias, body.force)

    @app.post("/v1/adapters/{project}/{name}/generate")
    def generate(
        project: str, name: str, body: GenerateRequest, b: Backend, caller: Caller
    ) -> dict[str, str]:
        with _named(b, caller, project, name):
            return {"text": b.generate(project, name, body.prompt, body.max_new_tokens, body.raw)}

    @app.get("/v1/adapters/{project}/{name}/export")
    def export(project: str, name: str, b: Backend, caller: Caller, merged: bool = False) -> FileResponse:
        """The export as a zip: the PEFT adapter directory, or the merged model (`?merged=true`)."""
        with _named(b, caller, project, name):
            b.adapter(project, name)
        exports = settings.export_staging  # nowhere a request chooses; removed once sent
        exports.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="export-", dir=exports))
        try:
            out = b.export(project, name, work / name, merged)
            archive = shutil.make_archive(str(work / name), "zip", root_dir=out)
        except BaseException:  # nothing of a failed export is left behind
            shutil.rmtree(work, ignore_errors=True)
            raise
        suffix = "-merged" if merged else ""
        return FileResponse(
            archive,
            filename=f"{project}.{name}{suffix}.zip",
            media_type="application/zip",
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenRequest, b: Backend, caller: Caller) -> NewToken:
        require_admin(caller)
        record, secret = b.store.create_token(body.project, body.role, body.name)
        return NewToken(**TokenView.of(record).model_dump(), token=secret)

    @app.get("/v1/tokens")
    def tokens(
        b: Backend, caller: Caller, project: Annotated[str | None, Query(max_length=100)] = None
    ) -> list[TokenView]:
        require_admin(caller)
        return [TokenView.of(t) for t in b.store.list_tokens(project)]

    @app.delete("/v1/tokens/{token_id}")
    def revoke_token(token_id: str, b: Backend, caller: Caller) -> TokenView:
        require_admin(caller)
        return TokenView.of(b.store.revoke_token(token_id))

    return app


def _visible_tree(root: LineageNode, caller: Principal, target: str) -> LineageNode:
    """A tree can span projects (an admin may branch a child from another project's adapter): show the
    caller only its own part. The shown tree starts at the highest node above `target` reached through
    nodes the caller sees alone, so it always holds `target` and never a name of a project the caller
    cannot read (an ancestor's, a parent's, or a child's and what hangs below it)."""

    def sees(node: LineageNode) -> bool:
        return caller.sees(node.name.partition("/")[0])

    def prune(node: LineageNode) -> LineageNode:
        children = [prune(c) for c in node.children if sees(c)]
        parent = node.parent if node.parent is None or caller.sees(node.parent.partition("/")[0]) else None
        return node.model_copy(update={"children": children, "parent": parent})

    def path_to(node: LineageNode) -> list[LineageNode] | None:
        if node.name == target:
            return [node]
        for child in node.children:
            found = path_to(child)
            if found is not None:
                return [node, *found]
        return None

    path = path_to(root) or [root]
    top = len(path) - 1
    while top > 0 and sees(path[top - 1]):
        top -= 1
    return prune(path[top])
