"""What the wire protocols share: their error shape, reading a request body, running the model.

Both Open Inference Protocol v2 and TF Serving's REST API answer errors as {"error": "message"}
rather than imagerec's {"error": {"code", "message"}}. Their handlers raise ImagerecError as every
route does; `ProtocolErrors` rewrites any error answer under their URL prefixes, so errors raised
in a handler, hug's own validation errors, the body-size middleware's 413 and falcon's 404/405
all come out in the protocol's shape.
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

import base64
import binascii
import json
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from imagerec.errors import (
    ImagerecError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from imagerec.hugcompat import falcon, hug
from imagerec.images import decode_image

log = logging.getLogger(__name__)

_INSTALLED = "imagerec.protocols.errors"


class ProtocolErrors:
    """Falcon middleware: error answers under `prefixes` become {"error": "message"}."""

    def __init__(self, prefixes: tuple[str, ...] = ()):
        self.prefixes = prefixes

    def covers(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.prefixes)

    def process_response(self, request, response, resource, req_succeeded) -> None:
        if int(str(response.status)[:3]) < 400 or not self.covers(request.path):
            return
        message = error_message(response.body if response.body is not None else response.data)
        if not message:
            message = f"{request.method} {request.path}: {str(response.status)[4:].lower()}"
        response.content_type = falcon.MEDIA_JSON
        response.data = None
        response.body = json.dumps({"error": message})


def install_protocol_errors(api: hug.API, *prefixes: str) -> None:
    """Add `prefixes` to the API's one ProtocolErrors middleware (added on first use)."""
    middleware = api.context.get(_INSTALLED)
    if middleware is None:
        middleware = api.context[_INSTALLED] = ProtocolErrors()
        api.http.add_middleware(middleware)
    middleware.prefixes = tuple(dict.fromkeys(middleware.prefixes + prefixes))


def protocol_error_prefixes(api: hug.API) -> tuple[str, ...]:
    """The URL prefixes whose errors take the protocols' {"error": "message"} shape."""
    middleware = api.context.get(_INSTALLED)
    return middleware.prefixes if middleware is not None else ()


def error_message(body: Any) -> str:
    """The message in an error body of any shape the stack produces, or "" if there is none."""
    try:
        data = json.loads(body) if body else None
    except (TypeError, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    error = data.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, dict):  # imagerec's own shape
        return str(error.get("message", ""))
    errors = data.get("errors")  # hug validation and falcon's serializer: {name: reason}
    if isinstance(errors, dict):
        return "; ".join(f"{name}: {reason}" for name, reason in errors.items() if reason)
    return ""  # hug's not-found page lists the whole API; the caller says "not found" instead


def read_body(request, max_bytes: int) -> bytes:
    """The raw request body, inflated if it was sent gzip- or deflate-compressed (tritonclient's
    request_compression_algorithm), never more than `max_bytes` either way."""
    data = request.bounded_stream.read()
    encoding = (request.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return data
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, detected
    try:
        inflated = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(inflated) > max_bytes:
        raise PayloadTooLarge(f"the decompressed body is over the limit of {max_bytes:,} bytes")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated")
    return inflated


def parse_json_object(data: bytes, what: str = "the body") -> dict:
    """A JSON object from bytes; anything else is the client's 400."""
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{what} must be a JSON object", code="invalid_json")
    return parsed


def decode_b64(text: Any, where: str) -> bytes:
    """Standard base64 (a data: URL prefix and line breaks allowed) to bytes."""
    if not isinstance(text, str):
        raise InvalidInput(f"{where} must be a base64 string", code="invalid_base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where} is not valid base64", code="invalid_base64") from None


def leaves(data: Any) -> Iterator[Any]:
    """The elements of a (nested) JSON list in row-major order."""
    if isinstance(data, list):
        for item in data:
            yield from leaves(item)
    else:
        yield data


def pixels_to_uint8(values: np.ndarray, where: str) -> np.ndarray:
    """Pixel values 0..255 (integers or floats) to the model's uint8; fractions are rounded."""
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255):
        raise InvalidInput(f"{where}: pixel values must be numbers from 0 to 255")
    return np.rint(values).astype(np.uint8)


def prepare_encoded(engine: Any, images: list[bytes], max_pixels: int) -> list[np.ndarray]:
    """Encoded images to arrays at the model's input size, through the one decode path."""
    predictor = getattr(engine, "predictor", engine)  # a MicroBatcher wraps a Predictor
    prepared = []
    for index, data in enumerate(images):
        try:
            image = decode_image(data, max_pixels, fit=predictor.input_size)
        except ImagerecError as exc:
            message = f"image {index}: {exc.message}"
            raise type(exc)(message, code=exc.code, status=exc.status) from None
        prepared.append(predictor.prepare(image))
    return prepared


def probabilities(serving: Any, engine: Any, batch: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Class probabilities for prepared (N, H, W, 3) uint8 images, counted in the metrics."""
    if len(batch) == 0:
        raise InvalidInput("the request holds no images", code="missing_image")
    probs = engine.predict_arrays(np.stack(batch) if isinstance(batch, list) else batch)
    serving.metrics.images.inc(len(probs))
    # A MicroBatcher reports the batches it runs; a bare Predictor's batch is the request.
    if not getattr(engine, "reports_batches", False):
        serving.metrics.observe_batch(len(probs))
    return probs


def ranked(row: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, ties in label order (as Predictor.top_k ranks them)."""
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]
