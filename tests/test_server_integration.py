"""The real server: `imagerec serve` under each front (granian, waitress), called with requests
and with curl."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from imagerec.api import create_app
from imagerec.config import Settings
from imagerec.images import decode_image
from imagerec.predictor import Predictor
from imagerec.repository import ModelRepository
from imagerec.server import make_server
from live_server import free_port, running_server
from tiny_bundle import FIXTURES, LABELS, SAMPLES, make_tiny_bundle

MAX_BODY = 300_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor.from_path(bundle)


@pytest.fixture(scope="module", params=["granian", "waitress"])
def server(request, bundle, tmp_path_factory):
    env = {
        "IMAGEREC_MAX_BODY_BYTES": str(MAX_BODY),
        "IMAGEREC_MAX_PIXELS": "1000000",
        "IMAGEREC_THREADS": "8",
        "IMAGEREC_FRONT": request.param,
    }
    with running_server(bundle, tmp_path_factory.mktemp("log"), env) as live:
        yield live.url, live.process, live.log_path


def top_labels(predictor, data: bytes, k: int = 3) -> list[str]:
    return [label for label, _ in predictor.classify([decode_image(data)], k)[0].top_k]


def test_requests_client_with_each_input_form(server, predictor):
    url, _, _ = server
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in SAMPLES[:2]]
    by_form = requests.post(url + "/v1/predict", files=files, data={"top_k": "2"}, timeout=30)
    assert by_form.status_code == 200
    results = by_form.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in SAMPLES[:2]]
    for result, path in zip(results, SAMPLES[:2], strict=True):
        assert [t["label"] for t in result["top_k"]] == top_labels(predictor, path.read_bytes(), 2)

    data = SAMPLES[2].read_bytes()
    raw = requests.post(
        url + "/v1/predict", data=data, headers={"Content-Type": "image/jpeg"}, timeout=30
    )
    payload = {"images": [{"b64": base64.b64encode(data).decode()}], "top_k": 3}
    as_json = requests.post(url + "/v1/predict", json=payload, timeout=30)
    for response in (raw, as_json):
        assert response.status_code == 200
        [result] = response.json()["results"]
        assert [t["label"] for t in result["top_k"]] == top_labels(predictor, data)

    model = requests.get(url + "/v1/model", timeout=30).json()
    assert model["labels"] == LABELS and model["version"] == predictor.version
    assert requests.get(url + "/v1/labels", timeout=30).json() == {"labels": LABELS}
    metrics = requests.get(url + "/metrics", timeout=30).text
    assert "imagerec_images_classified_total" in metrics and "imagerec_batch_size" in metrics


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
def test_curl_multipart(server, predictor):
    url, _, _ = server
    path = SAMPLES[0]
    result = subprocess.run(
        ["curl", "-sS", "-F", f"image=@{path}", f"{url}/v1/predict?top_k=4"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    [answer] = json.loads(result.stdout)["results"]
    assert answer["filename"] == path.name
    assert [t["label"] for t in answer["top_k"]] == top_labels(predictor, path.read_bytes(), 4)


def test_every_error_code_over_http(server):
    url, _, _ = server
    predict = url + "/v1/predict"
    jpeg = SAMPLES[0].read_bytes()

    def post(body, content_type="image/jpeg", **kwargs):
        return requests.post(
            predict, data=body, headers={"Content-Type": content_type}, timeout=30, **kwargs
        )

    def chunks():
        for _ in range(MAX_BODY // 10_000 + 2):
            yield b"\xff" * 10_000

    cases = {
        "bad top_k": (post(jpeg, params={"top_k": 99}), 400),
        "truncated": (post(jpeg[:-200]), 400),
        "bad base64": (requests.post(predict, json={"images": [{"b64": "@@"}]}, timeout=30), 400),
        "over Content-Length": (post(b"\xff\xd8\xff" + bytes(MAX_BODY)), 413),
        "over, chunked": (post(chunks()), 413),
        "too many pixels": (post(_huge_png_header(), "image/png"), 413),
        "not an image": (post(b"<html></html>"), 415),
        "gif declared": (post(b"GIF89a", "image/gif"), 415),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, name
        assert set(response.json()) == {"error"}, name
    assert requests.get(url + "/no/such/route", timeout=30).status_code == 404


def _huge_png_header() -> bytes:
    import struct
    import zlib

    chunk = b"IHDR" + struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + crc + b"IEND\xaeB`\x82"


def test_503_over_http_until_the_model_is_ready(predictor):
    slot = ModelRepository()
    settings = Settings(host="127.0.0.1", port=free_port(), threads=2)
    server = make_server(create_app(slot, settings).http.server(), settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        assert requests.get(url + "/healthz", timeout=30).status_code == 200
        not_ready = requests.get(url + "/readyz", timeout=30)
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        jpeg = SAMPLES[0].read_bytes()
        headers = {"Content-Type": "image/jpeg"}
        response = requests.post(url + "/v1/predict", data=jpeg, headers=headers, timeout=30)
        assert response.status_code == 503
        slot.add(predictor)
        assert requests.get(url + "/readyz", timeout=30).status_code == 200
    finally:
        server.close()


def test_32_parallel_clients_get_their_own_answers(server, predictor):
    url, _, _ = server
    paths = sorted((FIXTURES / "cifar_small").glob("*/*.jpg"))
    images = [p.read_bytes() for p in paths]
    expected = [
        predictor.predict_arrays(predictor.prepare(decode_image(d))[None])[0] for d in images
    ]
    sessions = threading.local()

    def call(index: int):
        session = getattr(sessions, "session", None) or requests.Session()
        sessions.session = session
        i = index % len(images)
        response = session.post(
            url + "/v1/predict?top_k=10",
            data=images[i],
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        return i, response.status_code, response.json()

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(320)))
    for i, status, body in answers:
        assert status == 200
        scores = {t["label"]: t["score"] for t in body["results"][0]["top_k"]}
        got = np.array([scores[label] for label in LABELS])
        np.testing.assert_allclose(got, expected[i], atol=1e-5)


def test_a_body_over_the_limit_is_refused_in_the_shape_of_its_protocol(server):
    url, _, _ = server
    body = b"x" * (MAX_BODY + 1)
    native = requests.post(url + "/v1/predict", data=body, timeout=30)
    assert native.status_code == 413 and native.json()["error"]["code"] == "payload_too_large"
    for path in ("/v2/models/tiny/infer", "/v1/models/tiny:predict"):
        answer = requests.post(url + path, data=body, timeout=30)
        assert answer.status_code == 413, path
        assert isinstance(answer.json()["error"], str) and "body" in answer.json()["error"]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="thread placement needs Linux and at least two CPUs",
)
def test_python_threads_share_one_cpu_and_the_model_keeps_them_all(server):
    url, process, log_path = server
    sample = next(p for p in SAMPLES if p.suffix == ".jpg")
    answer = requests.post(
        f"{url}/v1/predict", data=sample.read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    assert answer.status_code == 200
    every = os.sched_getaffinity(0)  # the server started with this process's CPUs
    placement = {}
    # Under granian the model and the request threads live in its worker, a child process.
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    holder = int(children[0]) if children else process.pid
    for task in Path(f"/proc/{holder}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        placement.setdefault(comm.startswith("tf_"), []).append(
            os.sched_getaffinity(int(task.name))
        )
    model_threads, others = placement[True], placement[False]
    assert model_threads and all(cpus == every for cpus in model_threads)
    # the main thread and the 8 request threads at least, all on the lowest CPU
    assert sum(cpus == {min(every)} for cpus in others) >= 9
    assert f"Python threads on CPU [{min(every)}]" in log_path.read_text()


def test_sigterm_stops_the_server_cleanly(server):
    url, process, log_path = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    log = log_path.read_text()
    assert f"on {url}/" in log and "stopped" in log
