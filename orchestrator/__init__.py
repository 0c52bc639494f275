"""lorafleet's control plane: job specs, the SQL store, the Ray controller, the API, the client and CLI."""

from orchestrator.client import Client, Job
from orchestrator.spec import JobSpec

__all__ = ["Client", "Job", "JobSpec"]
