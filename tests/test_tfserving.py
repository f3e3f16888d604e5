"""TF Serving's REST API against the real server, with the request bodies of TF Serving's REST
documentation (tensorflow_serving/g3doc/api_rest.md), next to imagerec's own /v1 routes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import numpy as np
import pytest
import requests

from imagerec.api import create_app
from imagerec.config import Settings
from imagerec.hugcompat import hug
from imagerec.images import decode_image
from imagerec.repository import ModelRepository
from tiny_bundle import LABELS, SAMPLES

JPEGS = [path.read_bytes() for path in SAMPLES[:3]]
B64 = [base64.b64encode(data).decode() for data in JPEGS]


@pytest.fixture(scope="module")
def model_url(live_server, protocol_predictor) -> str:
    return f"{live_server}/v1/models/{protocol_predictor.name}"


@pytest.fixture(scope="module")
def expected(protocol_predictor) -> np.ndarray:
    batch = np.stack([protocol_predictor.prepare(decode_image(data)) for data in JPEGS])
    return protocol_predictor.predict_arrays(batch)


def tf_version(predictor) -> str:
    """TF Serving versions are int64: the bundle's hex version read as a number."""
    return str(int(predictor.version, 16))


def test_model_status_and_metadata(model_url, protocol_predictor):
    status = requests.get(model_url, timeout=30)
    assert status.status_code == 200
    assert status.json() == {
        "model_version_status": [
            {
                "version": tf_version(protocol_predictor),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    by_version = requests.get(f"{model_url}/versions/{tf_version(protocol_predictor)}", timeout=30)
    assert by_version.json() == status.json()

    metadata = requests.get(f"{model_url}/metadata", timeout=30).json()
    assert metadata["model_spec"] == {
        "name": protocol_predictor.name,
        "signature_name": "",
        "version": tf_version(protocol_predictor),
    }
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    output = signature["outputs"]["probabilities"]
    assert [dim["size"] for dim in output["tensor_shape"]["dim"]] == ["-1", str(len(LABELS))]


def test_predict_row_and_columnar_formats(model_url, expected):
    rows = requests.post(
        f"{model_url}:predict", json={"instances": [{"b64": b} for b in B64]}, timeout=30
    )
    assert rows.status_code == 200 and set(rows.json()) == {"predictions"}
    np.testing.assert_allclose(rows.json()["predictions"], expected, rtol=1e-5, atol=1e-6)

    named = {"signature_name": "serving_default", "instances": [{"image_bytes": {"b64": B64[0]}}]}
    answer = requests.post(f"{model_url}:predict", json=named, timeout=30).json()
    np.testing.assert_allclose(answer["predictions"], expected[:1], rtol=1e-5, atol=1e-6)

    columns = {"inputs": {"image_bytes": [{"b64": b} for b in B64]}}
    answer = requests.post(f"{model_url}:predict", json=columns, timeout=30).json()
    assert set(answer) == {"outputs"}
    np.testing.assert_allclose(answer["outputs"], expected, rtol=1e-5, atol=1e-6)


def test_predict_pixel_instances(model_url, protocol_predictor, expected):
    pixels = [protocol_predictor.prepare(decode_image(data)).tolist() for data in JPEGS]
    answer = requests.post(f"{model_url}:predict", json={"instances": pixels}, timeout=30)
    assert answer.status_code == 200
    np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=1e-5, atol=1e-6)


def test_classify_with_the_documented_example_body(model_url, protocol_predictor, expected):
    # The documentation's classify example: an image feature and a caption feature per example.
    body = {
        "examples": [
            {"image": {"b64": B64[0]}, "caption": "seaside"},
            {"image": {"b64": B64[1]}, "caption": "mountains"},
        ]
    }
    answer = requests.post(f"{model_url}:classify", json=body, timeout=30)
    assert answer.status_code == 200
    result = answer.json()["result"]
    assert len(result) == 2
    for pairs, want in zip(
        result, protocol_predictor.top_k(expected[:2], len(LABELS)), strict=True
    ):
        assert [label for label, _ in pairs] == [label for label, _ in want.top_k]
        np.testing.assert_allclose([s for _, s in pairs], [s for _, s in want.top_k], rtol=1e-5)

    # That example names its own model's signature; this model has no signature of that name.
    other = requests.post(
        f"{model_url}:classify", json={**body, "signature_name": "classify_objects"}, timeout=30
    )
    assert other.status_code == 400 and "classify_objects" in other.json()["error"]


def test_versioned_routes_take_either_version_spelling(model_url, protocol_predictor, expected):
    body = {"instances": [{"b64": B64[0]}]}
    for version in (tf_version(protocol_predictor), protocol_predictor.version):
        answer = requests.post(f"{model_url}/versions/{version}:predict", json=body, timeout=30)
        assert answer.status_code == 200, version
        np.testing.assert_allclose(answer.json()["predictions"], expected[:1], rtol=1e-5)
    examples = {"examples": [{"image": [{"b64": B64[0]}]}]}
    version = tf_version(protocol_predictor)
    classify = requests.post(f"{model_url}/versions/{version}:classify", json=examples, timeout=30)
    assert classify.json()["result"][0][0][0] == protocol_predictor.top_k(expected[:1], 1)[0].label
    wrong = requests.post(f"{model_url}/versions/123:predict", json=body, timeout=30)
    assert wrong.status_code == 404 and "123" in wrong.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
def test_curl_as_in_the_documentation(model_url, expected):
    """`curl -d '...' -X POST .../v1/models/NAME:predict`: curl sends it as a form type."""
    body = json.dumps({"instances": [{"b64": B64[0]}]})
    output = subprocess.run(
        ["curl", "-sS", "-d", body, "-X", "POST", f"{model_url}:predict"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    np.testing.assert_allclose(json.loads(output)["predictions"], expected[:1], rtol=1e-5)


def test_errors_are_tf_serving_shaped(live_server, model_url):
    cases = {
        "unknown model": (
            requests.post(f"{live_server}/v1/models/half:predict", json={"instances": [1.0]}),
            404,
        ),
        "unknown model status": (requests.get(f"{live_server}/v1/models/half"), 404),
        "not JSON": (requests.post(f"{model_url}:predict", data=b"{"), 400),
        "both formats": (
            requests.post(f"{model_url}:predict", json={"instances": [], "inputs": []}),
            400,
        ),
        "numbers are not images": (
            requests.post(f"{model_url}:predict", json={"instances": [1.0, 2.0, 5.0]}),
            400,
        ),
        "bad base64": (
            requests.post(f"{model_url}:predict", json={"instances": [{"b64": "@"}]}),
            400,
        ),
        "not an image": (
            requests.post(
                f"{model_url}:classify",
                json={"examples": [{"image": {"b64": base64.b64encode(b"text").decode()}}]},
            ),
            415,
        ),
        "regress": (requests.post(f"{model_url}:regress", json={"examples": [{"x": 1.0}]}), 400),
        "GET on predict": (requests.get(f"{model_url}:predict"), 405),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, case
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], case


def test_native_v1_routes_live_beside_tf_serving(live_server, protocol_predictor):
    """/v1/model, /v1/labels and /v1/predict are imagerec's; /v1/models/... is TF Serving's."""
    model = requests.get(f"{live_server}/v1/model", timeout=30).json()
    assert model["name"] == protocol_predictor.name and model["labels"] == LABELS
    assert requests.get(f"{live_server}/v1/labels", timeout=30).json() == {"labels": LABELS}
    native = requests.post(f"{live_server}/v1/predict", json={"images": [{"b64": B64[0]}]})
    assert native.status_code == 200 and "results" in native.json()
    native_error = requests.post(f"{live_server}/v1/predict", json={"images": [{"b64": "@"}]})
    assert set(native_error.json()["error"]) == {"code", "message"}  # imagerec's own shape


def test_503_until_the_model_is_loaded(protocol_predictor):
    slot = ModelRepository()
    api = create_app(slot, Settings())
    status = hug.test.get(api, "/v1/models/tiny")
    predict = hug.test.post(api, "/v1/models/tiny:predict", body='{"instances": [{"b64": ""}]}')
    for response in (status, predict):
        assert response.status.startswith("503") and "loading" in response.data["error"]
    slot.add(protocol_predictor)
    assert hug.test.get(api, f"/v1/models/{protocol_predictor.name}").status == "200 OK"
