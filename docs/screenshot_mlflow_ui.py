"""Screenshot the MLflow UI of a lorafleet store: the job run expanded to show its adapter child runs.

    lorafleet quickstart                      # or any job, under LORAFLEET_HOME
    python docs/screenshot_mlflow_ui.py --project quickstart --out docs/mlflow-ui.png

Needs Debian's `chromium` (apt-get install -y chromium) and nothing else: it serves `mlflow ui` on the
store at $LORAFLEET_HOME/mlflow.db on a free port, opens the experiment's runs table in headless
Chromium and drives it over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-separated
JSON on fds 3 and 4, so no websocket client is needed): it seeds the page's saved view in localStorage
(lineage, loss and LoRA columns; assistant panel closed), clicks the expander of every parent run, and
saves a PNG. A plain `chromium --headless --screenshot` cannot do that: MLflow shows child runs collapsed
under their parent until someone clicks. The selectors and localStorage keys are MLflow 3.x UI internals
(checked with 3.17): if a new MLflow renames the expander it times out rather than take a collapsed shot;
if it renames the saved-view keys the shot shows MLflow's default columns and the assistant panel.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# MLflow 3.x markup: the +/- button left of a parent run's name, and the assistant side panel's close.
EXPANDERS = 'button[data-component-id$="runnamecellrenderer.tsx_46"]'
ASSISTANT_CLOSE = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
RUN_LINKS = 'a[href*="/runs/"] span'
# The runs table's saved view (MLflow keeps it in localStorage per experiment): lineage, losses, LoRA rank.
COLUMNS = [
    "tags.`lorafleet.lineage_path`",
    "metrics.`eval_loss`",
    "metrics.`parent_eval_loss`",
    "metrics.`train_loss`",
    "params.`lora.r`",
    "params.`train.steps`",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.5)


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe (Chromium reads fd 3, writes fd 4)."""

    def __init__(self, chromium: str, flags: list[str], stderr: Any) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def as_fds_3_and_4() -> None:  # in the child, before exec: via fds above 9, so nothing collides
            read_end = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
            write_end = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [chromium, *flags, "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=as_fds_3_and_4,
            close_fds=False,  # our own fds are non-inheritable (PEP 446); only 3 and 4 pass on
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:  # events and other replies are dropped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def attach_to_page(self) -> None:
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            time.sleep(0.25)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def screenshot_runs(
    base: str, experiment_id: str, out: Path, width: int = 1600, height: int = 640, timeout: float = 60
) -> tuple[str, list[str]]:
    """Open the experiment's runs table, expand every parent run, save a PNG; return the URL and run names."""
    url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    view = {"selectedColumns": COLUMNS, "columnOrder": COLUMNS, "columnWidths": dict.fromkeys(COLUMNS, 140)}
    seed = {
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(view),
        "mlflow.assistant.panelOpen_v1": "false",  # the assistant side panel would cover the table
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    }
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="lorafleet-chromium-") as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        devtools = DevTools(chromium, flags, subprocess.DEVNULL)
        try:
            devtools.attach_to_page()
            devtools.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            devtools.call("Page.navigate", url=f"{base}/health")  # same origin, to seed its localStorage
            devtools.wait_for("document.readyState === 'complete'", timeout)
            for key, value in seed.items():
                devtools.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
            devtools.call("Page.navigate", url=url)
            devtools.wait_for(f"document.querySelectorAll('{EXPANDERS}').length > 0", timeout)
            devtools.evaluate(f"document.querySelector('{ASSISTANT_CLOSE}')?.click()")
            collapsed = devtools.evaluate(f"document.querySelectorAll('{RUN_LINKS}').length")
            devtools.evaluate(f"document.querySelectorAll('{EXPANDERS}').forEach(b => b.click())")
            devtools.wait_for(f"document.querySelectorAll('{RUN_LINKS}').length > {collapsed}", timeout)
            time.sleep(1.0)  # let the grid and its color chips settle
            names = devtools.evaluate(
                f"[...document.querySelectorAll('{RUN_LINKS}')].map(e => e.textContent)"
            )
            png = devtools.call("Page.captureScreenshot", format="png")["data"]
            out.write_bytes(base64.b64decode(png))
            return url, names
        finally:
            devtools.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=os.environ.get("LORAFLEET_HOME"), help="LORAFLEET_HOME")
    parser.add_argument("--project", default="quickstart")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mlflow-ui.png"))
    args = parser.parse_args()
    if args.home is None:
        raise SystemExit("pass --home or set LORAFLEET_HOME")

    from mlflow import MlflowClient

    backend = f"sqlite:///{Path(args.home).resolve() / 'mlflow.db'}"
    experiment = MlflowClient(backend).get_experiment_by_name(f"lorafleet/{args.project}")
    if experiment is None:
        raise SystemExit(f"no experiment lorafleet/{args.project} in {backend}")
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", timeout=120)
        url, names = screenshot_runs(base, experiment.experiment_id, args.out)
        print(f"{args.out}: {url} showing runs {names}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
