"""TF Serving's gRPC PredictionService: Predict, Classify, GetModelMetadata (and Regress, which
answers that the model is a classifier), as tensorflow-serving-api calls them.

The same model as the REST routes in tfserving.py: Predict takes one input, "image_bytes" by
convention, a DT_STRING tensor of encoded images, or DT_UINT8 / DT_FLOAT pixels
[N, H, W, 3]; it answers "probabilities", DT_FLOAT [N, classes]. Classify takes tf.train.Example
protos, each with one bytes feature holding an image, and answers every class, best first.
Versions are TF Serving's integers (ServedVersion.numeric_version).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imagerec.errors import InvalidInput
from imagerec.protocols.common import pixels_to_uint8, prepare_encoded, probabilities, ranked
from imagerec.protocols.tfserving import INPUT, OUTPUT, PREDICT_METHOD, SIGNATURE, SIGNATURE_NAMES

CLASSIFY_SIGNATURES = (*SIGNATURE_NAMES, "tensorflow/serving/classify")
SIGNATURE_DEF_MAP = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
# TensorFlow's DataType numbers, and the NumPy types of their tensor_content.
DT_FLOAT, DT_UINT8, DT_STRING = 1, 4, 7
PIXEL_TYPES = {DT_UINT8: ("<u1", "int_val"), DT_FLOAT: ("<f4", "float_val")}


def requested_version(spec: Any) -> str | None:
    """The version a ModelSpec asks for, as the repository names it (None: the newest)."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return str(spec.version.value)
    if choice == "version_label":
        return spec.version_label or None
    return None


def check_signature(spec: Any, accepted: tuple[str, ...] = SIGNATURE_NAMES) -> None:
    if spec.signature_name not in accepted:
        raise InvalidInput(f'Serving signature name: "{spec.signature_name}" not found')


def answer_spec(answer_spec: Any, engine: Any) -> None:
    answer_spec.name = engine.name
    answer_spec.version.value = engine.numeric_version
    answer_spec.signature_name = SIGNATURE


def tensor_shape(tensor: Any) -> list[int]:
    return [dim.size for dim in tensor.tensor_shape.dim]


def tensor_images(name: str, tensor: Any, engine: Any, max_pixels: int) -> list:
    """One input TensorProto as prepared uint8 images: encoded images, or pixels."""
    shape = tensor_shape(tensor)
    if tensor.dtype == DT_STRING:
        encoded = list(tensor.string_val)
        if len(shape) > 1 or (shape and shape[0] != len(encoded)):
            raise InvalidInput(
                f"input {name!r}: a DT_STRING tensor of images has shape [N]; got {shape} "
                f"for {len(encoded)} values"
            )
        return prepare_encoded(engine, encoded, max_pixels)
    if tensor.dtype not in PIXEL_TYPES:
        raise InvalidInput(
            f"input {name!r}: send DT_STRING (encoded images) or DT_UINT8 / DT_FLOAT pixels"
        )
    height, width = engine.input_size
    if len(shape) != 4 or shape[1:] != [height, width, 3] or shape[0] < 0:
        raise InvalidInput(
            f"input {name!r}: pixel tensors must have shape [N, {height}, {width}, 3], the "
            f"model's input size; got {shape}"
        )
    dtype, field = PIXEL_TYPES[tensor.dtype]
    count = int(np.prod(shape))
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * np.dtype(dtype).itemsize:
            raise InvalidInput(f"input {name!r}: tensor_content does not fill shape {shape}")
        values = np.frombuffer(tensor.tensor_content, dtype=dtype)
    else:
        values = np.asarray(getattr(tensor, field), dtype=np.float64)
        if values.size != count:
            message = f"input {name!r} has {values.size} values; shape {shape} says {count}"
            raise InvalidInput(message)
    pixels = pixels_to_uint8(values.astype(np.float64), f"input {name!r}")
    return list(pixels.reshape(shape))


