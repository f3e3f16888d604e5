"""The compiled front with the int8 engine, as `imagerec serve` runs by default: slow clients do
not stop others being answered, and the server process never loads TensorFlow."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import requests

from live_server import running_server

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import slow_clients  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "cifar10"
SAMPLE = Path(__file__).parent / "fixtures" / "samples" / "dog.jpg"


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    with running_server(BUNDLED, tmp_path_factory.mktemp("log")) as live:
        yield live


def _worker(pid: int) -> int:
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def test_the_default_server_is_granian_with_the_int8_engine_and_no_tensorflow(default_server):
    answer = requests.post(
        default_server.url + "/v1/predict",
        data=SAMPLE.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["results"][0]["label"] == "dog"
    log = default_server.log_path.read_text()
    assert "(granian," in log and "engine onnx-int8" in log
    supervisor = default_server.process.pid
    maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in (supervisor, _worker(supervisor))}
    assert "onnxruntime" in maps[_worker(supervisor)]  # the worker runs the model
    for pid, mapped in maps.items():
        assert "libtensorflow" not in mapped, pid


def test_hundreds_of_trickling_connections_leave_other_clients_answered(default_server):
    result = slow_clients.measure(default_server.url, connections=300, seconds=5)
    assert result["slow_opened"] == 300 and result["slow_refused"] == 0
    assert result["requests"] > 10 and result["failed"] == 0
    assert result["max_ms"] < 1000, result  # a bound on starvation, not a speed measurement
    assert default_server.process.poll() is None


def test_a_busy_port_is_a_clear_error_not_a_traceback(capsys):
    from imagerec.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for front in ("granian", "waitress"):
            assert main(["serve", "--port", str(port), "--front", front]) == 1
            err = capsys.readouterr().err
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err, err


def test_an_engine_the_bundle_lacks_stops_serve_before_the_port_opens(capsys):
    from imagerec.cli import main

    assert main(["serve", "--port", "1", "--engine", "onnx"]) == 1
    assert "has no model.onnx for the onnx engine: add it with `imagerec export" in (
        capsys.readouterr().err
    )
