"""Every input path fuzzed: generated requests to every route of every protocol, through the
real app (hug and falcon, in process) and the real gRPC handlers.

The property: never a 5xx (never INTERNAL or UNKNOWN over gRPC), every error in its route's
documented shape ({"error": {"code", "message"}} for imagerec's routes, {"error": "message"} under
/v2 and /v1/models/), and the app healthy afterwards. The bodies go far past what the schema
describes: JSON of any shape and depth, wrong types in every field, invalid UTF-8 and unknown
charsets, any Content-Type, multipart with odd boundaries, headers and parts, and image files of
every accepted format truncated, bit-flipped and spliced.

A bounded run is part of the suite; `make fuzz` runs the same properties with many more
examples (IMAGEREC_FUZZ_EXAMPLES). Inputs that once failed are kept below as explicit examples.
"""

from __future__ import annotations

import base64
import json
import struct

import cv2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_routes import FUZZ, PROTOCOL_PREFIXES, ROUTES
from imagerec.api import create_app
from imagerec.config import Settings
from imagerec.hugcompat import falcon
from imagerec.repository import ModelRepository
from tiny_bundle import SAMPLES

CONTENT_TYPES = [
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
    "image/jpeg",
    "image/png",
    "application/octet-stream",
    "application/xml",
    "",
]


def image_files() -> list[bytes]:
    """One valid file of each accepted format, made from a fixture photo."""
    photo = cv2.imread(str(SAMPLES[0]))
    files = [SAMPLES[0].read_bytes()]
    for extension in (".png", ".webp", ".bmp"):
        files.append(cv2.imencode(extension, photo)[1].tobytes())
    return files


IMAGES = image_files()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image file truncated, with bits flipped, or with another file's header."""
    data = bytearray(draw(st.sampled_from(IMAGES)))
    how = draw(st.sampled_from(["truncate", "flip", "splice", "whole"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 16))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif how == "splice":
        other = draw(st.sampled_from(IMAGES))
        cut = draw(st.integers(0, min(len(other), len(data))))
        data = bytearray(other[:cut]) + data[cut:]
    return bytes(data)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
FIELDS = [
    "images",
    "image",
    "b64",
    "top_k",
    "model",
    "version",
    "inputs",
    "outputs",
    "instances",
    "examples",
    "parameters",
    "name",
    "shape",
    "datatype",
    "data",
    "signature_name",
    "id",
    "ready",
]


@st.composite
def shaped_json(draw) -> object:
    """JSON that resembles what the routes expect, with any value in any field."""
    image = base64.b64encode(draw(mutated_images())).decode()
    plausible = st.sampled_from(
        [
            {"images": [{"b64": image}]},
            {"instances": [{"b64": image}]},
            {"examples": [{"image": {"b64": image}}]},
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]},
            {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3]}]},
        ]
    )
    body = draw(plausible | st.dictionaries(st.sampled_from(FIELDS), ANY_JSON, max_size=4))
    if isinstance(body, dict):
        body = dict(body)
        for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
            body[field] = draw(ANY_JSON)
    return body


def nested(depth: int) -> bytes:
    return b'{"images": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, with odd boundaries, headers and parts."""
    boundary = draw(st.sampled_from(["x", "----b", "a" * 70, "", "é", "b;c", '"q"']))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["image", "images", "top_k", "model", "", '"', "x\r\ny"]))
        head = f'Content-Disposition: form-data; name="{name}"'
        if draw(st.booleans()):
            head += f'; filename="{draw(st.text(max_size=8))}"'
        if draw(st.booleans()):
            head += "\r\nContent-Type: " + draw(st.sampled_from(["image/jpeg", "text/plain", "x"]))
        content = draw(mutated_images() | st.binary(max_size=64))
        parts.append(head.encode("utf-8", "replace") + b"\r\n\r\n" + content)
    marker = b"--" + boundary.encode("utf-8", "replace")
    body = b"".join(marker + b"\r\n" + part + b"\r\n" for part in parts)
    if draw(st.booleans()):
        body += marker + b"--\r\n"
    kind = (
        f"multipart/form-data; boundary={boundary}"
        if draw(st.booleans())
        else "multipart/form-data"
    )
    return body, kind


