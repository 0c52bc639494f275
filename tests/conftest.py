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
