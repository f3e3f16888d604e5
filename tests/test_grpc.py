"""The gRPC port against the real server (`imagerec serve --grpc-port`), driven by the clients
users have: tritonclient.grpc for the Open Inference Protocol v2 and tensorflow-serving-api for
TF Serving's PredictionService. Every answer is held to the same server's HTTP answer."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from imagerec.images import decode_image
from live_server import free_port, running_server
from tiny_bundle import LABELS, SAMPLES

tf = pytest.importorskip("tensorflow")  # tensorflow-serving-api's tensors are TensorFlow's
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

JPEGS = [path.read_bytes() for path in SAMPLES[:4]]
TF_STUB = prediction_service_pb2_grpc.PredictionServiceStub


@pytest.fixture(scope="module")
def server(protocol_bundle, tmp_path_factory):
    """The tiny bundle served over HTTP and gRPC; yields (HTTP URL, gRPC address)."""
    port = free_port()
    log_dir = tmp_path_factory.mktemp("grpc-server")
    with running_server(protocol_bundle, log_dir, extra=("--grpc-port", str(port))) as live:
        yield live.url, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton_client(server):
    with triton.InferenceServerClient(server[1]) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server[1]) as channel:
        yield channel


def http_v2(url: str, name: str, classification: int = 0) -> dict:
    """The same images through the HTTP Open Inference Protocol route."""
    data = [base64.b64encode(jpeg).decode() for jpeg in JPEGS]
    output = {"name": "probabilities", "parameters": {"classification": classification}}
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data}],
        "outputs": [output] if classification else [],
    }
    answer = requests.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
    answer.raise_for_status()
    return answer.json()["outputs"][0]


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def test_protocol_files_match_the_published_messages():
    """Every field imagerec declares has the number, type and cardinality of the published
    protocol (tritonclient's and tensorflow-serving-api's own descriptors)."""
    from google.protobuf import descriptor_pool

    from imagerec.protocols.grpc_messages import PROTO_FILES, protocol_pool

    published = descriptor_pool.Default()  # the clients imported above registered theirs
    assert prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]

    def nested(message):
        yield message
        for inner in message.nested_types:
            yield from nested(inner)

    checked = 0
    for file_name in (*PROTO_FILES, "tensorflow_core.proto"):
        ours = protocol_pool().FindFileByName(file_name)
        for message in ours.message_types_by_name.values():
            for descriptor in nested(message):
                reference = published.FindMessageTypeByName(descriptor.full_name)
                for field in descriptor.fields:
                    theirs = reference.fields_by_name[field.name]
                    assert (field.number, field.type, field.is_repeated) == (
                        theirs.number,
                        theirs.type,
                        theirs.is_repeated,
                    ), f"{descriptor.full_name}.{field.name}"
                    if field.message_type is not None:
                        assert field.message_type.full_name == theirs.message_type.full_name
                    checked += 1
        for service in ours.services_by_name.values():
            reference = published.FindServiceByName(service.full_name)
            for method in service.methods:
                theirs = reference.methods_by_name[method.name]
                assert method.input_type.full_name == theirs.input_type.full_name
                assert method.output_type.full_name == theirs.output_type.full_name
    assert checked > 100


def test_triton_health_and_metadata(triton_client, protocol_predictor):
    name = protocol_predictor.name
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(name)
    assert triton_client.is_model_ready(name, protocol_predictor.version)
    assert not triton_client.is_model_ready("no-such-model")
    server = triton_client.get_server_metadata()
    assert server.name == "imagerec"
    assert "classification" in server.extensions
    metadata = triton_client.get_model_metadata(name)
    assert list(metadata.versions) == [protocol_predictor.version]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "BYTES", [-1]),
        ("pixels", "UINT8", [-1, 32, 32, 3]),
    ]
    assert list(metadata.outputs[0].shape) == [-1, len(LABELS)]
    index = triton_client.get_model_repository_index()
    assert [(m.name, m.state) for m in index.models] == [(name, "READY")]


def test_triton_infer_bytes_equals_http(server, triton_client, protocol_predictor):
    name = protocol_predictor.name
    answer = triton_client.infer(name, [bytes_input(JPEGS)])
    probs = answer.as_numpy("probabilities")
    http = http_v2(server[0], name)
    assert probs.shape == (len(JPEGS), len(LABELS))
    np.testing.assert_allclose(probs.ravel(), http["data"], rtol=0, atol=1e-7)
    assert answer.get_response().model_version == protocol_predictor.version


def test_triton_classification_equals_http(server, triton_client, protocol_predictor):
    name = protocol_predictor.name
    wanted = [triton.InferRequestedOutput("probabilities", class_count=3)]
    answer = triton_client.infer(name, [bytes_input(JPEGS)], outputs=wanted)
    strings = [s.decode() for s in answer.as_numpy("probabilities").ravel()]
    assert strings == http_v2(server[0], name, classification=3)["data"]
    best = strings[0].split(":")
    assert best[2] == LABELS[int(best[1])]


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_triton_infer_pixels(triton_client, protocol_predictor, datatype):
    pixels = np.stack([protocol_predictor.prepare(decode_image(j)) for j in JPEGS])
    tensor = triton.InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels.astype(np.uint8 if datatype == "UINT8" else np.float32))
    probs = triton_client.infer(protocol_predictor.name, [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, protocol_predictor.predict_arrays(pixels), atol=1e-6)


def test_typed_contents_instead_of_raw(channel, protocol_predictor):
    """Images in contents.bytes_contents and pixels in contents.uint_contents, not raw."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name=protocol_predictor.name, id="req-7")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(JPEGS)])
    tensor.contents.bytes_contents.extend(JPEGS)
    answer = stub.ModelInfer(request)
    probs = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(len(JPEGS), -1)
    pixels = np.stack([protocol_predictor.prepare(decode_image(j)) for j in JPEGS])
    np.testing.assert_allclose(probs, protocol_predictor.predict_arrays(pixels), atol=1e-6)
    assert answer.id == "req-7"

    request = service_pb2.ModelInferRequest(model_name=protocol_predictor.name)
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    answer = stub.ModelInfer(request)
    again = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(len(JPEGS), -1)
    np.testing.assert_allclose(again, probs, atol=1e-6)


