"""Test doubles for the data loader: tiny MedMNIST-format npz files and a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

FAKE_NAME = "tinymnist3d"
FAKE_LABELS = ("zero", "one", "two")
FAKE_SPLITS = {"train": 5, "val": 2, "test": 3}


def fake_arrays(size: int = 28, n_samples: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a MedMNIST npz: {split}_images (N,S,S,S) uint8 and {split}_labels (N,1) uint8."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (n_samples or FAKE_SPLITS).items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % len(FAKE_LABELS)).astype(np.uint8).reshape(n, 1)
    return arrays


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_info(md5_28: str, md5_64: str = "0" * 32, n_samples: dict | None = None) -> dict:
    """A `medmnist.INFO` entry shaped like the real 3D ones (the URLs are replaced by `url=` in the tests)."""
    return {
        "python_class": "TinyMNIST3D",
        "description": "A tiny synthetic MedMNIST-format set for tests.",
        "url": f"https://example.invalid/{FAKE_NAME}.npz?download=1",
        "MD5": md5_28,
        "url_64": f"https://example.invalid/{FAKE_NAME}_64.npz?download=1",
        "MD5_64": md5_64,
        "task": "multi-class",
        "label": {str(i): name for i, name in enumerate(FAKE_LABELS)},
        "n_channels": 1,
        "n_samples": dict(n_samples or FAKE_SPLITS),
        "license": "CC BY 4.0",
    }


@dataclass
class Route:
    """What the server answers on one path: `status` with `body`; `truncate_to` sends fewer bytes than
    the announced Content-Length, then closes; `fail_first` answers that many requests with 503 first."""

    body: bytes = b""
    status: int = 200
    truncate_to: int | None = None
    fail_first: int = 0
    hits: int = 0


@dataclass
class LoopbackServer:
    """A `ThreadingHTTPServer` on 127.0.0.1:<free port> serving `routes`; records every request path."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def start(self) -> LoopbackServer:
        server_state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server_state.requests.append(self.path)
                route = server_state.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route.hits += 1
                if route.hits <= route.fail_first:
                    self.send_error(503)
                    return
                if route.status != 200:
                    self.send_error(route.status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body[: route.truncate_to])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
