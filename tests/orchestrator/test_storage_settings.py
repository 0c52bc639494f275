"""`LORAFLEET_STORAGE` as an object-store URI: where things go, and a wrong one fails at start, clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator.settings import Settings
from workers.storage import check_writable


def test_an_s3_storage_puts_adapters_in_the_bucket_and_stages_exports_at_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, storage="s3://bucket/team/")
    assert settings.adapter_dir("p", "a") == "s3://bucket/team/adapters/p/a"
    assert settings.export_staging == tmp_path.resolve() / "exports"
    local = Settings(home=tmp_path, storage=str(tmp_path / "x" / ".." / "store"))
    assert local.storage_root == str(tmp_path.resolve() / "store")
    assert local.export_staging == tmp_path.resolve() / "store" / "exports"


def test_a_server_with_a_missing_bucket_exits_at_start_naming_the_setting(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **s3_server.env,
        "LORAFLEET_HOME": str(tmp_path / "home"),
        "LORAFLEET_STORAGE": f"s3://{s3_bucket}-missing/prefix",
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "server", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    said = " ".join(done.stderr.split())
    assert f"LORAFLEET_STORAGE='s3://{s3_bucket}-missing/prefix' is not writable" in said
    assert "AWS_ENDPOINT_URL" in said and "Traceback" not in said
    check_writable(f"s3://{s3_bucket}/prefix")  # the right bucket passes, and the probe is deleted
    assert not [k for k in s3_server.keys(s3_bucket) if "probe" in k]  # (pyarrow keeps a `prefix/` marker)
