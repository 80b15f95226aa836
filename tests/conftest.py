"""Shared pytest fixtures.

Data fixtures generate small trees of the embedded dataset once per session (seconds) and
run the data library on them; tests that alter files work on copies. ``serve_files`` is a real
HTTP server on 127.0.0.1 (with or without ``Range`` support, optionally dropping the
connection once) for the download tests: only loopback traffic, no mocks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# CI hygiene for every test, also those that start dvc or mlflow in a subprocess.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# A generated tree big enough for 5-shot episodes in every fold, small enough to build in ~2 s.
TINY_SYNTHETIC = {"num_sbd_images": 200, "num_voc_images": 240, "width": 128, "height": 96, "seed": 0}


def tiny_params(**sections):
    """The committed params with the tiny generated tree; ``sections`` replace whole sections."""
    from simprop.params import SyntheticParams, load_params

    params = load_params(REPO_ROOT / "params.yaml")
    data = dataclasses.replace(params.data, synthetic=SyntheticParams(**TINY_SYNTHETIC), workers=2)
    params = dataclasses.replace(params, data=data)
    return dataclasses.replace(params, **sections) if sections else params


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: small convolutions gain nothing from threads and
    lose a lot when the CPU is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_synthetic() -> dict:
    """The ``data.synthetic`` section of a tiny generated tree (fresh copy per use)."""
    return dict(TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def data_pipeline(tmp_path_factory) -> tuple:
    """``(layout, params, split metrics)`` of a tiny generated tree run through all data stages.

    Shared by many tests: never modify it (copy what you need).
    """
    from simprop.data.augment import build_segmentation_class_aug
    from simprop.data.download import prepare_raw
    from simprop.data.episodes import build_episodes
    from simprop.data.layout import DataLayout
    from simprop.data.splits import build_splits

    params = tiny_params()
    layout = DataLayout(tmp_path_factory.mktemp("pipeline") / "data")
    prepare_raw(layout, params.data, workers=2, progress=False)
    build_segmentation_class_aug(layout, workers=2, progress=False)
    metrics = build_splits(layout, params.splits, layout.root / "splits.json", workers=2, progress=False)
    build_episodes(layout, params.splits.folds, params.episodes)
    return layout, params, metrics


@pytest.fixture
def copy_tree(tmp_path):
    """Copy a directory into this test's tmp_path and return the copy."""

    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return copy


@pytest.fixture
def feature_cache_tree(data_pipeline, copy_tree, tmp_path):
    """``build(model=..., train=...) -> (params, root, manifest)``: a copy of the shared data tree
    in this test's tmp_path with fold 0's feature cache built, for a random backbone and the
    given ``model`` / ``train`` param overrides (``train.cache_backbone_features`` is on)."""
    import torch

    from simprop.engine.features import build_feature_cache

    def build(model: dict | None = None, train: dict | None = None):
        layout, params, _ = data_pipeline
        copy_tree(layout.root, "data")  # the shared tree stays untouched
        params = dataclasses.replace(
            params,
            splits=dataclasses.replace(params.splits, folds=[0]),
            model=dataclasses.replace(params.model, backbone_weights="none", **(model or {})),
            train=dataclasses.replace(params.train, cache_backbone_features=True, **(train or {})),
        )
        return params, tmp_path, build_feature_cache(params, tmp_path, torch.device("cpu"))

    return build


class FileServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving in-memory files.

    ``range_support``: honour ``Range: bytes=N-`` with 206 (else always 200 with the whole file).
    ``interrupt_after``: the next response is cut after that many bytes and the connection
    closed (once). ``trickle_interval``: every response sends its headers, waits
    ``trickle_delay`` seconds, then one body byte every ``trickle_interval`` seconds - for at most
    ``trickle_limit`` seconds in all, then closes the connection (a stalling server, bounded in
    time so that a client without a deadline fails the test instead of hanging it).
    ``requests`` records ``(path, Range header)``; ``bytes_sent`` counts body bytes.
    """

    def __init__(self, files: dict[str, bytes], range_support: bool = True) -> None:
        self.files = dict(files)
        self.range_support = range_support
        self.interrupt_after: int | None = None
        self.trickle_interval: float | None = None
        self.trickle_delay = 0.0
        self.trickle_limit = 5.0
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                with server._lock:
                    server.requests.append((name, range_header))
                    cut, server.interrupt_after = server.interrupt_after, None
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "not found")
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if server.range_support and match:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                if server.range_support:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.trickle_interval is not None:
                    self._trickle(body)
                    return
                if cut is not None:
                    body = body[:cut]
                    self.close_connection = True
                with server._lock:  # count before writing: the client may finish (and the test
                    server.bytes_sent += len(body)  # assert) before this thread runs again
                self.wfile.write(body)
                self.wfile.flush()

            def _trickle(self, body: bytes) -> None:
                self.close_connection = True
                deadline = time.monotonic() + server.trickle_limit
                time.sleep(min(server.trickle_delay, server.trickle_limit))
                try:
                    for i in range(len(body)):
                        if time.monotonic() >= deadline:
                            break
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        with server._lock:
                            server.bytes_sent += 1
                        time.sleep(server.trickle_interval)
                except OSError:  # the client gave up and closed the connection
                    pass

        return Handler


@pytest.fixture
def serve_files() -> Iterator:
    """Start :class:`FileServer` instances: ``serve_files(files, range_support=True)``."""
    servers: list[FileServer] = []

    def start(files: dict[str, bytes], range_support: bool = True) -> FileServer:
        server = FileServer(files, range_support)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
