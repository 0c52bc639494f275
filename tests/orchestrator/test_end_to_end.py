"""The control plane end to end: real Ray (local), real Ray Train runs, real SQL, the tiny model.

Ray Train runs cost ~15 s each on 2 cores, so each test here trains few, short packs and shares one Ray.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from orchestrator import Client
from orchestrator.control.controller import Controller
from orchestrator.scheduling import scheduler as sched
from orchestrator.server.local import stop_service
from orchestrator.service.plane import ControlPlane
from orchestrator.settings import Settings
from orchestrator.spec.job import JobSpec, SpecError
from workers.training.checkpoint import read_adapter
from workers.training.synthetic import write_skill_data

pytestmark = pytest.mark.slow
TRAINED = {"trained", "evaluated"}  # the registry marks trained adapters evaluated shortly after


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="lorafleet")
    yield


@pytest.fixture
def settings(tmp_path: Path):
    """A home of its own; a local service started for it by a `Client` is stopped afterwards."""
    home = Settings(home=tmp_path / "home", tick_seconds=0.2)
    yield home
    stop_service(home.home)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for skill in ("counting", "colors", "animals"):
        write_skill_data(root / f"{skill}.jsonl", skill, 80)
    return root


def _spec(base: Path, data: Path, name: str = "job", steps: int = 6, **extra) -> dict:
    adapters = extra.pop("adapters", None) or [
        {"name": "counting", "data": {"path": str(data / "counting.jsonl"), "eval_fraction": 0.1}},
        {"name": "colors", "data": {"path": str(data / "colors.jsonl"), "eval_fraction": 0.1}},
    ]
    return {
        "name": name,
        "base_model": str(base),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "max_seq_len": 48,
            "eval_every": 0,
            "checkpoint_every": 3,
            "learning_rate": 5e-3,
        },
        "adapters": adapters,
        **extra,
    }


def _wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_submit_trains_a_job_with_a_child_that_waits_for_its_parent(
    tiny_base: Path, data_dir: Path, settings: Settings
) -> None:
    spec = _spec(
        tiny_base,
        data_dir,
        adapters=[
            {"name": "counting", "data": {"path": str(data_dir / "counting.jsonl"), "eval_fraction": 0.1}},
            {
                "name": "counting-more",
                "parent": "counting",
                "data": {"path": str(data_dir / "counting.jsonl")},
                "train": {"steps": 3},
            },
            {"name": "colors", "data": {"path": str(data_dir / "colors.jsonl"), "eval_fraction": 0.1}},
        ],
    )
    with Client(home=settings.home) as client:
        job = client.submit(spec)
        assert job.state == "pending" and [a.state for a in job.adapters] == ["queued"] * 3
        seen: list[int] = []
        view = job.wait(timeout=300, progress=lambda v, events: seen.extend(e.id for e in events))
        assert view.state == "succeeded", view
        assert seen == sorted(seen) and len(seen) > 0
        adapters = {a.name: a for a in view.adapters}
        for adapter in adapters.values():
            assert (
                adapter.state in TRAINED
                and Path(adapter.final_checkpoint, "adapter_model.safetensors").is_file()
            )
        parent, child = adapters["counting"], adapters["counting-more"]
        assert (child.parent, child.depth, child.root) == ("default/counting", 1, "default/counting")
        assert child.parent_checkpoint == parent.final_checkpoint
        assert child.step == 3 and parent.step == 6 and parent.eval_loss is not None
        assert read_adapter(Path(child.final_checkpoint)).lora.r == 4
        tree = client.lineage("counting-more")
        assert tree.name == "default/counting" and [c.name for c in tree.children] == [
            "default/counting-more"
        ]
    _assert_mirrored_in_mlflow(settings, view)


def _assert_mirrored_in_mlflow(settings: Settings, view) -> None:
    """The job's parent run, one child run per adapter, step histories, lineage tags, PEFT artifacts."""
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = MlflowClient(str(settings.mlflow_uri))

    def all_runs_finished() -> dict:
        """The service mirrors SQL's events to MLflow about once a second: the runs may trail the job."""
        experiment = client.get_experiment_by_name("lorafleet/default")
        found = client.search_runs([experiment.experiment_id]) if experiment else []
        return {r.info.run_name: r for r in found if r.info.status != "RUNNING"}

    _wait_until(lambda: len(all_runs_finished()) == 4, timeout=60)
    runs = all_runs_finished()
    assert set(runs) == {"job", "counting", "counting-more", "colors"}
    for run in runs.values():  # times come from the engine's events: a run lasts as long as its training
        assert run.info.end_time > run.info.start_time
    job_run = runs["job"].info.run_id
    assert runs["job"].info.status == "FINISHED"
    for name in ("counting", "counting-more", "colors"):
        run = runs[name]
        assert run.data.tags["mlflow.parentRunId"] == job_run and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, int(run.data.params["train.steps"]) + 1))
        assert run.data.tags["lorafleet.adapter"] == f"default/{name}"
    child = runs["counting-more"].data.tags
    assert child["lorafleet.lineage_path"] == "counting/counting-more"
    assert child["lorafleet.parent"] == "default/counting"
    assert "eval_loss" in runs["counting"].data.metrics and "perplexity" in runs["counting"].data.metrics
    local = client.download_artifacts(runs["counting-more"].info.run_id, "adapter", str(settings.home / "dl"))
    final = next(a.final_checkpoint for a in view.adapters if a.name == "counting-more")
    weights = "adapter_model.safetensors"
    assert (Path(local) / weights).read_bytes() == (Path(final) / weights).read_bytes()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(view.adapters[0].base_model), local)


