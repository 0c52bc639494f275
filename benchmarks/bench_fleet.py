"""The control plane at fleet size: the real controller, store, event log and MLflow mirror, and the HTTP
API, against simulated packs (`orchestrator.control.simulated.SimulatedPacks`) that train nothing.

Per backend (SQLite, PostgreSQL) and per fleet size (adapters in jobs of 5, over `--workers` simulated
single-worker packs of `--per-worker` adapters each; what does not fit waits queued), it submits the jobs
through the service layer, then:

1. *steady*: ticks the controller every `--tick-seconds` for `--ticks` ticks, each drain advancing every
   running adapter one step (a step, an eval every 25 steps, a checkpoint every 50), while the MLflow
   mirror runs in its background thread (`Tracker.start`) and a client GETs a job's view and a page of its
   adapters from a `uvicorn` server of the API in the same process; reports tick time (median, p99), how
   far MLflow's cursor is behind SQL's newest event (seconds, sampled), and API latency;
2. *burst*: `--burst-ticks` ticks back to back with every adapter advancing `--burst-steps` steps per
   drain: events ingested into SQL per second of tick.

    python benchmarks/bench_fleet.py --sizes 100,1000,10000   # SQLite, and PostgreSQL at LORAFLEET_BENCH_PG
    python benchmarks/bench_fleet.py --sizes 100 --ticks 5 --backends sqlite   # a smoke run
    python benchmarks/bench_fleet.py --profile 1000 --backends postgresql      # cProfile of steady ticks

Writes `benchmarks/results/fleet.{json,md,png}` (not for `--profile`). The base model is SmolLM2-135M's
public config (`configs/smollm2-135m.json`), so memory estimates are a real base's; no weights are read.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from orchestrator.control.controller import Controller
from orchestrator.control.simulated import SimulatedPacks
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.states import AdapterState
from orchestrator.store import Store
from orchestrator.tracking.mirror import Tracker

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PG_ADMIN = os.environ.get("LORAFLEET_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADAPTERS_PER_JOB = 5
TARGETS = {"tick_p50_ms": 100.0, "events_per_s": 10_000.0, "mlflow_lag_s": 5.0, "api_max_ms": 200.0}


# ---- the pieces ----


class Database:
    """A fresh database for one case: a SQLite file under the home, or a new PostgreSQL database."""

    def __init__(self, backend: str, home: Path) -> None:
        self.backend = backend
        self.admin: Any = None
        if backend == "sqlite":
            self.url = f"sqlite:///{home / 'lorafleet.db'}"
            return
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        self.admin = create_engine(make_url(PG_ADMIN), isolation_level="AUTOCOMMIT")
        self.name = f"lf_bench_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = self.admin.url.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        if self.admin is not None:
            from sqlalchemy import text

            with self.admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.admin.dispose()


class ApiServer:
    """The real HTTP API (`orchestrator.server.app.create_app`, its controller not started) on a free port."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from orchestrator.server.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(
            create_app(settings, start_controller=False), port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start in 60 s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Prober:
    """GETs a job's view and a page of its adapters, over and over, recording each call's latency."""

    def __init__(self, port: int, job_id: str, period: float = 0.1) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.job_id, self.period = job_id, period
        self.latencies: dict[str, list[float]] = {"job": [], "adapters": []}
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        paths = {"job": f"/v1/jobs/{self.job_id}", "adapters": f"/v1/adapters?job_id={self.job_id}&limit=100"}
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.wait(self.period):
                for label, path in paths.items():
                    start = time.perf_counter()
                    response = client.get(path)
                    self.latencies[label].append(time.perf_counter() - start)
                    self.errors += response.status_code != 200

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=60)


