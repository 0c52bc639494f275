"""Training sessions on a tiny random base: exact against a pack, exact beside neighbours, isolated."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.workers.conftest import TaskFactory, final_weights, plan_of
from workers.contract.plan import LoraConfig
from workers.contract.sessions import AdamParams, Datum, LossFnInputs, SamplingParams
from workers.engine.examples import IGNORE_INDEX, Example
from workers.engine.model import load_base
from workers.sessions.host import SessionHost
from workers.training import checkpoint as ckpt
from workers.training.data import SampleStream, load_adapter_data
from workers.training.pack import run_pack

LORA_PATH = "model.layers.0.self_attn.q_proj"
LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
ADAM = AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.5)


def _host(base: Path, **kw) -> SessionHost:
    return SessionHost(load_base(str(base), device="cpu"), str(base), **kw)


def _weights(host: SessionHost, session: str) -> dict[str, torch.Tensor]:
    adapter = host.sessions[session].adapter
    return {
        f"{p}.{m}": getattr(w, m).detach().clone()
        for p, w in adapter.modules.items()
        for m in ("lora_A", "lora_B")
    }


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _datums(examples: list[Example]) -> list[Datum]:
    """A pack's micro-batch as datums whose cross-entropy is the pack's loss: the mean over its targets."""
    n = sum(ex.n_targets for ex in examples)
    out = []
    for ex in examples:
        targets = [
            t if t != IGNORE_INDEX else i for t, i in zip(ex.labels[1:], ex.input_ids[1:], strict=True)
        ]
        weights = [0.0 if t == IGNORE_INDEX else 1.0 / n for t in ex.labels[1:]]
        out.append(
            Datum(
                model_input=list(ex.input_ids[:-1]),
                loss_fn_inputs=LossFnInputs(target_tokens=targets, weights=weights),
            )
        )
    return out


def _random_data(seed: int, n: int = 3, vocab: int = 512) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        tokens = torch.randint(7, vocab, (length + 1,), generator=g).tolist()
        data.append(Datum.from_sequence(tokens, weights=torch.rand(length, generator=g).tolist()))
    return data


def _rl_data(seed: int) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for d in _random_data(seed, n=2):
        n = d.length
        inputs = d.loss_fn_inputs.model_copy(
            update={
                "logprobs": (-torch.rand(n, generator=g) * 8).tolist(),
                "advantages": torch.randn(n, generator=g).tolist(),
            }
        )
        data.append(Datum(model_input=d.model_input, loss_fn_inputs=inputs))
    return data


def _call(seed: int, step: int, call: int) -> tuple[list[Datum], str]:
    """Session `seed`'s data and loss for one call: each session has its own kind of loss."""
    kind = ("cross_entropy", "importance_sampling", "ppo")[seed % 3]
    key = 100 * seed + 10 * step + call
    return (_random_data(key, n=2) if kind == "cross_entropy" else _rl_data(key)), kind


def _drive(host: SessionHost, session: str, seed: int, steps: int = 2) -> None:
    """Queue a session's whole script (each step: two calls, then a step)."""
    for step in range(steps):
        for call in range(2):
            host.forward_backward(session, *_call(seed, step, call))
        host.optim_step(session, ADAM)


def test_a_session_trains_exactly_as_a_pack_trains_the_same_adapter(
    tiny_base: Path, make_task: TaskFactory
) -> None:
    task = make_task(
        "counting",
        lora=LORA.model_dump(),
        data={"eval_fraction": 0.0},
        steps=3,
        lr_schedule="constant",
        weight_decay=0.01,
        max_grad_norm=0.5,
    )
    run_pack(plan_of(tiny_base, task))
    packed = final_weights(task)

    host = _host(tiny_base)
    data = load_adapter_data(
        task.data,
        host.tokenizer,
        task.train.max_seq_len,
        task.train.seed,
        task.name,
        max_record_bytes=task.max_record_bytes,
        eval_records=task.eval.max_examples,
    )
    stream = SampleStream(len(data.train), task.train.seed, task.name)
    session = host.create_session(task.name, LORA, seed=task.train.seed)
    initial = _weights(host, session)
    for _ in range(task.train.steps):
        batch = [data.train[i] for i in stream.next_indices(task.train.batch_size)]
        host.forward_backward(session, _datums(batch))
        host.optim_step(session, ADAM)
    host.run_until_idle()
    assert host.sessions[session].step == 3
    assert _diff(_weights(host, session), packed) < 1e-5
    assert _diff(_weights(host, session), initial) > 1e-3  # it did train

    # and a pack's checkpoint starts a session: its weights, and optionally its AdamW state and step
    final = str(Path(task.output_dir) / "final")
    resumed = host.create_session("resumed", from_state=final, with_optimizer=True)
    fresh_optimizer = host.create_session("branched", from_state=final)
    assert host.sessions[resumed].step == 3 and host.sessions[fresh_optimizer].step == 0
    assert host.sessions[resumed].optimizer.state and not host.sessions[fresh_optimizer].optimizer.state
    for name in (resumed, fresh_optimizer):
        assert all(torch.equal(_weights(host, name)[k], packed[k]) for k in packed)


