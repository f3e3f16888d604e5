"""OpenAPI 3.1 description of the HTTP API, served at `GET /openapi.json` (import it into Postman
or any OpenAPI tool).

The document is assembled from `OPERATIONS`, one entry per (method, path) route, filtered to the
routes the app actually has. `undocumented_routes(api)` lists live routes with no entry; the tests
require it to be empty, so a route added without its entry here fails the build.
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

import re
from typing import Any

import imagerec
from imagerec.hugcompat import hug


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def answer(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    return response


BINARY = {"type": "string", "format": "binary"}
NATIVE_ERRORS = {
    "400": answer("The request is malformed", ref("Error")),
    "404": answer("No such model or version being served", ref("Error")),
    "413": answer("The body or an image is over the size limit", ref("Error")),
    "415": answer("Not a supported content type or image format", ref("Error")),
    "503": answer("The model is still loading (or failed to load)", ref("Error")),
}
PROTOCOL_ERRORS = {
    "400": answer("The request is malformed", ref("ProtocolError")),
    "404": answer("No such model or version", ref("ProtocolError")),
    "413": answer("The body or an image is over the size limit", ref("ProtocolError")),
    "415": answer("Not a supported content type or image format", ref("ProtocolError")),
    "503": answer("The model is still loading (or failed to load)", ref("ProtocolError")),
    # falcon matches "{name}:predict" only where the name has no line break; others fall through
    "405": answer("The URL matched a route without this method", ref("ProtocolError")),
}
NOT_MODIFIED = answer("The client's copy (If-None-Match) is current")


def errors(table: dict, *codes: str) -> dict:
    return {code: table[code] for code in codes}


def operation(
    summary: str,
    tag: str,
    responses: dict,
    *,
    body: dict | None = None,
    query: tuple[dict, ...] = (),  # query and header parameters
    description: str | None = None,
) -> dict:
    """One OpenAPI operation; path parameters are added from the path when it is placed."""
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        op["description"] = description
    if query:
        op["parameters"] = list(query)
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    return op


TOP_K = {
    "name": "top_k",
    "in": "query",
    "required": False,
    "description": "How many labels to return per image, best first",
    "schema": {"type": "integer", "minimum": 1},
}
MODEL_CHOICE = (
    {
        "name": "model",
        "in": "query",
        "required": False,
        "description": "The model to use (GET /v1/models lists them); the default model if absent",
        "schema": {"type": "string"},
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "description": "The model's version; its newest served version if absent",
        "schema": {"type": "string"},
    },
)
PATH_PARAMETERS = {
    "name": "The model name (the bundle's folder name, e.g. cifar10)",
    "version": "The model version: its number (DIR/NAME/7), or a plain bundle's version (TF "
    "Serving also takes that in decimal)",
}
PATH_PARAMETER = re.compile(r"{(\w+)}")

HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "Binary tensor data extension: the length of the JSON part of the body",
    "schema": {"type": "integer", "minimum": 0},
}
V2_INFER_BODY = {
    "application/json": {"schema": ref("InferenceRequest")},
    "application/octet-stream": {
        "schema": {
            **BINARY,
            "description": "Binary tensor data extension: the JSON request (its length in the "
            "Inference-Header-Content-Length header), then each binary input's bytes",
        }
    },
}
V2_INFER_RESPONSES = {
    "200": {
        "description": "The outputs: JSON, or with binary outputs, the JSON response (its length "
        "in Inference-Header-Content-Length) followed by the tensors' bytes",
        "content": {
            "application/json": {"schema": ref("InferenceResponse")},
            "application/octet-stream": {"schema": BINARY},
        },
    },
    **errors(PROTOCOL_ERRORS, "400", "404", "413", "415", "503"),
}
TF_PREDICT_BODY = json_content(ref("TFPredictRequest"))
TF_CLASSIFY_BODY = json_content(ref("TFClassifyRequest"))
READ_ERRORS = errors(PROTOCOL_ERRORS, "404", "503")
READ_WRITE_ERRORS = errors(PROTOCOL_ERRORS, "400", "404")
TF_POST_ERRORS = errors(PROTOCOL_ERRORS, "400", "404", "405", "413", "415", "503")

OPERATIONS: dict[tuple[str, str], dict] = {
    ("GET", "/healthz"): operation(
        "Alive: the process answers HTTP (the model may still be loading)",
        "health",
        {"200": answer("Alive", ref("Status"))},
    ),
    ("GET", "/readyz"): operation(
        "Ready: the model is loaded and warmed up",
        "health",
        {"200": answer("Ready", ref("Ready")), **errors(NATIVE_ERRORS, "503")},
    ),
    ("GET", "/metrics"): operation(
        "Prometheus metrics: requests, latency, batch sizes, images classified",
        "health",
        {"200": answer("Prometheus text exposition format", {"type": "string"}, "text/plain")},
    ),
    ("GET", "/v1/models"): operation(
        "Every served model with its versions, the accuracy to expect, and the default model",
        "imagerec",
        {"200": answer("The models", ref("Models")), **errors(NATIVE_ERRORS, "503")},
    ),
    ("GET", "/v1/model"): operation(
        "One served model: name, version, labels, input shape, accuracy, preprocessing, metrics",
        "imagerec",
        {"200": answer("The model", ref("Model")), **errors(NATIVE_ERRORS, "400", "404", "503")},
        query=MODEL_CHOICE,
    ),
    ("GET", "/v1/labels"): operation(
        "The class labels, in the model's output order",
        "imagerec",
        {"200": answer("The labels", ref("Labels")), **errors(NATIVE_ERRORS, "400", "404", "503")},
        query=MODEL_CHOICE,
    ),
    ("POST", "/v1/predict"): operation(
        "Classify images: multipart 'image' fields, a raw image body, or JSON base64",
        "imagerec",
        {
            "200": answer("One result per image, in the order sent", ref("PredictResponse")),
            **errors(NATIVE_ERRORS, "400", "404", "413", "415", "503"),
        },
        query=(TOP_K, *MODEL_CHOICE),
        body={
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"oneOf": [BINARY, {"type": "array", "items": BINARY}]},
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "required": ["image"],
                }
            },
            **{media: {"schema": BINARY} for media in ("image/jpeg", "image/png", "image/webp")},
            "image/bmp": {"schema": BINARY},
            "application/octet-stream": {"schema": BINARY},
            "application/json": {"schema": ref("PredictRequest")},
        },
    ),
    ("GET", "/"): operation(
        "The web page: drop, pick, paste or photograph images and see their labels",
        "web",
        {"200": answer("The page", {"type": "string"}, "text/html"), "304": NOT_MODIFIED},
    ),
    ("GET", "/static/{name}"): operation(
        "The web page's script and style sheet",
        "web",
        {
            "200": {
                "description": "The file",
                "content": {
                    media: {"schema": {"type": "string"}}
                    for media in ("text/javascript", "text/css", "image/svg+xml", "text/html")
                },
            },
            "304": NOT_MODIFIED,
            "404": answer("No such file", ref("Error")),
        },
    ),
    ("GET", "/v1/model/card"): operation(
        "The served model's card: its pictures and metrics files, with a title and URL each",
        "web",
        {"200": answer("The card", ref("ModelCard")), **errors(NATIVE_ERRORS, "404", "503")},
        query=MODEL_CHOICE,
    ),
    ("GET", "/v1/model/card/{name}"): operation(
        "One file of the model card, e.g. confusion.png or training.png",
        "web",
        {
            "200": {
                "description": "The file",
                "content": {
                    "image/png": {"schema": BINARY},
                    "image/jpeg": {"schema": BINARY},
                    "application/json": {"schema": {}},
                    "text/plain": {"schema": {"type": "string"}},
                    "text/markdown": {"schema": {"type": "string"}},
                },
            },
            "304": NOT_MODIFIED,
            "404": answer("The card has no such file, or no such model", ref("Error")),
            **errors(NATIVE_ERRORS, "503"),
        },
        query=MODEL_CHOICE,
    ),
    ("GET", "/openapi.json"): operation(
        "This document: OpenAPI 3.1 for every route (import it into Postman)",
        "imagerec",
        {"200": answer("The OpenAPI document", {"type": "object"})},
    ),
    ("GET", "/v2"): operation(
        "Open Inference Protocol v2: server metadata and supported extensions",
        "open inference protocol v2",
        {"200": answer("Server metadata", ref("ServerMetadata"))},
    ),
    ("GET", "/v2/health/live"): operation(
        "OIP v2 server live",
        "open inference protocol v2",
        {"200": answer("Live", ref("Live"))},
    ),
    ("GET", "/v2/health/ready"): operation(
        "OIP v2 server ready: 503 while the model loads",
        "open inference protocol v2",
        {"200": answer("Ready", ref("ServerReady")), **errors(PROTOCOL_ERRORS, "503")},
    ),
    ("POST", "/v2/repository/index"): operation(
        "Triton model repository: every model's versions, state and reason",
        "open inference protocol v2",
        {"200": answer("The index", ref("RepositoryIndex")), **errors(PROTOCOL_ERRORS, "400")},
        body=json_content(ref("RepositoryIndexRequest")),
    ),
    ("POST", "/v2/repository/models/{name}/load"): operation(
        "Triton model repository: load (or reload) a model; --model-control explicit only",
        "open inference protocol v2",
        {"200": answer("Loaded and serving", {"type": "object"}), **READ_WRITE_ERRORS},
        body=json_content(ref("RepositoryRequest")),
    ),
    ("POST", "/v2/repository/models/{name}/unload"): operation(
        "Triton model repository: unload a model; --model-control explicit only",
        "open inference protocol v2",
        {"200": answer("Unloaded", {"type": "object"}), **READ_WRITE_ERRORS},
        body=json_content(ref("RepositoryRequest")),
    ),
    ("GET", "/v2/models/{name}"): operation(
        "OIP v2 model metadata",
        "open inference protocol v2",
        {"200": answer("Model metadata", ref("ModelMetadata")), **READ_ERRORS},
    ),
    ("GET", "/v2/models/{name}/versions/{version}"): operation(
        "OIP v2 model metadata, one version",
        "open inference protocol v2",
        {"200": answer("Model metadata", ref("ModelMetadata")), **READ_ERRORS},
    ),
    ("GET", "/v2/models/{name}/ready"): operation(
        "OIP v2 model ready",
        "open inference protocol v2",
        {"200": answer("Ready", ref("ModelReady")), **READ_ERRORS},
    ),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): operation(
        "OIP v2 model ready, one version",
        "open inference protocol v2",
        {"200": answer("Ready", ref("ModelReady")), **READ_ERRORS},
    ),
    ("POST", "/v2/models/{name}/infer"): operation(
        "OIP v2 inference: one BYTES tensor of encoded images, or UINT8/FP32 pixels",
        "open inference protocol v2",
        V2_INFER_RESPONSES,
        body=V2_INFER_BODY,
        query=(HEADER_LENGTH,),
        description="Input: BYTES [N] of encoded images (base64 strings in JSON, raw bytes with "
        "the binary tensor data extension), or UINT8/FP32 [N, H, W, 3] pixels 0..255. Output "
        '"probabilities": FP32 [N, classes], or with {"classification": k} BYTES [N, k] of '
        '"score:index:label". Binary outputs with "binary_data" or "binary_data_output".',
    ),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): operation(
        "OIP v2 inference, one version",
        "open inference protocol v2",
        V2_INFER_RESPONSES,
        body=V2_INFER_BODY,
        query=(HEADER_LENGTH,),
    ),
    ("GET", "/v1/models/{name}"): operation(
        "TF Serving model status",
        "tensorflow serving",
        {"200": answer("Version status", ref("TFModelStatus")), **READ_ERRORS},
    ),
    ("GET", "/v1/models/{name}/versions/{version}"): operation(
        "TF Serving model status, one version",
        "tensorflow serving",
        {"200": answer("Version status", ref("TFModelStatus")), **READ_ERRORS},
    ),
    ("GET", "/v1/models/{name}/metadata"): operation(
        "TF Serving model metadata: the serving_default signature",
        "tensorflow serving",
        {"200": answer("Signature", ref("TFModelMetadata")), **READ_ERRORS},
    ),
    ("GET", "/v1/models/{name}/versions/{version}/metadata"): operation(
        "TF Serving model metadata, one version",
        "tensorflow serving",
        {"200": answer("Signature", ref("TFModelMetadata")), **READ_ERRORS},
    ),
    ("POST", "/v1/models/{name}:predict"): operation(
        "TF Serving predict: class probabilities per instance",
        "tensorflow serving",
        {"200": answer("Probabilities", ref("TFPredictResponse")), **TF_POST_ERRORS},
        body=TF_PREDICT_BODY,
    ),
    ("POST", "/v1/models/{name}/versions/{version}:predict"): operation(
        "TF Serving predict, one version",
        "tensorflow serving",
        {"200": answer("Probabilities", ref("TFPredictResponse")), **TF_POST_ERRORS},
        body=TF_PREDICT_BODY,
    ),
    ("POST", "/v1/models/{name}:classify"): operation(
        "TF Serving classify: [label, score] for every class per example, best first",
        "tensorflow serving",
        {"200": answer("Labels and scores", ref("TFClassifyResponse")), **TF_POST_ERRORS},
        body=TF_CLASSIFY_BODY,
    ),
    ("POST", "/v1/models/{name}/versions/{version}:classify"): operation(
        "TF Serving classify, one version",
        "tensorflow serving",
        {"200": answer("Labels and scores", ref("TFClassifyResponse")), **TF_POST_ERRORS},
        body=TF_CLASSIFY_BODY,
    ),
    ("POST", "/v1/models/{name}:regress"): operation(
        "TF Serving regress: always 400, the model is a classifier",
        "tensorflow serving",
        errors(PROTOCOL_ERRORS, "400", "404", "405", "503"),
    ),
    ("POST", "/v1/models/{name}/versions/{version}:regress"): operation(
        "TF Serving regress, one version: always 400",
        "tensorflow serving",
        errors(PROTOCOL_ERRORS, "400", "404", "405", "503"),
    ),
}


def _object(properties: dict, required: tuple[str, ...] = (), **extra: Any) -> dict:
    schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


STRING, NUMBER, INTEGER, BOOLEAN = ({"type": t} for t in ("string", "number", "integer", "boolean"))
STRINGS = {"type": "array", "items": STRING}
PARAMETERS = {"type": "object", "additionalProperties": True}
TENSOR_DATA = {"type": "array", "items": {}, "description": "Row-major values, flat or nested"}
TF_TENSOR_INFO = _object(
    {
        "dtype": STRING,
        "tensor_shape": _object(
            {
                "dim": {
                    "type": "array",
                    "items": _object({"size": STRING, "name": STRING}, ("size",)),
                },
                "unknown_rank": BOOLEAN,
            }
        ),
        "name": STRING,
    },
    ("dtype", "tensor_shape"),
)
B64 = _object({"b64": STRING}, ("b64",), description="Base64 of an image file")
PIXELS = {"type": "array", "description": "Pixels [height][width][3], values 0..255"}

SCHEMAS: dict[str, dict] = {
    "Error": _object(
        {"error": _object({"code": STRING, "message": STRING}, ("code", "message"))},
        ("error",),
        description="imagerec's error shape",
    ),
    "ProtocolError": _object(
        {"error": STRING}, ("error",), description="The OIP v2 and TF Serving error shape"
    ),
    "Status": _object({"status": STRING}, ("status",)),
    "ModelSummary": _object({"name": STRING, "version": STRING}, ("name", "version")),
    "Ready": _object(
        {
            "status": STRING,
            "model": ref("ModelSummary"),
            "models": {
                "type": "array",
                "items": _object({"name": STRING, "versions": STRINGS}, ("name", "versions")),
            },
        },
        ("status", "models"),
    ),
    "Accuracy": {
        "type": ["object", "null"],
        "description": "The accuracy to expect: of a held-out validation split, or (kind "
        "'estimate') the figure recorded with the recipe that trained a bundle with none held out",
        "properties": {
            "value": NUMBER,
            "kind": STRING,
            "source": STRING,
            "std": {"type": ["number", "null"]},
            "runs": {"type": ["integer", "null"]},
        },
    },
    "Model": _object(
        {
            "name": STRING,
            "version": STRING,
            "bundle_version": STRING,
            "engine": {"type": ["string", "null"]},
            "labels": STRINGS,
            "input_shape": {"type": "array", "items": INTEGER},
            "accuracy": ref("Accuracy"),
            "preprocess": {"type": "object"},
            "metrics": {"type": "object"},
        },
        ("name", "version", "labels", "input_shape"),
    ),
    "Models": _object(
        {
            "models": {
                "type": "array",
                "items": _object(
                    {
                        "name": STRING,
                        "version": STRING,
                        "versions": STRINGS,
                        "default": {"type": "boolean"},
                        "labels": STRINGS,
                        "accuracy": ref("Accuracy"),
                    },
                    ("name", "version", "versions"),
                ),
            },
            "default": {"type": ["string", "null"]},
        },
        ("models",),
    ),
    "RepositoryIndexRequest": _object({"ready": {"type": "boolean"}}),
    "RepositoryRequest": _object({"parameters": {"type": "object"}}),
    "RepositoryIndex": {
        "type": "array",
        "items": _object(
            {"name": STRING, "version": STRING, "state": STRING, "reason": STRING},
            ("name", "state"),
        ),
    },
    "Labels": _object({"labels": STRINGS}, ("labels",)),
    "PredictRequest": _object(
        {
            "images": {
                "type": "array",
                "items": _object(
                    {"b64": STRING, "filename": {"type": ["string", "null"]}}, ("b64",)
                ),
            },
            "top_k": {"type": "integer", "minimum": 1},
        },
        ("images",),
    ),
    "PredictResponse": _object(
        {
            "model": ref("ModelSummary"),
            "results": {
                "type": "array",
                "items": _object(
                    {
                        "filename": {"type": ["string", "null"]},
                        "label": STRING,
                        "score": NUMBER,
                        "top_k": {
                            "type": "array",
                            "items": _object({"label": STRING, "score": NUMBER}),
                        },
                    },
                    ("label", "score", "top_k"),
                ),
            },
        },
        ("model", "results"),
    ),
    "ModelCard": _object(
        {
            "model": ref("ModelSummary"),
            "files": {
                "type": "array",
                "items": _object(
                    {"name": STRING, "title": STRING, "url": STRING, "content_type": STRING}
                ),
            },
        },
        ("model", "files"),
    ),
    "ServerMetadata": _object(
        {"name": STRING, "version": STRING, "extensions": STRINGS},
        ("name", "version", "extensions"),
    ),
    "Live": _object({"live": BOOLEAN}, ("live",)),
    "ServerReady": _object({"ready": BOOLEAN}, ("ready",)),
    "ModelReady": _object({"name": STRING, "ready": BOOLEAN}, ("name", "ready")),
    "MetadataTensor": _object(
        {"name": STRING, "datatype": STRING, "shape": {"type": "array", "items": INTEGER}},
        ("name", "datatype", "shape"),
    ),
    "ModelMetadata": _object(
        {
            "name": STRING,
            "versions": STRINGS,
            "platform": STRING,
            "inputs": {"type": "array", "items": ref("MetadataTensor")},
            "outputs": {"type": "array", "items": ref("MetadataTensor")},
        },
        ("name", "platform", "inputs", "outputs"),
    ),
    "RequestInput": _object(
        {
            "name": STRING,
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": ["BYTES", "UINT8", "FP32"]},
            "parameters": _object({"binary_data_size": {"type": "integer", "minimum": 0}}),
            "data": TENSOR_DATA,
        },
        ("name", "shape", "datatype"),
    ),
    "RequestOutput": _object(
        {
            "name": {"type": "string", "enum": ["probabilities"]},
            "parameters": _object(
                {
                    "classification": {"type": "integer", "minimum": 1},
                    "binary_data": BOOLEAN,
                }
            ),
        },
        ("name",),
    ),
    "InferenceRequest": _object(
        {
            "id": STRING,
            "parameters": _object({"binary_data_output": BOOLEAN}),
            "inputs": {
                "type": "array",
                "items": ref("RequestInput"),
                "minItems": 1,
                "maxItems": 1,
            },
            "outputs": {"type": "array", "items": ref("RequestOutput")},
        },
        ("inputs",),
    ),
    "ResponseOutput": _object(
        {
            "name": STRING,
            "shape": {"type": "array", "items": INTEGER},
            "datatype": STRING,
            "parameters": PARAMETERS,
            "data": TENSOR_DATA,
        },
        ("name", "shape", "datatype"),
    ),
    "InferenceResponse": _object(
        {
            "model_name": STRING,
            "model_version": STRING,
            "id": STRING,
            "parameters": PARAMETERS,
            "outputs": {"type": "array", "items": ref("ResponseOutput")},
        },
        ("model_name", "outputs"),
    ),
    "TFModelStatus": _object(
        {
            "model_version_status": {
                "type": "array",
                "items": _object(
                    {
                        "version": STRING,
                        "state": STRING,
                        "status": _object({"error_code": STRING, "error_message": STRING}),
                    },
                    ("version", "state"),
                ),
            }
        },
        ("model_version_status",),
    ),
    "TFModelMetadata": _object(
        {
            "model_spec": _object({"name": STRING, "signature_name": STRING, "version": STRING}),
            "metadata": _object(
                {
                    "signature_def": _object(
                        {
                            "signature_def": {
                                "type": "object",
                                "additionalProperties": _object(
                                    {
                                        "inputs": {
                                            "type": "object",
                                            "additionalProperties": TF_TENSOR_INFO,
                                        },
                                        "outputs": {
                                            "type": "object",
                                            "additionalProperties": TF_TENSOR_INFO,
                                        },
                                        "method_name": STRING,
                                    }
                                ),
                            }
                        }
                    )
                }
            ),
        },
        ("model_spec", "metadata"),
    ),
    "TFPredictRequest": _object(
        {
            "signature_name": STRING,
            "instances": {
                "type": "array",
                "minItems": 1,
                "items": {"oneOf": [B64, {"type": "object"}, PIXELS]},
                "description": 'Row format: [{"b64": ...}], [{"image_bytes": {"b64": ...}}] '
                "or pixel arrays",
            },
            "inputs": {
                "oneOf": [{"type": "array", "minItems": 1}, {"type": "object"}],
                "description": "Columnar format: the same values as a list (or {name: list})",
            },
        },
        description='Send "instances" or "inputs", not both',
    ),
    "TFPredictResponse": _object(
        {
            "predictions": {"type": "array", "items": {"type": "array", "items": NUMBER}},
            "outputs": {"type": "array", "items": {"type": "array", "items": NUMBER}},
        },
    ),
    "TFClassifyRequest": _object(
        {
            "signature_name": STRING,
            "examples": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": {"oneOf": [B64, {"type": "array", "items": B64}]},
                    "description": 'One image feature, e.g. {"image": {"b64": "..."}}',
                },
            },
        },
        ("examples",),
    ),
    "TFClassifyResponse": _object(
        {
            "result": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "prefixItems": [STRING, NUMBER],
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
            }
        },
        ("result",),
    ),
}


def live_routes(api: hug.API) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route registered on `api`."""
    return {
        (method.upper(), base_url + url)
        for base_url, routes in api.http.routes.items()
        for url, methods in routes.items()
        for method in methods
    }


