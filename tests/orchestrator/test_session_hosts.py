"""Session hosts as Ray actors (`LORAFLEET_SESSION_HOSTS=ray`), through the real app and client, on a
local Ray of 2 CPUs (2 worker slots: 2 hosts at most) and the tiny base.

One app serves the module (one session per host, two per project, hosts linger 1 s), and the tests run
in order on it: a session on a Ray host trains as on a local host; the caps answer 429 / 503 with their
reasons; an emptied host lingers then closes; a killed actor fails its in-flight call with 503 and the
next call restores the session from its last saved state, going on exactly as a session loaded from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from fastapi.testclient import TestClient

from orchestrator.client.client import ApiError, Client
from orchestrator.server.app import create_app
from orchestrator.service.sessions import SESSION_INIT_NAME, Sessions
from orchestrator.settings import Settings
from tests.conftest import own_local_ray
from tests.orchestrator.test_sessions_api import ADAM, ADMIN, LORA, _create, client_of, token
from tests.workers.test_sessions import _random_data
from workers.contract.sessions import SamplingParams
from workers.engine.model import load_base
from workers.sessions.host import SessionHost
from workers.training import checkpoint as ckpt

Weights = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("hosts") / "home"
    home.mkdir()
    settings = Settings(
        home=home,
        api_token=ADMIN,
        model_roots=str(tiny_base.parent),  # type: ignore[arg-type]
        session_hosts="ray",
        sessions_per_host=1,
        sessions_per_project=2,
        session_host_linger_seconds=1.0,
    )
    with own_local_ray(), TestClient(create_app(settings, start_controller=False)) as client:
        yield client


@pytest.fixture(scope="module")
def local(tiny_base: Path) -> SessionHost:
    host = SessionHost(load_base(str(tiny_base), device="cpu"), str(tiny_base))
    return host


def sessions_of(api: TestClient) -> Sessions:
    return api.app.state.plane.service.sessions  # type: ignore[attr-defined,no-any-return]


def saved(path: str) -> Weights:
    files = ckpt.read_adapter(path)
    return {f"{m}.{k}": getattr(w, k).float() for m, w in files.weights.items() for k in ("lora_A", "lora_B")}


def weights(host: SessionHost, session: str) -> Weights:
    modules = host.sessions[session].adapter.modules
    return {
        f"{m}.{k}": getattr(w, k).detach().float() for m, w in modules.items() for k in ("lora_A", "lora_B")
    }


def diff(a: Weights, b: Weights) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_local(host: SessionHost, session: str, batches: list) -> list[float]:
    futures = []
    for batch in batches:
        futures += [host.forward_backward(session, batch), host.optim_step(session, ADAM)]
    host.run_until_idle()
    return [f.result().loss for f in futures[0::2]]


def train(tc, batches: list) -> list[float]:  # type: ignore[no-untyped-def]
    futures = []
    for batch in batches:
        futures += [tc.forward_backward(batch), tc.optim_step(ADAM)]
    return [f.result(timeout=120).loss for f in futures[0::2]]


@pytest.fixture(scope="module")
def alice(api: TestClient) -> Client:
    return client_of(api, token(api, "alice"), "alice")


@pytest.fixture(scope="module")
def first(alice: Client, tiny_base: Path):  # type: ignore[no-untyped-def]
    return _create(alice, tiny_base)


def test_a_session_on_a_ray_host_trains_as_on_a_local_host(
    api: TestClient, first, local: SessionHost, tiny_base: Path
) -> None:  # type: ignore[no-untyped-def]
    assert sessions_of(api).pool.ray_hosts() == 1
    batches = [_random_data(40 + step, n=3) for step in range(2)]
    losses = train(first, batches)
    path = first.save_state("after-2").result(timeout=60)

    # another id, the same (lora, seed): the same start wherever it runs
    local.create_session("direct", LORA, seed=3, init_name=SESSION_INIT_NAME)
    assert train_local(local, "direct", batches) == pytest.approx(losses, abs=1e-5)
    assert diff(saved(path), weights(local, "direct")) < 1e-5
    assert first.info().step == 2


def test_the_caps_answer_429_and_503_with_reasons(
    api: TestClient, alice: Client, first, tiny_base: Path
) -> None:  # type: ignore[no-untyped-def]
    second = _create(alice, tiny_base)  # the first host holds one session: a second host starts
    assert sessions_of(api).pool.ray_hosts() == 2
    with pytest.raises(ApiError) as capped:
        _create(alice, tiny_base)
    assert capped.value.status == 429
    assert "LORAFLEET_SESSIONS_PER_PROJECT=2" in str(capped.value)
    bob = client_of(api, token(api, "bob"), "bob")
    with pytest.raises(ApiError) as full:  # two hosts, one session each, and no third worker slot
        _create(bob, tiny_base)
    assert full.value.status == 503
    assert "LORAFLEET_SESSIONS_PER_HOST=1" in str(full.value) and "worker slot" in str(full.value)

    # an emptied host lingers (a session started now would reuse it), then closes and frees its slot
    actor = sessions_of(api)._live[second.session_id].host.actor
    second.close()
    assert sessions_of(api).pool.ray_hosts() == 2
    deadline = time.monotonic() + 20
    while sessions_of(api).pool.ray_hosts() > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sessions_of(api).pool.ray_hosts() == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.session_info.remote(""), timeout=30)
    _create(bob, tiny_base).close()  # room again


def test_a_killed_worker_fails_in_flight_calls_and_the_session_resumes_from_its_last_save(
    api: TestClient, first, local: SessionHost
) -> None:  # type: ignore[no-untyped-def]
    state = first.save_state("before-loss").result(timeout=60)
    train(first, [_random_data(60, n=3)])  # lost with the worker: redone below
    live = sessions_of(api)._live[first.session_id]
    deadline = time.monotonic() + 30
    while live.inflight > 0 and time.monotonic() < deadline:  # the calls before answered, to the server too
        time.sleep(0.01)
    long = first.sample([5, 9, 17], 4, SamplingParams(max_tokens=4000, stop=[], seed=1))
    while live.inflight == 0 and time.monotonic() < deadline:  # queued on the actor: in flight
        time.sleep(0.01)
    ray.kill(sessions_of(api)._live[first.session_id].host.actor, no_restart=True)
    with pytest.raises(ApiError) as lost:
        long.result(timeout=120)
    assert lost.value.status == 503 and "restores it" in str(lost.value)

    batches = [_random_data(70 + step, n=3) for step in range(2)]
    losses = train(first, batches)  # restored from `before-loss` on a new host, then trained
    assert first.info().step == 2 + 2
    after = first.save_state("after-loss").result(timeout=60)

    local.create_session("loaded", from_state=state, with_optimizer=True)
    assert train_local(local, "loaded", batches) == pytest.approx(losses, abs=1e-5)
    assert diff(saved(after), weights(local, "loaded")) < 1e-5
    assert sessions_of(api).pool.ray_hosts() == 1


def test_a_session_that_never_saved_restarts_from_its_first_weights(
    api: TestClient, alice: Client, local: SessionHost, tiny_base: Path
) -> None:  # type: ignore[no-untyped-def]
    never = _create(alice, tiny_base)  # seed 3, as `first`: its first weights are drawn for (lora, seed)
    step = never.forward_backward(_random_data(90, n=3)), never.optim_step(ADAM)
    assert [f.result(timeout=120) for f in step]  # answered, then lost with the worker: never saved
    live = sessions_of(api)._live[never.session_id]
    ray.kill(live.host.actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the kill lands
        try:
            ray.get(live.host.actor.session_info.remote(""), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            break
        time.sleep(0.1)

    with pytest.raises(ApiError) as lost:  # the first call finds the worker gone: the loss is said
        never.forward_backward(_random_data(94, n=3)).result(timeout=120)
    assert lost.value.status == 503 and "restores it" in str(lost.value)

    batches = [_random_data(95 + step, n=3) for step in range(2)]
    losses = train(never, batches)  # placed again, from its starting state: step 0, the first A
    assert never.info().step == 2
    local.create_session("fresh", LORA, seed=3, init_name=SESSION_INIT_NAME)
    assert train_local(local, "fresh", batches) == pytest.approx(losses, abs=1e-5)
    never.close()


def test_a_host_no_worker_can_take_is_given_up_with_503(api: TestClient, tiny_base: Path) -> None:  # type: ignore[no-untyped-def]
    """Something else Ray runs holds the slots the pool counts free: the create answers 503 once
    `LORAFLEET_SESSION_HOST_START_SECONDS` pass, never waits forever."""
    sessions = sessions_of(api)
    deadline = time.monotonic() + 30
    while sessions.pool.ray_hosts() > 1 and time.monotonic() < deadline:  # the last test's host lingers
        time.sleep(0.2)
    assert sessions.pool.ray_hosts() == 1  # `first`'s host; one slot counted free
    hog = ray.remote(num_cpus=1)(_Hog).remote()  # the free slot, taken behind the pool's back
    ray.get(hog.ready.remote(), timeout=60)
    sessions.settings.session_host_start_seconds = 2.0
    carol = client_of(api, token(api, "carol"), "carol")
    try:
        with pytest.raises(ApiError) as refused:
            _create(carol, tiny_base)
        assert refused.value.status == 503
        assert "LORAFLEET_SESSION_HOST_START_SECONDS" in str(refused.value) or "within 2 s" in str(
            refused.value
        )
        assert sessions.pool.ray_hosts() == 1  # nothing half-started kept
    finally:
        ray.kill(hog)
        sessions.settings.session_host_start_seconds = 300.0


class _Hog:
    def ready(self) -> bool:
        return True
