"""Training sessions over the HTTP API and the Python client (`TrainingClient`), on a tiny random base.

The app runs in-process (FastAPI's TestClient over the real ASGI app, a real SQLite store, no
controller); the `Client` talks to it through that transport, from its pool of sender threads. What a
session computes is compared with a `SessionHost` driven directly on the same batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from orchestrator.client.client import ApiError, Client
from orchestrator.server.app import create_app
from orchestrator.service import sessions as sessions_service
from orchestrator.service.sessions import SEQ_WAIT_S
from orchestrator.settings import Settings
from tests.workers.test_sessions import _random_data
from workers.contract.plan import LoraConfig
from workers.contract.sessions import AdamParams, SamplingParams
from workers.engine.model import load_base
from workers.sessions.host import SessionHost

ADMIN = "admin-secret"
LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
ADAM = AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.5)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(tmp_path: Path, tiny_base: Path, **settings: object) -> TestClient:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = Settings(home=home, api_token=ADMIN, model_roots=str(tiny_base.parent), **settings)  # type: ignore[arg-type]
    return TestClient(create_app(config, start_controller=False))


@pytest.fixture
def api(tmp_path: Path, tiny_base: Path) -> Iterator[TestClient]:
    with _app(tmp_path, tiny_base) as client:
        yield client


def client_of(api: TestClient, token: str, project: str = "default") -> Client:
    """The real `Client`, its HTTP through the in-process app."""
    client = Client("http://testserver", token, project=project)
    client._http.close()
    client._http = TestClient(api.app, headers=auth(token))  # an httpx.Client over the same app
    return client


def token(api: TestClient, project: str, role: str = "member") -> str:
    made = api.post("/v1/tokens", json={"project": project, "role": role}, headers=auth(ADMIN))
    assert made.status_code == 201, made.text
    return made.json()["token"]


def server_weights(api: TestClient, session_id: str) -> dict[str, torch.Tensor]:
    live = api.app.state.plane.service.sessions._live[session_id]  # type: ignore[attr-defined]
    return _weights(live.host, session_id)


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


def _create(client: Client, tiny_base: Path):
    return client.create_lora_training_client(
        str(tiny_base), rank=LORA.r, alpha=LORA.alpha, targets=list(LORA.target_modules), seed=3
    )


def test_a_session_over_http_trains_as_a_host_driven_directly(api: TestClient, tiny_base: Path) -> None:
    alice = client_of(api, token(api, "alice"), "alice")
    tc = _create(alice, tiny_base)
    batches = [_random_data(10 + step, n=3) for step in range(3)]
    futures = []
    for batch in batches:  # everything queued before anything is waited for
        futures += [tc.forward_backward(batch), tc.optim_step(ADAM)]
    logprobs = tc.compute_logprobs([5, 9, 17, 33, 2])
    sampled = tc.sample([5, 9, 17], 2, SamplingParams(max_tokens=4, seed=7, stop=[]))
    results = [f.result(timeout=120) for f in futures]

    host = SessionHost(load_base(str(tiny_base), device="cpu"), str(tiny_base))
    host.create_session(tc.session_id, LORA, seed=3, init_name=sessions_service.SESSION_INIT_NAME)
    direct = []
    for batch in batches:
        direct += [host.forward_backward(tc.session_id, batch), host.optim_step(tc.session_id, ADAM)]
    direct_logprobs = host.compute_logprobs(tc.session_id, [5, 9, 17, 33, 2])
    direct_sampled = host.sample(tc.session_id, [5, 9, 17], 2, SamplingParams(max_tokens=4, seed=7, stop=[]))
    host.run_until_idle()

    assert [r.step for r in results[1::2]] == [1, 2, 3]
    for got, want in zip(results[0::2], direct[0::2], strict=True):
        assert got.loss == pytest.approx(want.result().loss, abs=1e-5)
    assert _diff(server_weights(api, tc.session_id), _weights(host, tc.session_id)) < 1e-5
    got_lp, want_lp = logprobs.result(timeout=60), direct_logprobs.result()
    assert got_lp[0] is None and got_lp[1:] == pytest.approx(want_lp[1:], abs=1e-5)
    assert [s.tokens for s in sampled.result(timeout=60).sequences] == [
        s.tokens for s in direct_sampled.result().sequences
    ]
    assert tc.info().step == 3
    assert [s.id for s in alice.training_sessions()] == [tc.session_id]
    tc.close()
    assert alice.training_sessions() == []


def test_calls_are_queued_in_the_clients_order_whatever_order_they_arrive_in(
    api: TestClient, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = client_of(api, token(api, "alice"), "alice")
    tc = _create(alice, tiny_base)
    path = f"/v1/sessions/{tc.session_id}"
    headers = alice._http.headers
    step: dict = {}

    def late_step() -> None:  # number 1 arrives first, and must wait for number 0
        step["answer"] = api.post(f"{path}/optim_step", json={"seq": 1}, headers=headers)

    sender = threading.Thread(target=late_step)
    sender.start()
    time.sleep(0.5)
    data = [d.model_dump() for d in _random_data(1, n=2)]
    fb = api.post(f"{path}/forward_backward", json={"seq": 0, "data": data}, headers=headers)
    sender.join()
    assert fb.status_code == 200, fb.text
    answer = step["answer"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["step"] == 1 and answer.json()["metrics"]["grad_norm"] > 0  # the gradient was there
    # a number already used is refused, not run out of order
    again = api.post(f"{path}/optim_step", json={"seq": 1}, headers=headers)
    assert again.status_code == 409 and "seq" in again.json()["detail"]["message"]
    # numbers that never come (requests lost) are skipped after a short wait; one that comes later is refused
    monkeypatch.setattr(sessions_service, "SEQ_WAIT_S", 0.3)
    skipped = api.post(f"{path}/optim_step", json={"seq": 5}, headers=headers)
    assert skipped.status_code == 200 and skipped.json()["step"] == 2
    assert api.post(f"{path}/optim_step", json={"seq": 3}, headers=headers).status_code == 409


def test_a_projects_token_cannot_reach_another_projects_session(api: TestClient, tiny_base: Path) -> None:
    alice_token, bob_token = token(api, "alice"), token(api, "bob")
    reader = token(api, "alice", "reader")
    tc = _create(client_of(api, alice_token, "alice"), tiny_base)
    path = f"/v1/sessions/{tc.session_id}"
    unknown = api.get("/v1/sessions/sess-nope", headers=auth(bob_token))
    assert unknown.status_code == 404
    data = [d.model_dump() for d in _random_data(1, n=1)]
    for method, suffix, body in [
        ("GET", "", None),
        ("POST", "/forward_backward", {"data": data}),
        ("POST", "/optim_step", {}),
        ("POST", "/save_state", {"name": "x"}),
        ("DELETE", "", None),
    ]:
        hidden = api.request(method, path + suffix, json=body, headers=auth(bob_token))
        assert hidden.status_code == 404, (suffix, hidden.text)
        assert hidden.json()["detail"]["message"] == f"session {tc.session_id!r} not found"
    assert api.get("/v1/sessions", headers=auth(bob_token)).json() == []
    # creating in another project is refused; a reader of alice sees, but cannot train
    refused = api.post(
        "/v1/sessions", json={"project": "alice", "base_model": str(tiny_base)}, headers=auth(bob_token)
    )
    assert refused.status_code == 403
    assert api.get(path, headers=auth(reader)).status_code == 200
    assert api.post(path + "/optim_step", json={}, headers=auth(reader)).status_code == 403
    assert [s["id"] for s in api.get("/v1/sessions", headers=auth(ADMIN)).json()] == [tc.session_id]
    # bob cannot start from alice's saved state either
    saved = tc.save_state("s1").result(timeout=60)
    stolen = api.post("/v1/sessions", json={"project": "bob", "from_state": saved}, headers=auth(bob_token))
    assert stolen.status_code == 422 and stolen.json()["detail"]["problems"][0]["field"] == "from_state"


def test_a_malformed_datum_is_a_422_naming_the_field_and_the_session_trains_on(
    api: TestClient, tiny_base: Path
) -> None:
    alice = client_of(api, token(api, "alice"), "alice")
    tc = _create(alice, tiny_base)
    good = _random_data(4, n=2)
    bad = good[1].model_dump()
    bad["loss_fn_inputs"]["weights"] = bad["loss_fn_inputs"]["weights"][:-1]
    started = time.monotonic()
    refused = tc.forward_backward([good[0], bad])
    fb, step = tc.forward_backward(good), tc.optim_step(ADAM)  # queued behind the refused call
    with pytest.raises(ApiError) as caught:
        refused.result(timeout=60)
    assert caught.value.status == 422
    assert [f for f, _ in caught.value.problems] == ["data.1.loss_fn_inputs.weights"]
    assert fb.result(timeout=60).loss > 0 and step.result(timeout=60).step == 1
    assert time.monotonic() - started < SEQ_WAIT_S  # its number was used up: no one waited for it
    out_of_vocab = tc.forward_backward(
        [{"model_input": [1, 10**6], "loss_fn_inputs": {"target_tokens": [2, 3]}}]
    )
    with pytest.raises(ApiError) as caught:
        out_of_vocab.result(timeout=60)
    assert caught.value.status == 422 and caught.value.problems[0][0] == "data.0.model_input"
    assert tc.optim_step(ADAM).result(timeout=60).step == 2


def test_save_state_writes_a_peft_adapter_and_a_session_starts_from_it(
    api: TestClient, tiny_base: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    alice = client_of(api, token(api, "alice"), "alice")
    tc = _create(alice, tiny_base)
    tc.forward_backward(_random_data(2, n=2))
    tc.optim_step(ADAM)
    path = tc.save_state("after-one", close=True).result(timeout=60)
    assert api.get(f"/v1/sessions/{tc.session_id}", headers=alice._http.headers).status_code == 404
    trained = server_weights_of_saved(path)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), path)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) and loaded
    for key, value in trained.items():  # PEFT reads back the very weights the session trained
        assert torch.equal(loaded[f"base_model.model.{key}.default.weight"], value), key

    again = alice.create_training_client_from_state(path)
    assert again.info().step == 1 and again.view.rank == LORA.r
    assert _diff(server_weights(api, again.session_id), trained) == 0.0
    assert again.optim_step(ADAM).result(timeout=60).step == 2  # its AdamW state came along
    again.load_state(path).result(timeout=60)
    assert again.info().step == 1
    again.close()


def server_weights_of_saved(path: str) -> dict[str, torch.Tensor]:
    from workers.training.checkpoint import read_adapter

    files = read_adapter(path)
    return {f"{p}.{m}": getattr(w, m) for p, w in files.weights.items() for m in ("lora_A", "lora_B")}


def test_idle_sessions_close(tmp_path: Path, tiny_base: Path) -> None:
    with _app(tmp_path, tiny_base, session_idle_seconds=0.5) as api:
        alice = client_of(api, ADMIN, "alice")
        tc = _create(alice, tiny_base)
        tc.optim_step(ADAM).result(timeout=60)
        host = api.app.state.plane.service.sessions._live[tc.session_id].host  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while alice.training_sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alice.training_sessions() == []
        assert tc.session_id not in host.sessions  # the adapter is detached: the worker is free
        with pytest.raises(ApiError) as caught:
            tc.optim_step(ADAM).result(timeout=60)
        assert caught.value.status == 404


def test_two_creates_at_once_never_pass_the_projects_cap(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create counted the project's sessions, then placed, loaded and recorded its own for a while
    before it counted: a second create in that window passed the cap as well. The first create is held
    inside its host's `create_session` while the second one asks."""
    inside, go = threading.Event(), threading.Event()
    real = SessionHost.create_session

    def held_create(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        inside.set()
        assert go.wait(60)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SessionHost, "create_session", held_create)
    with _app(tmp_path, tiny_base, sessions_per_project=1) as api:
        alice = client_of(api, ADMIN, "alice")
        first: list = []
        creating = threading.Thread(target=lambda: first.append(_create(alice, tiny_base)))
        creating.start()
        assert inside.wait(60)
        with pytest.raises(ApiError) as capped:
            _create(alice, tiny_base)
        go.set()
        creating.join(60)
        assert capped.value.status == 429 and "LORAFLEET_SESSIONS_PER_PROJECT=1" in str(capped.value)
        assert [s.id for s in alice.training_sessions()] == [first[0].session_id]
        monkeypatch.setattr(SessionHost, "create_session", real)
        first[0].close()
        _create(alice, tiny_base).close()  # a create that failed holds no place: the cap frees with a close


