"""Errors as the API sends them: every refusal is 4xx (or 502/503/507) JSON in one shape,
`{"detail": {"message": ..., "problems": [{"field": ..., "message": ...}]}}`, never a 500.

Domain errors (a spec's problems, not found, forbidden, a conflict, the database or storage away) are
raised by the service and the routes as they are; the handlers here turn each into its status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from orchestrator.service.auth import Forbidden
from orchestrator.service.session_hosts import NoRoom
from orchestrator.service.sessions import InvalidCall
from orchestrator.spec.job import SpecError
from orchestrator.store import Conflict, DatabaseUnavailable, NotFound, StoreError
from workers import storage
from workers.contract.sessions import WorkerLost

RETRY_AFTER_S = 5  # told to clients while the database is unreachable (a restart takes a few seconds)


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
        429: "The project holds as many training sessions as it may; close one (after `Retry-After`)",
        502: "The MLflow tracking server refused",
        503: "The database is unreachable, storage is read-only, no worker has room for a session, or a "
        "session's worker was lost, for now; retry (after `Retry-After`)",
        507: "Storage is full (or over quota); retry once space is freed",
    }.items()
}


def problem(status: int, message: str, problems: list[tuple[str, str]] | None = None) -> JSONResponse:
    body = {
        "message": _utf8(message),
        "problems": [{"field": _utf8(f), "message": _utf8(m)} for f, m in problems or []],
    }
    return JSONResponse(status_code=status, content={"detail": body})


def unavailable(exc: DatabaseUnavailable) -> JSONResponse:
    """503, not 400 or 500: nothing is wrong with the request, and the same one will work once the
    database is back, which `Retry-After` tells clients to wait for (`Client` and `--wait` do)."""
    response = problem(503, f"the database is unreachable, try again shortly: {str(exc)[:500]}")
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _utf8(text: str) -> str:
    """Text that UTF-8 can carry: a lone surrogate a JSON body smuggled in (`"\\ud800"`) and a message
    echoes back would otherwise fail to encode the answer itself."""
    return text.encode("utf-8", "replace").decode("utf-8")


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (a body that is not JSON, an unknown path or method)
    in the same shape as every other error."""
    response = problem(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


async def _spec_error(_: Request, exc: SpecError) -> JSONResponse:
    return problem(422, "invalid job spec", exc.problems)


async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        (".".join(str(p) for p in e["loc"] if p != "body"), str(e["msg"])[:500]) for e in exc.errors()
    ]
    return problem(422, "invalid request", problems)


async def _invalid_call(_: Request, exc: InvalidCall) -> JSONResponse:
    return problem(422, "invalid request", exc.problems)


async def _no_room(_: Request, exc: NoRoom) -> JSONResponse:
    """Where no host can take a session: 429 (the project's cap) and 503 (every worker busy) say when
    to ask again; 422 (a base no worker can ever hold) does not."""
    response = problem(exc.status, str(exc)[:1000], [(exc.field, str(exc)[:1000])])
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _worker_lost(_: Request, exc: WorkerLost) -> JSONResponse:
    """503: the call was lost with its worker, not refused; the session's next call restores it."""
    response = problem(503, str(exc)[:1000])
    response.headers["Retry-After"] = "1"
    return response


async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
    return problem(404, str(exc)[:1000])


async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
    return problem(403, str(exc))


async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
    return problem(409, str(exc)[:1000])


async def _database_unavailable(_: Request, exc: DatabaseUnavailable) -> JSONResponse:
    return unavailable(exc)


async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
    return problem(400, str(exc)[:1000])


async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
    return problem(400, str(exc)[:1000])


async def _os_error(_: Request, exc: OSError) -> JSONResponse:
    """Storage that refuses writes is the operator's to fix, not a bug: 507 when it is full (a
    retry after freeing space works), 503 while it is read-only; JSON, never a plain-text 500."""
    fault = storage.storage_fault(exc)
    if fault is None:
        raise exc
    status = 503 if fault.errno in storage.READ_ONLY_ERRNOS else 507
    return problem(status, storage.describe_fault(fault))


async def _mlflow_error(_: Request, exc: Exception) -> JSONResponse:
    return problem(502, f"the MLflow tracking server refused: {str(exc)[:500]}")


Handler = Callable[[Request, Any], Awaitable[Response]]


def handlers() -> dict[Any, Handler]:
    """Each error class and its handler, for `FastAPI(exception_handlers=...)`. Starlette picks the
    handler of the nearest class in an exception's MRO (a `NotFound` is a `StoreError`, 404 not 400)."""
    from mlflow.exceptions import MlflowException  # MLflow loads with the app, not with this module

    return {
        HTTPException: _http_error,
        SpecError: _spec_error,
        InvalidCall: _invalid_call,
        NoRoom: _no_room,
        WorkerLost: _worker_lost,
        RequestValidationError: _request_error,
        NotFound: _not_found,
        Forbidden: _forbidden,
        Conflict: _conflict,
        DatabaseUnavailable: _database_unavailable,
        StoreError: _store_error,
        ValueError: _value_error,
        OSError: _os_error,
        MlflowException: _mlflow_error,
    }
