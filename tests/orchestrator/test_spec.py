"""The job spec: defaults merged per adapter, every problem named by its field, paths made absolute."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import JobSpec, SpecError, json_schema

DESIGN_EXAMPLE = """
name: support-bots
project: default
base_model: ./models/tiny
quantization: none
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}
train: {steps: 100, batch_size: 4, learning_rate: 1.0e-3, max_seq_len: 256, seed: 0,
        eval_every: 50, checkpoint_every: 50, warmup_steps: 0}
adapters:
  - name: billing
    data: {path: data/billing.jsonl, eval_path: data/billing-eval.jsonl}
  - name: refunds
    data: {path: data/all.jsonl, shard: {count: 4, index: 1}, eval_fraction: 0.1}
    lora: {r: 16, alpha: 32}
    train: {learning_rate: 5.0e-4}
  - name: refunds-fr
    parent: refunds
    data: {path: data/fr.jsonl}
promotion: {metric: eval_loss, max: 2.0, alias: champion, auto: true}
resources: {workers: 1, gpus_per_worker: 0, max_adapters_per_worker: 8}
"""


def _minimal(**overrides):
    spec = {"name": "j", "base_model": "some/model", "adapters": [{"name": "a", "data": {"path": "a.jsonl"}}]}
    return {**spec, **overrides}


def _problems(source) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        JobSpec.parse(source)
    return dict(caught.value.problems)


def test_the_design_example_parses_with_overrides_merged(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(DESIGN_EXAMPLE)
    spec = JobSpec.parse(path)
    assert spec.adapter_lora(1).r == 16 and spec.adapter_lora(1).alpha == 32
    assert spec.adapter_lora(0).r == 8 and spec.adapter_lora(1).target_modules == ["q_proj", "v_proj"]
    assert spec.adapter_train(1).learning_rate == 5e-4 and spec.adapter_train(1).steps == 100
    assert spec.adapters[0].data.path == tmp_path / "data" / "billing.jsonl"  # relative to the spec file
    assert spec.base_model == str(tmp_path / "models" / "tiny")
    assert spec.adapters[2].parent == "refunds" and spec.promotion.auto
    assert spec.resources.max_tokens_per_pass is None  # the engine's default for the device


@pytest.mark.parametrize(
    ("source", "field", "fragment"),
    [
        (_minimal(extra=1), "extra", "unknown field"),
        (_minimal(adapters=[{"name": "Bad Name", "data": {"path": "a"}}]), "adapters.0.name", "invalid"),
        (
            _minimal(adapters=[{"name": "a", "data": {"path": "a"}, "lora": {"rank": 4}}]),
            "adapters.0.lora.rank",
            "unknown field",
        ),
        (
            _minimal(adapters=[{"name": "a", "data": {"path": "a"}, "train": {"steps": -1}}]),
            "adapters.0.train.steps",
            "greater than or equal to 0",
        ),
        (_minimal(adapters=[{"name": "a"}]), "adapters.0.data", "required"),
        (_minimal(adapters=[]), "adapters", "at least 1"),
        (
            _minimal(adapters=[{"name": "a", "data": {"path": "x"}}, {"name": "a", "data": {"path": "y"}}]),
            "adapters.1.name",
            "used twice",
        ),
        (
            _minimal(
                adapters=[
                    {"name": "a", "parent": "b", "data": {"path": "x"}},
                    {"name": "b", "parent": "a", "data": {"path": "y"}},
                ]
            ),
            "adapters.0.parent",
            "ancestor",
        ),
        ("name: [unclosed", "spec", "YAML"),
        (_minimal(resources={"max_tokens_per_pass": 0}), "resources.max_tokens_per_pass", "greater than 0"),
    ],
)
def test_bad_specs_name_the_field(source, field: str, fragment: str) -> None:
    problems = _problems(source)
    assert field in problems, problems
    assert fragment in problems[field]


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_kbit_base_needs_no_gpu(quantization: str) -> None:
    """bitsandbytes runs on CPU: a k-bit base on CPU workers is a valid spec (it was refused)."""
    spec = JobSpec.parse(_minimal(quantization=quantization))
    assert spec.quantization == quantization and spec.resources.gpus_per_worker == 0


def test_all_problems_are_reported_at_once() -> None:
    problems = _problems(
        _minimal(name="BAD", adapters=[{"name": "a", "data": {"path": "a"}, "lora": {"r": 0}}])
    )
    assert {"name", "adapters.0.lora.r"} <= set(problems)


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    spec = JobSpec.parse(_minimal(), base_dir=tmp_path)
    assert spec.adapters[0].data.path.is_absolute()
    assert spec.adapters[0].data.path.parent == tmp_path
    gguf = JobSpec.parse(_minimal(base_model="models/base.gguf"), base_dir=tmp_path)
    assert gguf.base_model == str(tmp_path / "models" / "base.gguf")  # a file, not a hub id


def test_json_schema_describes_the_spec() -> None:
    schema = json_schema()
    assert schema["title"] == "JobSpec" and "adapters" in schema["properties"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("name", ["ok\n", "a" * 101, "..", "Upper", "sp ace"])
def test_names_are_whole_safe_and_short(name: str) -> None:
    problems = _problems(_minimal(adapters=[{"name": name, "data": {"path": "a.jsonl"}}]))
    assert "adapters.0.name" in problems