def test_a_session_needs_a_base_the_server_holds(api: TestClient, tmp_path: Path) -> None:
    """A request never downloads a base: an uncached hub id, a path outside the model roots, a missing
    body field are each a 422 naming the field, at once."""
    started = time.monotonic()
    for body in (
        {"base_model": "someone/not-cached-here"},
        {"base_model": str(tmp_path)},
        {},
        {"from_state": "/etc"},
    ):
        refused = api.post("/v1/sessions", json=body, headers=auth(ADMIN))
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["detail"]["problems"][0]["field"] in ("base_model", "from_state")
    assert time.monotonic() - started < 5


def test_async_twins_and_a_custom_loss_train_as_the_builtin_loss(api: TestClient, tiny_base: Path) -> None:
    """Two sessions from one saved state: one trained with cross_entropy, awaited through the async twins,
    the other with the same loss written as a custom function (forward, then -gradient as weights)."""
    import asyncio

    alice = client_of(api, token(api, "alice"), "alice")
    start = _create(alice, tiny_base).save_state("start", close=True).result(timeout=60)
    builtin = alice.create_training_client_from_state(start)
    custom = alice.create_training_client_from_state(start)
    data = _random_data(7, n=2)

    async def builtin_step() -> tuple[float, int]:
        fb = builtin.forward_backward_async(data)  # queued at once, in order, before any await
        step = builtin.optim_step_async(ADAM)
        return (await fb).loss, (await step).step

    def cross_entropy(datums, logprobs):  # the same loss, as a client-side function
        loss = sum(
            -(torch.tensor(d.loss_fn_inputs.weights) * lp).sum()
            for d, lp in zip(datums, logprobs, strict=True)
        )
        return loss, {"tokens": float(sum(d.length for d in datums))}

    loss, step = asyncio.run(builtin_step())
    out = custom.forward_backward_custom(data, cross_entropy).result(timeout=60)
    assert custom.optim_step(ADAM).result(timeout=60).step == step == 1
    assert out.loss == pytest.approx(loss, abs=1e-5) and out.metrics["tokens"] > 0
    assert _diff(server_weights(api, builtin.session_id), server_weights(api, custom.session_id)) < 1e-5
    assert _diff(server_weights(api, builtin.session_id), server_weights_of_saved(start)) > 1e-4  # it trained
