"""The hosts sessions run on: where each goes, when a host starts and closes, and what a lost one costs.

A *host* is one loaded base holding many sessions, which share its clock cycles
(`workers.sessions.host.SessionHost`). `HostPool` keeps the service's hosts and acts on the pure
placement decision (`orchestrator.scheduling.sessions.place`):

- **Kind** (`LORAFLEET_SESSION_HOSTS`): `ray` runs each host in a Ray actor (`workers.sessions.actor`)
  that takes one worker slot (a GPU on a GPU cluster, else a CPU), and the controller counts those slots
  against packs (`Controller.session_hosts`), so packs and hosts never overcommit the same GPU. `local`
  runs hosts in the server's process. `auto`: Ray when the server runs its packs on Ray (a controller
  with Ray Train packs that has started), else local.
- **Placement**: a session joins the fullest host of its base with room (at most
  `LORAFLEET_SESSIONS_PER_HOST` sessions, and their adapters and AdamW state within the host's memory,
  `LORAFLEET_SESSION_HOST_MEMORY_GB`), else a new host starts on a free worker; else it is refused: 429
  at the project's `LORAFLEET_SESSIONS_PER_PROJECT`, 503 (retry) when every worker is busy, 422 when the
  base can never fit a worker (`NoRoom`).
- **Starting**: a new host is counted at once (its worker slot, its bytes) and started outside the pool's
  lock, so sessions placed on hosts already up never wait behind a base loading; creates that join a
  host still starting wait for it, and share its failure.
- **Lingering**: a host whose last session closed stays `LORAFLEET_SESSION_HOST_LINGER_SECONDS` (a new
  session on its base starts at once), then closes and frees its worker.
- **A lost worker** (a Ray actor killed, its node gone): the calls it had not answered fail with
  `WorkerLost` (503). The pool forgets the host; each of its sessions, at its next call, is placed again
  and restored from its last `save_state` (weights, AdamW state and step), or from the state it started
  from if it never saved (`Sessions._restore`). **What is redone is every call since that save**: the
  forward_backward / optim_step calls after it are lost with the worker, and the restored session
  answers its next call at the saved step (`info().step` says which). A session's fresh start depends on
  its LoRA settings and seed only (`SESSION_INIT_NAME`), so a session that never saved restarts from
  exactly the weights it began with, on any host.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.scheduling import sessions as placement
from orchestrator.scheduling.sessions import HostKey, HostKind
from orchestrator.settings import Settings
from workers.contract import memory
from workers.contract.plan import LoraConfig

log = logging.getLogger(__name__)

DEFAULT_GPU_HOST_GB = 16.0  # a GPU host's memory when none is set: the controller's default GPU budget
RAM_SHARE = 0.8  # of a machine's RAM that hosts (or a CPU worker's share of it) may plan for


class NoRoom(Exception):
    """A session could not be placed: `status` 429 / 503 (retry after `retry_after` seconds) / 422."""

    def __init__(self, refusal: placement.Refuse) -> None:
        self.status, self.field, self.retry_after = refusal.status, refusal.field, refusal.retry_after
        super().__init__(refusal.reason)


@dataclass
class Held:
    """A host the pool keeps: its sessions, and since when it has none."""

    id: str
    key: HostKey
    kind: HostKind
    host: Any  # a SessionHost (local) or a RayHost
    host_bytes: int
    sessions: dict[str, int] = field(default_factory=dict)  # session id -> its bytes
    empty_since: float | None = None
    started: threading.Event = field(default_factory=threading.Event)  # set once `host` is up, or failed
    failure: BaseException | None = None  # why it did not start

    def state(self) -> placement.HostState:
        return placement.HostState(
            self.id, self.key, self.kind, len(self.sessions), self.host_bytes + sum(self.sessions.values())
        )

    @property
    def lost(self) -> bool:
        return getattr(self.host, "lost", None) is not None


class HostPool:
    """The service's session hosts (see the module docstring). `load_local(key)` builds an in-process
    host; `on_ray()` says whether the server runs on Ray (for `auto`); `packs_running()` how many packs
    hold worker slots now."""

    def __init__(
        self,
        settings: Settings,
        load_local: Callable[[HostKey], Any],
        on_ray: Callable[[], bool] = lambda: False,
        packs_running: Callable[[], int] = lambda: 0,
    ) -> None:
        self.settings = settings
        self._load_local = load_local
        self._on_ray = on_ray
        self._packs_running = packs_running
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()  # one placement at a time: no double-booked slot (starts run outside)
        self._infos: dict[str, memory.BaseModelInfo] = {}
        self._connecting = threading.Lock()

    # ---- placing ----

    def kind(self) -> HostKind:
        mode = self.settings.session_hosts
        if mode == "auto":
            return "ray" if self._on_ray() else "local"
        return mode

    def acquire(
        self, key: HostKey, project: str, project_sessions: int, lora: LoraConfig | None
    ) -> tuple[Held, int]:
        """A host for a new session of `project` (which holds `project_sessions`): joined or started.
        Returns it and the session's bytes, to `attach` once the session exists. Raises `NoRoom`, or
        `ValueError` / `RuntimeError` when the base cannot be read or loaded."""
        with self._lock:
            self._forget_lost()
            kind = self.kind()
            cpu = not self._has_gpu(kind)
            info = self._info(key[0])
            need = placement.session_bytes(info, lora or LoraConfig(), key[2], cpu)
            ask = placement.Ask(project, key, need, placement.host_bytes(info, key[1], key[2], cpu))
            held = [h for h in self._held.values() if h.kind == kind]
            decision = placement.place(
                ask,
                [h.state() for h in held],
                project_sessions,
                self._room(kind, held, ask),
                placement.Limits(self.settings.sessions_per_host, self.settings.sessions_per_project),
            )
            if isinstance(decision, placement.Refuse):
                raise NoRoom(decision)
            starting = isinstance(decision, placement.Start)
            if starting:  # counted at once (its slot, its bytes), started below without the lock
                host = Held(f"host-{uuid.uuid4().hex[:12]}", key, kind, None, ask.host_bytes)
                self._held[host.id] = host
            else:
                host = self._held[decision.host_id]
            host.empty_since = None
            host.sessions[f"pending-{uuid.uuid4().hex}"] = need  # its place, held until `attach`
        if starting:
            self._start(host)
        else:
            self._wait_started(host, need)
        return host, need

    def attach(self, host: Held, session_id: str, need: int) -> None:
        with self._lock:
            self._unreserve(host, need)
            host.sessions[session_id] = need
            host.empty_since = None

    def unreserve(self, host: Held, need: int) -> None:
        """Give back a place `acquire` held for a session that was not created after all."""
        with self._lock:
            self._unreserve(host, need)
            if not host.sessions:
                host.empty_since = time.monotonic()

    def release(self, host: Held, session_id: str) -> None:
        """The session left `host`; an empty host starts lingering."""
        with self._lock:
            host.sessions.pop(session_id, None)
            if not host.sessions:
                host.empty_since = time.monotonic()

    def forget(self, host: Held) -> None:
        """A lost host: its sessions are placed again at their next call."""
        with self._lock:
            if self._held.get(host.id) is host:
                del self._held[host.id]

    # ---- lifetime ----

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close every host that has held no session for `session_host_linger_seconds`."""
        now = time.monotonic() if now is None else now
        linger = self.settings.session_host_linger_seconds
        with self._lock:
            done = [
                h
                for h in self._held.values()
                if not h.sessions and h.empty_since is not None and now - h.empty_since >= linger
            ]
            for h in done:
                del self._held[h.id]
        for h in done:
            log.info("closing session host %s of %s: empty for %.0f s", h.id, h.key[0], linger)
            h.host.shutdown()
        return [h.id for h in done]

    def shutdown(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            if h.host is not None:  # one still starting is shut down by its starter (`_start`)
                h.host.shutdown()

    def hosts(self) -> list[placement.HostState]:
        with self._lock:
            return [h.state() for h in self._held.values()]

    def ray_hosts(self) -> int:
        """Worker slots Ray hosts hold now: what the controller leaves out of packs' slots."""
        with self._lock:
            return sum(1 for h in self._held.values() if h.kind == "ray" and not h.lost)

    # ---- inside ----

    def _unreserve(self, host: Held, need: int) -> None:
        pending = next((k for k, v in host.sessions.items() if k.startswith("pending-") and v == need), None)
        if pending is not None:
            del host.sessions[pending]

    def _forget_lost(self) -> None:
        for host_id in [i for i, h in self._held.items() if h.lost]:
            del self._held[host_id]

    def _info(self, base_model: str) -> memory.BaseModelInfo:
        if base_model not in self._infos:
            from workers.bases.catalog import base_config

            config = base_config(base_model, self.settings.home)
            self._infos[base_model] = memory.model_info_from_config(config.to_dict())
        return self._infos[base_model]

    def _has_gpu(self, kind: HostKind) -> bool:
        if kind == "ray":
            import ray

            return ray.cluster_resources().get("GPU", 0) > 0
        import torch

        return torch.cuda.is_available()

    def _room(self, kind: HostKind, held: list[Held], ask: placement.Ask) -> placement.Room:
        import psutil

        configured = self.settings.session_host_memory_gb
        gpu = self._has_gpu(kind)
        ram = psutil.virtual_memory().total * RAM_SHARE
        if kind == "ray":
            import ray

            total = ray.cluster_resources()
            slots = int(total.get("GPU", 0)) if gpu else int(total.get("CPU", 1))
            worker = configured * 2**30 if configured else None
            if worker is None:
                worker = DEFAULT_GPU_HOST_GB * 2**30 if gpu else ram / max(1, slots)
            free = placement.free_workers(slots, self._packs_running(), len(held))
            return placement.Room(int(worker), free)
        # in-process hosts share this one machine, as one worker: a new host starts while all fit it
        if configured:
            worker = configured * 2**30
        elif gpu:
            import torch

            worker = torch.cuda.get_device_properties(0).total_memory * 0.9
        else:
            worker = ram
        used = sum(h.state().used_bytes for h in held)
        fits = used + ask.host_bytes + ask.session_bytes <= worker
        return placement.Room(int(worker), 1 if fits else 0)

    def _start(self, held: Held) -> None:
        """Load `held`'s base (or start its actor) outside the pool's lock: a start takes seconds to
        minutes, and sessions placed on hosts already up must not wait behind it. A failed start takes
        the host out of the pool; a host the pool let go meanwhile (shutdown) is shut down at once."""
        try:
            held.host = self._make(held.kind, held.key)
        except BaseException as exc:
            with self._lock:
                if self._held.get(held.id) is held:
                    del self._held[held.id]
                held.failure = exc
            held.started.set()
            raise
        with self._lock:
            if self._held.get(held.id) is not held:  # joiners must not use it: it fails them too
                held.failure = NoRoom(
                    placement.Refuse(503, "base_model", "the server is stopping its session hosts")
                )
        held.started.set()
        if held.failure is not None:
            held.host.shutdown()
            raise held.failure
        log.info("started %s session host %s for %s", held.kind, held.id, held.key[0])

    def _wait_started(self, held: Held, need: int) -> None:
        """Wait for a host another create is starting; its failure is this create's too."""
        held.started.wait()
        if held.failure is None:
            return
        self.unreserve(held, need)
        if isinstance(held.failure, NoRoom):
            failed = held.failure
            raise NoRoom(placement.Refuse(failed.status, failed.field, str(failed)))  # type: ignore[arg-type]
        raise RuntimeError(str(held.failure)) from held.failure

    def _make(self, kind: HostKind, key: HostKey) -> Any:
        if kind == "ray":
            from orchestrator.control.controller import connect_ray
            from workers.sessions.actor import HostNotStarted, RayHost

            with self._connecting:  # two first starts at once would each `ray.init`
                connect_ray(self.settings)
            gpu = self._has_gpu(kind)
            try:
                host: Any = RayHost.start(
                    key[0],
                    key[1],
                    key[2],
                    str(self.settings.home),
                    resources={"CPU": 1, **({"GPU": 1} if gpu else {})},
                    timeout_s=self.settings.session_host_start_seconds,
                )
            except HostNotStarted as exc:  # the slots counted free are held by something Ray runs
                raise NoRoom(placement.Refuse(503, "LORAFLEET_SESSION_HOST_START_SECONDS", str(exc))) from exc
        else:
            host = self._load_local(key)
            host.start()
        return host


__all__ = ["DEFAULT_GPU_HOST_GB", "Held", "HostPool", "NoRoom"]
