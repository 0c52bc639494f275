"""The control plane's parts and their lifetime: the store, the service, the controller, the MLflow mirror
and the registry, built together and started and stopped together.

`lorafleet server` (a team's server, or a home's local service) runs exactly one `ControlPlane` behind the
HTTP API, whose routes call its `service`; tests build one to drive the controller. Clients never do: they
talk to a server. It has no operations of its own: every use case is the service's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orchestrator.control.controller import Controller
from orchestrator.registry.promotion import Registry
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.store import DatabaseUnavailable, Store
from orchestrator.tracking.mirror import Tracker

log = logging.getLogger(__name__)


class ControlPlane:
    def __init__(self, home: str | Path | None = None, settings: Settings | None = None) -> None:
        self.settings = settings or (Settings(home=Path(home)) if home is not None else Settings())
        self.settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)  # job specs, paths, metrics
        self.store = Store.open(self.settings.database_url, upgrade=True)
        self.controller = Controller(self.settings, self.store)
        self.tracker = Tracker(self.store, str(self.settings.mlflow_uri), self.settings.mlflow_artifact_root)
        self.registry = Registry(self.store, self.tracker)
        self.tracker.after_sync = self.registry.settle
        self.service = Service(
            self.settings,
            self.store,
            controller=self.controller,
            tracker=self.tracker,
            registry=self.registry,
        )
        self._started = False
        try:  # sessions of an earlier life of this server: their adapters were in its memory
            self.service.sessions.records.end_orphans()
        except DatabaseUnavailable as exc:
            log.warning("could not end the sessions of an earlier server life (next start will): %s", exc)

    def start(self) -> None:
        """Start the controller and the MLflow mirror (the server does, at startup); idempotent."""
        if not self._started:
            self.controller.start()
            self.tracker.start()
            self._started = True

    def stop(self) -> None:
        """Stop what `start` started, and the training sessions' hosts; idempotent."""
        self.service.sessions.shutdown()
        if self._started:
            self.controller.stop()
            self.tracker.stop()
            self._started = False
