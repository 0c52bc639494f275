"""Concurrency against the real thing: a `lorafleet server` process under a burst of submissions, and the
store under many writers, on SQLite and on PostgreSQL (a fresh database per test, see conftest.py).

Clients retry: a submit that timed out may have been stored, so a client sends it again with the same
`Idempotency-Key`, possibly while the first is still in flight. Whatever the interleaving, each key must
give exactly one job, the same id to both sends, and no error.

Nothing trains: the specs name a hub id that cannot resolve offline (`HF_HUB_OFFLINE=1`), so the
controller fails each job at once, without Ray Train. No assertion is about time: timeouts are only
there so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from orchestrator.store import AdapterChange, NewAdapter, NewEvent, Store

pytestmark = pytest.mark.slow

TOKEN = "load-admin-secret"
KEYS = 50  # each sent twice: 100 submissions
THREADS = 16
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _family(pid: int) -> list[psutil.Process]:
    """The server and every process it started (Ray's GCS, raylet, workers), while it runs."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


@contextlib.contextmanager
def served(home: Path, db_url: str) -> Iterator[str]:
    """A `lorafleet server` subprocess on a free port; yields its URL. On the way out it is terminated
    and waited for, and every process it had started must be gone too (killed, and the test failed,
    if not)."""
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {
        **os.environ,
        "LORAFLEET_HOME": str(home),
        "LORAFLEET_API_TOKEN": TOKEN,
        "LORAFLEET_DB_URL": db_url,
        "LORAFLEET_RAY_NUM_CPUS": "1",
        "LORAFLEET_TICK_SECONDS": "0.2",
        "HF_HUB_OFFLINE": "1",  # the hub id fails here, at once, and never reaches for the network
    }
    log_path = home / "server.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "server", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []

    def healthy() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _until(healthy, START_TIMEOUT_S, "the server to answer /healthz")
        yield url
        assert server.poll() is None, f"the server died under load:\n{log_path.read_text()[-3000:]}"
    finally:
        family = _family(server.pid)
        server.terminate()
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        _gone, alive = psutil.wait_procs(family, timeout=60)
        for process in alive:  # ours: started by the server this test started
            with contextlib.suppress(psutil.Error):
                process.kill()
        assert not alive, f"processes left behind by the server: {[p.pid for p in alive]}"


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "skill.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    return path


def _spec(i: int, data: Path) -> dict[str, Any]:
    """Job `i`: one project for all (names compete in one namespace), its own adapter name."""
    return {
        "name": f"load-{i}",
        "project": "load",
        "base_model": "lorafleet-tests/no-such-model",
        "train": {"steps": 1, "batch_size": 1, "max_seq_len": 16},
        "adapters": [{"name": f"adapter-{i}", "data": {"path": str(data)}}],
    }


def test_concurrent_submissions_with_retried_keys_store_one_job_per_key(
    db_url: str, data_file: Path, tmp_path: Path
) -> None:
    """100 submissions from 16 threads against a real server: 50 keys, each sent twice, the two sends of
    a key next to each other in the queue so they are in flight together."""
    sends = [i for i in range(KEYS) for _ in range(2)]
    with served(tmp_path / "home", db_url) as url:
        answers: list[tuple[int, int, str]] = []
        lock = threading.Lock()
        with httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=THREADS, max_keepalive_connections=THREADS),
        ) as client:

            def submit(i: int) -> None:
                response = client.post(
                    "/v1/jobs", json=_spec(i, data_file), headers={"Idempotency-Key": f"k-{i}"}
                )
                with lock:
                    answers.append((i, response.status_code, response.text))

            with ThreadPoolExecutor(max_workers=THREADS) as pool:
                for future in [pool.submit(submit, i) for i in sends]:
                    future.result()  # a transport error (refused, timed out) fails here, with its cause

            bad = [(i, status, text[:300]) for i, status, text in answers if status not in (200, 201)]
            assert not bad, bad
            ids: dict[int, set[str]] = {}
            for i, _, text in answers:
                ids.setdefault(i, set()).add(json.loads(text)["id"])
            assert len(answers) == 2 * KEYS
            assert all(len(job_ids) == 1 for job_ids in ids.values()), ids  # both sends, one job
            assert len({next(iter(job_ids)) for job_ids in ids.values()}) == KEYS

            listed = client.get("/v1/jobs", params={"project": "load"})
            assert listed.status_code == 200 and len(listed.json()) == KEYS
            with Store(db_url) as store:  # what SQL holds, not what the API says
                jobs = store.list_jobs(project="load")
                assert len(jobs) == KEYS
                assert {j.id for j in jobs} == {next(iter(v)) for v in ids.values()}
                assert len(store.list_adapters(project="load")) == KEYS

            # the controller then fails every one of them (the base cannot load), each once, with the reason
            def all_failed() -> list[dict[str, Any]] | None:
                views = client.get("/v1/jobs", params={"project": "load"}).json()
                return views if all(v["state"] == "failed" for v in views) else None

            views = _until(all_failed, 300, "the controller to fail all 50 jobs", interval=2)
            assert all("base_model" in (v["error"] or "") for v in views)


