"""The in-process backend: the service layer, the store, the MLflow mirror and the controller together.

`lorafleet server` (a team's server, or a home's local service) runs exactly one of these behind the HTTP
API; tests use it directly to drive the controller. Clients never do: they talk to a server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.control.controller import Controller
from orchestrator.registry.export import export_adapter
from orchestrator.registry.promotion import Registry
from orchestrator.service.auth import ADMIN, Principal
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.job import BranchSpec, JobSpec
from orchestrator.spec.views import AdapterPage, AdapterView, EventView, JobView, LineageNode, RegistryView
from orchestrator.store import Store
from orchestrator.tracking.mirror import Tracker


class EmbeddedBackend:
    def __init__(self, home: str | Path | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or (Settings(home=Path(home)) if home is not None else Settings())
        self.settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)  # job specs, paths, metrics
        self.store = Store.open(self.settings.database_url, upgrade=True)
        self.service = Service(self.settings, self.store)
        self.controller = Controller(self.settings, self.store)
        self.tracker = Tracker(self.store, str(self.settings.mlflow_uri), self.settings.mlflow_artifact_root)
        self.registry = Registry(self.store, self.tracker)
        self.tracker.after_sync = self.registry.settle
        self._started = False
        self._servers: dict[tuple[str, str, str], Any] = {}

    def ensure_running(self) -> None:
        """Start the controller and the MLflow mirror (the server does, at startup)."""
        if not self._started:
            self.controller.start()
            self.tracker.start()
            self._started = True

    def submit(
        self, spec: JobSpec | dict[str, Any], idempotency_key: str | None, principal: Principal = ADMIN
    ) -> JobView:
        return self.service.submit(spec, idempotency_key, principal)

    def job(self, job_id: str) -> JobView:
        return self.service.job(job_id)

    def jobs(self, project: str | None) -> list[JobView]:
        return self.service.jobs(project)

    def events(self, job_id: str, after_id: int) -> list[EventView]:
        return self.service.events(job_id, after_id)

    def adapter(self, project: str, name: str) -> AdapterView:
        return self.service.adapter(project, name)

    def adapters(
        self, project: str | None, job_id: str | None, after: int = 0, limit: int = 1000
    ) -> AdapterPage:
        return self.service.adapters(project, job_id, after, limit)

    def lineage(self, project: str, name: str) -> LineageNode:
        return self.service.lineage(project, name)

    def branch(self, project: str, parent: str, child: BranchSpec, principal: Principal = ADMIN) -> JobView:
        return self.service.branch(project, parent, child, principal)

    def promote(self, project: str, name: str, alias: str | None, force: bool) -> RegistryView:
        adapter = self.store.get_adapter(project, name)
        return RegistryView.of(self.registry.promote(adapter.id, alias=alias, force=force))

    def export(self, project: str, name: str, out_dir: Path, merged: bool) -> Path:
        adapter = self.store.get_adapter(project, name)
        return export_adapter(self.store, adapter, out_dir, merged=merged, home=self.settings.home)

    def generate(self, project: str, name: str, prompt: str, max_new_tokens: int, raw: bool = False) -> str:
        adapter = self.store.get_adapter(project, name)
        if not adapter.final_checkpoint:
            raise ValueError(
                f"adapter {adapter.qualified_name} is {adapter.state}: nothing to generate with yet"
            )
        key = (adapter.base_model, adapter.quantization, adapter.dtype)
        if key not in self._servers:  # one base in memory per base model; adapters cached on it
            from workers.serving import AdapterServer

            self._servers[key] = AdapterServer(
                adapter.base_model,
                quantization=adapter.quantization,  # type: ignore[arg-type]
                dtype=adapter.dtype,
                home=self.settings.home,  # where a catalogued or GGUF base was converted
            )  # type: ignore[arg-type]
        server = self._servers[key]
        return server.generate([(adapter.final_checkpoint, prompt)], max_new_tokens, raw=raw)[0]

    def cancel(self, job_id: str) -> JobView:
        return self.service.cancel(job_id, self.controller)

    def retry(self, job_id: str) -> JobView:
        return self.service.retry(job_id, self.controller)

    def retry_adapter(self, project: str, name: str) -> AdapterView:
        return self.service.retry_adapter(project, name, self.controller)

    def delete_adapter(self, project: str, name: str) -> AdapterView:
        return self.service.delete_adapter(project, name, self.controller, self.tracker)

    def close(self) -> None:
        if self._started:
            self.controller.stop()
            self.tracker.stop()
            self._started = False
