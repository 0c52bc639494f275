"""After training: lineage across jobs, branching, promotion to the MLflow registry, export, generate.

One module-scoped home (and its local service) trains a root job (auto-promoted), a child branched from it
and a grandchild branched with 0 steps: three Ray Train runs in all, shared by the tests below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from orchestrator import Client
from orchestrator.cli.commands import app
from orchestrator.server.local import stop_service
from orchestrator.settings import Settings
from workers.serving import AdapterServer
from workers.training.synthetic import write_skill_data

pytestmark = pytest.mark.slow


@dataclass
class Trained:
    client: Client
    settings: Settings
    data: Path


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lifecycle")
    data = {s: write_skill_data(root / f"{s}.jsonl", s, 200) for s in ("counting", "colors")}
    settings = Settings(home=root / "home", tick_seconds=0.2)
    client = Client(home=settings.home)
    spec = {
        "name": "root-job",
        "base_model": str(tiny_base),
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "train": {
            "steps": 40,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_seq_len": 64,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
        "adapters": [{"name": s, "data": {"path": str(p), "eval_fraction": 0.1}} for s, p in data.items()],
        "promotion": {"metric": "eval_loss", "max": 100.0, "alias": "champion", "auto": True},
    }
    assert client.submit(spec).wait(timeout=300).state == "succeeded"
    child = client.branch(
        "counting", "counting-v2", data=data["counting"], eval_data=data["counting"], train={"steps": 5}
    )
    assert child.wait(timeout=300).state == "succeeded"
    grandchild = client.branch("counting-v2", "counting-v3", data=data["counting"], train={"steps": 0})
    assert grandchild.wait(timeout=300).state == "succeeded"
    yield Trained(client, settings, root)
    client.close()
    stop_service(settings.home)


def test_three_level_tree_across_three_jobs(trained: Trained) -> None:
    client = trained.client
    v3 = client.adapter("counting-v3")
    assert (v3.parent, v3.root, v3.depth) == ("default/counting-v2", "default/counting", 2)
    v2 = client.adapter("counting-v2")  # branched with --eval-data: it and its parent measured on it
    assert v2.eval_loss is not None and "parent_eval_loss" in v2.metrics
    assert len({client.adapter(n).job_id for n in ("counting", "counting-v2", "counting-v3")}) == 3
    tree = client.lineage("counting-v2")
    assert tree.name == "default/counting" and tree.parent is None
    assert [c.name for c in tree.children] == ["default/counting-v2"]
    assert [g.name for g in tree.children[0].children] == ["default/counting-v3"]
    assert tree.children[0].children[0].parent == "default/counting-v2"
    assert client.lineage("colors").children == []

    result = CliRunner().invoke(
        app, ["lineage", "counting", "--json"], env={"LORAFLEET_HOME": str(trained.settings.home)}
    )
    assert result.exit_code == 0, result.output
    nested = json.loads(result.stdout)
    assert nested["children"][0]["children"][0]["name"] == "default/counting-v3"
    assert set(nested) == {"name", "parent", "status", "metrics", "children"}


def test_branch_with_zero_steps_reproduces_its_parent_bit_for_bit(trained: Trained) -> None:
    parent = trained.client.adapter("counting-v2")
    child = trained.client.adapter("counting-v3")
    assert child.parent_checkpoint == parent.final_checkpoint
    ours = load_file(str(Path(child.final_checkpoint) / "adapter_model.safetensors"))
    theirs = load_file(str(Path(parent.final_checkpoint) / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_gate_pass_registers_a_version_and_moves_the_alias(trained: Trained) -> None:
    client, mlflow = trained.client, MlflowClient(str(trained.settings.mlflow_uri))
    assert client.adapter("counting").state == "promoted"  # auto: the job's gate passed after training
    first = mlflow.get_model_version_by_alias("default.counting", "champion")
    assert int(first.version) == 1 and first.tags["lorafleet.lineage_path"] == "counting"
    assert first.run_id and first.source.endswith("/adapter")  # the adapter run's logged artifacts

    again = client.promote("counting", alias="champion")
    assert again.decision == "promoted" and again.version == 2 and "<= max 100.0" in again.reason
    assert mlflow.get_model_version_by_alias("default.counting", "champion").version == 2
    staging = client.promote("counting", alias="staging")
    assert mlflow.get_model_version_by_alias("default.counting", "staging").version == staging.version


def test_gate_fail_sets_no_alias_and_keeps_the_reason(trained: Trained) -> None:
    client, mlflow = trained.client, MlflowClient(str(trained.settings.mlflow_uri))
    decision = client.promote("counting-v3")  # branched without eval data: nothing to gate on
    assert decision.decision == "rejected" and "eval_path" in decision.reason and decision.alias is None
    assert client.adapter("counting-v3").state == "rejected"
    assert mlflow.search_registered_models(filter_string="name='default.counting-v3'") == []
    forced = client.promote("counting-v3", alias="manual", force=True)
    assert forced.decision == "promoted" and forced.reason.startswith("forced past a failed gate")
    assert mlflow.get_model_version_by_alias("default.counting-v3", "manual").version == 1


def test_a_branched_child_is_promoted_only_if_it_beats_its_parent(trained: Trained) -> None:
    """No gate condition written: a child is measured against its parent on the child's eval data."""
    client, data = trained.client, trained.data
    worse = client.adapter("counting-v2")  # 5 steps more, from a fresh optimizer at lr 1e-2: it overshoots
    parent_loss = worse.metrics["parent_eval_loss"]
    assert worse.eval_loss > parent_loss
    rejected = client.promote("counting-v2")
    assert rejected.decision == "rejected" and rejected.alias is None
    assert rejected.reason == (
        f"eval_loss {worse.eval_loss:.4f} does not beat the parent's eval_loss {parent_loss:.4f} "
        "on the same eval data"
    )
    assert client.adapter("counting-v2").state == "rejected"

    learner = client.branch(  # colors taught to count, measured on counting: its parent never learnt it
        "colors",
        "colors-counting",
        data=data / "counting.jsonl",
        eval_data=data / "counting.jsonl",
        train={"steps": 8},
    )
    assert learner.wait(timeout=300).state == "succeeded"
    better = client.adapter("colors-counting")
    parent_loss = better.metrics["parent_eval_loss"]
    assert better.eval_loss < parent_loss
    promoted = client.promote("colors-counting")
    assert promoted.decision == "promoted" and promoted.alias == "champion"
    assert promoted.reason == f"eval_loss {better.eval_loss:.4f} beats the parent's {parent_loss:.4f}"