# ---- the store under many writers ----


def test_concurrent_state_updates_lose_nothing(store: Store) -> None:
    """Writers racing on one adapter, as the controller, the tracker and API requests may: per-thread
    metric keys all arrive with their own last and best values, a shared key's best is the minimum of
    everything anyone wrote (a read-modify-write that would lose updates without the row lock), every
    event is recorded once, and the step is one somebody wrote."""
    threads, rounds = 8, 20
    job, (adapter,), _ = store.create_job(
        "race", "job", {}, [NewAdapter(name="a", base_model="tiny", data={"path": "a.jsonl"})]
    )
    # The shared row exists before the race: updates race, not creation. Two first writes of one new key
    # at once are not safe on PostgreSQL (both INSERT; one gets a Conflict); the controller is the one
    # writer of metrics, so that does not happen in the service.
    store.upsert_metrics(adapter.id, {"shared_loss": (1000.0, 0)})
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def value(t: int, r: int) -> float:
        return float((t * 7919 + r * 104729) % 1009)  # distinct-ish, not ordered by time

    def writer(t: int) -> None:
        try:
            start.wait(timeout=60)
            for r in range(rounds):
                v = value(t, r)
                store.upsert_metrics(adapter.id, {"shared_loss": (v, r), f"own_{t}_loss": (v, r)})
                store.update_adapter(AdapterChange(adapter.id, step=t * 1000 + r))
                store.record_events(
                    [NewEvent(job_id=job.id, adapter_id=adapter.id, kind="step", step=r, payload={"t": t})]
                )
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a writer hung"
    assert not errors, errors

    metrics = {m.key: m for m in store.get_metrics(adapter.id)}
    assert set(metrics) == {"shared_loss", *(f"own_{t}_loss" for t in range(threads))}
    everything = [value(t, r) for t in range(threads) for r in range(rounds)]
    assert metrics["shared_loss"].best_value == min([1000.0, *everything])
    assert metrics["shared_loss"].last_value in everything
    for t in range(threads):
        own = metrics[f"own_{t}_loss"]
        assert own.best_value == min(value(t, r) for r in range(rounds))
        assert (own.last_value, own.step) == (value(t, rounds - 1), rounds - 1)
    events = store.list_events(job.id, limit=10_000)
    assert len(events) == threads * rounds and len({e.id for e in events}) == threads * rounds
    assert sorted((e.payload["t"], e.step) for e in events) == [
        (t, r) for t in range(threads) for r in range(rounds)
    ]
    assert store.get_adapter_by_id(adapter.id).step in {
        t * 1000 + r for t in range(threads) for r in range(rounds)
    }