@pytest.mark.parametrize(("k", "steps"), [(2, 2), (8, 1)])
def test_sessions_sharing_cycles_equal_each_alone(tiny_base: Path, k: int, steps: int) -> None:
    host = _host(tiny_base)
    alone = []
    for i in range(k):  # one at a time: each session alone in its cycles
        host.create_session(f"s{i}", LORA, seed=i)
        _drive(host, f"s{i}", i, steps)
        host.run_until_idle()
        alone.append(_weights(host, f"s{i}"))
        host.close_session(f"s{i}")
        host.run_until_idle()
    assert host.counters["max_sessions_per_pass"] == 1

    shared = _host(tiny_base, pass_tokens=64, max_passes_per_cycle=3)  # several passes, several cycles
    for i in range(k):
        shared.create_session(f"s{i}", LORA, seed=i)
    for i in range(k):
        _drive(shared, f"s{i}", i, steps)
    shared.run_until_idle()
    assert shared.counters["max_sessions_per_pass"] > 1
    assert shared.counters["cycles"] < host.counters["cycles"] - k  # closes aside, fewer cycles
    for i in range(k):
        assert shared.sessions[f"s{i}"].step == steps
        assert _diff(_weights(shared, f"s{i}"), alone[i]) < 1e-5


def test_results_resolve_per_call_and_report_the_loss(tiny_base: Path) -> None:
    host = _host(tiny_base)
    a, b = host.create_session("a", LORA), host.create_session("b", LORA, seed=1)
    data = _random_data(1)
    fa = host.forward_backward(a, data)
    fb = host.forward(b, data)
    step = host.optim_step(a, ADAM)
    assert not fa.done()
    host.run_until_idle()
    out = fa.result()
    assert len(out.loss_fn_outputs) == 3
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        assert len(o["logprobs"]) == d.length and all(x < 0 for x in o["logprobs"])
        expected = [-w * lp for w, lp in zip(d.loss_fn_inputs.weights, o["logprobs"], strict=True)]
        assert o["elementwise_loss"] == pytest.approx(expected, rel=1e-6)
    assert out.loss == pytest.approx(sum(sum(o["elementwise_loss"]) for o in out.loss_fn_outputs), rel=1e-6)
    # fresh adapters (B = 0) are the base: both sessions see the same logprobs
    assert fb.result().loss_fn_outputs[0]["logprobs"] == pytest.approx(
        out.loss_fn_outputs[0]["logprobs"], abs=1e-5
    )
    assert step.result().step == 1 and step.result().metrics["grad_norm"] > 0


