"""The MLflow mirror: one experiment per project, a parent run per job, a nested child run per adapter.

It is a projection of SQL's event log, not a second source of truth: `sync()` reads events after a cursor
kept in SQL, creates the runs it needs, logs each run's metrics with one `log_batch` per batch of events,
uploads finished adapters as artifacts, and only then moves the cursor. If MLflow is unreachable the
cursor stays put and the same events are mirrored on a later sync, so training never waits for MLflow and
nothing is lost, even across a controller restart. Each metric is logged once per step: steps an adapter
redoes after a worker restart (exactly, from its checkpoint) are not logged again. An adapter's final
eval also leaves its judged samples as a table artifact (`eval_samples.json`), written whole, not
appended (as `log_table` would), so a replay rewrites the same table rather than doubling it; a finished
job's run gets `eval_summary.json`, each adapter's main task score and lifts.

A training session (a job of kind `session`) is mirrored the same way: its job's run is the session's run
(params: base, LoRA, seed, the state it started from), its calls' metrics (`session` events, by optimizer
step: a forward_backward's `loss:sum`, an optim_step's `grad_norm`...) are logged to it, and its saved
states are its child runs, uploaded as any finished adapter is. Every call's metrics are kept: a session's
events are recorded once, never replayed, so two forward_backward calls of one step are two points.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.lineage.tree import lineage_path
from orchestrator.spec.job import ScoreOrder
from orchestrator.spec.states import ADAPTER_FINISHED, JOB_TERMINAL, JobKind, JobState, adapter_state_after
from orchestrator.spec.views import scores
from orchestrator.store import AdapterChange, AdapterRecord, EventRecord, JobRecord, Store
from orchestrator.tracking.status import run_status
from workers import storage
from workers.contract.plan import Outcome

log = logging.getLogger(__name__)

CURSOR = "mlflow"
BATCH_EVENTS = 2000
# MLflow's log_batch takes at most 1000 entities (metrics + params + tags) and 100 tags per call.
METRICS_PER_CALL, TAGS_PER_CALL = 900, 100
STEP_METRICS = {"loss": "train_loss", "lr": "lr", "tokens_per_s": "tokens_per_s", "grad_norm": "grad_norm"}
EVAL_METRICS = {"eval_loss": "eval_loss", "perplexity": "perplexity"}  # and the eval's named `metrics`
DONE_METRICS = {"baseline_eval_loss": "parent_eval_loss"}
METRICS_BY_KIND = {"step": STEP_METRICS, "eval": EVAL_METRICS, "done": DONE_METRICS}
SAMPLES_ARTIFACT = "eval_samples.json"
SUMMARY_ARTIFACT = "eval_summary.json"  # on the job's run: each adapter's main score and lifts
# Fail fast against a down tracking server instead of MLflow's long default retry; we retry ourselves.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def experiment_name(project: str) -> str:
    return f"lorafleet/{project}"


def runs_url(base: str, experiment_id: str, job_id: str | None = None) -> str:
    """The MLflow UI's model-training runs table of an experiment, filtered to one job's runs (its parent
    run and the adapters' child runs all carry the `lorafleet.job` tag)."""
    from urllib.parse import quote

    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if job_id:
        url += "&searchFilter=" + quote(f"tags.`lorafleet.job` = '{job_id}'", safe="")
    return url


def _millis(event: EventRecord) -> int:
    """When the engine emitted the event (its `at`), else when SQL recorded it."""
    at = event.payload.get("at")
    return int(float(at) * 1000) if at is not None else int(event.created_at.timestamp() * 1000)


def _metrics_of(event: EventRecord) -> dict[str, float]:
    """The MLflow metrics an event carries: its kind's fixed fields, and an eval's named `metrics`
    (`eval_token_accuracy`, `eval_<scorer>`, the base's and the parent's)."""
    names = METRICS_BY_KIND.get(event.kind, {})
    out = {metric: event.payload.get(key) for key, metric in names.items()}
    if event.kind == "eval":
        out |= event.payload.get("metrics") or {}
    return {metric: float(value) for metric, value in out.items() if value is not None}


def _metric_name(name: str) -> str:
    """A session call's metric name as MLflow takes it (`loss:sum` is one; a character MLflow refuses
    would otherwise stop the mirror's cursor for good)."""
    return re.sub(r"[^/\w.\- :]", "_", name).strip("/") or "metric"


def _table_tag(artifact: str) -> Any:
    """The tag by which the MLflow UI knows a JSON artifact is a table (what `log_table` sets). Our runs
    hold one table each, so the tag is set whole, in the batch, with no read of the run first."""
    from mlflow.entities import RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    return RunTag(MLFLOW_LOGGED_ARTIFACTS, json.dumps([{"path": artifact, "type": "table"}]))


def samples_table(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Judged samples (`EvalSample` dumps) in the table format `MlflowClient.log_table` writes (pandas'
    `split` orientation): prompt, reference, the base's, the adapter's and (for a child) the parent's
    output, then one column per score of the adapter's output."""
    has_parent = any(s.get("parent_output") is not None for s in samples)
    scores = list(dict.fromkeys(k for s in samples for k in s.get("scores") or {}))
    columns = ["prompt", "reference", "base output", "adapter output"]
    columns += ["parent output"] if has_parent else []
    rows = []
    for sample in samples:
        row = [sample.get("prompt"), sample.get("reference"), sample.get("base_output"), sample.get("output")]
        row += [sample.get("parent_output")] if has_parent else []
        rows.append(row + [(sample.get("scores") or {}).get(k) for k in scores])
    return {"columns": columns + scores, "data": rows}


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out |= _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return out
    return {prefix: str(value)[:6000]}


def _start_tags(event: EventRecord) -> list[Any]:
    """Pack placement and data fingerprint, as tags: params cannot change when an adapter resumes."""
    from mlflow.entities import RunTag

    payload = event.payload
    return [
        RunTag("lorafleet.pack_id", str(payload.get("pack_id"))),
        RunTag("lorafleet.node", str(payload.get("node") or "")),
        RunTag("lorafleet.data_fingerprint", str(payload.get("data_fingerprint"))),
        RunTag("lorafleet.train_examples", str(payload.get("train_examples"))),
        RunTag("lorafleet.eval_examples", str(payload.get("eval_examples"))),
    ]


class Tracker:
    def __init__(
        self,
        store: Store,
        tracking_uri: str,
        artifact_root: Path | None = None,
        after_sync: Callable[[], None] | None = None,
        batch_events: int = BATCH_EVENTS,
    ) -> None:
        from mlflow import MlflowClient

        self.store = store
        self.uri = tracking_uri
        self.artifact_root = artifact_root
        self.after_sync = after_sync  # e.g. the registry's auto-promotion, once runs and artifacts exist
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._experiments: dict[str, str] = {}
        self._closed_jobs: set[str] = set()
        self._last_step: dict[tuple[str, str], int] = {}
        self._new_runs: set[str] = set()  # created by this process: nothing logged to them before
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batch_events = batch_events
        # One writer to MLflow at a time: the mirror thread and a request thread (a promotion syncs
        # first) would otherwise both see an adapter without a run and both create one.
        self.lock = threading.RLock()

    # ---- background loop ----

    def start(self, period: float = 1.0) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, args=(period,), name="lorafleet-mlflow", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop soon: the loop ends after the batch it is mirroring, and one last batch is mirrored.
        A backlog is left to the next start (the cursor is in SQL): a server asked to stop with
        thousands of events behind once took 7 minutes to exit."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.sync_quietly() and self.after_sync is not None:  # a last batch on a clean shutdown
            self.after_sync()

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            if self.sync_quietly() and self.after_sync is not None:
                try:
                    self.after_sync()
                except Exception:
                    log.exception("after-sync hook failed; it runs again next time")

    def sync_quietly(self) -> bool:
        try:
            self.sync()
            return True
        except Exception as exc:  # MLflow down or slow: keep the cursor, try again next time
            log.warning("MLflow sync to %s failed, will retry: %s", self.uri, exc)
            return False

    # ---- the projection ----

    def sync(self) -> int:
        """Mirror every event after the cursor, a batch at a time; returns how many were mirrored.
        Once `stop()` was asked, at most one more batch: the rest waits for the next start. Holds `lock`."""
        with self.lock:
            return self._sync()

    def _sync(self) -> int:
        total = 0
        while True:
            cursor = self.store.get_cursor(CURSOR)
            events = self.store.list_events(None, after_id=cursor, limit=self.batch_events)
            if not events:
                break
            self._mirror(events)
            self.store.set_cursor(CURSOR, events[-1].id)
            total += len(events)
            if self._stop.is_set():
                return total
        self._close_finished_jobs()
        return total

    def _mirror(self, events: list[EventRecord]) -> None:

        pending: dict[tuple[str, str], int] = {}
        try:
            self._mirror_events(events, pending)
        except BaseException:  # some batches may have reached MLflow: ask it again next time
            for key in pending:
                self._last_step.pop(key, None)
                self._new_runs.discard(key[0])
            raise
        self._last_step.update(pending)

    def _mirror_events(self, events: list[EventRecord], pending: dict[tuple[str, str], int]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics: dict[str, list[Metric]] = defaultdict(list)
        tags: dict[str, list[RunTag]] = defaultdict(list)
        finished: list[tuple[str, EventRecord]] = []
        samples: dict[str, list[dict[str, Any]]] = {}
        adapters = self.store.adapters_by_id({e.adapter_id for e in events if e.adapter_id is not None})
        jobs: dict[str, JobRecord] = {}
        for event in events:
            if event.kind == "session" and event.adapter_id is None:
                if event.job_id not in jobs:
                    jobs[event.job_id] = self.store.get_job(event.job_id)
                run_id = self._job_run(jobs[event.job_id])
                jobs[event.job_id] = replace(jobs[event.job_id], mlflow_run_id=run_id)
                for metric, value in (event.payload.get("metrics") or {}).items():
                    if value is not None:
                        name = _metric_name(str(metric))
                        metrics[run_id].append(
                            Metric(name, float(value), _millis(event), int(event.step or 0))
                        )
                continue
            if event.adapter_id is None or event.adapter_id not in adapters:
                continue
            stamp = _millis(event)
            run_id = self._adapter_run(adapters[event.adapter_id], start_ms=stamp)
            if run_id != adapters[event.adapter_id].mlflow_run_id:  # the same record for its next events
                adapters[event.adapter_id] = replace(adapters[event.adapter_id], mlflow_run_id=run_id)
            step = int(event.step or 0)
            for metric, value in _metrics_of(event).items():
                if self._first_at(run_id, metric, step, pending):
                    metrics[run_id].append(Metric(metric, value, stamp, step))
            if event.kind == "eval" and event.payload.get("final") and event.payload.get("samples"):
                samples[run_id] = event.payload["samples"]  # a replayed final eval: the same table
                tags[run_id].append(_table_tag(SAMPLES_ARTIFACT))
            if event.kind == "start":
                tags[run_id] += _start_tags(event)
            elif event.kind == "done" and event.payload.get("status") != Outcome.YIELDED:  # it resumes
                finished.append((run_id, event))
                if event.payload.get("error"):
                    tags[run_id].append(RunTag("lorafleet.error", str(event.payload["error"])[:5000]))
        # One call per run and batch for its metrics and tags together, not one per kind of thing.
        for run_id in dict.fromkeys([*metrics, *tags]):
            points, labels = metrics.get(run_id, []), tags.get(run_id, [])
            for k in range(max(-(-len(points) // METRICS_PER_CALL), -(-len(labels) // TAGS_PER_CALL))):
                self.client.log_batch(
                    run_id,
                    metrics=points[k * METRICS_PER_CALL : (k + 1) * METRICS_PER_CALL],
                    tags=labels[k * TAGS_PER_CALL : (k + 1) * TAGS_PER_CALL],
                )
        for run_id, judged in samples.items():  # their tags went with the batch
            self.client.log_dict(run_id, samples_table(judged), SAMPLES_ARTIFACT)
        for run_id, event in finished:
            self._finish_adapter_run(run_id, event)

    def _job_summary(self, job: JobRecord) -> dict[str, Any]:
        """One row per adapter of a finished job: its state and main task score with its lifts, so the
        job's run compares its adapters at a glance (the adapters' own runs hold the rest)."""
        rows, after, order = [], 0, ScoreOrder.of(job.spec)
        while page := self.store.adapter_page(job_id=job.id, after_seq=after, limit=1000):
            metrics = self.store.last_metrics([a.id for a in page])
            for adapter in page:
                found = scores(metrics[adapter.id], order(adapter.name))
                main = found[0] if found else None
                rows.append(
                    [adapter.name, adapter.state, adapter.eval_loss]
                    + (
                        [main.metric, main.value, main.base, main.base_lift, main.parent, main.parent_lift]
                        if main
                        else [None] * 6
                    )
                )
            after = page[-1].seq
        columns = [
            "adapter",
            "state",
            "eval loss",
            "score",
            "value",
            "base",
            "lift over base",
            "parent",
            "lift over parent",
        ]
        return {"columns": columns, "data": rows}

    def _first_at(self, run_id: str, metric: str, step: int, pending: dict[tuple[str, str], int]) -> bool:
        """Whether this is the first point of `metric` at `step` or later. After a worker restart the
        engine redoes the steps since its last checkpoint, exactly (same data, same RNG, same values), so
        the repeats are skipped: each step appears once in MLflow, none missing. (`pending` holds this
        sync's steps until MLflow has them all.)"""
        key = (run_id, metric)
        if key not in pending and key not in self._last_step:
            if run_id in self._new_runs:
                self._last_step[key] = -1
            else:  # first touch in this process: ask MLflow what it already has
                history = self.client.get_metric_history(run_id, metric)
                self._last_step[key] = max((m.step for m in history), default=-1)
        if step <= pending.get(key, self._last_step.get(key, -1)):
            return False
        pending[key] = step
        return True

    def _experiment(self, project: str) -> str:
        if project not in self._experiments:
            name = experiment_name(project)
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                self._experiments[project] = found.experiment_id
            else:
                location = None
                if self.artifact_root is not None:
                    location = (self.artifact_root / project).resolve().as_uri()
                self._experiments[project] = self.client.create_experiment(name, artifact_location=location)
        return self._experiments[project]

    def _job_run(self, job: JobRecord) -> str:
        if job.mlflow_run_id:
            return job.mlflow_run_id
        spec = job.spec
        session = job.kind == JobKind.SESSION
        run = self.client.create_run(
            self._experiment(job.project),
            start_time=int(job.created_at.timestamp() * 1000),
            run_name=job.name,
            tags={
                "lorafleet.job": job.id,
                "lorafleet.project": job.project,
                "lorafleet.kind": "session" if session else "job",
            },
        )
        params: dict[str, Any] = {
            "base_model": spec.get("base_model"),
            "quantization": spec.get("quantization"),
            "dtype": spec.get("dtype"),
        }
        if session:
            params |= {
                **_flatten("lora", spec.get("lora", {})),
                "seed": spec.get("seed"),
                "from_state": spec.get("from_state") or "",
            }
        else:
            params |= {
                "adapters": len(spec.get("adapters", [])),
                **_flatten("resources", spec.get("resources", {})),
                **_flatten("promotion", spec.get("promotion", {})),
            }
        self._log_params(run.info.run_id, params)
        self.store.update_job(job.id, mlflow_run_id=run.info.run_id)
        return run.info.run_id

    def _adapter_run(self, adapter: AdapterRecord, start_ms: int | None = None) -> str:
        """The adapter's child run, created at its first mirrored event (its start, when the engine
        began it), so the run's duration is the training's, not the mirror's."""
        if adapter.mlflow_run_id:
            return adapter.mlflow_run_id
        job = self.store.get_job(adapter.job_id)
        parent_run = self._job_run(job)
        path = lineage_path(self.store, adapter)
        parent = self.store.get_adapter_by_id(adapter.parent_id) if adapter.parent_id else None
        root = self.store.get_adapter_by_id(adapter.root_id) if adapter.root_id != adapter.id else adapter
        run = self.client.create_run(
            self._experiment(adapter.project),
            start_time=start_ms,
            run_name=adapter.name,
            tags={
                "mlflow.parentRunId": parent_run,
                "lorafleet.kind": "adapter",
                "lorafleet.job": adapter.job_id,
                "lorafleet.adapter": adapter.qualified_name,
                "lorafleet.parent": parent.qualified_name if parent else "",
                "lorafleet.root": root.qualified_name,
                "lorafleet.lineage_path": path,
                "lorafleet.depth": str(adapter.depth),
            },
        )
        params = {
            "base_model": adapter.base_model,
            "quantization": adapter.quantization,
            "dtype": adapter.dtype,
            **_flatten("lora", adapter.lora.model_dump(mode="json")),
            **_flatten("train", adapter.train.model_dump(mode="json")),
            **_flatten("data", adapter.data.model_dump(mode="json")),
            "config_hash": adapter.config_hash,
            "parent_checkpoint": adapter.parent_checkpoint or "",
        }
        self._log_params(run.info.run_id, params)
        self.store.update_adapter(AdapterChange(adapter.id, mlflow_run_id=run.info.run_id))
        self._new_runs.add(run.info.run_id)
        return run.info.run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in sorted(params.items()) if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _finish_adapter_run(self, run_id: str, event: EventRecord) -> None:
        outcome = Outcome(event.payload["status"])
        final_dir = event.payload.get("final_dir")
        if outcome == Outcome.TRAINED and final_dir and storage.exists(final_dir):
            with storage.local_copy(final_dir) as local:  # MLflow uploads files (object storage: a copy)
                self.client.log_artifacts(run_id, str(local), "adapter")
        status = run_status(adapter_state_after(outcome))
        self.client.set_terminated(run_id, status=status, end_time=_millis(event))

    @contextmanager
    def adapter_run_deleted(self, adapter_id: str) -> Iterator[None]:
        """Delete the adapter's child run for the body of the `with`, which deletes the adapter itself;
        if the body fails, the run is restored, so a failed delete leaves both as they were.

        Holds `lock` throughout, and mirrors every pending event first: no event of the adapter is
        left for the mirror to log to a deleted run (MLflow refuses, and the cursor would stick), and
        once the body has detached the adapter's events from it, no later sync creates its run again."""
        with self.lock:
            self._sync()
            run_id = self.store.get_adapter_by_id(adapter_id).mlflow_run_id
            if run_id is not None:
                self.client.delete_run(run_id)
            try:
                yield
            except BaseException:
                if run_id is not None:
                    self.client.restore_run(run_id)
                raise

    def _close_finished_jobs(self) -> None:
        from mlflow.entities import RunTag

        jobs = [
            job
            for job in self.store.list_jobs(states=JOB_TERMINAL)
            if job.mlflow_run_id and job.id not in self._closed_jobs
        ]
        counts = self.store.adapter_counts([job.id for job in jobs])  # one query, not a job's adapters each
        for job in jobs:
            assert job.mlflow_run_id is not None
            if all(state in ADAPTER_FINISHED for state in counts[job.id]):
                if self.client.get_run(job.mlflow_run_id).info.status == run_status(JobState.RUNNING):
                    self.client.log_dict(job.mlflow_run_id, self._job_summary(job), SUMMARY_ARTIFACT)
                    ended = [RunTag("lorafleet.end_reason", job.end_reason)] if job.end_reason else []
                    self.client.log_batch(job.mlflow_run_id, tags=[_table_tag(SUMMARY_ARTIFACT), *ended])
                    self.client.set_terminated(
                        job.mlflow_run_id,
                        status=run_status(job.state),
                        end_time=int(job.updated_at.timestamp() * 1000),
                    )
                self._closed_jobs.add(job.id)
