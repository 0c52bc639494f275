"""Big jobs cost a bounded number of queries (issue 15, item 10): a job's view, a page of adapters and a
cancel ask SQL the same number of times for 12 adapters as for 120, on SQLite and PostgreSQL.

Statements are counted with SQLAlchemy's `before_cursor_execute` event on the store's engine: what the
database is asked, not how long it takes (timings are in docs/benchmarks, never in assertions).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from orchestrator.client.client import Client
from orchestrator.control.controller import Controller
from orchestrator.server.app import create_app
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.store import Store, upgrade

VIEW_ADAPTERS = 5


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    return path


@pytest.fixture
def service(db_url: str, tmp_path: Path) -> Iterator[Service]:
    upgrade(db_url)
    settings = Settings(home=tmp_path / "home", db_url=db_url, job_view_adapters=VIEW_ADAPTERS)
    with Store(db_url) as store:
        yield Service(settings, store)


def job_spec(name: str, n: int, data: Path) -> dict:
    """`n` adapters, every third branched from the one before it (parents are named in views)."""
    adapters = []
    for i in range(n):
        adapter = {"name": f"{name}-{i}", "data": {"path": str(data)}}
        if i % 3 == 2:
            adapter["parent"] = f"{name}-{i - 1}"
        adapters.append(adapter)
    return {"name": name, "base_model": "Qwen/Qwen2.5-0.5B", "train": {"steps": 2}, "adapters": adapters}


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def test_a_job_view_holds_counts_and_the_first_adapters_in_queries_no_job_size_changes(
    service: Service, data: Path
) -> None:
    small = service.submit(job_spec("small", 12, data))
    big = service.submit(job_spec("big", 120, data))
    service.store.upsert_metrics(big.adapters[0].id, {"train_loss": (0.5, 1)})
    with statements(service.store) as small_queries:
        service.job(small.id)
    with statements(service.store) as big_queries:
        view = service.job(big.id)
    assert len(big_queries) == len(small_queries) <= 8
    assert [a.name for a in view.adapters] == [f"big-{i}" for i in range(VIEW_ADAPTERS)]
    assert view.adapter_count == 120 and view.adapter_states == {"queued": 120} and view.has_more_adapters
    assert view.adapters[0].metrics == {"train_loss": 0.5}
    assert view.adapters[2].parent == "default/big-1" and view.adapters[2].root == "default/big-1"
    listed = {job.id: job for job in service.jobs()}
    assert listed[big.id].adapter_count == 120 and listed[big.id].adapters == []
    assert listed[small.id].adapter_states == {"queued": 12}


def test_pages_of_adapters_neither_skip_nor_repeat_and_cost_the_same_queries(
    service: Service, data: Path
) -> None:
    job = service.submit(job_spec("paged", 60, data))
    service.submit(job_spec("other", 7, data))
    seen, cursors, costs = [], [], []
    after: int | None = 0
    while after is not None:
        with statements(service.store) as queries:
            page = service.adapters(job_id=job.id, after=after, limit=25)
        costs.append(len(queries))
        seen += [a.name for a in page.adapters]
        cursors.append(after := page.next_after)
    assert seen == [f"paged-{i}" for i in range(60)]
    assert len(cursors) == 3 and cursors[-1] is None  # 25 + 25 + 10
    assert costs[0] == costs[1] and costs[0] <= 4
    assert [a.name for a in service.adapters(after=0, limit=1000).adapters][-7:] == [
        f"other-{i}" for i in range(7)
    ]


def test_cancelling_a_big_job_is_one_batch_of_queries(service: Service, data: Path) -> None:
    """Cancelling 2,000 queued adapters took 56 s (a transaction per adapter, under the controller's
    lock); now the number of statements does not grow with the job. Every adapter still gets its
    `done` event, once."""
    controller = Controller(service.settings, service.store)  # no packs run: no Ray needed to cancel
    small = service.submit(job_spec("few", 6, data))
    big = service.submit(job_spec("many", 90, data))
    with statements(service.store) as small_queries:
        controller.cancel_job(small.id)
    with statements(service.store) as big_queries:
        controller.cancel_job(big.id)
    assert len(big_queries) == len(small_queries)
    assert service.job(big.id).adapter_states == {"cancelled": 90}
    done = [e for e in service.store.list_events(big.id) if e.kind == "done"]
    assert sorted(e.payload["adapter"] for e in done) == sorted(f"many-{i}" for i in range(90))
    assert all(e.payload["status"] == "cancelled" for e in done)
    controller.cancel_job(big.id)  # again: nothing left to cancel, nothing recorded twice
    assert len([e for e in service.store.list_events(big.id) if e.kind == "done"]) == 90


def test_the_client_pages_through_a_job_bigger_than_its_view(tmp_path: Path, data: Path) -> None:
    """Over HTTP: the view embeds the first adapters; `Job.adapters` and `Client.iter_adapters` follow
    the `X-Next-After` header through every page."""
    settings = Settings(home=tmp_path / "api", job_view_adapters=3)
    with TestClient(create_app(settings, start_controller=False)) as http:
        client = Client("http://testserver")
        client._http.close()
        client._http = http  # the real app, in process
        job = client.submit(job_spec("wide", 30, data))
        assert len(job.view.adapters) == 3 and job.view.adapter_count == 30
        names = [f"wide-{i}" for i in range(30)]
        assert [a.name for a in job.adapters] == names
        assert [a.name for a in client.iter_adapters(job_id=job.id, page_size=7)] == names
        first = http.get("/v1/adapters", params={"job_id": job.id, "limit": 10})
        last = http.get("/v1/adapters", params={"job_id": job.id, "limit": 10, "after": 10**6})
        assert len(first.json()) == 10 and "X-Next-After" in first.headers
        assert last.json() == [] and "X-Next-After" not in last.headers
        refused = http.get("/v1/adapters", params={"limit": 5000})
        assert (
            refused.status_code == 422 and refused.json()["detail"]["problems"][0]["field"] == "query.limit"
        )


def test_the_api_refuses_a_job_over_the_adapter_limit_with_the_setting_to_raise(
    tmp_path: Path, data: Path
) -> None:
    settings = Settings(home=tmp_path / "api", max_adapters_per_job=10)
    with TestClient(create_app(settings, start_controller=False)) as http:
        answer = http.post("/v1/jobs", json=job_spec("wide", 11, data))
        assert answer.status_code == 422
        assert answer.json()["detail"]["problems"] == [
            {
                "field": "adapters",
                "message": "11 adapters is over this server's limit of 10 per job; split the job, or ask "
                "the admin to raise LORAFLEET_MAX_ADAPTERS_PER_JOB",
            }
        ]
        assert http.get("/v1/jobs").json() == []
        assert http.post("/v1/jobs", json=job_spec("wide", 10, data)).status_code == 201