def predict(serving: Any, engine: Any, request: Any, messages: Any) -> Any:
    check_signature(request.model_spec)
    if len(request.inputs) != 1:
        raise InvalidInput(
            f'send one input, "{INPUT}": a DT_STRING tensor of encoded images '
            f"(got {len(request.inputs)} inputs)"
        )
    unknown = [name for name in request.output_filter if name != OUTPUT]
    if unknown:
        raise InvalidInput(f"unknown output {unknown[0]!r}: the model's output is {OUTPUT!r}")
    ((name, tensor),) = request.inputs.items()
    images = tensor_images(name, tensor, engine, serving.settings.max_pixels)
    probs = probabilities(serving, engine, images).astype("<f4")
    answer = messages.PredictResponse()
    answer_spec(answer.model_spec, engine)
    output = answer.outputs[OUTPUT]
    output.dtype = DT_FLOAT
    output.tensor_shape.dim.add(size=probs.shape[0])
    output.tensor_shape.dim.add(size=probs.shape[1])
    output.tensor_content = probs.tobytes()
    return answer


def example_image(example: Any, index: int) -> bytes:
    """The encoded image of one Example: its one bytes feature holding one value."""
    values = [
        feature.bytes_list.value
        for feature in example.features.feature.values()
        if feature.WhichOneof("kind") == "bytes_list"
    ]
    if len(values) != 1 or len(values[0]) != 1:
        raise InvalidInput(
            f"example {index} must have one bytes feature holding one image, e.g. "
            '"image": bytes_list { value: <JPEG bytes> }'
        )
    return values[0][0]


def examples_of(request: Any) -> list:
    kind = request.input.WhichOneof("kind")
    if kind == "example_list_with_context":
        raise InvalidInput("example_list_with_context is not supported: send example_list")
    examples = list(request.input.example_list.examples) if kind else []
    if not examples:
        raise InvalidInput("send input { example_list { examples: [...] } } with one image each")
    return examples


def classify(serving: Any, engine: Any, request: Any, messages: Any) -> Any:
    check_signature(request.model_spec, CLASSIFY_SIGNATURES)
    encoded = [example_image(x, i) for i, x in enumerate(examples_of(request))]
    images = prepare_encoded(engine, encoded, serving.settings.max_pixels)
    probs = probabilities(serving, engine, images)
    answer = messages.ClassificationResponse()
    answer_spec(answer.model_spec, engine)
    labels = engine.labels
    for row in probs:
        ranked_classes = answer.result.classifications.add()
        for k in ranked(row, len(labels)):
            ranked_classes.classes.add(label=labels[k], score=float(row[k]))
    return answer


def regress(_serving: Any, _engine: Any, _request: Any, _messages: Any) -> Any:
    raise InvalidInput(
        "Expected regression signature method_name to be tensorflow/serving/regress. "
        f"Was: {PREDICT_METHOD} (this model is a classifier: use Classify or Predict)"
    )


def model_metadata(engine: Any, request: Any, messages: Any) -> Any:
    fields = list(request.metadata_field)
    if not fields:
        raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
    unknown = [f for f in fields if f != "signature_def"]
    if unknown:
        raise InvalidInput(f"Metadata field {unknown[0]} is not supported (signature_def is)")
    signatures = messages.SignatureDefMap()
    signature = signatures.signature_def[SIGNATURE]
    signature.method_name = PREDICT_METHOD
    _tensor_info(signature.inputs[INPUT], INPUT, DT_STRING, [-1])
    _tensor_info(signature.outputs[OUTPUT], OUTPUT, DT_FLOAT, [-1, len(engine.labels)])
    answer = messages.GetModelMetadataResponse()
    answer_spec(answer.model_spec, engine)
    answer.model_spec.ClearField("signature_name")
    packed = answer.metadata["signature_def"]
    packed.type_url = SIGNATURE_DEF_MAP
    packed.value = signatures.SerializeToString()
    return answer


def _tensor_info(info: Any, name: str, dtype: int, dims: list[int]) -> None:
    info.name = f"{name}:0"
    info.dtype = dtype
    for size in dims:
        info.tensor_shape.dim.add(size=size)
