"""Checkpoints, resume and event logs on a real S3-compatible server (moto, started by the test).

The engine writes and reads `s3://` locations through the same code as directories: a checkpoint is
whole or invisible (its marker is uploaded last), a pack resumed from S3 checkpoints ends bit-for-bit
where an uninterrupted local run does, and nothing of it touches the local disk but temp copies.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from orchestrator.control.packrun import EVENTS, EventLog
from tests.workers.conftest import TaskFactory, final_weights, max_weight_diff, plan_of
from workers import storage
from workers.contract.plan import CheckpointEvent, Event, LoraConfig, StepEvent
from workers.engine.multilora import MultiLoraModel, linear_module_names
from workers.training import checkpoint as ckpt
from workers.training.pack import run_pack


def _adapter(tiny_base: Path) -> MultiLoraModel:
    model = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32))
    model.add_adapter("a", LoraConfig(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]), seed=3)
    with torch.no_grad():
        for weights in model.adapters["a"].modules.values():
            weights.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def _write(model: MultiLoraModel, dest: str, tiny_base: Path, step: int) -> str:
    return ckpt.write_checkpoint(
        dest,
        model.adapters["a"],
        base_model=str(tiny_base),
        all_linear_paths=linear_module_names(model.base),
        training_state={"step": step},
        meta={"step": step},
    )


def test_checkpoints_in_s3_list_prune_and_read_back_like_local_ones(
    tiny_base: Path, tmp_path: Path, s3_bucket: str, s3_server
) -> None:
    model = _adapter(tiny_base)
    remote = f"s3://{s3_bucket}/adapters/p/a"
    for step in (5, 10, 15):
        _write(model, ckpt.checkpoint_dir(remote, step), tiny_base, step)
        _write(model, ckpt.checkpoint_dir(tmp_path, step), tiny_base, step)
    # An upload cut short (everything but the marker) is never listed, so never resumed from.
    client = s3_server.client()
    client.put_object(
        Bucket=s3_bucket, Key="adapters/p/a/checkpoint-00000020/adapter_model.safetensors", Body=b"x"
    )
    assert [storage.name(c) for c in ckpt.list_checkpoints(remote)] == [
        "checkpoint-00000005",
        "checkpoint-00000010",
        "checkpoint-00000015",
    ]
    assert ckpt.latest_checkpoint(remote) == f"{remote}/checkpoint-00000015"
    ckpt.prune_checkpoints(remote, keep=2)
    assert [storage.name(c) for c in ckpt.list_checkpoints(remote)] == [
        "checkpoint-00000010",
        "checkpoint-00000015",
    ]
    assert ckpt.read_training_state(ckpt.latest_checkpoint(remote)) == {"step": 15}
    assert ckpt.read_meta(ckpt.latest_checkpoint(remote))["step"] == 15
    ours, theirs = (
        ckpt.read_adapter(ckpt.latest_checkpoint(remote)),
        ckpt.read_adapter(ckpt.checkpoint_dir(tmp_path, 15)),
    )
    assert ours.weights.keys() == theirs.weights.keys()
    for path, weights in ours.weights.items():
        assert torch.equal(weights.lora_A, theirs.weights[path].lora_A)
        assert torch.equal(weights.lora_B, theirs.weights[path].lora_B)
    # Rewriting a checkpoint replaces it whole: no file of the old one is left beside the new one.
    client.put_object(Bucket=s3_bucket, Key="adapters/p/a/checkpoint-00000015/stale.bin", Body=b"old")
    _write(model, ckpt.checkpoint_dir(remote, 15), tiny_base, 16)
    assert "stale.bin" not in storage.files(ckpt.checkpoint_dir(remote, 15))
    assert ckpt.read_meta(ckpt.checkpoint_dir(remote, 15))["step"] == 16
    assert not list(tmp_path.glob("**/lorafleet-*"))  # temp copies are gone


def test_a_pack_resumed_from_s3_checkpoints_ends_where_an_uninterrupted_run_does(
    tiny_base: Path, make_task: TaskFactory, s3_bucket: str, s3_server
) -> None:
    kw = {"steps": 12, "checkpoint_every": 4, "lora": {"dropout": 0.2}, "warmup_steps": 3}
    straight = [make_task("counting", out="straight", **kw), make_task("colors", out="straight", **kw)]
    run_pack(plan_of(tiny_base, *straight))

    remote = [
        t.model_copy(update={"output_dir": f"s3://{s3_bucket}/adapters/p/{t.name}"})
        for t in (make_task("counting", **kw), make_task("colors", **kw))
    ]

    def crash_after_step_8(event: Event) -> None:
        if isinstance(event, CheckpointEvent) and event.step == 8 and event.adapter == "colors":
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_pack(plan_of(tiny_base, *remote), emit=crash_after_step_8)
    assert not ckpt.is_complete(storage.join(remote[0].output_dir, ckpt.FINAL_DIR))
    events: list[Event] = []
    result = run_pack(plan_of(tiny_base, *remote), emit=events.append)  # Ray Train's restart does this
    assert next(e.step for e in events if isinstance(e, StepEvent) and e.adapter == "counting") == 9
    assert {d.status for d in result.adapters.values()} == {"trained"}
    for local, s3 in zip(straight, remote, strict=True):
        done = result.adapters[s3.name]
        assert done.final_dir == f"{s3.output_dir}/final"
        assert max_weight_diff(final_weights(local), final_weights(s3)) <= 1e-6
    keys = s3_server.keys(s3_bucket, "adapters/p/counting/")
    assert "adapters/p/counting/final/adapter_model.safetensors" in keys
    assert "adapters/p/counting/final/lorafleet.json" in keys


def test_the_event_log_in_s3_reads_back_every_batch_in_order(s3_bucket: str) -> None:
    log = EventLog(f"s3://{s3_bucket}/storage", "pack-1")
    batches = [
        [
            StepEvent(
                pack_id="pack-1",
                adapter="a",
                step=s,
                loss=1 / s,
                lr=1e-3,
                grad_norm=1,
                tokens=s,
                tokens_per_s=1,
            )
            for s in (i, i + 1)
        ]
        for i in (1, 3, 5)
    ]
    for batch in batches:
        log.append(EVENTS.dump_json(batch).decode())
    again = EventLog(f"s3://{s3_bucket}/storage", "pack-1").read()  # as the next controller reads it
    assert [e.step for e in again] == [1, 2, 3, 4, 5, 6]
    assert [e.id for e in again] == [e.id for batch in batches for e in batch]
