"""Placement of training sessions on hosts (`orchestrator.scheduling.sessions`): a pure decision, tested
on plain numbers, and the host pool's bookkeeping on stand-in hosts (no base, no Ray)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator.scheduling import sessions as placement
from orchestrator.scheduling.sessions import Ask, HostState, Join, Limits, Refuse, Room, Start, place
from orchestrator.service.session_hosts import HostPool, NoRoom
from orchestrator.settings import Settings
from workers.contract import memory
from workers.contract.plan import LoraConfig

GB = 2**30
BASE = ("org/base", "none", "float32")
OTHER = ("org/other", "none", "float32")
LIMITS = Limits(sessions_per_host=4, sessions_per_project=3)
ASK = Ask("alice", BASE, session_bytes=1 * GB, host_bytes=4 * GB)


def host(
    host_id: str, sessions: int, key: placement.HostKey = BASE, used_gb: float | None = None
) -> HostState:
    used = int((4 + sessions) * GB if used_gb is None else used_gb * GB)
    return HostState(host_id, key, "ray", sessions, used)


def test_a_session_joins_the_fullest_host_of_its_base_with_room() -> None:
    hosts = [host("a", 1), host("b", 2), host("c", 3, key=OTHER)]
    assert place(ASK, hosts, 0, Room(16 * GB, free_workers=5), LIMITS) == Join("b")


def test_a_full_host_is_skipped_by_count_and_by_memory() -> None:
    hosts = [host("a", 4), host("b", 1, used_gb=15.5)]  # a: at the per-host cap; b: 0.5 GB left
    assert place(ASK, hosts, 0, Room(16 * GB, free_workers=1), LIMITS) == Start()
    refused = place(ASK, hosts, 0, Room(16 * GB, free_workers=0), LIMITS)
    assert isinstance(refused, Refuse) and refused.status == 503 and refused.retry_after
    assert "LORAFLEET_SESSIONS_PER_HOST=4" in refused.reason and "org/base" in refused.reason


def test_no_host_of_the_base_and_no_free_worker_is_503_saying_so() -> None:
    refused = place(ASK, [host("x", 1, key=OTHER)], 0, Room(16 * GB, free_workers=0), LIMITS)
    assert isinstance(refused, Refuse) and refused.status == 503
    assert "no host of this base runs" in refused.reason


def test_the_project_cap_is_429_before_anything_else() -> None:
    refused = place(ASK, [host("a", 1)], 3, Room(16 * GB, free_workers=1), LIMITS)
    assert isinstance(refused, Refuse) and refused.status == 429 and refused.retry_after
    assert "'alice' holds 3" in refused.reason and "LORAFLEET_SESSIONS_PER_PROJECT=3" in refused.reason
    no_cap = Limits(sessions_per_host=4, sessions_per_project=None)
    assert place(ASK, [host("a", 1)], 1000, Room(16 * GB, free_workers=1), no_cap) == Join("a")


def test_a_base_that_can_never_fit_a_worker_is_422() -> None:
    refused = place(ASK, [], 0, Room(int(4.5 * GB), free_workers=8), LIMITS)
    assert isinstance(refused, Refuse) and refused.status == 422 and refused.retry_after is None
    assert refused.field == "base_model" and "LORAFLEET_SESSION_HOST_MEMORY_GB" in refused.reason


def test_free_workers_leave_out_packs_and_hosts() -> None:
    assert placement.free_workers(8, packs_running=5, ray_hosts=2) == 1
    assert placement.free_workers(2, packs_running=2, ray_hosts=1) == 0


def test_costs_follow_the_memory_model() -> None:
    config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
    }
    info = memory.model_info_from_config(config)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    params = memory.lora_param_count(info, lora)
    assert placement.session_bytes(info, lora, "float32", cpu=False) == 16 * params
    assert placement.session_bytes(info, lora, "float32", cpu=True) == 64 * params
    # a host is its base and at least one pass: more than the base alone, more on CPU
    gpu, cpu = (placement.host_bytes(info, "none", "float32", cpu=c) for c in (False, True))
    assert memory.base_bytes(info, "none", "float32") < gpu < cpu


@pytest.mark.parametrize("sessions", [0, 3])
def test_an_empty_host_of_another_base_does_not_take_a_session(sessions: int) -> None:
    assert place(ASK, [host("x", sessions, key=OTHER)], 0, Room(16 * GB, 1), LIMITS) == Start()


class _StandIn:
    """A host that runs nothing: what the pool starts and shuts down."""

    def __init__(self) -> None:
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True


def test_the_pool_places_lingers_and_closes_local_hosts(tmp_path: Path, tiny_base: Path) -> None:
    settings = Settings(
        home=tmp_path, session_hosts="local", sessions_per_host=1, sessions_per_project=2,
        session_host_linger_seconds=30.0,
    )  # fmt: skip
    made: list[_StandIn] = []
    pool = HostPool(settings, lambda key: made.append(_StandIn()) or made[-1])
    key = (str(tiny_base), "none", "float32")
    a, need = pool.acquire(key, "alice", 0, LoraConfig(r=4))
    pool.attach(a, "s1", need)
    b, need_b = pool.acquire(key, "alice", 1, LoraConfig(r=4))  # a holds its one session: a second host
    assert b is not a and len(made) == 2 and all(h.started for h in made)
    pool.unreserve(b, need_b)  # the session was not created after all: b is empty
    with pytest.raises(NoRoom) as capped:
        pool.acquire(key, "alice", 2, None)
    assert capped.value.status == 429 and capped.value.retry_after
    pool.release(a, "s1")
    assert pool.close_idle() == []  # both empty, lingering
    assert sorted(pool.close_idle(now=time.monotonic() + 31)) == sorted([a.id, b.id])
    assert all(h.stopped for h in made) and pool.hosts() == []


@pytest.mark.parametrize("fails", [False, True])
def test_a_host_starting_holds_up_no_session_placed_on_a_host_already_up(
    tmp_path: Path, tiny_base: Path, fails: bool
) -> None:
    """A host start (a base loading: seconds to minutes) held the pool's lock, and every create on the
    server waited behind it. Now only the creates that join that host wait for it, and share its fate."""
    settings = Settings(home=tmp_path, session_hosts="local", sessions_per_host=2, sessions_per_project=None)
    loading, release = threading.Event(), threading.Event()

    def load(key: placement.HostKey) -> _StandIn:
        if key[2] == "bfloat16":  # the slow base
            loading.set()
            assert release.wait(60)
            if fails:
                raise RuntimeError("cannot read the base's weights")
        return _StandIn()

    pool = HostPool(settings, load)
    up, slow = (str(tiny_base), "none", "float32"), (str(tiny_base), "none", "bfloat16")
    ready, need = pool.acquire(up, "alice", 0, LoraConfig(r=4))
    pool.attach(ready, "s1", need)
    outcomes: dict[str, object] = {}

    def acquire(who: str) -> None:
        try:
            outcomes[who] = pool.acquire(slow, who, 0, LoraConfig(r=4))[0]
        except Exception as exc:  # what the create would answer
            outcomes[who] = exc

    starter = threading.Thread(target=acquire, args=("bob",))
    starter.start()
    assert loading.wait(60)
    joiner = threading.Thread(target=acquire, args=("carol",))
    joiner.start()
    deadline = time.monotonic() + 60
    while [h.sessions for h in pool.hosts() if h.key == slow] != [2]:  # carol joined the starting host
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pool.acquire(up, "dave", 0, LoraConfig(r=4))[0] is ready  # at once, the slow start going on
    assert starter.is_alive() and joiner.is_alive()
    release.set()
    starter.join(60)
    joiner.join(60)
    if fails:
        assert [str(outcomes[w]) for w in ("bob", "carol")] == ["cannot read the base's weights"] * 2
        assert [h.key for h in pool.hosts()] == [up]  # the failed host holds no slot
    else:
        assert outcomes["bob"] is outcomes["carol"] and outcomes["bob"].host.started  # type: ignore[attr-defined]


def test_a_host_that_finishes_starting_after_the_pool_shut_down_is_shut_down(
    tmp_path: Path, tiny_base: Path
) -> None:
    """The server stopping while a base loads: the host that comes up is shut down at once, and neither
    its starter nor a create that joined it gets a host that is gone."""
    settings = Settings(home=tmp_path, session_hosts="local", sessions_per_host=2, sessions_per_project=None)
    loading, release = threading.Event(), threading.Event()
    made: list[_StandIn] = []

    def load(key: placement.HostKey) -> _StandIn:
        loading.set()
        assert release.wait(60)
        made.append(_StandIn())
        return made[-1]

    pool = HostPool(settings, load)
    key = (str(tiny_base), "none", "float32")
    outcomes: list[object] = []

    def acquire() -> None:
        try:
            outcomes.append(pool.acquire(key, "alice", 0, LoraConfig(r=4)))
        except NoRoom as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=acquire) for _ in range(2)]
    threads[0].start()
    assert loading.wait(60)
    threads[1].start()
    deadline = time.monotonic() + 60
    while [h.sessions for h in pool.hosts()] != [2]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pool.shutdown()
    release.set()
    for thread in threads:
        thread.join(60)
    assert [(type(o).__name__, getattr(o, "status", None)) for o in outcomes] == [("NoRoom", 503)] * 2
    assert [h.stopped for h in made] == [True] and pool.hosts() == []


def test_packs_start_only_on_the_slots_session_hosts_leave(tmp_path: Path, store) -> None:  # type: ignore[no-untyped-def]
    """The controller counts a Ray session host's worker slot as taken: packs and hosts never overcommit."""
    from orchestrator.control.controller import Controller
    from orchestrator.control.simulated import SimulatedPacks

    controller = Controller(Settings(home=tmp_path), store, packs=SimulatedPacks(cpus_per_node=4))
    assert controller._free_slots() == 4
    controller.session_hosts = lambda: 3
    assert controller._free_slots() == 1
    controller.session_hosts = lambda: 6  # more hosts than slots (a cluster that shrank): none, never below
    assert controller._free_slots() == 0
