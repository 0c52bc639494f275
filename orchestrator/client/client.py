"""`Client()`: the Python way in. Local (`Client()`: the home's background service, started on first use)
or remote (`Client(url, token)`: a team's `lorafleet server`); both speak the same HTTP API, have the same
methods and return the same views. Each method is one request through one transport (`Client._call`):
adding an operation to the API adds one method here.

A local client never runs the controller itself: jobs train in the service whether or not any client is
attached, `wait()` only watches, and interrupting it stops the watching, never the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.client.errors import UNAVAILABLE, ApiError
from orchestrator.spec.job import BranchSpec, JobSpec, SpecError, load_source
from orchestrator.spec.states import JobState
from orchestrator.spec.views import (
    AdapterView,
    EventView,
    JobView,
    LineageNode,
    RegistryView,
    SessionView,
    TokenView,
)

if TYPE_CHECKING:
    from orchestrator.client.training import TrainingClient

NEXT_PAGE_HEADER = "X-Next-After"  # as orchestrator.server.routes.adapters sends it (the client stays light)
ProgressFn = Callable[["JobView", list[EventView]], None]

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_UNAVAILABLE_S = 60.0  # how long a read keeps retrying a 503 before it raises


def retry_delay(attempt: int, retry_after: str | None, cap_s: float = 30.0) -> float:
    """Seconds to wait before retry number `attempt` (0 first) of a request answered 503: exponential
    backoff from 0.5 s, never sooner than the server's `Retry-After` (in seconds; an HTTP date or junk
    is ignored: the backoff alone is safe), never longer than `cap_s`."""
    backoff = 0.5 * 2 ** min(attempt, 16)
    try:
        hinted = float(retry_after) if retry_after is not None else 0.0
    except ValueError:
        hinted = 0.0
    if not hinted >= 0.0:  # NaN, negative
        hinted = 0.0
    return min(cap_s, max(backoff, hinted))


def outlasting_outages(call: Callable[[], T], what: str, deadline: float | None = None) -> T:
    """`call()`, asked again with `retry_delay`'s backoff while the server answers that its database is
    unreachable (503), until `deadline` (`time.monotonic()`; None: for as long as the outage lasts)."""
    attempt = 0
    while True:
        try:
            return call()
        except ApiError as exc:
            if not exc.unavailable or (deadline is not None and time.monotonic() > deadline):
                raise
            delay = retry_delay(attempt, None)
            log.warning("%s: %s (asking again in %.0f s)", what, exc, delay)
            attempt += 1
            time.sleep(delay)


class Job:
    """A submitted job: a live handle whose `view` refreshes on `refresh()` and `wait()`."""

    def __init__(self, client: Client, view: JobView) -> None:
        self._client, self.view = client, view

    @property
    def id(self) -> str:
        return self.view.id

    @property
    def state(self) -> JobState:
        return self.view.state

    @property
    def adapters(self) -> list[AdapterView]:
        """All the job's adapters: those the view holds, or every page of them when it holds only the
        first (a view embeds a bounded number)."""
        if not self.view.has_more_adapters:
            return self.view.adapters
        return self._client.adapters(job_id=self.id)

    def refresh(self) -> JobView:
        self.view = self._client.job(self.id).view
        return self.view

    def events(self, after_id: int = 0) -> list[EventView]:
        return self._client.events(self.id, after_id)

    def wait(
        self, timeout: float | None = None, progress: ProgressFn | None = None, poll: float = 0.5
    ) -> JobView:
        """Watch until the job ends; `progress(view, new_events)` is called on every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_event = 0

        def poll_once() -> tuple[JobView, list[EventView]]:
            return self.refresh(), (self.events(last_event) if progress is not None else [])

        while True:  # an outage of the server's database is waited out, like the job
            view, events = outlasting_outages(poll_once, f"waiting for job {self.id}", deadline)
            if events:
                last_event = events[-1].id
            if progress is not None:
                progress(view, events)
            if view.done:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {view.state} after {timeout} s")
            time.sleep(poll)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, name={self.view.name!r}, state={self.state.value!r})"


