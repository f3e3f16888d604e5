"""`imagerec serve --grpc-port`: gRPC beside HTTP, in the process that holds the models.

One grpcio server offers the Open Inference Protocol v2 (`inference.GRPCInferenceService`), TF
Serving's `tensorflow.serving.PredictionService`, the gRPC health checking protocol and server
reflection. Its handlers take models from the same ModelRepository as the HTTP routes, and a
served version's MicroBatcher gathers gRPC and HTTP requests into the same batches.

- Limits: a message over the HTTP body limit is refused by gRPC itself (RESOURCE_EXHAUSTED);
  images pass the same decoder and pixel limit as HTTP.
- Errors: ImagerecError's HTTP status becomes the gRPC status code (STATUS_CODES).
- Health: "" and both protocol services are SERVING once the repository is ready.
- Shutdown: `stop()` turns health to NOT_SERVING, refuses new calls and lets the calls in
  flight finish (up to `grace_s`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from imagerec.errors import ImagerecError, InvalidInput
from imagerec.protocols import grpc_kserve, grpc_tfserving
from imagerec.protocols.grpc_messages import KSERVE_SERVICE, TFSERVING_SERVICE, messages

log = logging.getLogger(__name__)

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
HEALTH_POLL_S = 0.5  # how often Watch streams learn of a change in readiness
HEALTH_SERVICE = health.SERVICE_NAME


def grpc_status(error: ImagerecError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


class GrpcServing:
    """The gRPC handlers over a repository: each call holds the version it uses until it ends."""

    def __init__(self, serving: Any):
        self.serving = serving  # api.Serving: repository, settings, metrics
        self.repository = serving.repository
        self.v2 = messages("inference")
        self.tfs = messages("tensorflow.serving")

    def call(
        self, method: str, handler: Callable, request_type: Any, data: bytes, context: Any
    ) -> Any:
        """Parse the request, run `handler`, count the call by method and status, and turn
        errors into status codes. Parsed here rather than by grpcio, which would answer a
        malformed message with INTERNAL: it is the client's mistake."""
        metrics = self.serving.metrics
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        metrics.grpc_in_flight.inc()
        try:
            if self.serving.keys is not None:  # as HTTP's: "authorization: Bearer KEY"
                metadata = dict(context.invocation_metadata() or ())
                self.serving.keys.check(metadata.get("authorization"))
            try:
                request = request_type.FromString(data)
            except DecodeError as exc:
                kind = request_type.__name__
                raise InvalidInput(f"the request is not a valid {kind}: {exc}") from None
            return handler(request)
        except ImagerecError as exc:
            code = grpc_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("gRPC %s failed: %s", method, exc.message)
            message = exc.message
        except Exception:  # a bug: logged in full, the client gets no internals
            log.exception("gRPC %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, "internal server error"
        finally:
            metrics.grpc_in_flight.dec()
            metrics.grpc_requests.labels(method, code.name).inc()
            metrics.grpc_latency.labels(method).observe(time.perf_counter() - started)
        context.abort(code, message)

    def held(self, name: str | None, version: str | None, run: Callable[[Any], Any]) -> Any:
        """`run(version)` on the version asked for, held meanwhile and counted per model."""
        started = time.perf_counter()
        served = self.repository.acquire(name or None, version or None)
        status = "OK"
        try:
            return run(served)
        except ImagerecError as exc:
            status = grpc_status(exc).name
            raise
        finally:
            metrics = self.serving.metrics
            metrics.model_requests.labels(served.name, served.version, status).inc()
            metrics.model_latency.labels(served.name).observe(time.perf_counter() - started)
            served.release()

    # -- inference.GRPCInferenceService -------------------------------------------------------

    def server_live(self, _request):
        return self.v2.ServerLiveResponse(live=True)

    def server_ready(self, _request):
        try:
            self.repository.readiness()
        except ImagerecError:
            return self.v2.ServerReadyResponse(ready=False)
        return self.v2.ServerReadyResponse(ready=True)

    def model_ready(self, request):
        try:
            self.held(request.name, request.version, lambda _served: None)
        except ImagerecError:  # not served, or still loading: Triton answers "not ready"
            return self.v2.ModelReadyResponse(ready=False)
        return self.v2.ModelReadyResponse(ready=True)

    def server_metadata(self, _request):
        return grpc_kserve.fill_server_metadata(self.v2)

    def model_metadata(self, request):
        def describe(served):
            versions = [v.version for v in self.repository.versions(served.name)]
            shown = versions if not request.version else [served.version]
            return grpc_kserve.fill_model_metadata(served, shown, self.v2)

        return self.held(request.name, request.version, describe)

    def model_infer(self, request):
        def infer(served):
            return grpc_kserve.model_infer(self.serving, served, request, self.v2)

        return self.held(request.model_name, request.model_version, infer)

    def repository_index(self, request):
        answer = self.v2.RepositoryIndexResponse()
        for row in self.repository.index():
            if not request.ready or row["state"] == "READY":
                answer.models.add(**row)
        return answer

    def repository_load(self, request):
        grpc_kserve.check_no_parameters(request)
        self.repository.load(request.model_name)
        return self.v2.RepositoryModelLoadResponse()

    def repository_unload(self, request):
        # tritonclient always sends unload_dependents; imagerec has no ensembles to depend on.
        grpc_kserve.check_no_parameters(request, ignored=("unload_dependents",))
        self.repository.unload(request.model_name)
        return self.v2.RepositoryModelUnloadResponse()

    # -- tensorflow.serving.PredictionService -------------------------------------------------

    def _tf(self, operation: Callable, request: Any) -> Any:
        spec = request.model_spec
        version = grpc_tfserving.requested_version(spec)

        def run(served):
            return operation(self.serving, served, request, self.tfs)

        return self.held(spec.name or None, version, run)

    def tf_predict(self, request):
        return self._tf(grpc_tfserving.predict, request)

    def tf_classify(self, request):
        return self._tf(grpc_tfserving.classify, request)

    def tf_regress(self, request):
        return self._tf(grpc_tfserving.regress, request)

    def tf_model_metadata(self, request):
        def describe(_serving, served, req, tfs):
            return grpc_tfserving.model_metadata(served, req, tfs)

        return self._tf(describe, request)

    def services(self) -> list[grpc.GenericRpcHandler]:
        """Both protocols' handlers, for grpc.Server.add_generic_rpc_handlers."""
        v2, tfs = self.v2, self.tfs
        table = {
            KSERVE_SERVICE: {
                "ServerLive": (self.server_live, v2.ServerLiveRequest),
                "ServerReady": (self.server_ready, v2.ServerReadyRequest),
                "ModelReady": (self.model_ready, v2.ModelReadyRequest),
                "ServerMetadata": (self.server_metadata, v2.ServerMetadataRequest),
                "ModelMetadata": (self.model_metadata, v2.ModelMetadataRequest),
                "ModelInfer": (self.model_infer, v2.ModelInferRequest),
                "RepositoryIndex": (self.repository_index, v2.RepositoryIndexRequest),
                "RepositoryModelLoad": (self.repository_load, v2.RepositoryModelLoadRequest),
                "RepositoryModelUnload": (
                    self.repository_unload,
                    v2.RepositoryModelUnloadRequest,
                ),
            },
            TFSERVING_SERVICE: {
                "Predict": (self.tf_predict, tfs.PredictRequest),
                "Classify": (self.tf_classify, tfs.ClassificationRequest),
                "Regress": (self.tf_regress, tfs.RegressionRequest),
                "GetModelMetadata": (self.tf_model_metadata, tfs.GetModelMetadataRequest),
            },
        }
        handlers = []
        for service, methods in table.items():
            rpcs = {
                name: grpc.unary_unary_rpc_method_handler(
                    functools.partial(self.call, f"/{service}/{name}", handler, request_type),
                    response_serializer=lambda message: message.SerializeToString(),
                )
                for name, (handler, request_type) in methods.items()
            }
            handlers.append(grpc.method_handlers_generic_handler(service, rpcs))
        return handlers


class ReadinessHealth(health.HealthServicer):
    """The health service: SERVING while the repository is ready. Check asks the repository
    each time (a client that saw /readyz answer 200 never sees NOT_SERVING after it); Watch
    streams follow `refresh()`."""

    def __init__(self, repository: Any):
        super().__init__(experimental_non_blocking=True)
        self.repository = repository
        self._status: int | None = None
        self._refreshing = threading.Lock()  # not `_lock`: the base class has one

    def refresh(self) -> None:
        try:
            self.repository.readiness()
            now = health_pb2.HealthCheckResponse.SERVING
        except ImagerecError:
            now = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._refreshing:
            if now != self._status:
                for service in ("", KSERVE_SERVICE, TFSERVING_SERVICE):
                    self.set(service, now)  # ignored once a shutdown has begun
                self._status = now

    def Check(self, request, context):  # noqa: N802 (the generated servicer's name)
        self.refresh()
        return super().Check(request, context)


class GrpcServer:
    """The gRPC port: started with `start()`, stopped gracefully with `stop()`."""

    def __init__(self, serving: Any, host: str, port: int, grace_s: float = 10.0):
        from grpc_health.v1 import health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from imagerec.protocols.grpc_messages import protocol_pool

        settings = serving.settings
        self.repository = serving.repository
        self.grace_s = grace_s
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a busy port is an error, not a shared one
            ],
        )
        self.server.add_generic_rpc_handlers(GrpcServing(serving).services())
        self.health = ReadinessHealth(self.repository)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (KSERVE_SERVICE, TFSERVING_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server, pool=protocol_pool())
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            message = f"cannot listen for gRPC on {address}: {exc}"
            raise ImagerecError(message, code="serve") from None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="grpc-health", daemon=True)

    def start(self) -> GrpcServer:
        self.health.refresh()
        self.server.start()
        self._watcher.start()
        return self

    def _watch(self) -> None:
        """Keep the health service's Watch streams up to date until stopped."""
        while not self._stopping.wait(HEALTH_POLL_S):
            self.health.refresh()

    def stop(self) -> None:
        """NOT_SERVING, no new calls, the calls in flight finished (at most `grace_s`)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        log.info("gRPC: finishing the calls in flight (at most %g s)", self.grace_s)
        self.server.stop(self.grace_s).wait()
        log.info("gRPC stopped")