@st.composite
def requests_anywhere(draw) -> dict:
    method, template = draw(st.sampled_from(ROUTES))
    name = draw(st.sampled_from(["tiny", "tiny", "nope", "", "%00", "a" * 300]))
    version = draw(st.sampled_from(["1", "0", "x", "-1", "99999999999999999999"]))
    path = template.replace("{name}", name or "tiny").replace("{version}", version)
    kind = draw(st.sampled_from(["json", "shaped", "bytes", "image", "multipart", "deep", "none"]))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if kind == "json":
        body = json.dumps(draw(ANY_JSON)).encode()
        content_type = content_type or "application/json"
    elif kind == "shaped":
        body = json.dumps(draw(shaped_json())).encode()
        content_type = "application/json"
    elif kind == "bytes":
        body = draw(st.binary(max_size=256))
    elif kind == "image":
        body = draw(mutated_images())
    elif kind == "multipart":
        body, content_type = draw(multipart_bodies())
    elif kind == "deep":
        body = nested(draw(st.integers(100, 200_000)))
        content_type = "application/json"
    else:
        body = b""
    if content_type and draw(st.booleans()):
        charset = draw(st.sampled_from(["utf-8", "latin-1", "utf-16", "bogus", "", "ascii"]))
        content_type += f"; charset={charset}"
    query = draw(
        st.sampled_from(
            ["", "top_k=1", "top_k=0", "top_k=x", "top_k=1&top_k=2", "model=%ff", "version=%00"]
        )
    )
    headers = {"Content-Type": content_type} if content_type else {}
    if draw(st.booleans()):
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity"]))
    return {"method": method, "path": path, "body": body, "headers": headers, "query": query}


@pytest.fixture(scope="module")
def client(protocol_predictor):
    repository = ModelRepository()
    repository.add(protocol_predictor, name="tiny", version="1")
    settings_ = Settings(max_body_bytes=1 << 20, max_pixels=4_000_000)
    api = create_app(repository, settings_)
    return falcon.testing.TestClient(api.http.server())


def check_answer(client, request: dict) -> None:
    result = client.simulate_request(
        request["method"],
        request["path"],
        query_string=request["query"] or None,
        headers=request["headers"],
        body=request["body"],
    )
    where = f"{request['method']} {request['path']} {request['headers']}: {result.text[:300]}"
    assert result.status_code < 500, where
    if result.status_code >= 400 and request["method"] != "HEAD":
        error = result.json["error"]
        if request["path"].startswith(PROTOCOL_PREFIXES):
            assert isinstance(error, str) and error, where
        else:
            assert isinstance(error["code"], str) and isinstance(error["message"], str), where
    assert client.simulate_get("/healthz").status_code == 200


