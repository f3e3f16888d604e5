"""TensorFlow Serving's REST API, for clients and tooling written against TF Serving.

    GET  /v1/models/{name}[/versions/{v}]              model status (GetModelStatusResponse)
    GET  /v1/models/{name}[/versions/{v}]/metadata     signature (GetModelMetadataResponse)
    POST /v1/models/{name}[/versions/{v}]:predict      {"instances": [{"b64": ...}]}
    POST /v1/models/{name}[/versions/{v}]:classify     {"examples": [{"image": {"b64": ...}}]}
    POST /v1/models/{name}[/versions/{v}]:regress      400: the model is a classifier

TF Serving's versions are integers: a numbered version (DIR/NAME/7) is its number; a plain
bundle's version (12 hex digits of the manifest digest) is given as the same number in decimal,
and either form is accepted in a URL. TF Serving owns the
`/v1/models/` prefix, which none of imagerec's own routes (/v1/model, /v1/labels, /v1/predict)
use, so both live side by side. Errors are {"error": "message"}.
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

from typing import Any

import numpy as np

from imagerec.errors import InvalidInput
from imagerec.hugcompat import hug
from imagerec.protocols.common import (
    decode_b64,
    install_protocol_errors,
    parse_json_object,
    pixels_to_uint8,
    prepare_encoded,
    probabilities,
    ranked,
    read_body,
)

SIGNATURE = "serving_default"
SIGNATURE_NAMES = ("", SIGNATURE)
INPUT = "image_bytes"  # TF Serving's convention: a `_bytes` suffix marks binary (base64) values
OUTPUT = "probabilities"
PREDICT_METHOD = "tensorflow/serving/predict"


def model_status(versions: list[Any]) -> dict:
    """GetModelStatusResponse: every version given, AVAILABLE."""
    return {
        "model_version_status": [
            {
                "version": str(served.numeric_version),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
            for served in versions
        ]
    }


def _tensor_info(name: str, dtype: str, dims: list[int]) -> dict:
    return {
        "dtype": dtype,
        "tensor_shape": {
            "dim": [{"size": str(size), "name": ""} for size in dims],
            "unknown_rank": False,
        },
        "name": f"{name}:0",
    }


def model_metadata(engine: Any) -> dict:
    return {
        "model_spec": {
            "name": engine.name,
            "signature_name": "",
            "version": str(engine.numeric_version),
        },
        "metadata": {
            "signature_def": {
                "signature_def": {
                    SIGNATURE: {
                        "inputs": {INPUT: _tensor_info(INPUT, "DT_STRING", [-1])},
                        "outputs": {
                            OUTPUT: _tensor_info(OUTPUT, "DT_FLOAT", [-1, len(engine.labels)])
                        },
                        "method_name": PREDICT_METHOD,
                    }
                }
            }
        },
    }


def check_signature(body: dict, accepted: tuple[str, ...] = SIGNATURE_NAMES) -> None:
    name = body.get("signature_name", "")
    if name not in accepted:
        raise InvalidInput(f'Serving signature name: "{name}" not found in signature def')


def b64_value(value: Any) -> Any:
    """The base64 text of {"b64": ...} (or of a one-element list of it, as Example features
    are lists), else None."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and set(value) == {"b64"}:
        return value["b64"]
    return None


def instance_image(instance: Any, index: int, engine: Any, max_pixels: int) -> np.ndarray:
    """One predict instance, {"b64": ...}, {"<input>": {"b64": ...}} or [H][W][3] pixels, as an
    image prepared at the model's input size."""
    where = f"instance {index}"
    if isinstance(instance, dict) and len(instance) == 1 and "b64" not in instance:
        instance = next(iter(instance.values()))  # the named form of the one input
    text = b64_value(instance)
    if text is not None:
        return prepare_encoded(engine, [decode_b64(text, where)], max_pixels)[0]
    if not isinstance(instance, list):
        raise InvalidInput(
            f'{where} must be an image as {{"b64": "..."}} or pixels [height][width][3]'
        )
    height, width = engine.input_size
    try:
        pixels = np.asarray(instance, dtype=np.float64)
    except (TypeError, ValueError, RecursionError):
        pixels = None
    if pixels is None or pixels.shape != (height, width, 3):
        raise InvalidInput(
            f"{where}: pixels must be numbers 0..255 in shape [{height}][{width}][3], the "
            "model's input size"
        )
    return pixels_to_uint8(pixels, where)


def predict_instances(body: dict) -> tuple[list, str]:
    """The instances of a predict request and the key its answer goes under."""
    if "instances" in body and "inputs" in body:
        raise InvalidInput('send "instances" (row format) or "inputs" (columnar), not both')
    if "instances" in body:
        key, answer_key = "instances", "predictions"
    elif "inputs" in body:
        key, answer_key = "inputs", "outputs"
    else:
        raise InvalidInput('send {"instances": [{"b64": "<base64 of an image>"}, ...]}')
    instances = body[key]
    if key == "inputs" and isinstance(instances, dict) and len(instances) == 1:
        instances = next(iter(instances.values()))  # the named form of the one input
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(f'"{key}" must be a non-empty list')
    return instances, answer_key


