"""`/v1/tokens`: project tokens, managed by the admin token alone."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.server.deps import Caller, Svc
from orchestrator.service.auth import require_admin
from orchestrator.spec.views import TokenView
from workers.contract.plan import check_name

router = APIRouter()


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


@router.post("/v1/tokens", status_code=201)
def create_token(body: TokenRequest, service: Svc, caller: Caller) -> NewToken:
    require_admin(caller)
    view, secret = service.create_token(body.project, body.role, body.name)
    return NewToken(**view.model_dump(), token=secret)


@router.get("/v1/tokens")
def tokens(
    service: Svc, caller: Caller, project: Annotated[str | None, Query(max_length=100)] = None
) -> list[TokenView]:
    require_admin(caller)
    return service.tokens(project)


@router.delete("/v1/tokens/{token_id}")
def revoke_token(token_id: str, service: Svc, caller: Caller) -> TokenView:
    require_admin(caller)
    return service.revoke_token(token_id)
