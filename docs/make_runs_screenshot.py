"""Screenshot of the MLflow UI as the README's instructions open it: experiment `simprop`, runs table.

Usage (on a machine with a Chromium, e.g. Debian's `apt-get install chromium`; not needed by CI):

    python3 docs/make_runs_screenshot.py --db mlflow.db --out docs/images/mlflow_runs.png

It starts the README's `mlflow ui --backend-store-uri sqlite:///<db> --host 127.0.0.1` on a free
port, finds experiment `simprop` over REST, opens the README's link
`http://127.0.0.1:<port>/#/experiments/<id>?workflowType=machine_learning` in headless Chromium
(a fresh profile, as a new user's browser) and saves the page. The store is copied first, so the
screenshot never changes it. (Without `workflowType=machine_learning`, MLflow 3.17's UI opens a
fresh browser on its GenAI overview whatever the experiment's `mlflow.experimentKind` tag says.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="mlflow.db", help="the sqlite store to show (copied, never changed)")
    parser.add_argument("--experiment", default="simprop")
    parser.add_argument("--out", default="docs/images/mlflow_runs.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--size", default="1600,900", help="window width,height in pixels")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page to load its data")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="simprop-screenshot-") as tmp:
        tmp = Path(tmp)
        db = tmp / "mlflow.db"
        shutil.copyfile(args.db, db)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(base + "/health")
            experiment = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={args.experiment}")
            experiment_id = experiment["experiment"]["experiment_id"]
            tags = {t["key"]: t["value"] for t in experiment["experiment"].get("tags", [])}
            print(f"experiment {args.experiment} ({experiment_id}): mlflow.experimentKind = {tags.get('mlflow.experimentKind')}")
            url = f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"  # as in the README
            out = Path(args.out).absolute()
            out.parent.mkdir(parents=True, exist_ok=True)
            profile = tmp / "chromium-profile"
            command = [
                args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
                f"--virtual-time-budget={args.wait_ms}", f"--screenshot={out}", url,
            ]  # fmt: skip
            print(" ".join(command))
            subprocess.run(command, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"wrote {out} ({url})")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
