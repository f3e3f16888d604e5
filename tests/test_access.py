"""API keys and CORS against the real server: every route of every protocol with the right
key, a wrong one and none; keys from a file that is re-read when it changes; keys kept out of
the log; preflight, allowed and refused origins."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from imagerec.access import ApiKeys, Unauthorized
from live_server import free_port, running_server
from tiny_bundle import SAMPLES

JPEG = SAMPLES[0].read_bytes()
B64 = base64.b64encode(JPEG).decode()
KEYS = ("first-key-3f9a", "second-key-77c1")
FILE_KEY, NEW_FILE_KEY = "file-key-0b12", "file-key-9e4d"
PROTOCOL_PREFIXES = ("/v2", "/v1/models/")
# Every route a client calls, with a request that succeeds when the key is right.
ROUTES = [
    ("GET", "/v1/model", None),
    ("GET", "/v1/labels", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/model/card", None),
    ("POST", "/v1/predict", {"images": [{"b64": B64}]}),
    ("GET", "/openapi.json", None),
    ("GET", "/v2", None),
    ("GET", "/v2/models/tiny", None),
    ("GET", "/v2/models/tiny/ready", None),
    (
        "POST",
        "/v2/models/tiny/infer",
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]},
    ),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v1/models/tiny", None),
    ("GET", "/v1/models/tiny/metadata", None),
    ("POST", "/v1/models/tiny:predict", {"instances": [{"b64": B64}]}),
    ("POST", "/v1/models/tiny:classify", {"examples": [{"image": {"b64": B64}}]}),
]
OPEN_ROUTES = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/metrics"]


@pytest.fixture(scope="module")
def server(protocol_bundle, tmp_path_factory):
    """Keys from the environment and from a file; CORS for one origin; gRPC on."""
    folder = tmp_path_factory.mktemp("access")
    keys_file = folder / "keys.txt"
    keys_file.write_text(f"# one key a line\n{FILE_KEY}\n")
    grpc_port = free_port()
    env = {
        "IMAGEREC_API_KEYS": ",".join(KEYS),
        "IMAGEREC_API_KEYS_FILE": str(keys_file),
        "IMAGEREC_CORS_ORIGINS": "https://app.example.com",
    }
    extra = ("--grpc-port", str(grpc_port))
    with running_server(protocol_bundle, folder, env=env, extra=extra) as live:
        yield live, keys_file, grpc_port


def call(url: str, method: str, path: str, body, key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = json.dumps(body) if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.request(method, url + path, data=data, headers=headers, timeout=60)


def assert_refused(answer: requests.Response, path: str) -> None:
    assert answer.status_code == 401, (path, answer.text)
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    error = answer.json()["error"]
    if path.startswith(PROTOCOL_PREFIXES):
        assert isinstance(error, str) and "key" in error
    else:
        assert error["code"] == "unauthorized" and "key" in error["message"]


def test_every_route_needs_the_key(server):
    live, _, _ = server
    for method, path, body in ROUTES:
        for key in KEYS + (FILE_KEY,):
            answer = call(live.url, method, path, body, key)
            assert answer.status_code == 200, (path, key, answer.text)
        assert_refused(call(live.url, method, path, body, None), path)
        assert_refused(call(live.url, method, path, body, "not-a-key"), path)
        assert_refused(call(live.url, method, path, body, KEYS[0][:-1]), path)
    for path in OPEN_ROUTES:
        assert requests.get(live.url + path, timeout=30).status_code == 200, path
    assert requests.get(live.url + "/static/app.js", timeout=30).status_code == 200
    # Another scheme, or the key in the wrong header, is no key.
    basic = {"Authorization": f"Basic {KEYS[0]}"}
    assert requests.get(live.url + "/v1/model", headers=basic, timeout=30).status_code == 401
    stray = {"X-Api-Key": KEYS[0]}
    assert requests.get(live.url + "/v1/model", headers=stray, timeout=30).status_code == 401


def test_tritonclient_over_http_and_grpc_sends_the_key(server):
    live, _, grpc_port = server
    good = {"Authorization": f"Bearer {KEYS[1]}"}
    http = triton_http.InferenceServerClient(live.url.removeprefix("http://"))
    assert http.get_model_metadata("tiny", headers=good)["name"] == "tiny"
    with pytest.raises(InferenceServerException) as caught:
        http.get_model_metadata("tiny")
    assert caught.value.status() == "401"

    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    import numpy as np

    tensor.set_data_from_numpy(np.array([JPEG], dtype=object))
    answer = client.infer("tiny", [tensor], headers={"authorization": f"Bearer {KEYS[1]}"})
    assert answer.as_numpy("probabilities").shape == (1, 10)
    for headers in (None, {"authorization": "Bearer nope"}):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", [tensor], headers=headers)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    # The health service stays open for load balancers.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_the_keys_file_is_read_again_when_it_changes(server):
    live, keys_file, _ = server
    assert call(live.url, "GET", "/v1/model", None, FILE_KEY).status_code == 200
    replacement = keys_file.with_name("keys.new")
    replacement.write_text(f"{NEW_FILE_KEY}  # rotated\n")
    replacement.replace(keys_file)  # as an operator would swap it, atomically
    assert call(live.url, "GET", "/v1/model", None, NEW_FILE_KEY).status_code == 200
    assert call(live.url, "GET", "/v1/model", None, FILE_KEY).status_code == 401
    assert call(live.url, "GET", "/v1/model", None, KEYS[0]).status_code == 200


def test_no_key_reaches_the_log(server):
    live, _, _ = server
    call(live.url, "GET", "/v1/model", None, "guess-" + KEYS[0])
    log = live.log_path.read_text()
    assert "API keys file" in log  # the file is logged: its path and how many keys it holds
    for key in (*KEYS, FILE_KEY, NEW_FILE_KEY):
        for part in (key, key[:8], key[-6:]):
            assert part not in log


def test_cors_preflight_and_origins(server):
    live, _, _ = server
    allowed, refused = "https://app.example.com", "https://evil.example.net"
    preflight = {
        "Origin": allowed,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    answer = requests.options(live.url + "/v1/predict", headers=preflight, timeout=30)
    assert answer.status_code == 204  # no key needed: browsers send none with a preflight
    assert answer.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in answer.headers["Access-Control-Allow-Headers"]

    answer = requests.options(
        live.url + "/v2/models/tiny/infer", headers={**preflight, "Origin": refused}, timeout=30
    )
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert "evil.example.net" in answer.json()["error"]

    headers = {"Origin": allowed, "Authorization": f"Bearer {KEYS[0]}"}
    answer = requests.get(live.url + "/v1/model", headers=headers, timeout=30)
    assert answer.headers["Access-Control-Allow-Origin"] == allowed
    assert "Origin" in answer.headers["Vary"]
    # A refused key still carries the CORS header, so the browser app can read the 401.
    answer = requests.get(live.url + "/v1/model", headers={"Origin": allowed}, timeout=30)
    assert answer.status_code == 401
    assert answer.headers["Access-Control-Allow-Origin"] == allowed
    answer = requests.get(
        live.url + "/v1/model", headers={**headers, "Origin": refused}, timeout=30
    )
    assert answer.status_code == 200 and "Access-Control-Allow-Origin" not in answer.headers


def test_metrics_behind_the_key_when_asked(protocol_bundle, tmp_path):
    env = {"IMAGEREC_API_KEYS": KEYS[0], "IMAGEREC_METRICS_NEED_KEY": "true"}
    with running_server(protocol_bundle, tmp_path, env=env) as live:
        assert_refused(call(live.url, "GET", "/metrics", None, None), "/metrics")
        assert call(live.url, "GET", "/metrics", None, KEYS[0]).status_code == 200
        assert requests.get(live.url + "/healthz", timeout=30).status_code == 200


def test_without_keys_the_api_is_open_and_a_bad_keys_file_is_refused(tmp_path):
    assert not ApiKeys().enabled
    keys = ApiKeys(" a , b ")
    keys.check("Bearer a")
    keys.check("bearer  b ")
    for header in (None, "", "Bearer", "Bearer c", "Token a", "Bearer a b"):
        with pytest.raises(Unauthorized):
            keys.check(header)
    from imagerec.errors import ImagerecError

    with pytest.raises(ImagerecError, match="cannot be read"):
        ApiKeys(path=tmp_path / "missing.txt")
