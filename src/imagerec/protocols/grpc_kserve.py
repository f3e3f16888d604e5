"""Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService`.

The same model, inputs and outputs as the REST routes in kserve_v2.py: one input tensor, BYTES
of encoded images (in `raw_input_contents`, each element a 4-byte little-endian length and its
bytes, or in `contents.bytes_contents`) or UINT8 / FP32 pixels [N, H, W, 3]; the output
"probabilities" FP32 [N, classes], or with the `classification` parameter BYTES [N, k] of
"score:index:label". Answers carry their tensors in `raw_output_contents`, as Triton's do.
Errors are ImagerecError, which the server turns into gRPC status codes.
"""

from __future__ import annotations

from typing import Any

from imagerec.errors import InvalidInput
from imagerec.protocols.common import prepare_encoded, probabilities
from imagerec.protocols.kserve_v2 import (
    OUTPUT,
    classification_strings,
    images_of,
    join_bytes_elements,
    model_metadata,
    server_metadata,
)


def _parameter(parameters: Any, key: str) -> Any:
    """The value an InferParameter map holds for `key`, whichever kind it is, or None."""
    if key not in parameters:
        return None
    parameter = parameters[key]
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def requested_outputs(request: Any, classes: int) -> list[int]:
    """The classification count (0: probabilities) of each requested output, in order."""
    if not request.outputs:
        return [0]
    wanted = []
    for output in request.outputs:
        if output.name != OUTPUT:
            raise InvalidInput(f"unknown output {output.name!r}: the model's output is {OUTPUT!r}")
        count = _parameter(output.parameters, "classification") or 0
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= classes:
            raise InvalidInput(f"classification must be an integer from 1 to {classes}")
        wanted.append(count)
    return wanted


def request_images(request: Any, engine: Any, max_pixels: int) -> list:
    """The request's one input tensor as prepared uint8 images at the model's input size."""
    if len(request.inputs) != 1:
        raise InvalidInput(
            'the request must hold one input tensor: "image" (BYTES, encoded images) or '
            '"pixels" (UINT8 or FP32 pixels [N, H, W, 3])'
        )
    tensor = request.inputs[0]
    described = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
    if any(size < 0 for size in described["shape"]):
        raise InvalidInput(f"input {tensor.name!r}: the shape must not be negative")
    raw = list(request.raw_input_contents)
    if raw:
        if len(raw) != 1 or tensor.HasField("contents"):
            raise InvalidInput(
                "send the input either in raw_input_contents (one entry) or in contents"
            )
        return images_of(described, raw[0], engine, max_pixels)
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        encoded = list(contents.bytes_contents)
        count = 1
        for size in described["shape"]:
            count *= size
        if len(encoded) != count:
            raise InvalidInput(
                f"input {tensor.name!r} has {len(encoded)} elements; shape "
                f"{described['shape']} says {count}"
            )
        return prepare_encoded(engine, encoded, max_pixels)
    values = {"UINT8": contents.uint_contents, "FP32": contents.fp32_contents}.get(
        tensor.datatype, []
    )
    return images_of(described, list(values), engine, max_pixels)


def model_infer(serving: Any, engine: Any, request: Any, messages: Any) -> Any:
    """One ModelInfer call on the held version `engine`."""
    wanted = requested_outputs(request, len(engine.labels))
    images = request_images(request, engine, serving.settings.max_pixels)
    probs = probabilities(serving, engine, images)
    answer = messages.ModelInferResponse(
        model_name=engine.name, model_version=engine.version, id=request.id
    )
    for count in wanted:
        output = answer.outputs.add(name=OUTPUT)
        if count:
            strings = classification_strings(probs, engine.labels, count)
            output.datatype = "BYTES"
            output.shape.extend([len(probs), count])
            answer.raw_output_contents.append(join_bytes_elements([s.encode() for s in strings]))
        else:
            output.datatype = "FP32"
            output.shape.extend(probs.shape)
            answer.raw_output_contents.append(probs.astype("<f4").tobytes())
    return answer


def fill_model_metadata(engine: Any, versions: list[str], messages: Any) -> Any:
    described = model_metadata(engine, versions)
    answer = messages.ModelMetadataResponse(
        name=described["name"], versions=described["versions"], platform=described["platform"]
    )
    for field in ("inputs", "outputs"):
        for tensor in described[field]:
            getattr(answer, field).add(**tensor)
    return answer


def fill_server_metadata(messages: Any) -> Any:
    return messages.ServerMetadataResponse(**server_metadata())


def check_no_parameters(request: Any, ignored: tuple[str, ...] = ()) -> None:
    """Refuse load or unload parameters, except `ignored` ones that change nothing here."""
    given = sorted(set(request.parameters) - set(ignored))
    if given:
        raise InvalidInput(
            f"load parameters are not supported ({', '.join(given)}): the model is read from "
            "its folder in the repository"
        )