class Client:
    """`Client()` local, or `Client("http://host:8000", token)` remote; the same methods either way.
    Errors come back as `ApiError` or `SpecError` with their fields."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        project: str = "default",
        home: str | Path | None = None,
    ) -> None:
        self.project = project
        self._reconnect: Callable[[], tuple[str, str]] | None = None
        if url is None:
            from orchestrator.server.local import ensure_service
            from orchestrator.settings import Settings

            where = Path(home) if home is not None else Settings().home

            def connect() -> tuple[str, str]:
                return ensure_service(where)

            self._reconnect = connect  # the local service: restart it if it died, then retry once
            url, token = connect()
        self._connect(url, token)

    def _ref(self, name: str, project: str | None) -> tuple[str, str]:
        if "/" in name:
            proj, _, short = name.partition("/")
            return proj, short
        return project or self.project, name

    # ---- jobs ----

    def submit(self, spec: JobSpec | dict[str, Any] | str | Path, idempotency_key: str | None = None) -> Job:
        raw = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else load_source(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        # the service checks it all at once
        return Job(self, JobView.model_validate(self._call("POST", "/v1/jobs", json=raw, headers=headers)))

    def job(self, job_id: str) -> Job:
        return Job(self, JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}")))

    def jobs(self, project: str | None = None) -> list[JobView]:
        params = {"project": project} if project else {}
        return [JobView.model_validate(j) for j in self._call("GET", "/v1/jobs", params=params)]

    def events(self, job_id: str, after_id: int = 0) -> list[EventView]:
        """The job's events after the one numbered `after_id` (a page of them)."""
        rows = self._call("GET", f"/v1/jobs/{job_id}/events", params={"after": after_id})
        return [EventView.model_validate(e) for e in rows]

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> JobView:
        """Train the job's failed adapters again, each from its newest complete checkpoint."""
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/retry"))

    # ---- adapters ----

    def adapter(self, name: str, project: str | None = None) -> AdapterView:
        project, name = self._ref(name, project)
        return AdapterView.model_validate(self._call("GET", f"/v1/adapters/{project}/{name}"))

    def adapters(self, project: str | None = None, job_id: str | None = None) -> list[AdapterView]:
        """Every adapter (of a project, of a job), first come first, fetched page by page."""
        return list(self.iter_adapters(project, job_id))

    def iter_adapters(
        self, project: str | None = None, job_id: str | None = None, page_size: int = 1000
    ) -> Iterator[AdapterView]:
        """Adapters page by page, holding one page at a time; the server names the next page's cursor."""
        params: dict[str, Any] = {k: v for k, v in (("project", project), ("job_id", job_id)) if v}
        after: int | None = 0
        while after is not None:
            response = self._answer(
                "GET", "/v1/adapters", params={**params, "after": after, "limit": page_size}
            )
            following = response.headers.get(NEXT_PAGE_HEADER)
            after = int(following) if following is not None else None
            yield from (AdapterView.model_validate(a) for a in response.json())

    def retry_adapter(self, name: str, project: str | None = None) -> AdapterView:
        """Train a failed or cancelled adapter again under its name: from its newest complete
        checkpoint, or from step 0 if its data changed since (the fixed data is what it learns)."""
        project, name = self._ref(name, project)
        return AdapterView.model_validate(self._call("POST", f"/v1/adapters/{project}/{name}/retry"))

    def delete_adapter(self, name: str, project: str | None = None) -> AdapterView:
        """Delete an adapter (its rows, files and MLflow run), freeing its name; returns what it was.
        Refused (`ApiError` 409, with the reason) if promoted, queued, training, or a parent."""
        project, name = self._ref(name, project)
        return AdapterView.model_validate(self._call("DELETE", f"/v1/adapters/{project}/{name}"))

    # ---- lineage ----

    def lineage(self, name: str, project: str | None = None) -> LineageNode:
        project, name = self._ref(name, project)
        return LineageNode.model_validate(self._call("GET", f"/v1/adapters/{project}/{name}/lineage"))

    def branch(
        self,
        parent: str,
        name: str,
        data: dict[str, Any] | str | Path,
        lora: dict[str, Any] | None = None,
        train: dict[str, Any] | None = None,
        project: str | None = None,
        eval_data: str | Path | None = None,
        eval: dict[str, Any] | None = None,
    ) -> Job:
        """Start `name` from `parent`'s final weights and train it on `data` (a path or a data config),
        evaluated on `eval_data` if given (the parent is measured on the same data, for the gate), judged
        like the parent unless `eval` overrides some of its eval config (e.g. `{"scorers": [...]}`)."""
        data_cfg = {"path": str(Path(data).resolve())} if isinstance(data, str | Path) else dict(data)
        if eval_data is not None:
            data_cfg["eval_path"] = str(Path(eval_data).resolve())
        proj, parent_name = self._ref(parent, project)
        child = BranchSpec(name=name, data=data_cfg, lora=lora, train=train, eval=eval)
        path = f"/v1/adapters/{proj}/{parent_name}/branch"
        return Job(self, JobView.model_validate(self._call("POST", path, json=child.model_dump(mode="json"))))

    # ---- registry and serving ----

    def promote(
        self, name: str, alias: str | None = None, force: bool = False, project: str | None = None
    ) -> RegistryView:
        """Register the adapter in MLflow and point `alias` at it, if the job's gate passes (or `force`)."""
        project, name = self._ref(name, project)
        body = {"alias": alias, "force": force}
        return RegistryView.model_validate(
            self._call("POST", f"/v1/adapters/{project}/{name}/promote", json=body)
        )

    def export(
        self, name: str, out_dir: str | Path, merged: bool = False, project: str | None = None
    ) -> Path:
        """Write the PEFT adapter (or, `merged`, the base with it merged in) to `out_dir`, which must be
        new or empty: the server's zip, unpacked."""
        import io
        import zipfile

        project, name = self._ref(name, project)
        out_dir = Path(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ValueError(f"`out_dir` {str(out_dir)!r} exists and is not empty; choose a new directory")
        response = self._answer("GET", f"/v1/adapters/{project}/{name}/export", params={"merged": merged})
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            archive.extractall(out_dir)
        return out_dir

    def generate(
        self,
        name: str,
        prompt: str,
        max_new_tokens: int = 16,
        project: str | None = None,
        raw: bool = False,
    ) -> str:
        """Greedy completion of `prompt` through the adapter (cached in RAM over one shared base). The
        prompt is formatted as the adapter's training data was (in the chat template as a user turn, for
        an adapter trained on `messages`); `raw` feeds it as is."""
        project, name = self._ref(name, project)
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "raw": raw}
        return self._call("POST", f"/v1/adapters/{project}/{name}/generate", json=body)["text"]

    # ---- interactive training sessions (Tinker's primitives: `orchestrator.client.training`) ----

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: list[str] | str = "all-linear",
        seed: int = 0,
        quantization: str = "none",
        dtype: str = "float32",
        project: str | None = None,
    ) -> TrainingClient:
        """A new training session: a fresh LoRA adapter (`rank`, `alpha` default 2 x rank, on `targets`)
        on `base_model`, held by the server and trained call by call."""
        body = {
            "project": project or self.project,
            "base_model": base_model,
            "rank": rank,
            "alpha": alpha,
            "dropout": dropout,
            "targets": targets,
            "seed": seed,
            "quantization": quantization,
            "dtype": dtype,
        }
        return self._training_client(body)

    def create_training_client_from_state(
        self, adapter_or_path: str, *, base_model: str | None = None, project: str | None = None
    ) -> TrainingClient:
        """A training session that starts from a saved state: an adapter (`name` or `project/name`,
        its final weights) or a path `TrainingClient.save_state` returned (weights and optimizer)."""
        ref = adapter_or_path
        if not ref.startswith(("/", ".", "~")) and "://" not in ref and "/" not in ref:
            ref = f"{project or self.project}/{ref}"
        body = {"project": project or self.project, "from_state": ref, "base_model": base_model}
        return self._training_client(body)

    def training_sessions(self, project: str | None = None) -> list[SessionView]:
        """The live sessions this token may see (the admin's: all, or `project`'s)."""
        params = {"project": project} if project else {}
        return [SessionView.model_validate(s) for s in self._call("GET", "/v1/sessions", params=params)]

    def sessions(self, project: str | None = None) -> list[SessionView]:
        """The live sessions this token may see (`training_sessions`)."""
        return self.training_sessions(project)

    def session(self, session_id: str) -> SessionView:
        return SessionView.model_validate(self._call("GET", f"/v1/sessions/{session_id}"))

    def close_session(self, session_id: str) -> SessionView:
        """End a session once what it queued has run (its job: `succeeded`, closed by its client);
        answers what it was. Its saved states remain adapters."""
        return SessionView.model_validate(self._call("DELETE", f"/v1/sessions/{session_id}"))

    def _training_client(self, body: dict[str, Any]) -> TrainingClient:
        from orchestrator.client.training import TrainingClient

        view = SessionView.model_validate(self._call("POST", "/v1/sessions", json=body))
        return TrainingClient(self, view)

    # ---- tokens (the admin token only) ----

    def create_token(self, project: str, role: str = "member", name: str | None = None) -> dict[str, Any]:
        """A new token for `project` (`member`: read and change; `reader`: read only). The returned
        `token` is shown this once: only its hash is kept."""
        return self._call("POST", "/v1/tokens", json={"project": project, "role": role, "name": name})

    def tokens(self, project: str | None = None) -> list[TokenView]:
        params = {"project": project} if project else {}
        return [TokenView.model_validate(t) for t in self._call("GET", "/v1/tokens", params=params)]

    def revoke_token(self, token_id: str) -> TokenView:
        return TokenView.model_validate(self._call("DELETE", f"/v1/tokens/{token_id}"))

    # ---- the transport: every method above goes through `_call` (or `_answer`, for headers or bytes) ----

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The server's JSON answer, or its refusal raised as `SpecError` / `ApiError`."""
        return self._answer(method, path, **kwargs).json()

    def _answer(self, method: str, path: str, **kwargs: Any) -> Any:
        """The server's answer, or its refusal raised; a read is safe to repeat, so it waits out a
        database outage (503) for a while."""
        response = self._request(method, path, **kwargs)
        if method == "GET":
            deadline = time.monotonic() + RETRY_UNAVAILABLE_S
            attempt = 0
            while response.status_code == UNAVAILABLE and time.monotonic() < deadline:
                delay = retry_delay(attempt, response.headers.get("retry-after"))
                log.warning("the lorafleet server's database is unreachable; retrying in %.0f s", delay)
                time.sleep(delay)
                attempt += 1
                response = self._request(method, path, **kwargs)
        return _checked(response)

    def _connect(self, url: str, token: str | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60.0)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError:
            if self._reconnect is None:
                raise
            self._http.close()
            self._connect(*self._reconnect())
            return self._http.request(method, path, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(response: Any) -> Any:
    """The response, or the server's refusal raised as `SpecError` / `ApiError`."""
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", {})
        except ValueError:
            detail = {"message": response.text}
        if isinstance(detail, str):
            detail = {"message": detail}
        problems = [(p["field"], p["message"]) for p in detail.get("problems", [])]
        if response.status_code == 422 and problems:
            raise SpecError(problems)
        raise ApiError(response.status_code, detail.get("message", response.text), problems)
    return response
