"""Submit-time checks: every problem of a spec at once, schema and outside world together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.job import SpecError
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


# ---- the server's limits (issue 15, items 10 and 11) ----


@pytest.fixture
def small_limits(tmp_path: Path):
    settings = Settings(
        home=tmp_path / "limited",
        max_adapters_per_job=3,
        max_train_steps=1000,
        max_tokens_per_adapter=1_024_000,
        max_record_bytes=4096,
    )
    settings.home.mkdir()
    with Store.open(settings.database_url) as store:
        yield Service(settings, store)


def test_a_job_over_the_adapter_limit_is_refused_before_any_adapter_or_file_is_checked(
    small_limits: Service, tmp_path: Path
) -> None:
    """Issue 15, item 10: a 5,000-adapter spec was accepted after 52 s. Over the limit, the answer names
    the count, the limit and the setting, and comes before 5,000 adapters are validated or read."""
    adapters = [{"name": f"a{i}", "data": {"path": str(tmp_path / f"missing-{i}.jsonl")}} for i in range(4)]
    problems = _problems(
        small_limits, {"name": "wide", "base_model": "Qwen/Qwen2.5-0.5B", "adapters": adapters}
    )
    assert problems == {
        "adapters": "4 adapters is over this server's limit of 3 per job; split the job, or ask the admin "
        "to raise LORAFLEET_MAX_ADAPTERS_PER_JOB"
    }
    assert small_limits.store.list_jobs() == []


def test_steps_and_token_budget_over_the_limits_name_the_field_value_limit_and_setting(
    small_limits: Service, tmp_path: Path
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n")
    spec = {
        "name": "long",
        "base_model": "Qwen/Qwen2.5-0.5B",
        "train": {"steps": 1001},
        "adapters": [
            {"name": "a", "data": {"path": str(data)}},  # the job's 1001 steps
            {"name": "b", "data": {"path": str(data)}},  # the same: reported once, on `train.steps`
            {"name": "c", "data": {"path": str(data)}, "train": {"steps": 1000, "max_seq_len": 4096}},
        ],
    }
    problems = _problems(small_limits, spec)
    assert set(problems) == {"train.steps", "adapters.2.train"}
    assert problems["train.steps"] == (
        "1001 steps is over this server's limit of 1000; train fewer steps, or ask the admin to raise "
        "LORAFLEET_MAX_TRAIN_STEPS"
    )
    assert problems["adapters.2.train"].startswith(
        "16384000 tokens (steps 1000 x batch_size 4 x grad_accum_steps 1 x max_seq_len 4096) is over this "
        "server's limit of 1024000 per adapter"
    )
    assert "LORAFLEET_MAX_TOKENS_PER_ADAPTER" in problems["adapters.2.train"]
    spec["train"] = {"steps": 1000}
    spec["adapters"][2]["train"] = {"steps": 250, "max_seq_len": 1024}
    assert small_limits.submit(spec).name == "long"  # at the limits: accepted


def test_a_record_over_the_limit_in_the_first_records_is_refused_at_submit(
    small_limits: Service, tmp_path: Path
) -> None:
    """Issue 15, item 11: a one-line file of any size passed submit (and the server read it whole)."""
    data = tmp_path / "one-line.jsonl"
    line = json.dumps({"text": "x" * 100_000})
    data.write_text(line)
    spec = {
        "name": "big",
        "base_model": "Qwen/Qwen2.5-0.5B",
        "adapters": [{"name": "a", "data": {"path": str(data)}}],
    }
    problems = _problems(small_limits, spec)
    assert problems == {
        "adapters.0.data.path": f"{data}: line 1: a record of {len(line)} bytes is larger than 4096 bytes, "
        "the largest record this server reads; split it, or ask the admin to raise LORAFLEET_MAX_RECORD_BYTES"
    }