def test_two_jobs_share_one_pack(tiny_base: Path, data_dir: Path, settings: Settings) -> None:
    plane = ControlPlane(settings=settings)
    first = plane.service.submit(
        JobSpec.parse(
            _spec(
                tiny_base,
                data_dir,
                "first",
                adapters=[{"name": "counting", "data": {"path": str(data_dir / "counting.jsonl")}}],
            )
        )
    )
    second = plane.service.submit(
        JobSpec.parse(
            _spec(
                tiny_base,
                data_dir,
                "second",
                adapters=[{"name": "animals", "data": {"path": str(data_dir / "animals.jsonl")}}],
            )
        )
    )
    plane.start()
    try:
        _wait_until(lambda: all(plane.service.job(j.id).done for j in (first, second)), timeout=300)
        assert {plane.service.job(j.id).state for j in (first, second)} == {"succeeded"}
        _wait_until(lambda: all(p.state != "running" for p in plane.store.list_packs()))  # the fit returns
        packs = plane.store.list_packs()
        assert len(packs) == 1 and packs[0].state == "succeeded"
        members = {m.adapter_id for m in plane.store.list_pack_members(packs[0].id)}
        assert members == {first.adapters[0].id, second.adapters[0].id}
    finally:
        plane.stop()


def test_cancel_stops_a_running_job(tiny_base: Path, data_dir: Path, settings: Settings) -> None:
    with Client(home=settings.home) as client:
        job = client.submit(_spec(tiny_base, data_dir, steps=100_000))
        _wait_until(lambda: any(a.step > 0 for a in job.refresh().adapters), timeout=180)
        client.cancel(job.id)
        view = job.wait(timeout=120)
        assert view.state == "cancelled"
        assert {a.state for a in view.adapters} == {"cancelled"}
        assert all(a.step < 100_000 for a in view.adapters)


def test_controller_restart_mid_job_resumes_from_checkpoints(
    tiny_base: Path, data_dir: Path, settings: Settings
) -> None:
    plane = ControlPlane(settings=settings)
    job = plane.service.submit(JobSpec.parse(_restart_spec(tiny_base, data_dir)), None)
    plane.start()
    try:
        _wait_until(lambda: plane.store.latest_checkpoint(job.adapters[0].id) is not None, timeout=180)
        plane.controller.stop(abandon_running=True)  # the controller dies; SQL still says "running"
        checkpointed = plane.store.latest_checkpoint(job.adapters[0].id).step
        assert plane.service.job(job.id).state == "running"
        restarted = Controller(settings, plane.store)
        restarted.start()
        try:
            _wait_until(lambda: plane.service.job(job.id).done, timeout=300)
            _wait_until(lambda: all(p.state != "running" for p in plane.store.list_packs()))
        finally:
            restarted.stop()
        view = plane.service.job(job.id)
        assert view.state == "succeeded" and view.adapters[0].step == RESTART_STEPS
        steps = [e.step for e in plane.service.events(job.id) if e.kind == "step"]
        # Events posted to the dead controller after its last recorded checkpoint are gone with it.
        assert max(steps) == RESTART_STEPS and set(range(1, checkpointed + 1)) <= set(steps), checkpointed
        # Resumed from the checkpoint, not from scratch: the steps it covered were not trained again.
        assert all(steps.count(s) == 1 for s in range(1, checkpointed + 1)), (checkpointed, steps)
        assert sorted((p.state, p.error) for p in plane.store.list_packs()) == [
            ("failed", "controller restarted"),
            ("succeeded", None),
        ]
    finally:
        plane.stop()


