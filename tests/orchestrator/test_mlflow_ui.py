"""The MLflow UI served from a job's store, seen by a real browser: headless Chromium (Debian `chromium`).

A job with two adapters is mirrored to MLflow without Ray (store events + `Tracker.sync`), `mlflow ui` serves
that store, and Chromium loads it: a screenshot of the experiment's runs table must be a real, non-blank
page, and the job run's page must list the adapter runs as its child runs. The REST API of the same server
is checked for what those pages show: the job run and its children, nested by `mlflow.parentRunId`.
docs/screenshot_mlflow_ui.py makes the docs' picture (docs/mlflow-ui.png), children expanded.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.store import AdapterChange, NewAdapter, NewEvent, Store
from orchestrator.tracking.mirror import Tracker, experiment_name

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 1280, 800
ADAPTERS = ("ui-root", "ui-branch")  # the branch is trained from the root's weights


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mirrored_job(tmp_path: Path) -> str:
    """A finished job with two adapters, mirrored to sqlite MLflow under tmp_path; returns the backend URI."""
    store = Store.open(f"sqlite:///{tmp_path / 'lf.db'}")
    data = {"path": "/data/x.jsonl"}
    root, branch = ADAPTERS
    job, adapters, _ = store.create_job(
        "uiproj",
        "ui-job",
        {"base_model": "base", "adapters": [{}, {}]},
        [
            NewAdapter(name=root, base_model="base", data=data, lora={"r": 4}, train={"steps": 3}),
            NewAdapter(name=branch, base_model="base", data=data, parent_name=root, train={"steps": 3}),
        ],
    )
    events = []
    for adapter in adapters:
        start = {"pack_id": "p1", "data_fingerprint": "f" * 64, "train_examples": 10, "eval_examples": 2}
        events.append(NewEvent(job.id, "start", adapter.id, 0, start))
        events += [
            NewEvent(
                job.id,
                "step",
                adapter.id,
                step,
                {"loss": 3.0 / step, "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": 0.5},
            )
            for step in (1, 2, 3)
        ]
        events.append(NewEvent(job.id, "done", adapter.id, 3, {"status": "trained", "final_dir": None}))
    store.record_events(events)
    for adapter in adapters:
        store.update_adapter(AdapterChange(adapter.id, state="training"))
        store.update_adapter(AdapterChange(adapter.id, state="trained"))
    store.set_job_state(job.id, "succeeded")
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert Tracker(store, backend, tmp_path / "mlflow-artifacts").sync() == len(events)
    return backend


def _chromium(tmp_path: Path, profile: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run, offline-safe, on a fresh profile; the page's scripts get 15 s of
    virtual time (which does not advance while its API calls are in flight)."""
    assert CHROMIUM is not None
    profile_dir = tmp_path / profile
    profile_dir.mkdir()
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile_dir}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=15000",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium for a headless browser (apt-get install -y chromium)"
)
def test_mlflow_ui_shows_the_job_run_with_its_adapter_child_runs(tmp_path: Path) -> None:
    from PIL import Image  # pillow comes with mlflow (through matplotlib)

    backend = _mirrored_job(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend),
            *("--default-artifact-root", (tmp_path / "mlflow-artifacts").as_uri()),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": "*"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"mlflow ui exited with {server.returncode}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow ui did not answer within 90 s"
            time.sleep(0.5)

        # What the pages show, as the server's REST API gives it: the job run and its nested adapter runs.
        experiment = httpx.get(
            f"{url}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment_name("uiproj")},
            timeout=30,
        ).json()["experiment"]
        experiment_id = experiment["experiment_id"]
        found = httpx.post(
            f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment_id]}, timeout=30
        ).json()["runs"]
        runs = {run["info"]["run_name"]: run for run in found}
        assert set(runs) == {"ui-job", *ADAPTERS}
        job_run_id = runs["ui-job"]["info"]["run_id"]
        assert runs["ui-job"]["info"]["status"] == "FINISHED"
        children = {}
        for name in ADAPTERS:
            tags = {tag["key"]: tag["value"] for tag in runs[name]["data"]["tags"]}
            assert tags["mlflow.parentRunId"] == job_run_id
            assert tags["lorafleet.kind"] == "adapter"
            assert runs[name]["info"]["status"] == "FINISHED"
            children[name] = runs[name]["info"]["run_id"]

        # The experiment's runs table, in the browser: a real page of the requested size, not a blank one.
        shot = tmp_path / "runs.png"
        runs_page = f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        browser = _chromium(tmp_path, "profile-shot", f"--screenshot={shot}", runs_page)
        assert browser.returncode == 0, browser.stderr[-2000:]
        data = shot.read_bytes()
        assert _png_size(data) == (WIDTH, HEIGHT)
        with Image.open(shot) as image:
            colors = image.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT)
        assert colors is not None and len(colors) > 64, f"a near-blank page: {colors and len(colors)} colors"
        assert max(count for count, _ in colors) < 0.95 * WIDTH * HEIGHT, "one color fills the page"

        # The job run's page lists the adapter runs as its child runs, each a link to its own run page.
        job_page = f"{url}/#/experiments/{experiment_id}/runs/{job_run_id}"
        for attempt in range(3):  # a loaded machine may need longer for the page's API calls than one try
            browser = _chromium(tmp_path, f"profile-dom-{attempt}", "--dump-dom", job_page)
            assert browser.returncode == 0, browser.stderr[-2000:]
            dom = browser.stdout
            if "Child runs" in dom:
                break
        assert "Child runs" in dom, dom[-2000:]
        assert "ui-job" in dom
        for name, run_id in children.items():
            assert f"#/experiments/{experiment_id}/runs/{run_id}" in dom, f"no link to {name}'s run"
            assert f">{name}<" in dom
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
