"""The HTTP API: hug routes over a predictor, built by `create_app` from injected parts.

    api = create_app(predictor_or_slot, settings)    # a hug.API
    wsgi = api.http.server()                         # what waitress (or hug.test) calls

Routes are thin: parse and validate (hug.types annotations and the input formats below), call
`classify_uploads`, shape the answer. Errors become HTTP answers in one place, `http_error`.
To add routes (a web page, other wire protocols), write a function `add_..._routes(api)` that
decorates its endpoints with `@hug.get(..., api=api)` and takes the `serving` directive, then pass
it in `create_app(..., routes=DEFAULT_ROUTES + (add_..._routes,))`.
"""

# No `from __future__ import annotations`: hug reads the annotations as validators and directives.

import base64
import binascii
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from imagerec.access import ApiKeys, Cors, RequireApiKey
from imagerec.config import Settings
from imagerec.errors import (
    ImagerecError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from imagerec.hugcompat import (
    FilePart,
    answer_error,
    falcon,
    guard_input_formats,
    hug,
    install_input_formats,
)
from imagerec.images import MEDIA_TYPES, decode_image
from imagerec.openapi import add_openapi_route
from imagerec.protocols import add_tfserving_routes, add_v2_repository_routes, add_v2_routes
from imagerec.protocols.common import error_message, protocol_error_prefixes
from imagerec.repository import ModelRepository, ServedVersion
from imagerec.webpage import add_web_routes

log = logging.getLogger(__name__)

RAW_IMAGE_TYPES = (*MEDIA_TYPES.values(), "image/jpg", "application/octet-stream")
BODY_TYPES = ("multipart/form-data", "application/json", *RAW_IMAGE_TYPES)


LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)  # seconds


class ServingMetrics:
    """Prometheus metrics of one API, in its own registry (no process-wide state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagerec_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imagerec_http_request_duration_seconds",
            "Time from the request reaching the app to the answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imagerec_batch_size",
            "Images per forward pass of the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.images = Counter(
            "imagerec_images_classified",
            "Images classified",
            registry=self.registry,
        )
        self.model_versions = Gauge(
            "imagerec_model_versions_loaded",
            "Versions of each model loaded and served",
            ["model"],
            registry=self.registry,
        )
        self.model_load_failures = Counter(
            "imagerec_model_load_failures",
            "Versions that failed to verify or load (or were refused by the limit), by model",
            ["model"],
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "imagerec_model_load_duration_seconds",
            "Time to load and warm up one version, by model",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.model_requests = Counter(
            "imagerec_model_requests",
            "Requests answered by a model, by model, version and status",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.model_latency = Histogram(
            "imagerec_model_request_duration_seconds",
            "Time from the request reaching the app to the answer, by model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "imagerec_grpc_requests",
            "gRPC calls answered, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "imagerec_grpc_request_duration_seconds",
            "Time from a gRPC call reaching its handler to the answer, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_in_flight = Gauge(
            "imagerec_grpc_requests_in_flight",
            "gRPC calls being handled now",
            registry=self.registry,
        )
        self._loaded_names: set[str] = set()

    def set_loaded(self, counts: dict[str, int]) -> None:
        """The versions loaded per model; a model no longer loaded reads 0."""
        for name in self._loaded_names - set(counts):
            self.model_versions.labels(name).set(0)
        for name, count in counts.items():
            self.model_versions.labels(name).set(count)
        self._loaded_names |= set(counts)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Serving:
    """The injected parts every route reaches: the model repository, settings and metrics, and
    the API keys (None when the API is open)."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: ServingMetrics,
        keys: ApiKeys | None = None,
    ):
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.keys = keys


class RequestServing:
    """What the `serving` directive hands a route: the app's parts, and `model()`, which holds
    the version it returns until the answer is sent (ModelHolds releases it), so a version
    replaced meanwhile is freed only after this request."""

    def __init__(self, serving: Serving, request: Any):
        self.repository = serving.repository
        self.settings = serving.settings
        self.metrics = serving.metrics
        self._request = request

    def model(self, name: str | None = None, version: str | None = None) -> ServedVersion:
        """The served version asked for: the default model if `name` is None, its newest
        version if `version` is None. 404 if not served, 503 while loading."""
        if (
            name is not None
            and not isinstance(name, str)
            or (version is not None and not isinstance(version, str))
        ):
            raise InvalidInput("model and version must be text", code="invalid_parameter")
        served = self.repository.acquire(name or None, version or None)
        held = getattr(self._request.context, "imagerec_held", None) if self._request else None
        if held is None:  # no middleware to release it (a route called outside an app)
            served.release()
        else:
            held.append(served)
        return served