RETRY_STEPS = 100  # the cancel lands a few steps after the first checkpoint, well before the end


def test_a_cancelled_adapter_retried_by_name_resumes_from_its_newest_checkpoint(
    tiny_base: Path, data_dir: Path, settings: Settings
) -> None:
    """Issue 17: a cancelled (or failed) adapter trains again under its own name, resuming from its
    newest complete checkpoint (the steps up to it are not trained again), and its job runs again to
    success. Before: its name was taken for good, with no retry and no delete."""
    from workers.training import checkpoint as ckpt

    plane = ControlPlane(settings=settings)
    spec = _restart_spec(tiny_base, data_dir)
    spec["train"] |= {"steps": RETRY_STEPS}
    job = plane.service.submit(JobSpec.parse(spec), None)
    adapter_id = job.adapters[0].id
    plane.start()
    try:
        _wait_until(lambda: plane.store.latest_checkpoint(adapter_id) is not None, timeout=180)
        plane.service.cancel(job.id)
        _wait_until(lambda: plane.service.job(job.id).done, timeout=120)
        assert plane.service.job(job.id).state == "cancelled"
        cancelled = plane.store.get_adapter_by_id(adapter_id)
        assert cancelled.state == "cancelled" and cancelled.step < RETRY_STEPS
        resumed_from = ckpt.stored_steps(cancelled.output_dir)[-1][0]

        assert plane.service.retry_adapter("default", "counting").state == "queued"
        assert plane.service.job(job.id).state == "running"
        _wait_until(lambda: plane.service.job(job.id).done, timeout=300)
        view = plane.service.job(job.id)
        assert view.state == "succeeded" and view.adapters[0].step == RETRY_STEPS, view
        events = plane.service.events(job.id)
        steps = [e.step for e in events if e.kind == "step"]
        assert all(steps.count(s) == 1 for s in range(1, resumed_from + 1)), (resumed_from, steps)
        starts = [(e.step, e.payload["resumed"]) for e in events if e.kind == "start"]
        assert starts == [(0, False), (resumed_from, True)], starts
    finally:
        plane.stop()


