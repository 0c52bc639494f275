"""One router per resource, each route a plain function: check who may, call the service, answer.

`ROUTERS` is the order the app includes them in (the OpenAPI document lists paths in that order).
"""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.server.routes import adapters, health, jobs, lineage, registry, serving, sessions, tokens

ROUTERS: list[APIRouter] = [
    health.router,
    jobs.router,
    adapters.router,
    lineage.router,
    registry.router,
    serving.router,
    tokens.router,
    sessions.router,
]