# Found by this suite or by hand, and kept (each failed the property before its fix):
FOUND = [
    # a JSON body nested past Python's recursion limit
    {"method": "POST", "path": "/v1/predict", "body": nested(100_000), "query": "",
     "headers": {"Content-Type": "application/json"}},
    # a charset Python does not know, on the native JSON route and on hug's own formats
    {"method": "POST", "path": "/v1/predict", "body": b'{"images": []}', "query": "",
     "headers": {"Content-Type": "application/json; charset=bogus"}},
    {"method": "GET", "path": "/", "body": b"a=b", "query": "",
     "headers": {"Content-Type": "application/x-www-form-urlencoded; charset=bogus"}},
    # bytes that are not text in the charset given (hug's text/plain and urlencoded formats)
    {"method": "GET", "path": "/", "body": b"\xff\xfe\x00", "query": "",
     "headers": {"Content-Type": "text/plain"}},
    {"method": "POST", "path": "/v1/predict", "body": b"\xff\xfe\x00", "query": "",
     "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    # not 5xx, but not the route's shape: hug's 404 page (the whole API described) and 405
    {"method": "GET", "path": "/no/such/route", "body": b"", "query": "", "headers": {}},
    {"method": "DELETE", "path": "/v1/predict", "body": b"", "query": "", "headers": {}},
]  # fmt: skip


@pytest.mark.parametrize("request_", FOUND, ids=lambda r: f"{r['path']} {r['headers']}")
def test_found_inputs_stay_fixed(client, request_):
    check_answer(client, request_)


@FUZZ
@given(request_=requests_anywhere())
def test_any_request_to_any_route(client, request_):
    check_answer(client, request_)


@FUZZ
@given(body=shaped_json())
@example(body={"images": [{"b64": "", "filename": {"a": [1]}}], "top_k": 1e309})
def test_any_json_on_the_native_route(client, body):
    request_ = {
        "method": "POST",
        "path": "/v1/predict",
        "body": json.dumps(body).encode(),
        "headers": {"Content-Type": "application/json"},
        "query": "",
    }
    check_answer(client, request_)


@FUZZ
@given(image=mutated_images(), route=st.sampled_from(["native", "v2-binary", "tf-predict"]))
def test_mutated_images_on_every_image_route(client, image, route):
    if route == "native":
        request_ = {"path": "/v1/predict", "body": image, "headers": {"Content-Type": "image/jpeg"}}
    elif route == "v2-binary":
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": len(image) + 4},
                    }
                ]
            }
        ).encode()
        request_ = {
            "path": "/v2/models/tiny/infer",
            "body": header + struct.pack("<I", len(image)) + image,
            "headers": {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        }
    else:
        body = {"instances": [{"b64": base64.b64encode(image).decode()}]}
        request_ = {"path": "/v1/models/tiny:predict", "body": json.dumps(body).encode()}
        request_["headers"] = {"Content-Type": "application/json"}
    check_answer(client, {"method": "POST", "query": "", **request_})


# -- gRPC ----------------------------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    """What the handlers use of grpc.ServicerContext: abort."""

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted


@pytest.fixture(scope="module")
def grpc_handlers(protocol_predictor):
    from imagerec.api import Serving, ServingMetrics
    from imagerec.grpc_server import GrpcServing

    repository = ModelRepository()
    repository.add(protocol_predictor, name="tiny", version="1")
    serving = GrpcServing(Serving(repository, Settings(), ServingMetrics()))
    methods = {}
    for handler in serving.services():
        # grpc's generic handler keeps its table by full method name ("/service/method").
        for name, rpc in handler._method_handlers.items():
            methods[name] = rpc.unary_unary
    return methods


@st.composite
def grpc_messages(draw) -> tuple[str, bytes]:
    """A method and a message for it: random bytes, or a valid request with fields mangled."""
    from imagerec.protocols.grpc_messages import messages

    v2, tfs = messages("inference"), messages("tensorflow.serving")
    image = draw(mutated_images())
    method = draw(
        st.sampled_from(
            [
                "/inference.GRPCInferenceService/ModelInfer",
                "/inference.GRPCInferenceService/ModelMetadata",
                "/inference.GRPCInferenceService/ModelReady",
                "/inference.GRPCInferenceService/RepositoryModelLoad",
                "/tensorflow.serving.PredictionService/Predict",
                "/tensorflow.serving.PredictionService/Classify",
                "/tensorflow.serving.PredictionService/GetModelMetadata",
            ]
        )
    )
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=200))
    rpc = method.rsplit("/", 1)[1]
    if rpc == "ModelInfer":
        message = v2.ModelInferRequest(model_name=draw(st.sampled_from(["tiny", "x", ""])))
        tensor = message.inputs.add(
            name=draw(st.sampled_from(["image", "pixels", ""])),
            datatype=draw(st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", ""])),
            shape=draw(st.lists(st.integers(-(2**62), 2**62), max_size=5)),
        )
        if draw(st.booleans()):
            message.raw_input_contents.append(draw(st.binary(max_size=64)) + image)
        else:
            tensor.contents.bytes_contents.append(image)
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1))))
            floats = st.floats(width=32, allow_nan=True)
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=8)))
        if draw(st.booleans()):
            output = message.outputs.add(name=draw(st.sampled_from(["probabilities", "x"])))
            output.parameters["classification"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif "PredictionService" in method:
        message = tfs.PredictRequest() if rpc == "Predict" else tfs.ClassificationRequest()
        if rpc == "GetModelMetadata":
            message = tfs.GetModelMetadataRequest(
                metadata_field=draw(st.lists(st.text(max_size=4)))
            )
        message.model_spec.name = draw(st.sampled_from(["tiny", "nope"]))
        if draw(st.booleans()):
            message.model_spec.version.value = draw(st.integers(-(2**63), 2**63 - 1))
        if rpc == "Predict":
            tensor = message.inputs[draw(st.sampled_from(["image_bytes", "x"]))]
            tensor.dtype = draw(st.integers(0, 30))
            tensor.string_val.append(image)
            for size in draw(st.lists(st.integers(-(2**62), 2**62), max_size=5)):
                tensor.tensor_shape.dim.add(size=size)
            tensor.tensor_content = draw(st.binary(max_size=64))
        elif rpc == "Classify":
            examples = message.input.example_list.examples
            feature = examples.add().features.feature[draw(st.text(max_size=5))]
            feature.bytes_list.value.append(image)
    else:
        message = v2.ModelMetadataRequest(name=draw(st.text(max_size=8)), version="1")
    return method, message.SerializeToString()


@FUZZ
@given(call=grpc_messages())
def test_any_grpc_message(grpc_handlers, call):
    import grpc

    method, data = call
    context = FakeContext()
    try:
        grpc_handlers[method](data, context)
    except Aborted:
        assert context.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            method,
            context.details,
        )
        assert context.details