def test_one_project_cannot_hold_every_worker(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    """Issue 15, item 9: two endless jobs of one project held both workers of the shared Ray (2 CPUs,
    one adapter per pack) and another project's 10-step job sat queued, with no reason given, until they
    were cancelled. Now the small job says why it waits, an endless adapter yields its worker after a
    time slice (checkpointed at the step it left, back to the queue), the small job finishes while the
    big project still trains, and the yielded adapter resumes at the very step it left: nothing redone."""
    settings = Settings(home=tmp_path / "home", tick_seconds=0.2, yield_after_seconds=8)
    plane = ControlPlane(settings=settings)

    def job(project: str, name: str, steps: int):
        adapters = [{"name": name, "data": {"path": str(data_dir / "counting.jsonl")}}]
        spec = _spec(tiny_base, data_dir, name, steps, project=project, adapters=adapters)
        spec["resources"] = {"cpus_per_worker": 1, "max_adapters_per_worker": 1}
        spec["train"]["checkpoint_every"] = 1_000_000  # only the yield writes a checkpoint
        return plane.service.submit(JobSpec.parse(spec))

    def events(job_id: str) -> list:
        found: list = []
        while page := plane.service.events(job_id, after_id=found[-1].id if found else 0):
            found += page
        return found

    endless = {name: job("big", name, 1_000_000) for name in ("endless-a", "endless-b")}
    plane.start()
    try:

        def adapters() -> list:
            return [plane.service.job(j.id).adapters[0] for j in endless.values()]

        # both packs launched (no free worker left), and one of them trains
        _wait_until(
            lambda: all(a.state == "training" for a in adapters()) and any(a.step for a in adapters()),
            timeout=300,
        )
        small = job("small", "quick", 10)
        _wait_until(lambda: plane.service.job(small.id).adapters[0].waiting == sched.WAITING_FOR_WORKER, 60)
        _wait_until(lambda: plane.service.job(small.id).done, timeout=300)
        assert plane.service.job(small.id).state == "succeeded"
        assert {plane.service.job(j.id).state for j in endless.values()} == {"running"}

        yielded = [
            e
            for j in endless.values()
            for e in events(j.id)
            if e.kind == "done" and e.payload["status"] == "yielded"
        ]
        left = min(yielded, key=lambda e: e.id)
        other = next(j for name, j in endless.items() if name != left.adapter)
        plane.service.cancel(other.id)  # its worker, too, is free now: the yielded adapter gets one

        def resumed() -> list:
            starts = [e for e in events(endless[left.adapter].id) if e.kind == "start"]
            return [e for e in starts if e.payload["resumed"] and e.id > left.id]

        _wait_until(lambda: resumed(), timeout=300)
        assert resumed()[0].step == left.step  # it starts again exactly where it left
        plane.service.cancel(endless[left.adapter].id)
        _wait_until(lambda: all(plane.service.job(j.id).done for j in endless.values()), timeout=120)
        for name, j in endless.items():
            steps = [e.step for e in events(j.id) if e.kind == "step"]
            assert steps == list(range(1, len(steps) + 1)), f"{name}: a step was redone or skipped"
    finally:
        plane.stop()


RESTART_STEPS = 300  # long enough that the controller dies mid-job however fast the tiny base trains


def _restart_spec(base: Path, data: Path) -> dict:
    spec = _spec(base, data, adapters=[{"name": "counting", "data": {"path": str(data / "counting.jsonl")}}])
    spec["train"] |= {"steps": RESTART_STEPS, "checkpoint_every": 5}
    return spec


def test_bad_specs_are_refused_and_nothing_is_written(
    tiny_base: Path, data_dir: Path, settings: Settings
) -> None:
    with Client(home=settings.home) as client:
        cases = {
            "adapters.0.data.path": _spec(
                tiny_base,
                data_dir,
                adapters=[{"name": "a", "data": {"path": str(data_dir / "missing.jsonl")}}],
            ),
            "adapters.0.parent": _spec(
                tiny_base,
                data_dir,
                adapters=[
                    {"name": "a", "parent": "nobody", "data": {"path": str(data_dir / "colors.jsonl")}}
                ],
            ),
            "adapters.0.lora.rank": _spec(
                tiny_base,
                data_dir,
                adapters=[
                    {"name": "a", "lora": {"rank": 2}, "data": {"path": str(data_dir / "colors.jsonl")}}
                ],
            ),
            "base_model": {**_spec(tiny_base, data_dir), "base_model": "smollm2-135m-instruct"},
        }
        for field, spec in cases.items():
            with pytest.raises(SpecError) as caught:
                client.submit(spec)
            assert field in dict(caught.value.problems), caught.value.problems
        assert client.jobs() == [] and client.adapters() == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(args: list[str], home: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_RAY_NUM_CPUS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_cli_submit_wait_json_and_bad_spec(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    try:
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            json.dumps(_spec(tiny_base, data_dir, adapters=[{"name": "Bad", "data": {"path": "x.jsonl"}}]))
        )
        refused = _cli(["submit", str(bad), "--json"], home)
        assert refused.returncode == 2 and refused.stdout == ""
        assert (
            "adapters.0.name" in refused.stderr and "adapters.0.data.path" in refused.stderr
        )  # both at once
        assert json.loads(_cli(["jobs", "--json"], home).stdout) == []

        good = tmp_path / "good.yaml"
        good.write_text(json.dumps(_spec(tiny_base, data_dir, steps=3)))
        done = _cli(["submit", str(good), "--wait", "--json"], home)
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
        assert view["state"] == "succeeded" and {a["state"] for a in view["adapters"]} <= TRAINED
        listed = json.loads(_cli(["adapters", "--json"], home).stdout)
        assert sorted(a["name"] for a in listed) == ["colors", "counting"]
        status = json.loads(_cli(["status", view["id"], "--json"], home).stdout)
        assert status["id"] == view["id"]
    finally:
        stop_service(home)


def test_remote_client_against_a_real_server(tiny_base: Path, data_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(tmp_path / "server-home"),
        "LORAFLEET_API_TOKEN": "s3cret",
        "LORAFLEET_RAY_NUM_CPUS": "2",
        "LORAFLEET_TICK_SECONDS": "0.2",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "server", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        _wait_until(lambda: _healthy(httpx, url), timeout=60)
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        with Client(url, "s3cret") as client:
            with pytest.raises(SpecError) as caught:
                client.submit(
                    _spec(tiny_base, data_dir, adapters=[{"name": "x", "data": {"path": "/nope.jsonl"}}])
                )
            assert "adapters.0.data.path" in dict(caught.value.problems)
            job = client.submit(_spec(tiny_base, data_dir, steps=3), idempotency_key="once")
            again = client.submit(_spec(tiny_base, data_dir, steps=3), idempotency_key="once")
            assert again.id == job.id
            view = job.wait(timeout=300)
            assert view.state == "succeeded"
            assert client.adapter("counting").state in TRAINED
            from orchestrator.client.client import ApiError

            with pytest.raises(ApiError) as missing:
                client.job("does-not-exist")
            assert missing.value.status == 404
    finally:
        server.terminate()
        server.wait(timeout=30)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _fill(volume: Path) -> Path:
    """Write until the volume is full (ENOSPC), as a careless neighbour's files would."""
    filler = volume / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 2**16)
                out.flush()
        except OSError:
            pass
    return filler


def test_storage_full_fails_with_the_cause_first_and_retry_resumes_from_the_newest_checkpoint(
    tiny_base: Path, data_dir: Path, tmp_path: Path, small_storage: Path
) -> None:
    """Storage fills mid-job: the adapter fails (as it must) with `ENOSPC` first in one line, no colour
    codes; SQL's newest checkpoint is the newest complete one on storage; once space is freed, `retry`
    finishes the adapter from it, redoing no step before it. Before: the cause was cut off the end of a
    Ray traceback, SQL could name an older checkpoint, and a failed adapter could never train again."""
    from workers.training import checkpoint as ckpt

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_storage)], check=True)
    settings = Settings(home=tmp_path / "home", storage=str(small_storage), tick_seconds=0.2)
    plane = ControlPlane(settings=settings)
    spec = _restart_spec(tiny_base, data_dir)
    spec["resources"] = {"max_failures": 0}
    job = plane.service.submit(JobSpec.parse(spec), None)
    adapter_id = job.adapters[0].id
    plane.start()
    try:
        _wait_until(lambda: plane.store.latest_checkpoint(adapter_id) is not None, timeout=180)
        filler = _fill(small_storage)
        _wait_until(lambda: plane.service.job(job.id).done, timeout=120)
        failed = plane.store.get_adapter_by_id(adapter_id)
        assert failed.state == "failed", failed
        first = failed.error.splitlines()[0]
        assert first.startswith("storage is full (ENOSPC") and "\x1b" not in failed.error, failed.error
        newest = ckpt.latest_checkpoint(failed.output_dir)
        assert newest is not None and plane.store.latest_checkpoint(adapter_id).path == newest
        resumed_from = plane.store.latest_checkpoint(adapter_id).step

        filler.unlink()  # the operator frees space, then retries
        assert plane.service.retry(job.id).state == "running"
        _wait_until(lambda: plane.service.job(job.id).done, timeout=300)
        view = plane.service.job(job.id)
        assert view.state == "succeeded" and view.adapters[0].step == RESTART_STEPS
        steps = [e.step for e in plane.service.events(job.id) if e.kind == "step"]
        assert all(steps.count(s) == 1 for s in range(1, resumed_from + 1)), (resumed_from, steps)
    finally:
        plane.stop()
