"""The job spec: defaults merged per adapter, every problem named by its field, paths made absolute."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec.job import JobSpec, SpecError, json_schema
from workers.contract.plan import LoraConfig, branch_problems

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


def _two(job_eval=None, own_eval=None, promotion=None):
    adapters = [{"name": "a", "data": {"path": "a.jsonl"}}, {"name": "b", "data": {"path": "b.jsonl"}}]
    if own_eval is not None:
        adapters[1]["eval"] = own_eval
    spec = _minimal(adapters=adapters)
    if job_eval is not None:
        spec["eval"] = job_eval
    if promotion is not None:
        spec["promotion"] = promotion
    return spec


def test_an_adapters_eval_overrides_the_jobs_field_by_field() -> None:
    spec = JobSpec.parse(_two({"scorers": ["token_f1"], "max_new_tokens": 32}, {"samples": 3}))
    assert spec.adapter_eval(0).scorers == ["token_f1"] and spec.adapter_eval(0).samples == 10
    own = spec.adapter_eval(1)
    assert own.scorers == ["token_f1"] and own.max_new_tokens == 32 and own.samples == 3
    assert spec.eval_of("b") == own
    assert JobSpec.parse(_minimal()).adapter_eval(0).scorers == ["exact_match", "token_f1"]  # the default


@pytest.mark.parametrize(
    ("source", "field", "fragment"),
    [
        (_two(own_eval={"scorers": ["nope"]}), "adapters.1.eval.scorers", "unknown scorer 'nope'"),
        (_two(own_eval={"max_new_tokens": 0}), "adapters.1.eval.max_new_tokens", "greater than 0"),
        (_two(own_eval={"scorer": ["exact_match"]}), "adapters.1.eval.scorer", "unknown field"),
        (_two({"scorers": ["regex"]}), "eval", "needs `eval.pattern`"),
        (_two(own_eval={"scorers": ["regex"], "pattern": "("}), "adapters.1.eval", "regular expr"),
        (
            _two({"scorers": ["json_schema"], "json_schema": {"type": 12}}),
            "eval",
            "not a valid JSON Schema",
        ),
        (
            _two(own_eval={"scorers": ["token_f1"]}, promotion={"metric": "eval_exact_match"}),
            "promotion.metric",
            "not recorded for adapter 'b'",
        ),
        (
            _two(own_eval={"scorers": ["token_f1"]}, promotion={"metric": "eval_exact_match"}),
            "promotion.metric",
            "add `exact_match` to `eval.scorers`",
        ),
        (
            _two(own_eval={"max_examples": 0}, promotion={"metric": "eval_exact_match"}),
            "promotion.metric",
            "`eval.max_examples` above 0",
        ),
        (_minimal(promotion={"metric": "accuracy"}), "promotion.metric", "choose one it records"),
        (_minimal(promotion={"metric": "a b"}), "promotion.metric", "pattern"),
    ],
)
def test_bad_eval_configs_and_gates_name_the_field(source, field: str, fragment: str) -> None:
    problems = _problems(source)
    assert field in problems, problems
    assert fragment in problems[field]


def test_a_gate_on_any_recorded_metric_is_accepted() -> None:
    """The README's example, a user scorer's metric, the token accuracy every eval records."""
    readme = {"metric": "eval_exact_match", "min": 0.8, "better_than_parent": True}
    assert JobSpec.parse(_minimal(promotion=readme)).promotion.metric == "eval_exact_match"
    user = _two({"scorers": ["my_scorers.grading:polite"]}, promotion={"metric": "eval_polite"})
    assert JobSpec.parse(user).adapter_eval(1).scorers == ["my_scorers.grading:polite"]
    JobSpec.parse(_minimal(promotion={"metric": "eval_token_accuracy", "min": 0.5}))


def test_the_schema_shows_the_eval_fields() -> None:
    schema = json_schema()
    assert "eval" in schema["properties"] and "EvalConfig" in schema["$defs"]
    assert "eval" in schema["$defs"]["AdapterSpec"]["properties"]
    assert "eval_exact_match" in schema["$defs"]["PromotionPolicy"]["properties"]["metric"]["description"]


def test_a_child_keeps_its_parents_rank_and_targets_checked_in_one_place():
    """`branch_problems` is the one check (the service on spec words, the engine on module paths):
    rank and targets shape the inherited A/B; alpha and dropout are the child's own."""
    parent = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    assert branch_problems(parent, parent.model_copy(update={"alpha": 32.0, "dropout": 0.2})) == []
    (rank,) = branch_problems(parent, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "team/p")
    assert "`lora.r` 8" in rank and "parent 'team/p''s rank 4" in rank and "keeps its parent's rank" in rank
    (targets,) = branch_problems(parent, LoraConfig(r=4, target_modules="all-linear"))
    assert "`lora.target_modules` 'all-linear'" in targets and "its parent's ['q_proj', 'v_proj']" in targets
    paths = [f"model.layers.{i}.self_attn.q_proj" for i in range(30)]
    both = branch_problems(LoraConfig(r=2, target_modules=paths), LoraConfig(r=4, target_modules=paths[:2]))
    assert len(both) == 2 and "... (30 in all)]" in both[1] and len(both[1]) < 600  # long path lists cut
