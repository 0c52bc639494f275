"""lorafleet's control plane, in rooms along a request's way: spec -> client/cli -> server -> service ->
control -> scheduling -> store -> tracking -> lineage -> registry.

`from orchestrator import Client, JobSpec` is the public entry; both load on first use, so importing a
room (`orchestrator.store`, say) never pulls the client and everything above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.client.client import Client, Job
    from orchestrator.spec.job import JobSpec

__all__ = ["Client", "Job", "JobSpec"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "Job"):
        from orchestrator.client import client

        return getattr(client, name)
    if name == "JobSpec":
        from orchestrator.spec.job import JobSpec

        return JobSpec
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
