"""Open Inference Protocol v2 (the KServe v2 REST protocol of Triton, KServe, Seldon MLServer and
OpenVINO Model Server), with Triton's binary tensor data and classification extensions.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200, or 503 while the model loads
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

The model name is the bundle's name and its one version the bundle version. A request carries one
input tensor: BYTES of encoded images (base64 strings in JSON; raw with the binary extension, each
element a 4-byte little-endian length and its bytes), or UINT8 / FP32 pixels [N, H, W, 3] with
values 0..255. The output "probabilities" is FP32 [N, classes]; with {"classification": k} it is
BYTES [N, k] of "score:index:label" strings. Errors are {"error": "message"}.
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

import json
import math
import struct
from typing import Any

import numpy as np

import imagerec
from imagerec.errors import InvalidInput
from imagerec.hugcompat import hug
from imagerec.protocols.common import (
    decode_b64,
    install_protocol_errors,
    leaves,
    parse_json_object,
    pixels_to_uint8,
    prepare_encoded,
    probabilities,
    ranked,
    read_body,
)

INPUT_IMAGE = "image"
INPUT_PIXELS = "pixels"
OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "tensorflow_keras"
HEADER_LENGTH = "Inference-Header-Content-Length"
PIXEL_DTYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}


@hug.format.content_type("application/json")
def json_or_bytes(data, **_kwargs) -> bytes:
    """hug output format: JSON, or bytes already encoded (a binary-extension answer)."""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    return json.dumps(data).encode()


def server_metadata() -> dict:
    return {"name": "imagerec", "version": imagerec.__version__, "extensions": EXTENSIONS}


def model_metadata(engine: Any, versions: list[str]) -> dict:
    height, width = engine.input_size
    return {
        "name": engine.name,
        "versions": versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": INPUT_IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": INPUT_PIXELS, "datatype": "UINT8", "shape": [-1, height, width, 3]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(engine.labels)]}],
    }


def split_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON inference request and the binary tensor data that follows it."""
    if header_length is None:
        return parse_json_object(body, "the inference request"), b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} must be the JSON header's length, 0 to {len(body)} bytes; "
            f"got {header_length!r}"
        )
    return parse_json_object(body[:length], "the inference request"), body[length:]


def split_bytes_elements(buffer: bytes, where: str) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise InvalidInput(f"{where}: the binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise InvalidInput(f"{where}: an element claims {length} bytes past the data's end")
        elements.append(buffer[offset : offset + length])
        offset += length
    return elements


def join_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in elements)


def request_tensor(infer: dict, binary: bytes) -> tuple[dict, Any]:
    """The request's one input tensor and its data (a JSON list, or bytes from the binary part)."""
    inputs = infer.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(
            f'"inputs" must hold one tensor: "{INPUT_IMAGE}" (BYTES, encoded images) or '
            f'"{INPUT_PIXELS}" (UINT8 or FP32 pixels [N, H, W, 3])'
        )
    tensor = inputs[0]
    name = tensor.get("name")
    shape = tensor.get("shape")
    if not isinstance(name, str):
        raise InvalidInput('the input tensor needs a "name" string')
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f'input {name!r}: "shape" must be a list of non-negative integers')
    if not isinstance(tensor.get("datatype"), str):
        raise InvalidInput(f'input {name!r} needs a "datatype" string')
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f'input {name!r}: "parameters" must be an object')
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInput(f"{len(binary)} bytes follow the JSON but no input claims them")
        if "data" not in tensor:
            raise InvalidInput(f'input {name!r} has neither "data" nor "binary_data_size"')
        return tensor, tensor["data"]
    if "data" in tensor:
        raise InvalidInput(f'input {name!r} has both "data" and "binary_data_size"')
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size!r} but {len(binary)} bytes follow the JSON"
        )
    return tensor, binary


