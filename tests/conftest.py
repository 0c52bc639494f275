"""Shared fixtures: one tiny LLaMA-style base (random init, saved and re-loaded via from_pretrained)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from workers.tiny import build_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session", autouse=True)
def _no_local_service_left_behind(tmp_path_factory: pytest.TempPathFactory):
    """Tests that start a home's local service stop it themselves; this catches any one that did not,
    and ends what is left of the Ray the test process itself started (e.g. a pack it abandoned)."""
    yield
    import ray

    from orchestrator.controller import ray_session_dir
    from orchestrator.localservice import kill_ray_session, stop_service

    for info in tmp_path_factory.getbasetemp().rglob("service/service.json"):
        stop_service(info.parent.parent)
    if ray.is_initialized():  # the in-process Ray some tests share: its abandoned actors too
        session = ray_session_dir()
        ray.shutdown()
        if session:
            kill_ray_session(session)


@pytest.fixture(scope="session")
def s3_server():
    """One real S3-compatible server (moto, its own process) for the session."""
    from tests.s3server import s3_server as start

    with start() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, and this process's environment pointed at the server the standard AWS way."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.new_bucket()


@pytest.fixture
def small_storage(tmp_path: Path):
    """A real 256 KiB tmpfs for storage faults (full, or remounted read-only): root may mount one here
    and in CI; skipped with the reason where mount is not permitted. Grow it with `remount,size=`."""
    mount_point = tmp_path / "storage"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
