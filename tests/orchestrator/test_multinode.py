"""lorafleet on a real two-node Ray cluster: a head and a second node, each its own `ray start` with its
own processes, the server pointed at it with LORAFLEET_RAY_ADDRESS, and a job whose two packs land on
both nodes (read from the engine's start events). Both nodes are stopped, and their processes gone,
at the end. (Both nodes run on this machine, each with one CPU: the scheduling is Ray's, for real.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator import Client
from orchestrator.server.local import kill_ray_session
from workers.training.synthetic import write_skill_data

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node(args: list[str], temp: Path) -> subprocess.Popen:
    """`ray start --block` in a session of its own: stopping it stops that node and nothing else
    (`ray stop` would stop every Ray on the machine)."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the node's group, then SIGKILL what is left: its raylet and GCS go at once, but `ray start
    --block` itself lingers ~33 s after a SIGTERM (measured here), which cost every run of this test."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture
def cluster() -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="lfray", dir="/tmp"))  # short: Ray's socket paths are bounded
    port = _free_port()  # never 6379: Redis holds it
    address = f"127.0.0.1:{port}"
    head = _node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], temp)
    nodes = [head]
    try:
        _wait_for_nodes(address, 1, head)
        second = _node([f"--address={address}", "--num-cpus=1", '--resources={"second": 1}'], temp)
        nodes.append(second)
        _wait_for_nodes(address, 2, second)
        yield address
    finally:
        for node in reversed(nodes):
            _stop(node)
        deadline = time.monotonic() + 30  # a stopped node's workers exit on their own, soon
        while _holding(temp) and time.monotonic() < deadline:
            time.sleep(1)
        kill_ray_session(str(temp))  # whatever did not
        time.sleep(1)
        assert not _holding(temp), "Ray processes outlived their nodes"
        shutil.rmtree(temp, ignore_errors=True)


def _holding(temp: Path) -> list[int]:
    """Processes still holding files of the cluster's Ray sessions."""
    import psutil

    pids = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if any(f.path.startswith(str(temp)) for f in process.open_files()):
                pids.append(process.pid)
    return pids


def _wait_for_nodes(address: str, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(len([n for n in ray.nodes() if n['Alive']]))"
    )
    while time.monotonic() < deadline:
        assert process.poll() is None, "ray start exited"
        done = subprocess.run(
            [sys.executable, "-c", probe, address],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_AUTH_MODE": "token"},  # the nodes run with token authentication
        )
        if done.returncode == 0 and done.stdout.strip().endswith(str(count)):
            return
        time.sleep(1)
    raise AssertionError(f"the cluster did not reach {count} nodes")


def test_packs_of_one_job_land_on_both_nodes(cluster: str, tiny_base: Path, tmp_path: Path) -> None:
    for skill in ("counting", "colors"):
        write_skill_data(tmp_path / f"{skill}.jsonl", skill, 60)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "LORAFLEET_HOME": str(tmp_path / "home"),
        "LORAFLEET_RAY_ADDRESS": cluster,
        "LORAFLEET_STORAGE": str(tmp_path / "storage"),  # a path every node sees (one machine here)
        "LORAFLEET_API_TOKEN": "cluster-admin",
        "LORAFLEET_TICK_SECONDS": "0.2",
        "RAY_AUTH_MODE": "token",  # the cluster's nodes run with Ray's token authentication
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "server", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        spec = {
            "name": "spread",
            "base_model": str(tiny_base),
            "lora": {"r": 4, "alpha": 8},
            "train": {"steps": 4, "batch_size": 4, "max_seq_len": 48, "eval_every": 0, "checkpoint_every": 0},
            "adapters": [
                {"name": s, "data": {"path": str(tmp_path / f"{s}.jsonl")}} for s in ("counting", "colors")
            ],
            # one adapter per pack, one CPU per worker: two packs, and each node has one CPU
            "resources": {"workers": 1, "cpus_per_worker": 1, "max_adapters_per_worker": 1},
        }
        with Client(url, "cluster-admin") as client:
            job = client.submit(spec)
            view = job.wait(timeout=600)
            assert view.state == "succeeded", view
            starts = [e for e in job.events() if e.kind == "start"]
        nodes = {e.payload["node"] for e in starts}
        assert len(starts) == 2 and len(nodes) == 2 and None not in nodes, json.dumps(
            [e.payload for e in starts]
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