def test_triton_errors_are_status_codes(channel, triton_client, protocol_predictor):
    name = protocol_predictor.name
    cases = {
        "StatusCode.INVALID_ARGUMENT": [
            lambda: triton_client.infer(name, [bytes_input([b"not an image"])]),
            lambda: triton_client.infer(name, [triton.InferInput("image", [2], "BYTES")]),
            lambda: triton_client.infer(
                name,
                [bytes_input(JPEGS[:1])],
                outputs=[triton.InferRequestedOutput("logits")],
            ),
            lambda: triton_client.infer(
                name,
                [bytes_input(JPEGS[:1])],
                outputs=[triton.InferRequestedOutput("probabilities", class_count=99)],
            ),
        ],
        "StatusCode.NOT_FOUND": [
            lambda: triton_client.infer("no-such-model", [bytes_input(JPEGS[:1])]),
            lambda: triton_client.infer(name, [bytes_input(JPEGS[:1])], model_version="7"),
            lambda: triton_client.get_model_metadata("no-such-model"),
        ],
    }
    for status, calls in cases.items():
        for make_call in calls:
            with pytest.raises(InferenceServerException) as caught:
                make_call()
            assert caught.value.status() == status, caught.value.message()
            assert caught.value.message()
    # Bytes that are no protobuf message at all: the client's mistake, not the server's.
    malformed = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        malformed(b"\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInferRequest" in caught.value.details()


def test_over_size_message_is_resource_exhausted(triton_client, protocol_predictor):
    huge = os.urandom(11 * 1024 * 1024)  # over the 10 MiB body limit that HTTP has too
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(protocol_predictor.name, [bytes_input([huge])])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def tf_predict_request(name: str, images: list[bytes]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images))
    return request


def test_tensorflow_serving_predict_equals_http(server, channel, protocol_predictor):
    name = protocol_predictor.name
    answer = TF_STUB(channel).Predict(tf_predict_request(name, JPEGS))
    probs = tf.make_ndarray(answer.outputs["probabilities"])
    body = {"instances": [{"b64": base64.b64encode(j).decode()} for j in JPEGS]}
    http = requests.post(f"{server[0]}/v1/models/{name}:predict", json=body, timeout=60).json()
    np.testing.assert_allclose(probs, http["predictions"], rtol=0, atol=1e-7)
    assert answer.model_spec.name == name
    number = answer.model_spec.version.value
    assert number == int(protocol_predictor.version, 16)  # TF Serving's integer version

    request = tf_predict_request(name, JPEGS[:1])
    request.model_spec.version.value = number
    again = tf.make_ndarray(TF_STUB(channel).Predict(request).outputs["probabilities"])
    np.testing.assert_allclose(again[0], probs[0], atol=1e-7)


