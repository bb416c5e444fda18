"""Shared test fixtures.

``dataset`` is a small embedded dataset (12 training images at 32 px), prepared and split once per session,
for the tests that train models.

``http_server`` serves a temporary folder on 127.0.0.1 with a small threaded HTTP server that speaks
``Range`` requests (206 / 416) the way real static file servers do, records every request, and can
misbehave on purpose (drop a connection after N bytes, ignore Range) to exercise resumable downloads.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weakshot.data.archives import safe_extract
from weakshot.data.classes import ClassTable
from weakshot.data.cocostuff import convert_cocostuff
from weakshot.data.embedded import EmbeddedConfig, generate_embedded
from weakshot.data.splits import SplitSpec, write_image_labels, write_split, write_split_image_labels


@dataclass
class ServedRequest:
    path: str
    range_header: str | None
    status: int


@dataclass
class HttpServerControl:
    """Handle on the running server: where files go, what was asked, and how to misbehave."""

    root: Path
    base_url: str
    requests: list[ServedRequest] = field(default_factory=list)
    # URL path -> bytes to send before closing the connection; used once, then removed.
    drop_after: dict[str, int] = field(default_factory=dict)
    # Answer every request with 200 and the whole file, as servers without range support do.
    ignore_range: bool = False

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add_file(self, name: str, data: bytes) -> str:
        """Put ``data`` under ``name`` in the served folder and return its URL."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url(name)


def _make_handler(control: HttpServerControl) -> type[http.server.BaseHTTPRequestHandler]:
    class RangeHandler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
            pass

        def _record(self, status: int) -> None:
            control.requests.append(ServedRequest(self.path, self.headers.get("Range"), status))

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            target = (control.root / name).resolve()
            if control.root.resolve() not in target.parents or not target.is_file():
                self._record(404)
                self.send_error(404)
                return
            data = target.read_bytes()
            size = len(data)
            start, status = 0, 200
            range_header = self.headers.get("Range")
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match and not control.ignore_range:
                start = int(match.group(1))
                if start >= size:
                    self._record(416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                end = int(match.group(2)) if match.group(2) else size - 1
                data = data[start : end + 1]
                status = 206
            self._record(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
            self.end_headers()
            drop = control.drop_after.pop(self.path, None)
            if drop is not None:
                # Send part of the body, then cut the connection like a flaky network would.
                self.wfile.write(data[:drop])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)

    return RangeHandler


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServerControl]:
    """A threaded Range-capable HTTP server on 127.0.0.1 (port chosen by the OS), stopped afterwards."""
    root = tmp_path_factory.mktemp("served")
    control = HttpServerControl(root=root, base_url="")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(control))
    server.daemon_threads = True
    control.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield control
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(
        EmbeddedConfig.from_dict({"seed": 0, "image_size": 32, "num_train": 12, "num_test": 4}),
        archive=root / "archive.zip",
        classes=root / "classes.yaml",
    )
    safe_extract(root / "archive.zip", root / "raw")
    convert_cocostuff(root / "raw", root / "prepared", ClassTable.load(root / "classes.yaml"))
    spec = SplitSpec.from_dict(
        {"source": "random", "num_random": 1, "novel_fraction": 0.25, "extra_novel_ratios": [], "seed": 0}
    )
    write_split(root / "prepared" / "classes.yaml", spec, "split1", root / "split1.yaml")
    write_image_labels(root / "prepared", root / "image_labels.tsv")
    write_split_image_labels(root / "image_labels.tsv", root / "split1.yaml", root / "split1_image_labels.tsv")
    return {
        "prepared": root / "prepared",
        "split": root / "split1.yaml",
        "image_labels": root / "split1_image_labels.tsv",
    }
