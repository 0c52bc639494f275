"""The service layer: every user-facing operation (use case), once. The HTTP API's routes call it
directly; nothing forwards to it.

It validates against the outside world (data files, existing parents in the store), writes through the
store in one transaction per operation, and turns records into views. It never talks to Ray: the
controller picks up what SQL says, and the few use cases that must reach running packs (cancel, retry,
delete) ask the controller. Who may call which use case is the route's to check (`service.auth`).
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from orchestrator.control import decisions
from orchestrator.lineage import tree as lineage
from orchestrator.registry.export import export_adapter
from orchestrator.service import preflight
from orchestrator.service.auth import ADMIN, Principal
from orchestrator.service.sessions import Sessions
from orchestrator.settings import Settings
from orchestrator.spec.job import BranchSpec, JobSpec, ScoreOrder, SpecError, check_parent, load_source
from orchestrator.spec.states import AdapterState
from orchestrator.spec.views import (
    AdapterPage,
    AdapterView,
    EventView,
    JobView,
    LineageNode,
    RegistryView,
    Score,
    TokenView,
    scores,
)
from orchestrator.store import AdapterRecord, Conflict, JobRecord, NewAdapter, NotFound, Store
from workers.contract.plan import EvalConfig, LoraConfig, branch_problems
from workers.training.data import fingerprint

if TYPE_CHECKING:
    from orchestrator.control.controller import Controller
    from orchestrator.registry.promotion import Registry
    from orchestrator.tracking.mirror import Tracker

_PARENT_MUST_MATCH = ("base_model", "quantization", "dtype")
MAX_PAGE = 1000  # adapters in one page of a list
SCORE_ORDERS_KEPT = 256  # jobs whose scores' order a service keeps
T = TypeVar("T")


class Service:
    """Every use case, once. Built over a store alone it checks, stores and reads (tests and benchmarks
    build it so); the use cases that reach running packs, MLflow or the registry need the `controller`,
    `tracker` and `registry` that `ControlPlane` (`service.plane`) builds and gives it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        controller: Controller | None = None,
        tracker: Tracker | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._controller, self._tracker, self._registry = controller, tracker, registry
        self._servers: dict[tuple[str, str, str], Any] = {}  # one generation server per base, on first use
        self.allowed = preflight.Allowed(settings.data_roots, settings.model_roots, settings.allowed_models)
        self.limits = preflight.Limits(
            max_adapters=settings.max_adapters_per_job,
            max_steps=settings.max_train_steps,
            max_tokens=settings.max_tokens_per_adapter,
            max_record_bytes=settings.max_record_bytes,
        )
        self._orders: OrderedDict[str, ScoreOrder] = OrderedDict()  # job id -> its scores' order, LRU
        self._orders_lock = threading.Lock()
        # Interactive training sessions (`service.sessions`): their use cases, one host per base.
        # On Ray when the controller runs packs there (`LORAFLEET_SESSION_HOSTS=auto`), its hosts' worker
        # slots counted against the packs' (`Controller.session_hosts`).
        self.sessions = Sessions(
            settings,
            store,
            self.allowed,
            on_ray=lambda: controller is not None and controller.on_ray(),
            packs_running=lambda: len(controller.running) if controller is not None else 0,
        )
        if controller is not None:
            controller.session_hosts = self.sessions.pool.ray_hosts

    @property
    def controller(self) -> Controller:
        return _given(self._controller, "controller")

    @property
    def tracker(self) -> Tracker:
        return _given(self._tracker, "tracker")

    @property
    def registry(self) -> Registry:
        return _given(self._registry, "registry")

    # ---- jobs ----

    def submit(
        self,
        source: JobSpec | dict[str, Any],
        idempotency_key: str | None = None,
        principal: Principal = ADMIN,
    ) -> JobView:
        """Check everything that can be checked now, report every problem at once, then store the job.

        `principal` is the caller: a parent outside the job must be in a project it may read (an admin
        reads all; a project token its own project), or it is reported exactly as a missing one.
        """
        spec, parents = self.check(source, principal)
        new = []
        for i, adapter in enumerate(spec.adapters):
            lora, train = spec.adapter_lora(i), spec.adapter_train(i)
            new.append(
                NewAdapter(
                    name=adapter.name,
                    priority=adapter.priority,
                    base_model=spec.base_model,
                    quantization=spec.quantization,
                    dtype=spec.dtype,
                    lora=lora,
                    train=train,
                    data=adapter.data,
                    parent_id=parents.get(i),
                    parent_name=adapter.parent if i not in parents else None,
                    output_dir=self.settings.adapter_dir(spec.project, adapter.name),
                )
            )
        job, _, _ = self.store.create_job(
            spec.project,
            spec.name,
            spec.model_dump(mode="json"),
            new,
            idempotency_key=idempotency_key,
            parent_projects=None if principal.admin else {principal.project or ""},
        )
        return self.job(job.id)

    def check(
        self, source: JobSpec | dict[str, Any], principal: Principal = ADMIN
    ) -> tuple[JobSpec, dict[int, str]]:
        """Schema, base model, data files and parents, all checked; one `SpecError` lists every problem.
        Returns the spec and the ids of the parents outside the job, by adapter index. Only parents the
        `principal` may read are found: any other is missing, with the very message a missing one gets."""
        raw = source.model_dump(mode="json") if isinstance(source, JobSpec) else load_source(source)
        too_many = preflight.adapter_count_problems(raw, self.limits)
        if too_many:
            raise SpecError(too_many)
        problems: list[tuple[str, str]] = []
        spec: JobSpec | None = None
        parents: dict[int, str] = {}
        try:
            spec = JobSpec.parse(raw)
        except SpecError as exc:
            problems += exc.problems
        else:
            problems += preflight.size_problems(spec, self.limits)
            allowed = self.settings.user_scorers_allowed(principal.admin)
            problems += preflight.user_scorer_problems(spec, allowed)
        problems += preflight.outside_world_problems(
            raw, self.allowed, self.limits.max_record_bytes, home=self.settings.home
        )
        if spec is not None:
            try:
                parents = self._resolve_parents(spec, principal)
            except SpecError as exc:
                problems += exc.problems
        else:
            problems += self._missing_parents(raw, principal)
        if problems or spec is None:
            raise SpecError(problems)
        return spec, parents

    def _missing_parents(self, raw: dict[str, Any], principal: Principal) -> list[tuple[str, str]]:
        """Parents named by a spec that failed validation: at least say which do not exist."""
        adapters = raw.get("adapters") if isinstance(raw.get("adapters"), list) else []
        project = raw.get("project") if isinstance(raw.get("project"), str) else "default"
        in_job = {a["name"] for a in adapters if isinstance(a, dict) and isinstance(a.get("name"), str)}
        problems = []
        for i, adapter in enumerate(adapters):
            parent = adapter.get("parent") if isinstance(adapter, dict) else None
            missing = isinstance(parent, str) and parent not in in_job and _names_an_adapter(parent, project)
            if missing and self._find_parent(parent, project, principal) is None:
                problems.append((f"adapters.{i}.parent", _no_parent(parent, project)))
        return problems

    def _find_parent(self, parent: str, project: str, principal: Principal) -> AdapterRecord | None:
        """The parent adapter, or None if it does not exist or is in a project `principal` may not read:
        both answer alike, so a spec cannot probe another project's names (nor, through the compatibility
        messages, its ranks, target modules or paths)."""
        owner, _, name = parent.rpartition("/")
        if not principal.sees(owner or project):
            return None
        try:
            return self.store.get_adapter(owner or project, name)
        except NotFound:
            return None

    def _resolve_parents(self, spec: JobSpec, principal: Principal) -> dict[int, str]:
        """Parents outside the job must exist and be compatible; parents inside are checked by config."""
        in_job = {a.name: i for i, a in enumerate(spec.adapters)}
        resolved: dict[int, str] = {}
        problems: list[tuple[str, str]] = []
        for i, adapter in enumerate(spec.adapters):
            if adapter.parent is None:
                continue
            field = f"adapters.{i}.parent"
            if "/" not in adapter.parent and adapter.parent in in_job:
                j = in_job[adapter.parent]
                problems += _compatibility(field, spec.adapter_lora(j), spec.adapter_lora(i), None)
                continue
            parent = self._find_parent(adapter.parent, spec.project, principal)
            if parent is None:
                problems.append((field, _no_parent(adapter.parent, spec.project)))
                continue
            mismatch = [k for k in _PARENT_MUST_MATCH if getattr(parent, k) != getattr(spec, k)]
            if mismatch:
                problems.append(
                    (
                        field,
                        f"parent {adapter.parent!r} was trained on another {mismatch[0]} "
                        f"({getattr(parent, mismatch[0])!r}); a child keeps its parent's base",
                    )
                )
            problems += _compatibility(field, parent.lora, spec.adapter_lora(i), adapter.parent)
            refusal = decisions.branch_refusal(parent)
            if refusal is not None:
                problems.append((field, refusal))
            resolved[i] = parent.id
        if problems:
            raise SpecError(problems)
        return resolved

    def job(self, job_id: str) -> JobView:
        return self._job_view(self.store.get_job(job_id), self.settings.job_view_adapters)

    def jobs(self, project: str | None = None) -> list[JobView]:
        """Every job with its adapter counts by state, but no adapters: a list of jobs answers which
        jobs and how far along, in a number of queries that no job's size changes."""
        jobs = self.store.list_jobs(project=project)
        counts = self.store.adapter_counts([job.id for job in jobs])
        return [self._job_view(job, 0, counts[job.id]) for job in jobs]

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[EventView]:
        self.store.get_job(job_id)  # 404 for an unknown job, not an empty list
        events = self.store.list_events(job_id, after_id=after_id, limit=limit)
        qualified = self.store.qualified_names({e.adapter_id for e in events if e.adapter_id})
        names = {adapter_id: ref.partition("/")[2] for adapter_id, ref in qualified.items()}
        views = []
        for event in events:
            views.append(
                EventView(
                    id=event.id,
                    job_id=event.job_id,
                    kind=event.kind,
                    step=event.step,
                    # a deleted adapter's events stay, detached: their payload still names it
                    adapter=names.get(event.adapter_id or "", event.payload.get("adapter")),
                    payload=event.payload,
                    created_at=event.created_at,
                )
            )
        return views

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job's unfinished adapters, through the controller: it changes adapters' states (under
        its lock: it may be placing those very adapters) and tells the packs that hold them."""
        self.store.get_job(job_id)  # 404 for an unknown job
        self.controller.cancel_job(job_id)
        return self.job(job_id)

    def retry(self, job_id: str) -> JobView:
        """Train a job's failed adapters again, each from its newest complete checkpoint, or from step 0
        if its data changed meanwhile (`decisions.fresh_start` says why)."""
        failed = self.store.list_adapters(job_id=job_id, states=[AdapterState.FAILED])
        fresh = {a.id for a in failed if decisions.fresh_start(a.data_fingerprint, _data_now(a))}
        self.controller.retry_job(job_id, fresh)
        return self.job(job_id)

    def retry_adapter(self, project: str, name: str) -> AdapterView:
        """Train one failed or cancelled adapter again under its own name (409 with the reason for any
        other). It resumes from its newest complete checkpoint where one exists, unless its data
        changed since that attempt began: then it starts again from step 0, on the fixed data
        (`decisions.fresh_start` says why resuming would mix the two)."""
        adapter = self.store.get_adapter(project, name)
        parent = self.store.get_adapter_by_id(adapter.parent_id) if adapter.parent_id else None
        refusal = decisions.retry_refusal(adapter, parent)
        if refusal is not None:
            raise Conflict(refusal)
        fresh = decisions.fresh_start(adapter.data_fingerprint, _data_now(adapter))
        self.controller.retry_adapter(adapter.id, fresh)
        return self.adapter(project, name)

    def delete_adapter(self, project: str, name: str) -> AdapterView:
        """Delete an adapter that is not promoted, not queued or training and has no children (409
        with the reason otherwise), freeing its name; returns what it was.

        In the order that leaves a retryable state at every step: the MLflow run (restored if what
        follows fails), the files (output directory, local or object storage), then the rows in one
        transaction. A crash after the files leaves the row, whose delete a person simply asks again.
        Its events stay in the job's log (detached), and the job stays, even with no adapter left."""
        adapter = self.store.get_adapter(project, name)
        view = self._adapter_view(adapter)
        children = [c.qualified_name for c in self.store.children(adapter.id)]
        refusal = decisions.delete_refusal(adapter, children)
        if refusal is not None:
            raise Conflict(refusal)

        with self.tracker.adapter_run_deleted(adapter.id):
            self.controller.delete_adapter(adapter.id)
        return view

    def missing_adapter(self, project: str, name: str, principal: Principal = ADMIN) -> NotFound:
        """The answer to a name not found in `project`: where else it exists, among the projects the
        caller may read (`--project` defaults to `default`, and a person forgets it), and never a
        project it may not read."""
        elsewhere = [p for p in self.store.projects_with_adapter(name) if p != project and principal.sees(p)]
        message = f"adapter {project}/{name} not found"
        if elsewhere:
            listed = ", ".join(elsewhere)
            message += (
                f": not in project {project!r}, but it exists in project(s) {listed}: "
                f"use --project {elsewhere[0]} (or {elsewhere[0]}/{name})"
            )
        return NotFound(message)

    # ---- adapters ----

    def adapter(self, project: str, name: str) -> AdapterView:
        return self._adapter_view(self.store.get_adapter(project, name))

    def adapters(
        self, project: str | None = None, job_id: str | None = None, after: int = 0, limit: int = MAX_PAGE
    ) -> AdapterPage:
        """One page of adapters (of a project, of a job, or all), first come first: at most `limit`
        (capped at `MAX_PAGE`) after the cursor `after`, in a number of queries no page size changes."""
        limit = max(1, min(limit, MAX_PAGE))
        records = self.store.adapter_page(project=project, job_id=job_id, after_seq=after, limit=limit)
        next_after = records[-1].seq if len(records) == limit else None
        return AdapterPage(adapters=self._adapter_views(records), next_after=next_after)

    def lineage(self, project: str, name: str) -> LineageNode:
        """The whole tree the adapter belongs to, from its root."""
        adapter = self.store.get_adapter(project, name)
        nodes = lineage.tree_of(self.store, adapter)
        metrics = self.store.last_metrics([n.id for n in nodes])  # one query for the whole tree
        return lineage.nested(nodes, adapter.root_id, metrics.__getitem__)

    def branch(self, project: str, parent: str, child: BranchSpec, principal: Principal = ADMIN) -> JobView:
        """A one-adapter job whose adapter starts from `parent`'s final weights."""
        if not principal.sees(project):
            raise NotFound(f"adapter {project}/{parent} not found")
        parent_record = self.store.get_adapter(project, parent)
        return self.submit(
            {
                "name": f"branch-{child.name}"[:100],
                "project": project,
                "base_model": parent_record.base_model,
                "quantization": parent_record.quantization,
                "dtype": parent_record.dtype,
                "lora": parent_record.lora.model_dump(mode="json"),
                "train": {**parent_record.train.model_dump(mode="json"), **(child.train or {})},
                "eval": self._eval_of(parent_record).model_dump(mode="json"),
                "adapters": [
                    {
                        "name": child.name,
                        "parent": parent,
                        "data": child.data,
                        "lora": child.lora,
                        "eval": child.eval,
                    }
                ],
            },
            principal=principal,
        )

    def _eval_of(self, adapter: AdapterRecord) -> EvalConfig:
        """How `adapter` was judged, so its child is judged alike (and compared on the same scores)."""
        try:
            return self.store.get_job(adapter.job_id).job_spec.eval_of(adapter.name)
        except ValidationError:  # a job stored by an older version that no longer validates
            return EvalConfig()

    # ---- registry and serving ----

    def promote(self, project: str, name: str, alias: str | None = None, force: bool = False) -> RegistryView:
        """Register the adapter in MLflow and point `alias` at it, if its job's gate passes (or `force`)."""
        adapter = self.store.get_adapter(project, name)
        return RegistryView.of(self.registry.promote(adapter.id, alias=alias, force=force))

    def export(self, project: str, name: str, out_dir: Path, merged: bool = False) -> Path:
        """The PEFT adapter directory (or, `merged`, the base with it merged in), written to `out_dir`."""
        adapter = self.store.get_adapter(project, name)
        return export_adapter(self.store, adapter, out_dir, merged=merged, home=self.settings.home)

    def generate(self, project: str, name: str, prompt: str, max_new_tokens: int, raw: bool = False) -> str:
        """Greedy completion through the adapter: one base in memory per base model (loaded on first use,
        kept for the service's life), the adapters cached on it."""
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

    # ---- tokens ----

    def principal(self, secret: str | None) -> Principal | None:
        """Who presents `secret` (a bearer token): the admin, a project token's holder, or None (unknown).
        A service whose settings hold no admin token is open: everyone is admin."""
        if not self.settings.api_token:
            return ADMIN
        if not secret:
            return None
        if secrets.compare_digest(secret, self.settings.api_token):
            return ADMIN
        token = self.store.find_token(secret)
        if token is None:
            return None
        return Principal(token.role, token.project, token.id)  # type: ignore[arg-type]

    def create_token(
        self, project: str, role: str = "member", name: str | None = None
    ) -> tuple[TokenView, str]:
        """A new project token and its secret, which is shown this once: only its hash is stored."""
        record, secret = self.store.create_token(project, role, name)
        return TokenView.of(record), secret

    def tokens(self, project: str | None = None) -> list[TokenView]:
        return [TokenView.of(t) for t in self.store.list_tokens(project)]

    def revoke_token(self, token_id: str) -> TokenView:
        return TokenView.of(self.store.revoke_token(token_id))

    # ---- views ----

    def _scores(
        self, records: list[AdapterRecord], metrics: dict[str, dict[str, float]]
    ) -> dict[str, list[Score]]:
        """Each adapter's task scores, its gate's metric and its scorers first."""
        orders = self._score_orders({a.job_id for a in records})
        return {a.id: scores(metrics.get(a.id, {}), orders[a.job_id](a.name)) for a in records}

    def _score_orders(self, job_ids: set[str]) -> dict[str, ScoreOrder]:
        """The jobs' `ScoreOrder`s: read from their specs in one query for those not kept yet. A spec
        never changes, so the last `SCORE_ORDERS_KEPT` are kept: a job watched with `--wait` (a view
        every half second) reads its spec once, not once per poll."""
        with self._orders_lock:
            missing = job_ids - self._orders.keys()
        found = (
            {i: ScoreOrder.of(spec) for i, spec in self.store.job_specs(missing).items()} if missing else {}
        )
        with self._orders_lock:
            self._orders.update(found)
            for job_id in job_ids & self._orders.keys():
                found.setdefault(job_id, self._orders[job_id])
                self._orders.move_to_end(job_id)
            while len(self._orders) > SCORE_ORDERS_KEPT:
                self._orders.popitem(last=False)
        return {i: found.get(i, ScoreOrder.of({})) for i in job_ids}

    def _adapter_view(self, a: AdapterRecord) -> AdapterView:
        return self._adapter_views([a])[0]

    def _adapter_views(self, records: list[AdapterRecord]) -> list[AdapterView]:
        """Views of many adapters in three queries whatever their number (a fourth for the specs of jobs
        not seen yet: the scorers' order): their metrics, and the names of parents and roots outside the
        batch (once one query per adapter each: 51 s for 5,000)."""
        metrics = self.store.last_metrics([a.id for a in records])
        task_scores = self._scores(records, metrics)
        names = {a.id: a.qualified_name for a in records}
        missing = {i for a in records for i in (a.parent_id, a.root_id) if i is not None and i not in names}
        names.update(self.store.qualified_names(missing))
        return [
            AdapterView(
                id=a.id,
                project=a.project,
                name=a.name,
                job_id=a.job_id,
                state=a.state,
                parent=names.get(a.parent_id) if a.parent_id else None,
                root=names.get(a.root_id, a.qualified_name),
                depth=a.depth,
                base_model=a.base_model,
                step=a.step or 0,
                steps=a.train.steps,
                eval_loss=a.eval_loss,
                final_checkpoint=a.final_checkpoint,
                parent_checkpoint=a.parent_checkpoint,
                data_fingerprint=a.data_fingerprint,
                config_hash=a.config_hash,
                error=a.error,
                waiting=a.waiting if a.state == AdapterState.QUEUED else None,
                metrics=metrics.get(a.id, {}),
                scores=task_scores[a.id],
                created_at=a.created_at,
                updated_at=a.updated_at,
            )
            for a in records
        ]

    def _job_view(self, job: JobRecord, embed: int, counts: dict[str, int] | None = None) -> JobView:
        """The job with its counts by state and its first `embed` adapters (a bounded view: a job of
        5,000 adapters once answered with 2.4 MB after 51 s)."""
        if counts is None:
            counts = self.store.adapter_counts([job.id])[job.id]
        first = self.store.adapter_page(job_id=job.id, limit=embed) if embed > 0 else []
        return JobView(
            id=job.id,
            project=job.project,
            name=job.name,
            state=job.state,
            error=job.error,
            kind=job.kind,
            end_reason=job.end_reason,
            created_at=job.created_at,
            updated_at=job.updated_at,
            adapters=self._adapter_views(first),
            adapter_count=sum(counts.values()),
            adapter_states=counts,
        )


