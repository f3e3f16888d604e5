"""Start the real `imagerec serve` in a subprocess for integration tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, status: int, process: subprocess.Popen | None = None, limit_s=180) -> None:
    """Poll `url` until it answers `status` (start-up, not timing: nothing is measured)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=5).status_code == status:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status}")


@contextlib.contextmanager
def running_server(
    bundle: Path,
    log_dir: Path,
    env: dict[str, str] | None = None,
    models: bool = False,
    extra: tuple[str, ...] = (),
):
    """`imagerec serve --model bundle` (or `--models bundle`, a repository folder) on a free
    port, ready (models loaded and warm)."""
    port = free_port()
    log_path = log_dir / "serve.log"
    flag = "--models" if models else "--model"
    command = [sys.executable, "-m", "imagerec.cli", "serve", flag, str(bundle), *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        try:
            wait_for(server.url + "/readyz", 200, process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{log_path.read_text()[-2000:]}") from None
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
