"""`/v1/adapters`: list (paged), view, delete and retry adapters, addressed as `{project}/{name}`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from orchestrator.server.deps import MAX_EVENT_ID, Caller, Svc, named
from orchestrator.service.auth import require_change
from orchestrator.service.operations import MAX_PAGE
from orchestrator.spec.views import AdapterView

NEXT_PAGE_HEADER = "X-Next-After"

router = APIRouter()


@router.get("/v1/adapters")
def adapters(
    service: Svc,
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
    page = service.adapters(caller.scope(project), job_id, after, limit)
    if page.next_after is not None:
        response.headers[NEXT_PAGE_HEADER] = str(page.next_after)
    return [a for a in page.adapters if caller.sees(a.project)]


@router.get("/v1/adapters/{project}/{name}")
def adapter(project: str, name: str, service: Svc, caller: Caller) -> AdapterView:
    with named(service, caller, project, name):
        return service.adapter(project, name)


@router.delete("/v1/adapters/{project}/{name}")
def delete_adapter(project: str, name: str, service: Svc, caller: Caller) -> AdapterView:
    """Delete the adapter (its rows, its files, its MLflow run), freeing its name; answers what it
    was. 409 with the reason if it is promoted, queued or training (cancel first), or a parent.
    Its events stay in its job's log; the job stays."""
    with named(service, caller, project, name):
        require_change(caller, project)
        return service.delete_adapter(project, name)


@router.post("/v1/adapters/{project}/{name}/retry")
def retry_adapter(project: str, name: str, service: Svc, caller: Caller) -> AdapterView:
    """Train a failed or cancelled adapter again under its name (409 for any other): from its
    newest complete checkpoint, or from step 0 if its data changed since that attempt began."""
    with named(service, caller, project, name):
        require_change(caller, project)
        return service.retry_adapter(project, name)
