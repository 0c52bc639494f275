"""The registry's side of an adapter: promote it (MLflow model version and alias), export it as a zip."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from orchestrator.server.deps import Caller, Svc, named
from orchestrator.service.auth import require_change
from orchestrator.spec.job import ALIAS_PATTERN, check_alias
from orchestrator.spec.views import RegistryView

router = APIRouter()


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: Annotated[str | None, Field(pattern=ALIAS_PATTERN, max_length=63)] = None
    force: bool = False


@router.post("/v1/adapters/{project}/{name}/promote")
def promote(project: str, name: str, body: PromoteRequest, service: Svc, caller: Caller) -> RegistryView:
    with named(service, caller, project, name):
        require_change(caller, project)
        if body.alias is not None:
            check_alias(body.alias)
        return service.promote(project, name, body.alias, body.force)


@router.get("/v1/adapters/{project}/{name}/export")
def export(project: str, name: str, service: Svc, caller: Caller, merged: bool = False) -> FileResponse:
    """The export as a zip: the PEFT adapter directory, or the merged model (`?merged=true`)."""
    with named(service, caller, project, name):
        service.adapter(project, name)
    exports = service.settings.export_staging  # nowhere a request chooses; removed once sent
    exports.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=exports))
    try:
        out = service.export(project, name, work / name, merged)
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