class ModelHolds:
    """Falcon middleware: release the versions a request held, and count the request for each."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def process_request(self, request, response) -> None:
        request.context.imagerec_held = []

    def process_response(self, request, response, resource, req_succeeded) -> None:
        held = getattr(request.context, "imagerec_held", None) or []
        started = getattr(request.context, "imagerec_started", None)
        status = str(response.status)[:3]
        for served in held:
            self.metrics.model_requests.labels(served.name, served.version, status).inc()
            if started is not None:
                elapsed = time.perf_counter() - started
                self.metrics.model_latency.labels(served.name).observe(elapsed)
            served.release()
        request.context.imagerec_held = []


_SERVING = "imagerec.serving"


@hug.directive()
def serving(default=None, api=None, request=None, **kwargs) -> RequestServing:
    """hug directive: this API's injected parts, for this request."""
    return RequestServing(api.context[_SERVING], request)


def serving_parts(api: hug.API) -> Serving:
    """The repository, settings and metrics an app was built over (for the gRPC port)."""
    return api.context[_SERVING]


def http_error(exception: BaseException) -> ImagerecError:
    """The one mapping from any exception to the error the client sees."""
    if isinstance(exception, ImagerecError):
        return exception
    if isinstance(exception, falcon.HTTPError):
        status = int(str(exception.status)[:3])
        code = (exception.title or "http_error").lower().replace(" ", "_")
        return ImagerecError(exception.description or exception.title, code=code, status=status)
    log.error("unhandled error", exc_info=exception)
    return ImagerecError("internal server error", code="internal_error", status=500)


def _status_line(status: int) -> str:
    return falcon.get_http_status(status)


def invalid_parameters(data: dict) -> dict:
    """hug `on_invalid` hook: hug.types failures in the house error shape (hug answers 400)."""
    errors = data.get("errors", {})
    message = "; ".join(f"{name}: {reason}" for name, reason in errors.items())
    return InvalidInput(message or "invalid parameters", code="invalid_parameter").to_dict()


class BodySizeLimit:
    """Falcon middleware: 413 before reading a body whose Content-Length is over the limit; a
    chunked body (no Content-Length) read here up to the limit, then handed on with its length,
    so that routes see it as any other body, whichever server is in front; and a counting reader
    in any case, so no route reads more than the limit, and a body that ends before its
    Content-Length is the client's 400 (`incomplete_body`), not a shorter body read as whole.

    The reader is installed as `wsgi.input` too: falcon's `bounded_stream`, which hug's body
    formats and the protocol routes read, wraps `wsgi.input`, not `request.stream`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def process_request(self, request, response) -> None:
        length = request.content_length
        try:
            if length is not None and length > self.max_bytes:
                raise _too_large(length, self.max_bytes)
            if length is None and is_chunked(request.get_header("Transfer-Encoding")):
                data = LimitedReader(request.stream, self.max_bytes).read()
                request.stream = io.BytesIO(data)
                length = len(data)
                request.env["CONTENT_LENGTH"] = str(length)
        except PayloadTooLarge as exc:
            answer_error(response, exc)
            return
        reader = LimitedReader(request.stream, self.max_bytes, length)
        request.env["wsgi.input"] = request.stream = reader


def is_chunked(transfer_encoding: str | None) -> bool:
    """Whether a Transfer-Encoding header says the body is chunked: its last coding, in any
    letter case (RFC 9112 6.1: codings are case-insensitive; clients send "Chunked" too)."""
    codings = (transfer_encoding or "").split(",")
    return codings[-1].strip().lower() == "chunked"


def _too_large(length: int | None, limit: int) -> PayloadTooLarge:
    size = f"{length:,} bytes" if length is not None else f"more than {limit:,} bytes"
    return PayloadTooLarge(f"the request body is {size}; the limit is {limit:,} bytes")


class LimitedReader:
    """A file-like reader of a request body: PayloadTooLarge once more than `limit` bytes are
    read, and InvalidInput (`incomplete_body`) if the stream ends before `length` bytes (its
    Content-Length) have come: a front may hand on a body cut short (Granian does, when the
    client closes early) as if it were whole."""

    def __init__(self, stream, limit: int, length: int | None = None):
        self._stream = stream
        self._limit = limit
        self._length = length
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        allowed = self._limit - self._count + 1  # one byte more tells "over" from "exactly at"
        wanted = allowed if size is None or size < 0 else min(size, allowed)
        data = self._stream.read(wanted)
        # PEP 3333 lets a read return less than asked before the end: ask again, so that a
        # short read below means the end of the stream.
        while data and len(data) < wanted and self._count + len(data) < (self._length or 0):
            more = self._stream.read(wanted - len(data))
            if not more:
                break
            data += more
        self._count += len(data)
        if self._count > self._limit:
            raise _too_large(None, self._limit)
        if len(data) < wanted:
            self._check_complete()
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._stream.readline(size)
        self._count += len(line)
        if self._count > self._limit:
            raise _too_large(None, self._limit)
        if not line and size != 0:
            self._check_complete()
        return line

    def _check_complete(self) -> None:
        if self._length is not None and self._count < self._length:
            raise InvalidInput(
                f"the request body ended after {self._count:,} of the {self._length:,} bytes "
                "its Content-Length announced",
                code="incomplete_body",
            )


class ErrorShape:
    """Falcon middleware: an error answer in some other shape (falcon's 405, hug's validation
    errors) becomes {"error": {"code", "message"}}, except under the wire protocols' prefixes,
    whose own middleware gives them {"error": "message"}."""

    def __init__(self, api: hug.API):
        self.api = api

    def process_response(self, request, response, resource, req_succeeded) -> None:
        status = int(str(response.status)[:3])
        if status < 400 or request.path.startswith(protocol_error_prefixes(self.api)):
            return
        body = response.body if response.body is not None else response.data
        try:
            data = json.loads(body) if body else None
        except (TypeError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return
        reason = str(response.status)[4:]
        message = error_message(body) or f"{request.method} {request.path}: {reason.lower()}"
        code = reason.lower().replace(" ", "_") or "http_error"
        response.content_type = falcon.MEDIA_JSON
        response.data = None
        response.body = json.dumps(ImagerecError(message, code=code, status=status).to_dict())


class RequestMetrics:
    """Falcon middleware: count every answer by route and status, and time it."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def process_request(self, request, response) -> None:
        request.context.imagerec_started = time.perf_counter()

    def process_response(self, request, response, resource, req_succeeded) -> None:
        route = getattr(request, "uri_template", None) or "unmatched"
        started = getattr(request.context, "imagerec_started", None)
        if started is not None:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
        status = str(response.status)[:3]
        self.metrics.requests.labels(route, request.method, status).inc()