def test_tensorflow_serving_predict_pixels(channel, protocol_predictor):
    pixels = np.stack([protocol_predictor.prepare(decode_image(j)) for j in JPEGS])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = protocol_predictor.name
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    answer = TF_STUB(channel).Predict(request)
    probs = tf.make_ndarray(answer.outputs["probabilities"])
    np.testing.assert_allclose(probs, protocol_predictor.predict_arrays(pixels), atol=1e-6)


def test_tensorflow_serving_classify_equals_http(server, channel, protocol_predictor):
    name = protocol_predictor.name
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = name
    for jpeg in JPEGS:
        example = request.input.example_list.examples.add()
        example.features.feature["image"].bytes_list.value.append(jpeg)
    answer = TF_STUB(channel).Classify(request)
    body = {"examples": [{"image": {"b64": base64.b64encode(j).decode()}} for j in JPEGS]}
    http = requests.post(f"{server[0]}/v1/models/{name}:classify", json=body, timeout=60).json()
    got = [[[c.label, c.score] for c in row.classes] for row in answer.result.classifications]
    assert [[label for label, _ in row] for row in got] == [
        [label for label, _ in row] for row in http["result"]
    ]
    np.testing.assert_allclose(
        [[score for _, score in row] for row in got],
        [[score for _, score in row] for row in http["result"]],
        atol=1e-7,
    )


def test_tensorflow_serving_metadata_and_errors(channel, protocol_predictor):
    name = protocol_predictor.name
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    answer = TF_STUB(channel).GetModelMetadata(request)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert answer.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    outputs = signature.outputs["probabilities"].tensor_shape.dim
    assert [d.size for d in outputs] == [-1, len(LABELS)]

    def refused(call, request) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.details()
        return caught.value.code()

    stub = TF_STUB(channel)
    unknown = tf_predict_request("no-such-model", JPEGS[:1])
    assert refused(stub.Predict, unknown) == grpc.StatusCode.NOT_FOUND
    garbage = tf_predict_request(name, [b"GIF89a not really"])
    assert refused(stub.Predict, garbage) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_signature = tf_predict_request(name, JPEGS[:1])
    wrong_signature.model_spec.signature_name = "other"
    assert refused(stub.Predict, wrong_signature) == grpc.StatusCode.INVALID_ARGUMENT
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = name
    assert refused(stub.Regress, regress) == grpc.StatusCode.INVALID_ARGUMENT
    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = name
    assert refused(stub.GetModelMetadata, no_field) == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_metrics(server, channel, protocol_predictor):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(channel)
    assert {
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "grpc.health.v1.Health",
    } <= set(database.get_services())
    pool = DescriptorPool(database)
    service = pool.FindServiceByName("inference.GRPCInferenceService")
    described = service.methods_by_name["ModelInfer"]
    assert described.input_type.fields_by_name["raw_input_contents"].number == 7

    before = images_classified(server[0])
    TF_STUB(channel).Predict(tf_predict_request(protocol_predictor.name, JPEGS))
    with pytest.raises(grpc.RpcError):
        TF_STUB(channel).Predict(tf_predict_request("no-such-model", JPEGS[:1]))
    metrics = requests.get(f"{server[0]}/metrics", timeout=30).text
    assert images_classified(server[0]) == before + len(JPEGS)  # one count for HTTP and gRPC
    predict = 'method="/tensorflow.serving.PredictionService/Predict"'
    assert f'imagerec_grpc_requests_total{{code="OK",{predict}}}' in metrics
    assert f'imagerec_grpc_requests_total{{code="NOT_FOUND",{predict}}}' in metrics
    assert 'imagerec_grpc_request_duration_seconds_count{method="/inference.' in metrics


