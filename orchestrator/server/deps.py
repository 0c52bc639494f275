"""What routes share, as FastAPI dependencies: the service, the caller, and the visibility rules every
route that names a job or an adapter applies before it calls the service.

A name not visible to the caller answers exactly as a missing one (404), so a project token cannot learn
what other projects hold (`orchestrator.service.auth`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request

from orchestrator.service.auth import Principal
from orchestrator.service.operations import Service
from orchestrator.spec.views import JobView
from orchestrator.store import NotFound

MAX_EVENT_ID = 2**62  # the highest cursor a list accepts


def _service(request: Request) -> Service:
    return request.app.state.plane.service


def _caller(request: Request) -> Principal:
    return request.state.principal  # set by the app's middleware, before the body is read


# Module level: FastAPI resolves the routes' string annotations in their modules' namespaces.
Svc = Annotated[Service, Depends(_service)]
Caller = Annotated[Principal, Depends(_caller)]


def job_for(service: Service, caller: Principal, job_id: str) -> JobView:
    """The job, or the very 404 an unknown id gets if it belongs to a project the caller cannot see."""
    view = service.job(job_id)
    if not caller.sees(view.project):
        raise NotFound(f"job {job_id!r} not found")
    return view


def visible(caller: Principal, project: str, name: str) -> None:
    if not caller.sees(project):
        raise NotFound(f"adapter {project}/{name} not found")


@contextmanager
def named(service: Service, caller: Principal, project: str, name: str) -> Iterator[None]:
    """Routes that address an adapter by name: the name checked visible, and a name not found in
    `project` answered with the projects the caller may read where it does exist."""
    try:
        visible(caller, project, name)
        yield
    except NotFound as exc:
        if str(exc) != f"adapter {project}/{name} not found":
            raise
        raise service.missing_adapter(project, name, caller) from None