def undocumented_routes(api: hug.API) -> list[tuple[str, str]]:
    """Live routes that OPERATIONS does not describe (empty when the document is complete)."""
    return sorted(live_routes(api) - set(OPERATIONS))


def with_path_parameters(path: str, op: dict) -> dict:
    names = PATH_PARAMETER.findall(path)
    if not names:
        return op
    path_parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PATH_PARAMETERS.get(name, "A file name"),
            "schema": {"type": "string"},
        }
        for name in names
    ]
    return {**op, "parameters": path_parameters + op.get("parameters", [])}


def openapi_document(api: hug.API, server_url: str | None = None) -> dict:
    """The OpenAPI 3.1 document of `api`'s live routes."""
    paths: dict[str, dict] = {}
    for method, path in sorted(live_routes(api) & set(OPERATIONS), key=lambda r: (r[1], r[0])):
        op = OPERATIONS[(method, path)]
        operation_id = re.sub(r"\W+", "_", f"{method} {path}").strip("_").lower()
        paths.setdefault(path, {})[method.lower()] = {
            **with_path_parameters(path, op),
            "operationId": operation_id,
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "imagerec",
            "version": imagerec.__version__,
            "description": "Image classification over HTTP: imagerec's own API, the Open "
            "Inference Protocol v2 (KServe, Triton) and TensorFlow Serving's REST API.",
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def add_openapi_route(api: hug.API) -> None:
    """Register `GET /openapi.json`."""

    @hug.get("/openapi.json", api=api)
    def openapi(request):
        """This API's OpenAPI 3.1 document."""
        return openapi_document(api, request.prefix)
