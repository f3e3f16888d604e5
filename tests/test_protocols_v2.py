"""Open Inference Protocol v2 against the real server, driven by Triton's own client
(tritonclient.http), and the answers held to the in-process Predictor's."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from imagerec.api import create_app
from imagerec.config import Settings
from imagerec.hugcompat import hug
from imagerec.images import decode_image
from imagerec.repository import ModelRepository
from tiny_bundle import LABELS, SAMPLES

JPEGS = [path.read_bytes() for path in SAMPLES[:4]]


@pytest.fixture(scope="module")
def client(live_server):
    with triton.InferenceServerClient(live_server.removeprefix("http://")) as client:
        yield client


@pytest.fixture(scope="module")
def expected(protocol_predictor) -> np.ndarray:
    """Probabilities of JPEGS from the in-process predictor (decode, resize, TTA, forward)."""
    batch = np.stack([protocol_predictor.prepare(decode_image(data)) for data in JPEGS])
    return protocol_predictor.predict_arrays(batch)


def pixels_of(predictor) -> np.ndarray:
    return np.stack([predictor.prepare(decode_image(data)) for data in JPEGS])


def bytes_input(binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(JPEGS)], "BYTES")
    # In JSON a BYTES element is text, so images travel as base64; binary carries them raw.
    elements = JPEGS if binary else [base64.b64encode(data) for data in JPEGS]
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def parse_classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in strings:
        parsed = []
        for item in row:
            text = item.decode() if isinstance(item, bytes) else item  # JSON gives str
            score, index, label = text.split(":", 2)
            parsed.append((float(score), int(index), label))
        rows.append(parsed)
    return rows


def test_health_and_metadata(client, protocol_predictor):
    name, version = protocol_predictor.name, protocol_predictor.version
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, version)
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(name, "no-such-version")

    server = client.get_server_metadata()
    assert server["name"] == "imagerec"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])

    metadata = client.get_model_metadata(name)
    assert metadata == client.get_model_metadata(name, version)
    assert metadata["name"] == name and metadata["versions"] == [version]
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    assert inputs["pixels"]["shape"] == [-1, 32, 32, 3]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(LABELS)]}
    ]
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("no-such-model")
    assert error.value.status() == "404" and "no-such-model" in error.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_encoded_images(client, protocol_predictor, expected, binary):
    name = protocol_predictor.name
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(name, [bytes_input(binary)], outputs=[output], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == name
    assert response["model_version"] == protocol_predictor.version
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) is binary
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(JPEGS), len(LABELS))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification_extension(client, protocol_predictor, expected, binary):
    output = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = client.infer(protocol_predictor.name, [bytes_input(binary)], outputs=[output])
    strings = result.as_numpy("probabilities")
    assert strings.shape == (len(JPEGS), 3)
    for row, want in zip(
        parse_classes(strings), protocol_predictor.top_k(expected, 3), strict=True
    ):
        assert [(index, label) for _, index, label in row] == [
            (LABELS.index(label), label) for label, _ in want.top_k
        ]
        np.testing.assert_allclose([s for s, _, _ in row], [s for _, s in want.top_k], rtol=1e-5)


@pytest.mark.parametrize(
    ("datatype", "binary"), [("UINT8", True), ("UINT8", False), ("FP32", True), ("FP32", False)]
)
def test_infer_pixels(client, protocol_predictor, expected, datatype, binary):
    pixels = pixels_of(protocol_predictor)
    tensor = triton.InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(
        pixels.astype(np.uint8 if datatype == "UINT8" else np.float32), binary
    )
    result = client.infer(protocol_predictor.name, [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


def test_no_outputs_named_means_all_outputs_in_binary(client, protocol_predictor, expected):
    """tritonclient sends binary_data_output: true when no output is named."""
    result = client.infer(
        protocol_predictor.name, [bytes_input(True)], request_compression_algorithm="gzip"
    )
    [output] = result.get_response()["outputs"]
    assert output["parameters"]["binary_data_size"] == expected.size * 4
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


def test_versioned_infer_and_errors_through_the_client(client, protocol_predictor):
    name, version = protocol_predictor.name, protocol_predictor.version
    result = client.infer(name, [bytes_input(False)], model_version=version)
    assert result.as_numpy("probabilities").shape == (len(JPEGS), len(LABELS))

    def failure(**kwargs) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as error:
            client.infer(**kwargs)
        return error.value

    unknown = failure(model_name="other", inputs=[bytes_input(True)])
    assert unknown.status() == "404"
    wrong_version = failure(model_name=name, inputs=[bytes_input(True)], model_version="9")
    assert wrong_version.status() == "404"

    small = triton.InferInput("pixels", [1, 8, 8, 3], "UINT8")
    small.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    bad_shape = failure(model_name=name, inputs=[small])
    assert bad_shape.status() == "400" and "[N, 32, 32, 3]" in bad_shape.message()

    too_many = triton.InferRequestedOutput("probabilities", class_count=len(LABELS) + 1)
    bad_count = failure(model_name=name, inputs=[bytes_input(True)], outputs=[too_many])
    assert bad_count.status() == "400" and "classification" in bad_count.message()

    text = triton.InferInput("image", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    not_image = failure(model_name=name, inputs=[text])
    assert not_image.status() == "415" and "image 0" in not_image.message()


def test_raw_http_errors_are_v2_shaped(live_server, protocol_predictor):
    infer_url = f"{live_server}/v2/models/{protocol_predictor.name}/infer"
    b64 = base64.b64encode(JPEGS[0]).decode()
    one_image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}
    cases = {
        "not JSON": (requests.post(infer_url, data=b"{", timeout=30), 400),
        "no inputs": (requests.post(infer_url, json={"inputs": []}, timeout=30), 400),
        "bad base64": (
            requests.post(infer_url, json={"inputs": [{**one_image, "data": ["@@"]}]}, timeout=30),
            400,
        ),
        "FP16": (
            requests.post(
                infer_url, json={"inputs": [{**one_image, "datatype": "FP16"}]}, timeout=30
            ),
            400,
        ),
        "header past the body": (
            requests.post(
                infer_url,
                data=json.dumps({"inputs": [one_image]}).encode(),
                headers={"Inference-Header-Content-Length": "99999"},
                timeout=30,
            ),
            400,
        ),
        "unknown output": (
            requests.post(
                infer_url,
                json={"inputs": [one_image], "outputs": [{"name": "logits"}]},
                timeout=30,
            ),
            400,
        ),
        "no such route": (requests.get(f"{live_server}/v2/models/x/y/z", timeout=30), 404),
        "wrong method": (requests.get(infer_url, timeout=30), 405),
    }
    for case, (response, status) in cases.items():
        assert response.status_code == status, case
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], case

    ok = requests.post(infer_url, json={"inputs": [one_image]}, timeout=30)
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("application/json")


def test_binary_answer_layout_by_hand(live_server, protocol_predictor, expected):
    """The binary extension on the wire: JSON header, its length in a header, then raw FP32."""
    request = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 4 + len(JPEGS[0])},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    header = json.dumps(request).encode()
    body = header + len(JPEGS[0]).to_bytes(4, "little") + JPEGS[0]
    response = requests.post(
        f"{live_server}/v2/models/{protocol_predictor.name}/infer",
        data=gzip.compress(body),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "gzip",
        },
        timeout=30,
    )
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == len(LABELS) * 4
    probs = np.frombuffer(response.content[length:], dtype="<f4")
    np.testing.assert_allclose(probs, expected[0], rtol=1e-5, atol=1e-6)


def test_not_ready_and_over_limit_in_process(protocol_predictor):
    slot = ModelRepository()
    api = create_app(slot, Settings(max_body_bytes=1000))
    assert hug.test.get(api, "/v2/health/live").status == "200 OK"
    for path in ("/v2/health/ready", "/v2/models/tiny/ready", "/v2/models/tiny"):
        response = hug.test.get(api, path)
        assert response.status.startswith("503"), path
        assert "loading" in response.data["error"], path

    not_ready = hug.test.post(api, "/v2/models/tiny/infer", body=json.dumps({"inputs": []}))
    assert not_ready.status.startswith("503") and "loading" in not_ready.data["error"]

    slot.add(protocol_predictor)
    assert hug.test.get(api, "/v2/health/ready").status == "200 OK"
    big = json.dumps({"inputs": [], "pad": "x" * 2000})
    response = hug.test.post(api, f"/v2/models/{protocol_predictor.name}/infer", body=big)
    assert response.status.startswith("413") and isinstance(response.data["error"], str)
