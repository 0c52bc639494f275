"""What a big job costs the control plane: submit, a job's view and a cancel, on N adapters.

Runs the service layer and the controller's cancel (no Ray: every adapter is still queued) against a real
store, SQLite under a temporary home or the PostgreSQL database given, and counts the SQL statements each
operation sends (SQLAlchemy's `before_cursor_execute`) beside its wall time. The data file is shared by
all adapters, the base model a hub id (not loaded). `LORAFLEET_MAX_ADAPTERS_PER_JOB` is lifted so that
the 5,000-adapter spec of issue 15 can be measured; results go to `benchmarks/results/big-jobs.md` by hand.

    python benchmarks/bench_big_jobs.py 1000
    python benchmarks/bench_big_jobs.py 5000 postgresql+psycopg://postgres@127.0.0.1:5432/empty_db
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from orchestrator.control.controller import Controller
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.store import Store


def main(n: int, db_url: str | None) -> None:
    home = Path(tempfile.mkdtemp(prefix="bench-big-jobs-"))
    data = home / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(50)))
    settings = Settings(home=home, db_url=db_url, max_adapters_per_job=max(n, 1000))
    store = Store.open(settings.database_url)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    event.listen(store.engine, "before_cursor_execute", count)
    service = Service(settings, store)
    spec = {
        "name": "big",
        "base_model": "Qwen/Qwen2.5-0.5B",
        "train": {"steps": 5},
        "adapters": [{"name": f"a{i}", "data": {"path": str(data)}} for i in range(n)],
    }
    where = "postgresql" if db_url else "sqlite"

    def timed(label: str, operation: Callable[[], Any]) -> Any:
        statements[0] = 0
        start = time.perf_counter()
        out = operation()
        seconds = time.perf_counter() - start
        size = f", {len(out.model_dump_json())} bytes" if hasattr(out, "model_dump_json") else ""
        print(
            f"{label:9s} {n:5d} adapters, {where:10s}: {seconds:6.2f} s, {statements[0]:6d} statements{size}"
        )
        return out

    job = timed("submit", lambda: service.submit(spec))
    timed("job view", lambda: service.job(job.id))
    timed("cancel", lambda: Controller(settings, store).cancel_job(job.id))
    store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