def images_classified(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("imagerec_images_classified_total "):
            return float(line.split()[1])
    raise AssertionError("no imagerec_images_classified_total in /metrics")


def in_flight(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("imagerec_grpc_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_finishes_the_calls_in_flight(protocol_bundle, tmp_path):
    """SIGTERM while a gRPC call is being handled: that call still gets its answer, a call
    after the signal is refused, and the server exits 0."""
    import cv2

    port = free_port()
    # Large images make the call take long enough to be caught in flight.
    rng = np.random.default_rng(0)
    photo = cv2.resize(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (3000, 3000))
    big = cv2.imencode(".jpg", photo)[1].tobytes()
    images = [big] * 32
    env = {"IMAGEREC_MAX_BODY_BYTES": str(sum(map(len, images)) + (1 << 20))}
    extra = ("--grpc-port", str(port))
    with running_server(protocol_bundle, tmp_path, env=env, extra=extra) as live:
        result: dict = {}

        def call():
            with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
                try:
                    answer = client.infer("tiny", [bytes_input(images)], client_timeout=120)
                    result["probs"] = answer.as_numpy("probabilities")
                except InferenceServerException as exc:
                    result["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 60
        while in_flight(live.url) < 1:
            assert time.monotonic() < deadline, "the call never reached the server"
            assert caller.is_alive(), f"the call ended before it was seen in flight: {result}"
            time.sleep(0.02)
        live.process.send_signal(signal.SIGTERM)
        caller.join(120)
        assert "error" not in result, result
        assert result["probs"].shape == (len(images), len(LABELS))
        assert live.process.wait(60) == 0
        log = live.log_path.read_text()
        assert "gRPC stopped" in log
    with pytest.raises(InferenceServerException):
        triton.InferenceServerClient(f"127.0.0.1:{port}").is_server_live()


def test_busy_grpc_port_is_a_clear_error(tmp_path):
    with socket_held() as port:
        done = subprocess.run(
            [sys.executable, "-m", "imagerec.cli", "serve", "--grpc-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


class socket_held:
    """A listening socket on a free port, for the length of a `with`."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *_exc) -> None:
        self.sock.close()


def test_grpcurl_through_server_reflection(server):
    """grpcurl (a Go client) knows nothing of the protocols but what reflection tells it."""
    import json
    import shutil
    from pathlib import Path

    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (the test extra installs it on x86-64)")
    address = server[1]

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [grpcurl, "-plaintext", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    listed = run(address, "list").stdout.split()
    assert "inference.GRPCInferenceService" in listed
    assert "tensorflow.serving.PredictionService" in listed
    image = base64.b64encode(JPEGS[0]).decode()
    body = {
        "model_spec": {"name": "tiny"},
        "input": {
            "example_list": {
                "examples": [
                    {"features": {"feature": {"image": {"bytes_list": {"value": [image]}}}}}
                ]
            }
        },
    }
    done = run("-d", json.dumps(body), address, "tensorflow.serving.PredictionService/Classify")
    assert done.returncode == 0, done.stderr
    classes = json.loads(done.stdout)["result"]["classifications"][0]["classes"]
    assert sorted(c["label"] for c in classes) == sorted(LABELS)
    missing = run(
        "-d", '{"model_name": "nope"}', address, "inference.GRPCInferenceService/ModelInfer"
    )
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr and "unknown model 'nope'" in missing.stderr


def test_every_model_and_version_of_a_repository(protocol_bundle, tmp_path):
    """A repository of the bundled model (ONNX int8) and two numbered versions of the tiny one
    (TensorFlow): each answers on gRPC by name and version, as on HTTP, and Triton's repository
    calls load and unload over gRPC."""
    import shutil

    from test_repository import BUNDLED, copy_version

    repository = tmp_path / "models"
    shutil.copytree(BUNDLED, repository / "cifar10")
    copy_version(protocol_bundle, repository / "tiny" / "1")
    copy_version(protocol_bundle, repository / "tiny" / "2")
    port = free_port()
    extra = ("--model-control", "explicit", "--version-policy", "all", "--grpc-port", str(port))
    with running_server(repository, tmp_path, models=True, extra=extra) as live:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        index = client.get_model_repository_index().models
        assert sorted((m.name, m.version, m.state) for m in index)[1:] == [
            ("tiny", "1", "READY"),
            ("tiny", "2", "READY"),
        ]
        for name, version in (("cifar10", ""), ("tiny", "1"), ("tiny", "2")):
            answer = client.infer(name, [bytes_input(JPEGS[:1])], model_version=version)
            files = {"image": ("a.jpg", JPEGS[0], "image/jpeg")}
            params = {"model": name, "version": version, "top_k": 1}
            http = requests.post(live.url + "/v1/predict", files=files, params=params, timeout=60)
            assert answer.get_response().model_name == name
            assert answer.get_response().model_version == http.json()["model"]["version"]
            best = float(answer.as_numpy("probabilities")[0].max())
            assert best == pytest.approx(http.json()["results"][0]["score"], abs=1e-6)

        request = tf_predict_request("tiny", JPEGS[:1])
        request.model_spec.version.value = 1
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert TF_STUB(channel).Predict(request).model_spec.version.value == 1

        client.unload_model("tiny")
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", [bytes_input(JPEGS[:1])])
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        client.load_model("tiny")
        assert client.is_model_ready("tiny", "2")
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("no-such-model")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