def _given(part: T | None, name: str) -> T:
    if part is None:
        raise RuntimeError(f"this Service was built without a {name}; a `ControlPlane` builds it with one")
    return part


def _data_now(adapter: AdapterRecord) -> str:
    """The fingerprint of the adapter's data as the files are now; a file gone or unreadable is the
    person's to restore before a retry (a clear 400), not a retry that fails again later."""
    try:
        return fingerprint(adapter.data, adapter.train.seed, adapter.name)
    except OSError as exc:
        raise ValueError(
            f"adapter {adapter.qualified_name}'s data cannot be read ({exc.strerror or exc}: "
            f"{exc.filename or adapter.data.path}); restore `data.path` / `data.eval_path`, then retry"
        ) from None


def _names_an_adapter(parent: str, project: str) -> bool:
    """Whether a parent reference of a spec that failed validation is worth looking up: a malformed one
    (NUL, lone surrogates, 10 KB) is already reported by the schema, and must not reach a query."""
    try:
        check_parent(parent if "/" in parent else f"{project}/{parent}")
    except ValueError:
        return False
    return True


def _no_parent(parent: str, project: str) -> str:
    owner, _, _ = parent.rpartition("/")
    return (
        f"no adapter {parent!r} in this job or in project {owner or project!r}; "
        "train the parent first or fix the name"
    )


def _compatibility(
    field: str, parent: LoraConfig, child: LoraConfig, parent_name: str | None
) -> list[tuple[str, str]]:
    return [(field, problem) for problem in branch_problems(parent, child, parent_name)]
