"""`lorafleet`: the command line, on Typer + Rich. Every result command takes `--json` and then prints
exactly one JSON document on stdout; errors go to stderr with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

from orchestrator.client import ApiError, Client, Job
from orchestrator.spec import SpecError, json_schema
from orchestrator.states import ADAPTER_ACTIVE
from orchestrator.views import EventView, JobView, LineageNode

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
out = Console()
err = Console(stderr=True)

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

    from orchestrator.localservice import ServiceError
    from workers.storage import StorageError, describe_fault, storage_fault

    try:
        return fn()
    except SpecError as exc:
        raise _fail(str(exc), 2) from None
    except (ApiError, ValueError) as exc:
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


def _jobs_table(jobs: list[JobView]) -> Table:
    table = Table("job", "project", "name", "state", "adapters", "created", "error")
    for job in jobs:
        done = sum(a.state not in ADAPTER_ACTIVE for a in job.adapters)
        table.add_row(
            job.id,
            job.project,
            job.name,
            job.state,
            f"{done}/{len(job.adapters)}",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _short(job.error),
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
    table = Table("adapter", "state", "step", "eval loss", "parent", "error", title=title)
    for a in adapters:
        eval_loss = f"{a.eval_loss:.4f}" if a.eval_loss is not None else "-"
        table.add_row(a.ref, a.state, f"{a.step}/{a.steps}", eval_loss, a.parent or "-", _short(a.error))
    return table


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
        losses: dict[str, str] = {}

        def update(view: JobView, events: list[EventView]) -> None:
            for event in events:
                if event.kind == "step" and event.adapter:
                    losses[event.adapter] = f"loss {event.payload['loss']:.3f}"
            for a in view.adapters:
                info = f"{a.state} {losses.get(a.name, '')}".strip()
                progress.update(
                    bars[a.name], completed=a.step if a.steps else int(a.state != "queued"), info=info
                )

        return job.wait(progress=update)


def _show_job(client: Client, job: Job, wait: bool, as_json: bool) -> None:
    """Print a submitted job (after waiting for it, if asked); a job that did not succeed exits 1.
    Ctrl-C while waiting stops the watching only: the job goes on in the service."""
    try:
        view = (job.wait() if as_json else _wait_with_progress(job)) if wait else job.view
    except KeyboardInterrupt:
        err.print(
            f"stopped watching; job {job.id} goes on "
            f"(`lorafleet status {job.id}`, `lorafleet cancel {job.id}`)"
        )
        raise typer.Exit(130) from None
    if as_json:
        _emit_json(view)
    else:
        out.print(_adapters_table(view, view.adapters))
    client.close()
    if wait and view.state != "succeeded":
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
def retry(job_id: str, as_json: JsonFlag = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Train a job's failed adapters again (once the cause is fixed), each from its newest checkpoint."""
    client = _client(url, token)
    view = _run(lambda: client.retry(job_id))
    if as_json:
        _emit_json(view)
    else:
        out.print(f"job {view.id}: failed adapters queued again ({view.state})")


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
    elif decision.decision == "promoted":
        out.print(
            f"promoted {decision.model_name} version {decision.version} as @{decision.alias}: "
            f"{decision.reason}"
        )
    else:
        err.print(f"rejected: {decision.reason}")
    if decision.decision != "promoted":
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
    project: ProjectOpt = "default",
    as_json: JsonFlag = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Complete PROMPT with adapter NAME (greedy)."""
    owner, _, short = name.rpartition("/")  # `project/name` names the adapter's own project
    owner = owner or project
    client = _client(url, token, owner)
    text = _run(lambda: client.generate(short, prompt, max_new_tokens=max_new_tokens))
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
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    err.print(f"database at {settings.database_url} is up to date")


@app.command()
def server(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the HTTP API and the controller (LORAFLEET_* settings)."""
    import uvicorn

    from orchestrator.api import create_app
    from orchestrator.controller import connect_ray
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
    model-training runs table: a parent run per job, a child run per adapter)."""
    from mlflow import MlflowClient

    from orchestrator.settings import Settings
    from orchestrator.tracking import experiment_name, runs_url

    settings = Settings()
    if job_id is not None:
        project = _run(lambda: _client(url, token).job(job_id).view.project)
    experiment = MlflowClient(str(settings.mlflow_uri)).get_experiment_by_name(experiment_name(project))
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    if experiment is None:
        err.print(f"no runs for project {project!r} yet (they appear once a job trains); MLflow UI: {base}")
        target = base
    else:
        target = runs_url(base, experiment.experiment_id, job_id)
        err.print(f"MLflow UI, {'job ' + job_id if job_id else 'project ' + project}: {target}")
    sys.stdout.write(target + "\n")
    sys.stdout.flush()
    # Become the MLflow server (exec, not a child): stopping this command stops the UI, nothing is left.
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", str(settings.mlflow_uri)]
    os.execv(sys.executable, [*command, "--host", host, "--port", str(port)])


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


# ---- the local service ----


def _home() -> Path:
    from orchestrator.settings import Settings

    return Settings().home


@service_app.command("status")
def service_status(as_json: JsonFlag = False) -> None:
    """Is this home's service running, where, and where its log is. Exit 1 if it is not running."""
    from orchestrator.localservice import status

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
    from orchestrator.localservice import ensure_service

    url, _ = _run(lambda: ensure_service(_home()))
    err.print(f"service running on {url}")


@service_app.command("stop")
def service_stop() -> None:
    """Stop this home's service. Training jobs pause; the next command restarts it and they resume from
    their last checkpoints."""
    from orchestrator.localservice import stop_service

    home = _home()
    err.print(f"service for {home} stopped" if stop_service(home) else f"no service was running for {home}")


@service_app.command("logs")
def service_logs(
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 50,
) -> None:
    """The end of this home's service log."""
    from orchestrator.localservice import tail

    sys.stdout.write(tail(_home(), lines))


@service_app.command("run", hidden=True)
def service_run() -> None:
    """The service process itself (started in the background by other commands)."""
    from orchestrator.localservice import run_service

    raise typer.Exit(run_service(_home()))


@app.command()
def quickstart(
    steps: Annotated[int, typer.Option(help="Training steps per adapter.")] = 60,
    as_json: JsonFlag = False,
) -> None:
    """Build a tiny base + 4 skills under LORAFLEET_HOME, train 4 adapters and a branched child."""
    from orchestrator.quickstart import run_quickstart

    view = run_quickstart(steps=steps, progress=None if as_json else _wait_with_progress)
    if as_json:
        _emit_json(view)
    if any(v.state != "succeeded" for v in view):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