def json_body(body, charset: str = "utf-8", **_params) -> Any:
    """hug input format for application/json: malformed JSON, nesting too deep to parse or a
    charset Python does not know is the client's 4xx, not a 500."""
    data = body.read()
    try:
        text = data.decode(charset)
    except LookupError:
        raise UnsupportedMediaType(
            f"charset {charset!r} is not known: send the JSON in UTF-8", code="invalid_charset"
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the body is not valid {charset}: {exc}", code="invalid_json") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidInput("the JSON body is nested too deeply", code="invalid_json") from None


def raw_image_body(body, **_params) -> dict:
    """hug input format for a raw image body: it becomes the `image` parameter."""
    return {"image": FilePart(body.read())}


def images_from_params(image: Any, images: Any) -> list[FilePart]:
    """The images of a request, in the order sent: multipart or raw `image`, JSON `images`."""
    parts: list[FilePart] = []
    for item in image if isinstance(image, list) else [] if image is None else [image]:
        if not isinstance(item, FilePart):
            raise InvalidInput(
                "'image' must be a file field, not a text value", code="invalid_form"
            )
        parts.append(item)
    if images is None:
        return parts
    if not isinstance(images, list):
        raise InvalidInput('"images" must be a list like [{"b64": "..."}]', code="invalid_json")
    for index, item in enumerate(images):
        if not isinstance(item, dict) or not isinstance(item.get("b64"), str):
            raise InvalidInput(f'images[{index}] must be an object with a "b64" string')
        filename = item.get("filename")
        parts.append(FilePart(decode_base64(item["b64"], index), filename=filename))
    return parts


def decode_base64(text: str, index: int = 0) -> bytes:
    """Standard base64, with or without a data: URL prefix."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"images[{index}].b64 is not valid base64", code="invalid_base64"
        ) from None


def classify_uploads(
    engine: Any,
    parts: Sequence[FilePart],
    top_k: int,
    max_pixels: int,
) -> list[dict]:
    """Image bytes in, one result dict per image in the same order (the reusable predict path).

    Every image is decoded (and so validated) before any is classified, so one bad image fails
    its own request only.
    """
    labels = len(engine.labels)
    if not 1 <= top_k <= labels:
        raise InvalidInput(f"top_k must be between 1 and {labels}", code="invalid_parameter")
    decoded = []
    for index, part in enumerate(parts):
        try:
            decoded.append(decode_image(part.data, max_pixels, fit=engine.input_size))
        except ImagerecError as exc:
            name = part.filename or f"image {index + 1}"
            raise type(exc)(f"{name}: {exc.message}", code=exc.code, status=exc.status) from None
    predictions = engine.classify(decoded, top_k)
    return [
        {
            "filename": part.filename,
            "label": prediction.label,
            "score": prediction.score,
            "top_k": [{"label": label, "score": score} for label, score in prediction.top_k],
        }
        for part, prediction in zip(parts, predictions, strict=True)
    ]


def model_summary(engine: Any) -> dict:
    return {"name": engine.name, "version": engine.version}


def expected_accuracy(bundle: Any) -> dict | None:
    """The accuracy a person can expect from the bundle's answers, and where the figure comes
    from: its held-out validation split, else the estimate recorded with the recipe that
    trained it (a bundle trained on every image has nothing of its own held out)."""
    metrics = bundle.metrics or {}
    flip = bundle.preprocess.tta == "flip"  # as served: with test-time augmentation if used
    value = metrics.get("val_accuracy_tta") if flip else None
    if not isinstance(value, int | float):
        value = metrics.get("val_accuracy")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"value": float(value), "kind": "validation", "source": "held-out validation split"}
    estimate = metrics.get("accuracy_estimate")
    if isinstance(estimate, dict) and isinstance(estimate.get("value"), int | float):
        return {
            "value": float(estimate["value"]),
            "std": estimate.get("std"),
            "runs": estimate.get("runs"),
            "kind": "estimate",
            "source": str(estimate.get("source", "")),
        }
    return None


def model_details(served: Any) -> dict:
    """What /v1/model and /v1/models say of one served version."""
    bundle = served.bundle
    height, width = bundle.preprocess.input_size
    return {
        **model_summary(served),
        "bundle_version": bundle.version,
        "engine": getattr(served, "engine_name", None),
        "labels": list(served.labels),
        "input_shape": [height, width, 3],
        "accuracy": expected_accuracy(bundle),
    }


def add_error_handler(api: hug.API) -> None:
    @hug.exception(Exception, api=api)
    def render_error(exception, response):
        error = http_error(exception)
        response.status = _status_line(error.status)
        return error.to_dict()

    def not_found(request, response, **_kwargs):
        """A URL no route serves: 404 in the error shape (hug's own 404 page would describe
        the whole API to whoever asks)."""
        error = NotFound(f"no route for {request.method} {request.path}")
        response.status = _status_line(error.status)
        response.content_type = falcon.MEDIA_JSON
        response.body = json.dumps(error.to_dict())

    api.http.set_not_found_handler(not_found)


def add_health_routes(api: hug.API) -> None:
    @hug.get("/healthz", api=api, on_invalid=invalid_parameters)
    def healthz():
        """Alive: the process answers HTTP (the model may still be loading)."""
        return {"status": "ok"}

    @hug.get("/readyz", api=api, on_invalid=invalid_parameters)
    def readyz(serving: serving):
        """Ready: the models are loaded and warmed up. 503 until then."""
        repository = serving.repository
        repository.readiness()
        models = [
            {"name": name, "versions": [v.version for v in repository.versions(name)]}
            for name in repository.names()
        ]
        answer = {"status": "ready", "models": models}
        # Several models and no default: there is no one model to name.
        with contextlib.suppress(ImagerecError):
            answer["model"] = model_summary(serving.model())
        return answer


def add_model_routes(api: hug.API) -> None:
    @hug.get("/v1/models", api=api, on_invalid=invalid_parameters)
    def models(serving: serving):
        """Every served model and its versions (newest last), and which one is the default."""
        repository = serving.repository
        repository.readiness()
        try:
            default = repository.default_name()
        except ImagerecError:
            default = None
        listed = []
        for name in repository.names():
            versions = repository.versions(name)
            if versions:
                newest = serving.model(name)
                listed.append(
                    {
                        **model_details(newest),
                        "versions": [v.version for v in versions],
                        "default": name == default,
                    }
                )
        return {"models": listed, "default": default}

    @hug.get("/v1/model", api=api, on_invalid=invalid_parameters)
    def model(serving: serving, model: str = None, version: str = None):
        """One served model (the default unless `model` names another): name, version,
        labels, input shape, the accuracy to expect, and its bundle's metrics."""
        served = serving.model(model, version)
        return {
            **model_details(served),
            "preprocess": served.bundle.preprocess.to_dict(),
            "metrics": served.bundle.metrics,
        }

    @hug.get("/v1/labels", api=api, on_invalid=invalid_parameters)
    def labels(serving: serving, model: str = None, version: str = None):
        """The class labels, in the model's output order."""
        return {"labels": list(serving.model(model, version).labels)}


def add_predict_routes(api: hug.API) -> None:
    @hug.post(
        "/v1/predict",
        api=api,
        on_invalid=invalid_parameters,
        examples="top_k=3",
        parse_body=True,
    )
    def predict(
        request,
        serving: serving,
        top_k: hug.types.greater_than(0) = None,
        image=None,
        images=None,
        model=None,
        version=None,
    ):
        """Classify images sent as multipart `image` fields, a raw image body, or JSON
        {"images": [{"b64": "..."}], "top_k": 3}. One result per image, in the order sent.
        `model` (and `version`) choose the model; the default model's newest version if not."""
        engine = serving.model(model, version)
        parts = images_from_params(image, images)
        if not parts:
            content_type = (request.content_type or "").split(";")[0].strip().lower()
            if request.content_length and content_type not in BODY_TYPES:
                raise UnsupportedMediaType(
                    f"Content-Type {content_type or '(none)'} is not accepted: send "
                    "multipart/form-data with 'image' fields, a raw image/jpeg, image/png, "
                    'image/webp or image/bmp body, or JSON {"images": [{"b64": "..."}]}'
                )
            raise InvalidInput(
                "no image in the request: send multipart 'image' fields, a raw image body, "
                'or JSON {"images": [{"b64": "..."}]}',
                code="missing_image",
            )
        if top_k is None:
            top_k = min(serving.settings.top_k, len(engine.labels))
        results = classify_uploads(engine, parts, top_k, serving.settings.max_pixels)
        serving.metrics.images.inc(len(results))
        # A MicroBatcher reports the batches it runs; a bare Predictor's batch is the request.
        if not getattr(engine, "reports_batches", False):
            serving.metrics.observe_batch(len(results))
        return {"model": model_summary(engine), "results": results}


def add_metrics_route(api: hug.API) -> None:
    @hug.get("/metrics", api=api, output=hug.output_format.text)
    def metrics(response, serving: serving):
        """Prometheus metrics: requests, latency, batch sizes, images classified."""
        response.content_type = CONTENT_TYPE_LATEST
        return serving.metrics.render().decode("utf-8")


RouteAdder = Callable[[hug.API], None]
DEFAULT_ROUTES: tuple[RouteAdder, ...] = (
    add_health_routes,
    add_model_routes,
    add_predict_routes,
    add_metrics_route,
    add_web_routes,
    add_v2_routes,
    add_v2_repository_routes,
    add_tfserving_routes,
    add_openapi_route,
)


def create_app(
    source: Any,
    settings: Settings,
    *,
    metrics: ServingMetrics | None = None,
    routes: Iterable[RouteAdder] = DEFAULT_ROUTES,
    name: str | None = None,
) -> hug.API:
    """Build a hug API over `source`: a ModelRepository (the server's, filled in the
    background), or one ready Predictor / MicroBatcher (tests, scripts), served as it is."""
    metrics = metrics or ServingMetrics()
    if isinstance(source, ModelRepository):
        repository = source
        if repository.metrics is None:
            repository.metrics = metrics
    else:
        repository = ModelRepository(metrics=metrics)
        repository.add(source)
    # hug keeps one API per module name; a fresh name gives every app its own routes.
    api = hug.API(name or f"imagerec.app.{uuid.uuid4().hex}")
    install_input_formats(api)
    api.http.set_input_format("application/json", json_body)
    for media_type in RAW_IMAGE_TYPES:
        api.http.set_input_format(media_type, raw_image_body)
    guard_input_formats(api)
    if settings.cors_origins:
        api.http.add_middleware(Cors(settings.cors_origins))  # first: preflight needs no key
    keys = ApiKeys(settings.api_keys, settings.api_keys_file)
    api.http.add_middleware(ErrorShape(api))
    api.http.add_middleware(RequestMetrics(metrics))
    if keys.enabled:
        api.http.add_middleware(RequireApiKey(keys, settings.metrics_need_key))
    api.http.add_middleware(ModelHolds(metrics))
    api.http.add_middleware(BodySizeLimit(settings.max_body_bytes))
    api.context[_SERVING] = Serving(repository, settings, metrics, keys if keys.enabled else None)
    add_error_handler(api)
    for add_routes in routes:
        add_routes(api)
    return api