class LagMeter:
    """How far the MLflow mirror's cursor is behind SQL's newest event, in seconds: for each sample of the
    newest event id (after each tick), the time until the cursor reached it."""

    def __init__(self, store: Store, cursor: str = "mlflow") -> None:
        self.store, self.cursor = store, cursor
        self.newest: list[tuple[float, int]] = []  # (when, newest event id then)
        self.reached: list[tuple[float, int]] = []  # (when, cursor then)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def note_newest(self) -> None:
        events = self.store.list_events(
            None, after_id=self.newest[-1][1] if self.newest else 0, limit=100_000
        )
        if events:
            self.newest.append((time.monotonic(), events[-1].id))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.reached.append((time.monotonic(), self.store.get_cursor(self.cursor)))

    def stop(self, drain_timeout: float) -> dict[str, Any]:
        """Waits up to `drain_timeout` for the mirror to catch up, then summarises."""
        deadline = time.monotonic() + drain_timeout
        while self.newest and time.monotonic() < deadline:
            if self.reached and self.reached[-1][1] >= self.newest[-1][1]:
                break
            time.sleep(0.2)
        self._stop.set()
        self.thread.join()
        lags, behind = [], 0
        for when, event_id in self.newest:
            caught = next((t for t, c in self.reached if c >= event_id and t >= when), None)
            if caught is None:
                behind += 1
            else:
                lags.append(caught - when)
        mirrored = self.reached[-1][1] if self.reached else 0
        moved = [(t, c) for t, c in self.reached if c > 0]
        span = moved[-1][0] - self.reached[0][0] if moved else 0.0
        return {
            "mirror_events_per_s": round(mirrored / span) if span > 0 else None,
            "lag_p50_s": _quantile(lags, 0.5),
            "lag_max_s": max(lags) if lags else None,
            "samples_never_mirrored": behind,
            "events_mirrored": mirrored,
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# ---- one case ----


def submit_fleet(service: Service, home: Path, adapters: int, steps: int) -> list[str]:
    data = home / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello {i}"}) + "\n" for i in range(20)))
    base = home / "base"
    base.mkdir(exist_ok=True)
    shutil.copy(HERE / "configs" / "smollm2-135m.json", base / "config.json")
    job_ids = []
    for j in range(-(-adapters // ADAPTERS_PER_JOB)):
        count = min(ADAPTERS_PER_JOB, adapters - j * ADAPTERS_PER_JOB)
        spec = {
            "name": f"job{j}",
            "project": f"team{j % 10}",
            "base_model": str(base),
            "tokenizer": str(base),
            "train": {"steps": steps, "eval_every": 25, "checkpoint_every": 50, "seed": j},
            "resources": {"max_adapters_per_worker": ARGS.per_worker, "memory_gb_per_worker": 80},
            "adapters": [{"name": f"j{j}a{i}", "data": {"path": str(data)}} for i in range(count)],
        }
        job_ids.append(service.submit(spec).id)
    return job_ids


def run_case(backend: str, adapters: int, profile: bool = False) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    database = Database(backend, home)
    settings = Settings(
        home=home,
        db_url=database.url,
        mlflow_uri=f"sqlite:///{home / 'mlflow.db'}",
        max_adapters_per_job=ADAPTERS_PER_JOB,
        tick_seconds=ARGS.tick_seconds,
    )
    store = Store.open(settings.database_url)
    try:
        return _measure(settings, store, backend, adapters, home, profile)
    finally:
        store.close()
        database.drop()
        shutil.rmtree(home, ignore_errors=True)


def _measure(
    settings: Settings, store: Store, backend: str, adapters: int, home: Path, profile: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    job_ids = submit_fleet(Service(settings, store), home, adapters, steps=ARGS.steps)
    submit_s = time.perf_counter() - started
    packs = SimulatedPacks(
        nodes=ARGS.workers, cpus_per_node=1, memory_bytes=64 * 2**30, advance_on_drain=False
    )
    controller = Controller(settings, store, packs=packs)
    tracker = Tracker(
        store, str(settings.mlflow_uri), home / "mlflow-artifacts", batch_events=ARGS.mlflow_batch
    )
    controller.tick()  # the first tick launches the packs: measured apart, it is not the steady state
    first_tick_s = time.perf_counter() - started - submit_s
    api = ApiServer(settings)
    prober = Prober(api.port, job_ids[0], period=0.1 if not ARGS.alone else 3600)
    if not ARGS.alone:
        tracker.start(period=1.0)
    lag = LagMeter(store)
    ticks: list[float] = []
    profiler = cProfile.Profile() if profile else None
    try:
        for _ in range(ARGS.ticks):
            packs.advance()  # the packs' work, not the controller's: outside the timing
            begin = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            controller.tick()
            if profiler is not None:
                profiler.disable()
            ticks.append(time.perf_counter() - begin)
            lag.note_newest()
            time.sleep(max(0.0, settings.tick_seconds - ticks[-1]))
        active = sum(len(p.members) for p in controller.running.values())
        events_before = _event_count(store)
        packs.steps_per_drain = ARGS.burst_steps
        burst_s = 0.0
        for _ in range(ARGS.burst_ticks):
            packs.advance()
            begin = time.perf_counter()
            controller.tick()
            burst_s += time.perf_counter() - begin
            lag.note_newest()
        burst_events = _event_count(store) - events_before
    finally:
        prober.stop()
        mirror = lag.stop(drain_timeout=ARGS.mlflow_drain)
        tracker.stop()
        api.stop()
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    latencies = prober.latencies["job"] + prober.latencies["adapters"]
    return {
        "backend": backend,
        "adapters": adapters,
        "jobs": len(job_ids),
        "active_adapters": active,
        "queued_adapters": len(store.list_adapters(states=[AdapterState.QUEUED])),
        "packs": len(controller.running),
        "submit_s": round(submit_s, 2),
        "first_tick_s": round(first_tick_s, 3),
        "ticks": len(ticks),
        "tick_p50_ms": _ms(_quantile(ticks, 0.5)),
        "tick_p99_ms": _ms(_quantile(ticks, 0.99)),
        "tick_max_ms": _ms(max(ticks)),
        "burst_events": burst_events,
        "burst_s": round(burst_s, 3),
        "events_per_s": round(burst_events / burst_s) if burst_s else None,
        "events_total": _event_count(store),
        "mlflow_lag_p50_s": _round(mirror["lag_p50_s"]),
        "mlflow_lag_max_s": _round(mirror["lag_max_s"]),
        "mlflow_samples_never_mirrored": mirror["samples_never_mirrored"],
        "mlflow_events_mirrored": mirror["events_mirrored"],
        "mlflow_events_per_s": mirror["mirror_events_per_s"],
        "api_calls": len(latencies),
        "api_errors": prober.errors,
        "api_p50_ms": _ms(_quantile(latencies, 0.5)),
        "api_p99_ms": _ms(_quantile(latencies, 0.99)),
        "api_max_ms": _ms(max(latencies) if latencies else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _event_count(store: Store) -> int:
    from sqlalchemy import func, select

    from orchestrator.store.models import EventRow

    with store.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(EventRow)).scalar_one())


# ---- the report ----


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("sqlalchemy", "psycopg", "mlflow", "fastapi", "uvicorn", "pydantic"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    pg_version = None
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_ADMIN)
        with engine.connect() as connection:
            pg_version = connection.execute(text("SHOW server_version")).scalar_one()
        engine.dispose()
    except Exception as exc:
        pg_version = f"unreachable: {exc}"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "load_average_before": os.getloadavg(),
        **versions,
    }


def write_report(rows: list[dict[str, Any]], info: dict[str, Any], tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(
        json.dumps({"machine": info, "args": vars(ARGS), "rows": rows}, indent=2)
    )
    columns = [
        ("backend", "backend"),
        ("adapters", "adapters"),
        ("active_adapters", "active"),
        ("queued_adapters", "queued"),
        ("tick_p50_ms", "tick p50 ms"),
        ("tick_p99_ms", "tick p99 ms"),
        ("first_tick_s", "first tick s"),
        ("events_per_s", "events/s (burst)"),
        ("mlflow_lag_p50_s", "MLflow lag p50 s"),
        ("mlflow_lag_max_s", "MLflow lag max s"),
        ("mlflow_samples_never_mirrored", "samples not mirrored"),
        ("mlflow_events_mirrored", "events mirrored / total"),
        ("mlflow_events_per_s", "mirror events/s"),
        ("api_p50_ms", "API p50 ms"),
        ("api_max_ms", "API max ms"),
        ("submit_s", "submit s"),
    ]
    lines = [
        "# Control plane at fleet size (`bench_fleet.py`)",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), Python {info['python']}, PostgreSQL "
        f"{info['postgresql']}, SQLAlchemy {info['sqlalchemy']}, psycopg {info['psycopg']}, MLflow "
        f"{info['mlflow']} (SQLite tracking store, in process), FastAPI {info['fastapi']}, uvicorn "
        f"{info['uvicorn']}. Load average before: {_loads(info['load_average_before'])}; after: "
        f"{_loads(info.get('load_average_after', ()))} (a shared machine).",
        "",
        f"Simulated packs: {ARGS.workers} single-worker packs of up to {ARGS.per_worker} adapters; jobs of "
        f"{ADAPTERS_PER_JOB} adapters of {ARGS.steps} steps (eval every 25, checkpoint every 50). Steady: "
        f"{ARGS.ticks} ticks every {ARGS.tick_seconds} s, each adapter one step per tick, MLflow mirror "
        f"(batches of {ARGS.mlflow_batch} events) and an API client (a job's view and a page of 100 "
        f"adapters, every 0.1 s) running. Burst: {ARGS.burst_ticks} ticks back to back, "
        f"{ARGS.burst_steps} steps per adapter per tick; events/s is per second of tick. "
        "MLflow lag: after each tick, the time until the "
        "mirror's cursor reached SQL's newest event (samples not mirrored: still behind when the run ended, "
        f"after up to {ARGS.mlflow_drain} s of draining).",
        "",
        "| " + " | ".join(label for _, label in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = {**row, "mlflow_events_mirrored": f"{row['mlflow_events_mirrored']} / {row['events_total']}"}
        lines.append("| " + " | ".join(str(cells.get(key, "")) for key, _ in columns) + " |")
    lines += ["", "Targets (at 1,000 active adapters, PostgreSQL):", ""]
    for row in rows:
        if row["active_adapters"] >= 1000 and row["backend"] == "postgresql":
            lines += [
                f"- {row['adapters']} adapters: tick p50 {row['tick_p50_ms']} ms (target < "
                f"{TARGETS['tick_p50_ms']:.0f}), {row['events_per_s']} events/s (target >= "
                f"{TARGETS['events_per_s']:.0f}), MLflow lag max {row['mlflow_lag_max_s']} s (target <= "
                f"{TARGETS['mlflow_lag_s']:.0f}), API max {row['api_max_ms']} ms (target < "
                f"{TARGETS['api_max_ms']:.0f})"
            ]
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    plot(rows, tag)


def _loads(values: Any) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def plot(rows: list[dict[str, Any]], tag: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metrics = [
        ("tick_p50_ms", "tick p50 (ms)"),
        ("events_per_s", "events/s into SQL (burst)"),
        ("mlflow_lag_max_s", "MLflow lag max (s)"),
        ("api_max_ms", "API max latency (ms)"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for backend in sorted({r["backend"] for r in rows}):
            points = [(r["adapters"], r[key]) for r in rows if r["backend"] == backend and r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_xlabel("adapters")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{tag}.png", dpi=110)


def main() -> None:
    info = machine()
    if ARGS.profile:
        for backend in ARGS.backends.split(","):
            print(json.dumps(run_case(backend, ARGS.profile, profile=True), indent=1))
        return
    rows = []
    for adapters in [int(x) for x in ARGS.sizes.split(",")]:
        for backend in ARGS.backends.split(","):
            row = run_case(backend, adapters)
            print(json.dumps(row), flush=True)
            rows.append(row)
    info["load_average_after"] = os.getloadavg()
    write_report(rows, info, ARGS.tag)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,1000,10000", help="adapters per case, ','-separated")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--workers", type=int, default=100, help="simulated single-worker packs")
    p.add_argument("--per-worker", type=int, default=10, help="adapters per pack")
    p.add_argument("--steps", type=int, default=1000, help="train.steps of each adapter")
    p.add_argument("--ticks", type=int, default=30, help="steady ticks")
    p.add_argument("--tick-seconds", type=float, default=0.5)
    p.add_argument("--burst-ticks", type=int, default=5)
    p.add_argument("--burst-steps", type=int, default=10)
    p.add_argument("--mlflow-batch", type=int, default=2000, help="the mirror's events per batch")
    p.add_argument("--mlflow-drain", type=float, default=20.0, help="seconds to let MLflow catch up")
    p.add_argument("--profile", type=int, default=0, help="cProfile steady ticks at this many adapters")
    p.add_argument("--alone", action="store_true", help="no MLflow mirror, no API client: the tick alone")
    p.add_argument("--tag", default="fleet", help="results/<tag>.{json,md,png}")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    main()
