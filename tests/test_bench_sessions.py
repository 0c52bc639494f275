"""The sessions benchmark's pure helpers: the data every mode trains on, the summary, the GPU table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_sessions", ROOT / "benchmarks" / "bench_sessions.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_round_data_is_the_same_in_every_mode_and_differs_between_sessions_and_rounds() -> None:
    a = bench.round_tokens(3, 1, batch=4, seq=20, vocab=100)
    assert a == bench.round_tokens(3, 1, batch=4, seq=20, vocab=100)
    assert a != bench.round_tokens(2, 1, batch=4, seq=20, vocab=100)
    assert a != bench.round_tokens(3, 0, batch=4, seq=20, vocab=100)
    assert len(a) == 4
    assert all(10 + 1 <= len(s) <= 20 + 1 for s in a)  # a datum is a sequence less its last token
    assert all(16 <= t < 100 for s in a for t in s)
    assert bench.target_count(a) == sum(len(s) for s in a) - 4


def test_summary_times_only_the_rounds_after_the_warm_up() -> None:
    out = bench.summarize([9.0, 1.0, 3.0], [100, 100, 300], warmup=1)
    assert out == {"tokens_per_s": 100.0, "round_s_median": 2.0, "round_s_max": 3.0, "timed_tokens": 400}
    with pytest.raises(ValueError, match="leave none to time"):
        bench.summarize([1.0], [10], warmup=1)


def test_gains_compare_the_shared_host_with_the_other_modes_of_the_same_n() -> None:
    rows = [
        {"n": 4, "mode": "shared", "status": "ok", "tokens_per_s": 300.0},
        {"n": 4, "mode": "sequential", "status": "ok", "tokens_per_s": 200.0},
        {"n": 4, "mode": "procs", "status": "skipped: memory"},
        {"n": 1, "mode": "procs", "status": "ok", "tokens_per_s": 600.0},
    ]
    bench.gains(rows)
    assert rows[0]["x_sequential"] == 1.5
    assert "x_procs" not in rows[0]  # N=1's procs row is not N=4's


def test_procs_are_skipped_only_when_n_bases_would_not_fit() -> None:
    assert bench.procs_skip_reason(16, 2000.0, ram_mb=24_000) is not None
    assert bench.procs_skip_reason(4, 2000.0, ram_mb=24_000) is None
    assert bench.procs_skip_reason(16, None, ram_mb=24_000) is None  # nothing measured yet: try


def test_gpu_table_from_the_memory_model() -> None:
    config = json.loads((ROOT / "benchmarks" / "configs" / "smollm2-135m.json").read_text())
    rows = {(r["device"], r["dtype"]): r for r in bench.gpu_capacity(config, session_tokens=300)}
    h100, h200 = rows[("H100 80 GB", "bfloat16")], rows[("H200 141 GB", "bfloat16")]
    assert 1024 < h100["pass_tokens"] < h200["pass_tokens"]
    assert rows[("H100 80 GB", "float32")]["pass_tokens"] < h100["pass_tokens"]
    assert h100["sessions"] == h100["pass_tokens"] // 300
    assert rows[("CPU (memory.CPU_PASS_TOKENS)", "float32")]["sessions"] == 1024 // 300


@pytest.mark.parametrize(
    "result", sorted((ROOT / "benchmarks" / "results").glob("sessions-*.json")), ids=lambda p: p.stem
)
def test_committed_results_render_from_their_json(result: Path, tmp_path: Path) -> None:
    """`--render` redraws a report from its JSON alone: every row, skipped ones with their reason."""
    doc = json.loads(result.read_text())
    text = bench.markdown(doc)
    for row in doc["rows"]:
        assert f"| {row['n']} | {row['mode']} |" in text
        if row["status"] != "ok":
            assert row["status"] in text
    assert "## What a GPU changes" in text and "H200 141 GB" in text
    bench.plot(doc, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