def example_image(example: Any, index: int) -> str:
    """The base64 image of one classify example: its one feature holding {"b64": ...}."""
    images = [b64_value(v) for v in example.values()] if isinstance(example, dict) else []
    images = [text for text in images if text is not None]
    if len(images) != 1:
        raise InvalidInput(
            f'example {index} must have one image feature, e.g. {{"image": {{"b64": "..."}}}}'
        )
    return images[0]


def add_tfserving_routes(api: hug.API) -> None:
    """Register TF Serving's REST API on `api`."""
    # Imported here: api.py imports this module for DEFAULT_ROUTES.
    from imagerec.api import serving

    install_protocol_errors(api, "/v1/models/")

    def status(serving, name: str, version: str | None) -> dict:
        engine = serving.model(name, version)
        versions = serving.repository.versions(name) if version is None else [engine]
        return model_status(versions)

    def metadata(serving, name: str, version: str | None) -> dict:
        return model_metadata(serving.model(name, version))

    def predict(request, serving, name: str, version: str | None) -> dict:
        engine = serving.model(name, version)
        body = parse_json_object(read_body(request, serving.settings.max_body_bytes))
        check_signature(body)
        instances, answer_key = predict_instances(body)
        max_pixels = serving.settings.max_pixels
        images = [instance_image(x, i, engine, max_pixels) for i, x in enumerate(instances)]
        return {answer_key: probabilities(serving, engine, images).tolist()}

    def classify(request, serving, name: str, version: str | None) -> dict:
        engine = serving.model(name, version)
        body = parse_json_object(read_body(request, serving.settings.max_body_bytes))
        check_signature(body, (*SIGNATURE_NAMES, "tensorflow/serving/classify"))
        if body.get("context"):
            raise InvalidInput('"context" is not supported: put the image in each example')
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise InvalidInput('send {"examples": [{"image": {"b64": "..."}}, ...]}')
        encoded = [decode_b64(example_image(x, i), f"example {i}") for i, x in enumerate(examples)]
        images = prepare_encoded(engine, encoded, serving.settings.max_pixels)
        probs = probabilities(serving, engine, images)
        labels = engine.labels
        # Every class, best first: result[i][0] is example i's top label.
        return {
            "result": [
                [[labels[k], float(row[k])] for k in ranked(row, len(labels))] for row in probs
            ]
        }

    def regress(serving, name: str, version: str | None) -> dict:
        serving.model(name, version)
        raise InvalidInput(
            "Expected regression signature method_name to be tensorflow/serving/regress. "
            f"Was: {PREDICT_METHOD} (this model is a classifier: use :classify or :predict)"
        )

    @hug.get("/v1/models/{name}", api=api)
    def tf_status(name: str, serving: serving):
        """TF Serving model status: the one version, AVAILABLE once loaded (503 before)."""
        return status(serving, name, None)

    @hug.get("/v1/models/{name}/versions/{version}", api=api)
    def tf_version_status(name: str, version: str, serving: serving):
        """TF Serving model status of one version."""
        return status(serving, name, version)

    @hug.get("/v1/models/{name}/metadata", api=api)
    def tf_metadata(name: str, serving: serving):
        """TF Serving model metadata: the serving_default signature."""
        return metadata(serving, name, None)

    @hug.get("/v1/models/{name}/versions/{version}/metadata", api=api)
    def tf_version_metadata(name: str, version: str, serving: serving):
        """TF Serving model metadata of one version."""
        return metadata(serving, name, version)

    @hug.post("/v1/models/{name}:predict", api=api, parse_body=False)
    def tf_predict(name: str, request, serving: serving):
        """TF Serving predict: class probabilities per instance."""
        return predict(request, serving, name, None)

    @hug.post("/v1/models/{name}/versions/{version}:predict", api=api, parse_body=False)
    def tf_version_predict(name: str, version: str, request, serving: serving):
        """TF Serving predict on one version."""
        return predict(request, serving, name, version)

    @hug.post("/v1/models/{name}:classify", api=api, parse_body=False)
    def tf_classify(name: str, request, serving: serving):
        """TF Serving classify: [label, score] pairs per example, best first."""
        return classify(request, serving, name, None)

    @hug.post("/v1/models/{name}/versions/{version}:classify", api=api, parse_body=False)
    def tf_version_classify(name: str, version: str, request, serving: serving):
        """TF Serving classify on one version."""
        return classify(request, serving, name, version)

    @hug.post("/v1/models/{name}:regress", api=api, parse_body=False)
    def tf_regress(name: str, serving: serving):
        """TF Serving regress: 400, as TF Serving answers for a classification model."""
        return regress(serving, name, None)

    @hug.post("/v1/models/{name}/versions/{version}:regress", api=api, parse_body=False)
    def tf_version_regress(name: str, version: str, serving: serving):
        """TF Serving regress on one version: 400."""
        return regress(serving, name, version)