def test_a_custom_loss_trains_as_the_same_builtin_loss(tiny_base: Path) -> None:
    data = _random_data(7)

    def weighted_ce(
        batch: list[Datum], logprobs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum(
            -(torch.tensor(d.loss_fn_inputs.weights) * lp).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {"tokens": float(sum(d.length for d in batch))}

    results = []
    for custom in (False, True):
        host = _host(tiny_base)
        s = host.create_session("s", LORA)
        for _ in range(2):
            out = (
                host.forward_backward_custom(s, data, weighted_ce)
                if custom
                else host.forward_backward(s, data)
            )
            host.optim_step(s, ADAM)
        host.run_until_idle()
        results.append((_weights(host, s), out.result()))
    assert _diff(results[0][0], results[1][0]) < 1e-6
    assert results[1][1].loss == pytest.approx(results[0][1].loss, rel=1e-5)
    assert results[1][1].metrics["tokens"] == sum(d.length for d in data)


def test_save_then_load_round_trips_bit_for_bit(tiny_base: Path, tmp_path: Path) -> None:
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    _drive(host, s, 0)
    saved = host.save_state(s, str(tmp_path / "state"))
    host.run_until_idle()
    assert saved.result() == str(tmp_path / "state")
    files = ckpt.read_adapter(tmp_path / "state")  # a PEFT adapter, as packs write them
    assert files.lora.r == 4 and sorted(files.weights) == sorted(host.sessions[s].adapter.modules)

    copy = host.create_session("copy", from_state=str(tmp_path / "state"), with_optimizer=True)
    assert host.sessions[copy].step == 2
    w, c = _weights(host, s), _weights(host, copy)
    assert all(torch.equal(w[key], c[key]) for key in w)
    for name in (s, copy):  # one more identical step: the optimizer state came along too
        _drive(host, name, 5, steps=1)
    host.run_until_idle()
    w, c = _weights(host, s), _weights(host, copy)
    assert all(torch.equal(w[key], c[key]) for key in w)

    other = host.create_session("other", LORA, seed=3)
    host.load_state(other, str(tmp_path / "state"))
    host.run_until_idle()
    assert host.sessions[other].step == 2
    loaded = _weights(host, other)
    saved_w = {f"{p}.{m}": getattr(x, m) for p, x in files.weights.items() for m in ("lora_A", "lora_B")}
    assert all(torch.equal(loaded[key], saved_w[key]) for key in saved_w)


def test_a_malformed_datum_fails_its_call_and_leaves_everyone_untouched(tiny_base: Path) -> None:
    def run(bad: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        host = _host(tiny_base)
        a, b = host.create_session("a", LORA), host.create_session("b", LORA, seed=1)
        _drive(host, a, 0, steps=1)
        if bad:
            good = _random_data(3)
            broken = Datum(model_input=[1, 2, 9999], loss_fn_inputs={"target_tokens": [1, 2, 3]})
            with pytest.raises(ValueError, match=r"data\[2\]\.model_input` holds token id 9999"):
                host.forward_backward(b, [*good[:2], broken])
            with pytest.raises(ValueError, match="advantages"):
                host.forward_backward(
                    b,
                    [
                        Datum(
                            model_input=[1, 2],
                            loss_fn_inputs={"target_tokens": [1, 2], "advantages": [0.0, math.inf]},
                        )
                    ],
                    "ppo",
                )
        _drive(host, b, 1, steps=1)
        host.run_until_idle()
        return _weights(host, a), _weights(host, b)

    clean, dirty = run(False), run(True)
    for x, y in zip(clean, dirty, strict=True):
        assert all(torch.equal(x[key], y[key]) for key in x)


def test_sampling_with_a_seed_is_repeatable_and_ignores_neighbours(tiny_base: Path) -> None:
    params = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.95, seed=11, stop=[])
    prompt = [1, 20, 30, 40]
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    _drive(host, s, 0, steps=1)
    host.run_until_idle()

    def sample(neighbours: int) -> list[list[int]]:
        future = host.sample(s, prompt, num_samples=3, sampling_params=params)
        for i in range(neighbours):  # other sessions' samples in the same batch, other prompt lengths
            host.sample(f"n{i}", [1, *range(50, 50 + 3 * i + 1)], num_samples=2, sampling_params=params)
        host.run_until_idle()
        out = future.result()
        assert all(seq.stop_reason == "length" and len(seq.tokens) == 6 for seq in out.sequences)
        return [seq.tokens for seq in out.sequences]

    alone = sample(0)
    assert alone == sample(0)
    for i in range(2):
        host.create_session(f"n{i}", LORA, seed=i + 1)
        _drive(host, f"n{i}", i + 1, steps=1)
    host.run_until_idle()
    assert sample(2) == alone
    assert len({tuple(t) for t in alone}) > 1  # the samples of one request differ from each other
    other = host.sample(s, prompt, num_samples=3, sampling_params=params.model_copy(update={"seed": 12}))
    host.run_until_idle()
    assert [seq.tokens for seq in other.result().sequences] != alone


def test_sample_logprobs_are_compute_logprobs_at_temperature_one(tiny_base: Path) -> None:
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    _drive(host, s, 0, steps=1)
    prompt = [1, 20, 30]
    sampled = host.sample(s, prompt, sampling_params=SamplingParams(max_tokens=5, seed=3, stop=[]))
    host.run_until_idle()
    seq = sampled.result().sequences[0]
    scored = host.compute_logprobs(s, [*prompt, *seq.tokens])
    host.run_until_idle()
    values = scored.result()
    assert values[0] is None and len(values) == len(prompt) + len(seq.tokens)
    assert values[len(prompt) :] == pytest.approx(seq.logprobs, abs=1e-4)


def test_a_background_thread_runs_queued_calls(tiny_base: Path) -> None:
    host = _host(tiny_base)
    host.start()
    try:
        s = host.create_session("s", LORA)
        fb = host.forward_backward(s, _random_data(0))
        step = host.optim_step(s, ADAM)
        assert step.result(timeout=60).step == 1 and fb.result(timeout=60).loss > 0
        host.close_session(s).result(timeout=60)
        assert "s" not in host.sessions and "s" not in host.model.adapters
        with pytest.raises(ValueError, match="no open session"):
            host.optim_step(s)
    finally:
        host.shutdown()


def test_a_failing_custom_loss_fails_only_its_own_call(tiny_base: Path) -> None:
    host = _host(tiny_base)
    a, b = host.create_session("a", LORA), host.create_session("b", LORA, seed=1)

    def broken(batch: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise RuntimeError("the client's loss is wrong")

    bad = host.forward_backward_custom(a, _random_data(0), broken)
    good = host.forward_backward(b, _random_data(1))
    host.run_until_idle()
    with pytest.raises(RuntimeError, match="client's loss"):
        bad.result()
    assert good.result().loss > 0
    assert host.counters["max_sessions_per_pass"] == 2  # they did share the pass


def test_a_call_over_the_pass_budget_runs_alone_in_passes_and_trains_the_same(tiny_base: Path) -> None:
    data = [Datum.from_sequence(list(range(10 + i, 26 + i))) for i in range(3)]  # 15 tokens (+1) each
    results = []
    for pass_tokens in (40, 1024):
        host = _host(tiny_base, pass_tokens=pass_tokens)
        s = host.create_session("s", LORA)
        out = host.forward_backward(s, data)
        host.optim_step(s, ADAM)
        host.run_until_idle()
        results.append((_weights(host, s), out.result(), host.counters["passes"]))
    (split, split_out, split_passes), (whole, whole_out, whole_passes) = results
    assert (split_passes, whole_passes) == (2, 1)
    assert _diff(split, whole) < 1e-6
    assert split_out.loss == pytest.approx(whole_out.loss, rel=1e-5)

    host = _host(tiny_base, pass_tokens=15)
    s = host.create_session("s", LORA)
    with pytest.raises(ValueError, match=r"`data\[0\]\.model_input` has 15 tokens, more than one pass"):
        host.forward_backward(s, data)
    host = _host(tiny_base, pass_tokens=20)  # each datum fits, the two together do not
    s = host.create_session("s", LORA)
    with pytest.raises(ValueError, match="custom loss has 32 tokens, more than one pass holds"):
        host.forward_backward_custom(s, data[:2], lambda d, lp: (lp[0].sum(), {}))


def test_clients_on_their_own_threads_get_what_they_would_alone(tiny_base: Path) -> None:
    import threading

    host = _host(tiny_base)
    alone = []
    for i in range(3):
        host.create_session(f"s{i}", LORA, seed=i)
        _drive(host, f"s{i}", i)
        host.run_until_idle()
        alone.append(_weights(host, f"s{i}"))
        host.close_session(f"s{i}")
        host.run_until_idle()

    host.start()
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            s = host.create_session(f"s{i}", LORA, seed=i)  # the same name: the same initial A
            for step in range(2):  # wait for each step, as an interactive client does
                for call in range(2):
                    host.forward_backward(s, *_call(i, step, call))
                host.optim_step(s, ADAM).result(timeout=120)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        host.shutdown()
    assert not errors
    for i in range(3):
        assert _diff(_weights(host, f"s{i}"), alone[i]) < 1e-5


def test_a_custom_loss_over_http_is_forward_then_cross_entropy_with_minus_its_gradient(
    tiny_base: Path,
) -> None:
    """What a remote client does (it cannot send a function): `forward` for the logprobs, its loss's
    gradient g computed at home, then `cross_entropy` with weights -g. It trains as the in-process call."""
    data = _random_data(5)

    def variance(batch: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.var(torch.cat(logprobs)), {}

    local = _host(tiny_base)
    s = local.create_session("s", LORA)
    local.forward_backward_custom(s, data, variance)
    local.optim_step(s, ADAM)
    local.run_until_idle()

    host = _host(tiny_base)
    remote = host.create_session("s", LORA)
    seen = host.forward(remote, data)
    host.run_until_idle()
    leaves = [torch.tensor(o["logprobs"], requires_grad=True) for o in seen.result().loss_fn_outputs]
    grads = torch.autograd.grad(variance(data, leaves)[0], leaves)
    sent = [
        Datum(
            model_input=d.model_input,
            loss_fn_inputs=LossFnInputs(target_tokens=d.loss_fn_inputs.target_tokens, weights=(-g).tolist()),
        )
        for d, g in zip(data, grads, strict=True)
    ]
    host.forward_backward(remote, sent)
    host.optim_step(remote, ADAM)
    host.run_until_idle()
    assert _diff(_weights(local, s), _weights(host, remote)) < 1e-5
    assert float(host.sessions[remote].adapter.modules[LORA_PATH].lora_B.detach().abs().max()) > 0


def test_a_step_on_a_non_finite_gradient_is_refused_and_drops_it(tiny_base: Path) -> None:
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    before = _weights(host, s)
    d = _random_data(0, n=1)[0]
    huge = Datum(
        model_input=d.model_input,
        loss_fn_inputs=LossFnInputs(target_tokens=d.loss_fn_inputs.target_tokens, weights=[3e38] * d.length),
    )
    host.forward_backward(s, [huge])
    refused = host.optim_step(s, ADAM)
    host.run_until_idle()
    with pytest.raises(ValueError, match="gradient is not finite"):
        refused.result()
    assert _diff(_weights(host, s), before) == 0.0
    host.forward_backward(s, [d])
    step = host.optim_step(s, ADAM)
    host.run_until_idle()
    assert step.result().step == 1 and _diff(_weights(host, s), before) > 0


def test_a_sample_stops_at_its_own_stop_token_or_text(tiny_base: Path) -> None:
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=[])
    free = host.sample(s, [1, 20, 30], sampling_params=params)
    host.run_until_idle()
    tokens = free.result().sequences[0].tokens
    assert len(tokens) == 12
    text = host.tokenizer.decode(tokens[4:6])
    k_text = next(k for k in range(1, 13) if text in host.tokenizer.decode(tokens[:k]))
    by_token = host.sample(s, [1, 20, 30], sampling_params=params.model_copy(update={"stop": [tokens[3]]}))
    by_text = host.sample(
        s, [1, 20, 30], sampling_params=SamplingParams(**{**params.model_dump(), "stop": text})
    )
    host.run_until_idle()
    first = tokens.index(tokens[3]) + 1
    assert by_token.result().sequences[0].tokens == tokens[:first]
    assert by_token.result().sequences[0].stop_reason == "stop"
    assert by_text.result().sequences[0].tokens == tokens[:k_text]
    assert by_text.result().sequences[0].stop_reason == "stop"
    assert len(by_text.result().sequences[0].logprobs) == k_text


def test_datums_with_and_without_weights_mix_in_one_call(tiny_base: Path) -> None:
    host = _host(tiny_base)
    s = host.create_session("s", LORA)
    weighted, plain = _random_data(2, n=2)
    plain = Datum(
        model_input=plain.model_input, loss_fn_inputs={"target_tokens": plain.loss_fn_inputs.target_tokens}
    )
    out = host.forward(s, [weighted, plain])
    host.run_until_idle()
    first, second = out.result().loss_fn_outputs
    w = weighted.loss_fn_inputs.weights
    assert first["elementwise_loss"] == pytest.approx(
        [-a * b for a, b in zip(w, first["logprobs"], strict=True)]
    )
    assert second["elementwise_loss"] == pytest.approx([-b for b in second["logprobs"]])
