"""Shared fixtures: one tiny LLaMA-style base (random init, saved and re-loaded via from_pretrained)."""

from __future__ import annotations

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
    """Tests that start a home's local service stop it themselves; this catches any one that did not."""
    yield
    from orchestrator.localservice import stop_service

    for info in tmp_path_factory.getbasetemp().rglob("service/service.json"):
        stop_service(info.parent.parent)