def test_export_peft_and_merged_give_the_adapter_logits(trained: Trained, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = trained.client
    adapter = client.adapter("colors")
    peft_dir = client.export("colors", tmp_path / "peft")
    merged_dir = client.export("colors", tmp_path / "merged", merged=True)
    assert "default/colors" in (merged_dir / "README.md").read_text()
    ids = torch.randint(10, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(adapter.base_model)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, peft_dir).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
    assert float((merged - expected).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="not empty"):
        client.export("colors", tmp_path / "merged")


def test_generate_two_adapters_batched_equals_each_alone(trained: Trained) -> None:
    client = trained.client
    counting, colors = (Path(client.adapter(n).final_checkpoint) for n in ("counting", "colors"))
    server = AdapterServer(client.adapter("counting").base_model, capacity=2, device="cpu")
    prompts = [(counting, "counting: three"), (colors, "colors: green")]
    together = server.generate(prompts, max_new_tokens=8)
    alone = [server.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone
    assert together[0].split()[:2] == ["four", "five"] and together[1].split()[:2] == ["blue", "purple"]
    assert client.generate("colors", "colors: green", max_new_tokens=8) == together[1]
    raw = server.generate([prompts[1]], max_new_tokens=8, raw=True)[0]  # no BOS: not how it trained
    env = {"LORAFLEET_HOME": str(trained.settings.home)}
    said = CliRunner().invoke(
        app, ["generate", "colors", "colors: green", "--raw", "--max-new-tokens", "8", "--json"], env=env
    )
    assert said.exit_code == 0, said.output
    assert json.loads(said.stdout)["text"] == raw
    assert client.generate("colors", "colors: green", max_new_tokens=8, raw=True) == raw
