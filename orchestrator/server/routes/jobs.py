"""`/v1/jobs`: submit, list, view, watch (events), cancel and retry jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from orchestrator.server.deps import MAX_EVENT_ID, Caller, Svc, job_for
from orchestrator.service.auth import Forbidden, require_change
from orchestrator.spec.views import EventView, JobView

router = APIRouter()


@router.post("/v1/jobs", status_code=201)
def submit(
    body: dict[str, Any],
    service: Svc,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobView:
    project = body.get("project", "default")
    if isinstance(project, str):
        require_change(caller, project)
    elif not caller.admin:  # not a name: the spec check reports it, but never into another project
        raise Forbidden(f"this token can only submit into project {caller.project!r}")
    return service.submit(body, idempotency_key, caller)


@router.get("/v1/jobs")
def jobs(
    service: Svc, caller: Caller, project: Annotated[str | None, Query(max_length=100)] = None
) -> list[JobView]:
    if project is not None and not caller.sees(project):
        return []
    return service.jobs(caller.scope(project))


@router.get("/v1/jobs/{job_id}")
def job(job_id: str, service: Svc, caller: Caller) -> JobView:
    return job_for(service, caller, job_id)


@router.get("/v1/jobs/{job_id}/events")
def events(
    job_id: str,
    service: Svc,
    caller: Caller,
    after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0,
) -> list[EventView]:
    job_for(service, caller, job_id)
    return service.events(job_id, after)


@router.post("/v1/jobs/{job_id}/cancel")
def cancel(job_id: str, service: Svc, caller: Caller) -> JobView:
    require_change(caller, job_for(service, caller, job_id).project)
    return service.cancel(job_id)


@router.post("/v1/jobs/{job_id}/retry")
def retry(job_id: str, service: Svc, caller: Caller) -> JobView:
    """Train the job's failed adapters again (once the cause is fixed), each from its newest
    complete checkpoint; 409 if none failed."""
    require_change(caller, job_for(service, caller, job_id).project)
    return service.retry(job_id)