def images_of(tensor: dict, data: Any, engine: Any, max_pixels: int) -> list[np.ndarray]:
    """The input tensor as prepared uint8 images at the model's input size."""
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    count = math.prod(shape)
    if datatype == "BYTES":
        if isinstance(data, bytes):
            encoded = split_bytes_elements(data, f"input {name!r}")
        else:
            encoded = [
                decode_b64(item, f"input {name!r} element {index}")
                for index, item in enumerate(leaves(data))
            ]
        if len(encoded) != count:
            raise InvalidInput(
                f"input {name!r} has {len(encoded)} elements; shape {shape} says {count}"
            )
        return prepare_encoded(engine, encoded, max_pixels)
    if datatype not in PIXEL_DTYPES:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not accepted; send BYTES (encoded "
            "images) or UINT8 / FP32 pixels"
        )
    height, width = engine.input_size
    if len(shape) != 4 or shape[1:] != [height, width, 3]:
        raise InvalidInput(
            f"input {name!r}: pixel tensors must have shape [N, {height}, {width}, 3], the "
            f"model's input size; got {shape}"
        )
    dtype = PIXEL_DTYPES[datatype]
    if isinstance(data, bytes):
        if len(data) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: {len(data)} bytes of {datatype} do not fill shape {shape}"
            )
        values = np.frombuffer(data, dtype=dtype).astype(np.float64)
    else:
        flat = list(leaves(data))
        if len(flat) != count:
            raise InvalidInput(f"input {name!r} has {len(flat)} values; shape {shape} says {count}")
        numbers = (int, float) if datatype == "FP32" else (int,)
        if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in flat):
            kind = "numbers" if datatype == "FP32" else "integers"
            raise InvalidInput(f"input {name!r}: {datatype} data must be {kind}")
        values = np.asarray(flat, dtype=np.float64)
    return list(pixels_to_uint8(values, f"input {name!r}").reshape(shape))


def requested_outputs(infer: dict, classes: int) -> list[tuple[int, bool]]:
    """(classification count or 0, as binary) for each requested output, in request order."""
    parameters = infer.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput('"binary_data_output" must be true or false')
    outputs = infer.get("outputs")
    if outputs is None or outputs == []:
        return [(0, binary_default)]
    if not isinstance(outputs, list):
        raise InvalidInput('"outputs" must be a list')
    wanted = []
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            name = output.get("name") if isinstance(output, dict) else output
            raise InvalidInput(f"unknown output {name!r}: the model's output is {OUTPUT!r}")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidInput(f'output {OUTPUT!r}: "parameters" must be an object')
        count = options.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= classes:
            raise InvalidInput(f"classification must be an integer from 1 to {classes}")
        binary = options.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput('"binary_data" must be true or false')
        wanted.append((count, binary))
    return wanted


def classification_strings(probs: np.ndarray, labels: list[str], k: int) -> list[str]:
    """Triton's classification extension: "score:index:label", best first, row by row."""
    # str(np.float32) is the shortest text that reads back as the same float32.
    return [f"{str(np.float32(row[i]))}:{i}:{labels[i]}" for row in probs for i in ranked(row, k)]


def infer_response(
    infer: dict, engine: Any, probs: np.ndarray, wanted: list[tuple[int, bool]]
) -> tuple[dict, bytes]:
    """The JSON inference response and the binary tensor data that follows it."""
    answer: dict[str, Any] = {"model_name": engine.name, "model_version": engine.version}
    if "id" in infer:
        answer["id"] = infer["id"]
    outputs, chunks = [], []
    for count, binary in wanted:
        if count:
            strings = classification_strings(probs, engine.labels, count)
            output = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(probs), count]}
            raw = join_bytes_elements([s.encode() for s in strings]) if binary else b""
            values: list = strings
        else:
            output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
            raw = probs.astype("<f4").tobytes() if binary else b""
            values = probs.ravel().tolist()
        if binary:
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = values
        outputs.append(output)
    answer["outputs"] = outputs
    return answer, b"".join(chunks)


def infer(request, response, serving: Any, name: str, version: str | None) -> bytes | dict:
    """One inference: parse, check, run the model, answer (JSON, or JSON + binary data)."""
    engine = serving.model(name, version)
    body = read_body(request, serving.settings.max_body_bytes)
    request_json, binary = split_request(body, request.get_header(HEADER_LENGTH))
    if "id" in request_json and not isinstance(request_json["id"], str):
        raise InvalidInput('"id" must be a string')
    wanted = requested_outputs(request_json, len(engine.labels))
    tensor, data = request_tensor(request_json, binary)
    images = images_of(tensor, data, engine, serving.settings.max_pixels)
    probs = probabilities(serving, engine, images)
    answer, raw = infer_response(request_json, engine, probs, wanted)
    if not raw and not any(binary for _, binary in wanted):
        return answer
    header = json.dumps(answer).encode()
    response.set_header(HEADER_LENGTH, str(len(header)))
    response.content_type = "application/octet-stream"
    return header + raw


