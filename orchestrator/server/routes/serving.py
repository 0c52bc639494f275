"""Inference through an adapter: a greedy completion, on the server's one base per base model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.server.deps import Caller, Svc, named

router = APIRouter()


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=100_000)]
    max_new_tokens: int = Field(default=16, gt=0, le=1024)
    raw: bool = Field(
        default=False, description="Feed the prompt as is, not in the adapter's training format."
    )


@router.post("/v1/adapters/{project}/{name}/generate")
def generate(project: str, name: str, body: GenerateRequest, service: Svc, caller: Caller) -> dict[str, str]:
    with named(service, caller, project, name):
        return {"text": service.generate(project, name, body.prompt, body.max_new_tokens, body.raw)}
