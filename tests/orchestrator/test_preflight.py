"""Submit-time checks: every problem of a spec at once, schema and outside world together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.service import Service
from orchestrator.settings import Settings
from orchestrator.spec import SpecError
from orchestrator.store import Store


@pytest.fixture
def service(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir()
    with Store.open(settings.database_url) as store:
        yield Service(settings, store)


def _problems(service: Service, spec: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        service.submit(spec)
    return dict(caught.value.problems)


def test_schema_errors_do_not_hide_missing_files_unknown_parents_or_a_bad_base(
    service: Service, tmp_path: Path
) -> None:
    problems = _problems(
        service,
        {
            "name": "Bad Name",
            "base_model": str(tmp_path / "no-model"),
            "lora": {"rank": 4},
            "adapters": [
                {"name": "a", "parent": "ghost", "data": {"path": str(tmp_path / "missing.jsonl")}},
                {"name": "b", "data": {"path": str(tmp_path / "also-missing.jsonl")}, "priority": "high"},
            ],
        },
    )
    assert set(problems) == {
        "name",
        "lora.rank",
        "base_model",
        "adapters.0.parent",
        "adapters.0.data.path",
        "adapters.1.data.path",
        "adapters.1.priority",
    }
    assert "does not exist" in problems["base_model"] and "ghost" in problems["adapters.0.parent"]
    assert service.store.list_jobs() == []


def test_a_malformed_first_record_is_refused_at_submit_with_line_and_field(
    service: Service, tiny_base: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    wrong_field = tmp_path / "fields.jsonl"
    wrong_field.write_text(json.dumps({"prompt": "p", "completion": 3}) + "\n")
    problems = _problems(
        service,
        {
            "name": "job",
            "base_model": str(tiny_base),
            "adapters": [
                {"name": "a", "data": {"path": str(data)}},
                {"name": "b", "data": {"path": str(wrong_field)}},
            ],
        },
    )
    assert "line 2: invalid JSON" in problems["adapters.0.data.path"]
    assert "field `completion` must be a string" in problems["adapters.1.data.path"]


@pytest.mark.parametrize(
    ("base", "ok"),
    [
        ("Qwen/Qwen2.5-0.5B", True),  # a hub id: resolved where the job runs
        ("gpt2", True),
        ("not a model!", False),
        ("./nowhere", False),
    ],
)
def test_base_model_is_a_loadable_directory_or_a_well_formed_hub_id(
    service: Service, tiny_base: Path, tmp_path: Path, base: str, ok: bool
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    spec = {"name": "job", "base_model": base, "adapters": [{"name": "a", "data": {"path": str(data)}}]}
    if ok:
        assert service.check(spec)[0].base_model == base
    else:
        assert "base_model" in _problems(service, spec)


def test_a_directory_without_a_loadable_config_is_refused(service: Service, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    spec = {
        "name": "job",
        "base_model": str(broken),
        "adapters": [{"name": "a", "data": {"path": str(data)}}],
    }
    assert "cannot load the model config" in _problems(service, spec)["base_model"]