def add_v2_routes(api: hug.API) -> None:
    """Register the Open Inference Protocol v2 routes on `api`."""
    # Imported here: api.py imports this module for DEFAULT_ROUTES.
    from imagerec.api import serving

    install_protocol_errors(api, "/v2")
    route = {"api": api, "output": json_or_bytes}

    @hug.get("/v2", **route)
    def v2_server_metadata():
        """Server metadata: name, version and the protocol extensions supported."""
        return server_metadata()

    @hug.get("/v2/health/live", **route)
    def v2_live():
        """Live: the server answers HTTP (the model may still be loading)."""
        return {"live": True}

    @hug.get("/v2/health/ready", **route)
    def v2_ready(serving: serving):
        """Ready: the models are loaded and warm. 503 until then."""
        serving.repository.readiness()
        return {"ready": True}

    def metadata(serving, name: str, version: str | None) -> dict:
        engine = serving.model(name, version)
        versions = [v.version for v in serving.repository.versions(name)]
        return model_metadata(engine, versions if version is None else [engine.version])

    @hug.get("/v2/models/{name}", **route)
    def v2_model(name: str, serving: serving):
        """Model metadata: inputs, outputs, the versions served."""
        return metadata(serving, name, None)

    @hug.get("/v2/models/{name}/versions/{version}", **route)
    def v2_model_version(name: str, version: str, serving: serving):
        """Model metadata of one version."""
        return metadata(serving, name, version)

    @hug.get("/v2/models/{name}/ready", **route)
    def v2_model_ready(name: str, serving: serving):
        """Model ready: 200 once it can infer, 503 while it loads, 404 for a model not served."""
        return {"name": serving.model(name).name, "ready": True}

    @hug.get("/v2/models/{name}/versions/{version}/ready", **route)
    def v2_model_version_ready(name: str, version: str, serving: serving):
        """Model ready, for one version."""
        return {"name": serving.model(name, version).name, "ready": True}

    @hug.post("/v2/models/{name}/infer", parse_body=False, **route)
    def v2_infer(name: str, request, response, serving: serving):
        """Inference: one input tensor of encoded images or pixels, JSON or binary."""
        return infer(request, response, serving, name, None)

    @hug.post("/v2/models/{name}/versions/{version}/infer", parse_body=False, **route)
    def v2_infer_version(name: str, version: str, request, response, serving: serving):
        """Inference on one version."""
        return infer(request, response, serving, name, version)


def repository_body(request, serving: Any) -> dict:
    """The optional JSON body of a repository request ({} when empty)."""
    body = read_body(request, serving.settings.max_body_bytes)
    return parse_json_object(body, "the repository request") if body.strip() else {}


def add_v2_repository_routes(api: hug.API) -> None:
    """Triton's model repository extension: list, load and unload models. Loading and
    unloading are allowed only under `--model-control explicit`, as in Triton."""
    from imagerec.api import serving

    install_protocol_errors(api, "/v2")
    route = {"api": api, "output": json_or_bytes, "parse_body": False}

    @hug.post("/v2/repository/index", **route)
    def v2_repository_index(request, serving: serving):
        """Every model in the repository: name, version, state (READY or UNAVAILABLE), reason.
        {"ready": true} lists the ready ones only."""
        body = repository_body(request, serving)
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput('"ready" must be true or false')
        rows = serving.repository.index()
        return [row for row in rows if row["state"] == "READY"] if ready_only else rows

    @hug.post("/v2/repository/models/{name}/load", **route)
    def v2_repository_load(name: str, request, serving: serving):
        """Load (or reload) a model's versions from the repository; answers once they serve."""
        parameters = repository_body(request, serving).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput('"parameters" must be an object')
        if parameters:
            raise InvalidInput(
                f"load parameters are not supported ({', '.join(sorted(parameters))}): the "
                "model is read from its folder in the repository"
            )
        serving.repository.load(name)
        return {}

    @hug.post("/v2/repository/models/{name}/unload", **route)
    def v2_repository_unload(name: str, request, serving: serving):
        """Stop serving a model; each version is freed once its requests in flight finish."""
        parameters = repository_body(request, serving).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput('"parameters" must be an object')
        serving.repository.unload(name)
        return {}
