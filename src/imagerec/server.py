"""`imagerec serve`: the hug API under Granian (a compiled HTTP server) or waitress.

Both fronts serve the same WSGI app, with the same routes, limits and error shapes: the body
limit is the app's own middleware (413 from Content-Length, before the body is read), so it
holds under either.

- granian (the default): connections are held by Rust's tokio runtime in a worker process, so
  thousands of slow or idle clients cost no Python thread; a request reaches Python only once
  its headers are in (`header_read_timeout`), on one of `threads` Python threads, the rest wait
  in Rust. The parent process supervises the worker and turns SIGTERM/SIGINT into a graceful
  stop.
- waitress (`--front waitress`, pure Python, the earlier front): buffers each request and
  response in full, so slow clients cost no worker thread, but it holds at most
  `connection_limit` connections (100) and answers nothing past them.

The bundle's manifest is verified before the port opens (a missing model fails at once);
loading the engine and warming the model happen in a background thread, so /healthz answers at
once and /readyz says 503 until the model is warm.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import multiprocessing.util
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask

from imagerec.access import ApiKeys
from imagerec.api import ServingMetrics, create_app, serving_parts
from imagerec.bundle import Bundle
from imagerec.config import Settings
from imagerec.engines import choose_engine
from imagerec.errors import ImagerecError
from imagerec.protocols.common import protocol_error_prefixes
from imagerec.repository import MODES, ModelRepository, VersionPolicy

log = logging.getLogger(__name__)


class JSONErrorTask(ErrorTask):
    """waitress's own errors (413 body too large, 400 bad framing) in the API's JSON shape, or
    the wire protocols' {"error": "message"} under their URL prefixes."""

    protocol_prefixes: tuple[str, ...] = ()

    def execute(self) -> None:
        error = self.request.error
        code = error.reason.lower().replace(" ", "_")
        message = error.body or error.reason
        if error.code == 413:
            code, message = "payload_too_large", f"the request body {message} bytes"
        if (self.request.path or "").startswith(self.protocol_prefixes):
            body = json.dumps({"error": message}).encode()
        else:
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


def make_server(app, settings: Settings, protocol_prefixes: tuple[str, ...] = ()):
    """A waitress server for the WSGI `app`, with the body limit the API enforces too."""

    error_task = type("ErrorTask", (JSONErrorTask,), {"protocol_prefixes": protocol_prefixes})
    channel = type("JSONErrorChannel", (HTTPChannel,), {"error_task_class": error_task})

    server = create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.threads,
        max_request_body_size=settings.max_body_bytes,
        ident="imagerec",
        clear_untrusted_proxy_headers=True,
    )
    listeners = (
        getattr(server, "map", {}).values() if not isinstance(server, BaseWSGIServer) else []
    )
    for listener in [server, *listeners]:
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel
    return server


def make_loader(settings: Settings, metrics: ServingMetrics) -> Callable[[Path], Any]:
    """The repository's loader: a bundle folder to a warm, micro-batched predictor."""
    compute_threads: set[int] = set()  # of every version loaded so far; they keep all CPUs

    def load(path: Path):
        from imagerec.predictor import MicroBatcher, Predictor, confine_python_threads

        predictor = Predictor.from_path(
            path,
            max_batch=settings.max_batch,
            engine=settings.engine,
            workers=settings.batch_workers,
        )
        predictor.warm_up()
        # TensorFlow leaves ~10^5 long-lived Python objects; frozen, the collector stops
        # rescanning them (or an engine's own) while requests allocate.
        gc.freeze()
        batcher = MicroBatcher(
            predictor,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            on_batch=metrics.observe_batch,
            workers=settings.batch_workers,
        )
        # The engine's own threads keep every core, and so do the batcher's under an ONNX
        # engine, which computes on its callers' threads.
        compute_threads.update(predictor.compute_threads)
        if predictor.engine != "tensorflow":
            compute_threads.update(batcher.thread_ids)
        confined = confine_python_threads(settings.http_cores, frozenset(compute_threads))
        if confined:
            log.info("Python threads on CPU %s, the models' on all", sorted(confined))
        return batcher

    return load


def build_repository(settings: Settings, metrics: ServingMetrics) -> ModelRepository:
    """The server's model repository: `--models DIR`, or `--model PATH` as a repository of one."""
    mode = settings.model_control or ("poll" if settings.models is not None else "none")
    return ModelRepository(
        settings.models,
        bundles=() if settings.models is not None else (settings.model,),
        loader=make_loader(settings, metrics),
        policy=VersionPolicy.parse(settings.version_policy),
        mode=mode,
        poll_interval_s=settings.poll_interval_s,
        max_versions=settings.max_versions,
        default_model=settings.default_model,
        metrics=metrics,
    )


FRONTS = ("granian", "waitress")


def build_app(settings: Settings):
    """The app over a repository that a background thread loads (and polls, if it does)."""
    metrics = ServingMetrics()
    repository = build_repository(settings, metrics)
    api = create_app(repository, settings, metrics=metrics)
    repository.start()
    return api, repository


def start_grpc(api, settings: Settings):
    """The gRPC port over the app's models, started, or None when `grpc_port` is 0."""
    if not settings.grpc_port:
        return None
    from imagerec.grpc_server import GrpcServer

    server = GrpcServer(
        serving_parts(api), settings.host, settings.grpc_port, settings.grpc_grace_s
    ).start()
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("serving gRPC on %s:%s (Open Inference Protocol v2, TF Serving)", shown, server.port)
    return server


def check_models(settings: Settings) -> None:
    """Before the port opens: a missing or tampered bundle, an engine it lacks, a repository
    folder that is not there, or a bad policy fails at once."""
    VersionPolicy.parse(settings.version_policy)
    ApiKeys(settings.api_keys, settings.api_keys_file)  # a keys file that cannot be read
    if settings.model_control and settings.model_control not in MODES:
        raise ImagerecError(
            f"model control must be one of {', '.join(MODES)}, not {settings.model_control!r}",
            code="usage",
        )
    if settings.models is None:
        choose_engine(Bundle.load(settings.model, keras_model=False), settings.engine)
        return
    if not settings.models.is_dir():
        raise ImagerecError(f"--models {settings.models}: no such folder", code="usage")
    if settings.max_versions < 1:
        raise ImagerecError("--max-versions must be at least 1", code="usage")


def described(settings: Settings) -> str:
    if settings.models is not None:
        return f"the models in {settings.models}"
    return str(settings.model)


def serve(settings: Settings) -> None:
    """Serve the API until SIGINT or SIGTERM."""
    if settings.front not in FRONTS:
        raise ImagerecError(
            f"the front must be one of {', '.join(FRONTS)}, not {settings.front!r}", code="usage"
        )
    check_models(settings)
    check_port_free(settings.host, settings.port)
    if settings.grpc_port:
        if settings.grpc_port == settings.port:
            raise ImagerecError("--grpc-port must differ from --port", code="usage")
        check_port_free(settings.host, settings.grpc_port)
    limit_malloc_arenas()
    if settings.front == "waitress":
        serve_waitress(settings)
    else:
        serve_granian(settings)


def serve_granian(settings: Settings) -> None:
    """Granian's WSGI server, one worker process, the app built inside it."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server import Server

    files = raise_file_limit()
    connections = min(settings.max_connections, max(1, files - 64))  # a few files of its own
    server = Server(
        "imagerec",  # a name only: the app comes from target_loader
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=1,  # one model in memory; its engine uses every core
        blocking_threads=settings.threads,
        # Granian counts every open connection against backpressure, idle keep-alive ones too:
        # bounded by the connection limit, not the threads (those bound the Python side).
        backpressure=connections,
        http=HTTPModes.http1,
        websockets=False,
        backlog=settings.backlog,
        http1_settings=HTTP1Settings(header_read_timeout=settings.header_timeout_s * 1000),
        log_enabled=False,  # the worker keeps the logging this process set up
    )
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info(
        "serving %s on http://%s:%s/ (granian, %d Python threads, %d connections at most)",
        described(settings),
        shown,
        settings.port,
        settings.threads,
        connections,
    )
    try:
        server.serve(target_loader=functools.partial(granian_app, settings), wrap_loader=False)
    except RuntimeError as exc:  # Granian's own start-up errors (the socket, mostly)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImagerecError(f"the server could not start: {message}", code="serve") from None
    log.info("stopped")


def check_port_free(host: str, port: int) -> None:
    """Fail with a clear message, not a traceback, when the address cannot be listened on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ImagerecError(
            f"cannot listen on {host}:{port}: {exc.strerror}", code="serve"
        ) from None


def granian_app(settings: Settings, *_target):
    """Run in Granian's worker process: the app, with the model loading behind it."""
    api, _repository = build_app(settings)
    grpc_server = start_grpc(api, settings)
    if grpc_server is not None:
        # Granian's worker returns once HTTP has drained on SIGTERM; the process's exit
        # finalizers then let the gRPC calls in flight finish too.
        multiprocessing.util.Finalize(None, grpc_server.stop, exitpriority=10)
    return close_after_unread_bodies(api.http.server())


def close_after_unread_bodies(app):
    """WSGI wrapper for Granian: a 413 refuses a body before it is read, and Granian then closes
    the connection, so the answer says `Connection: close`; without it a keep-alive client may
    send its next request on the closing connection and see it reset. (waitress reads bodies
    itself and answers its own 413s, and refuses this header from an app, as PEP 3333 asks.)"""

    def wrapped(environ, start_response):
        def start(status, headers, exc_info=None):
            if status.startswith("413"):
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """At most `arenas` glibc heaps, in this process and the worker it starts (forked or not).
    Each of the many request threads would otherwise get a heap of its own, and memory freed by
    an unloaded model stays scattered over them: on the 2-core test machine, serving only the
    bundled model, the worker's memory after unloading it wandered 0-18 MB above its level
    before loading it (of 31 MB the load added); with two heaps it came back within 1 MB,
    cycle after cycle. A MALLOC_ARENA_MAX already set wins."""
    import ctypes

    value = os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    with contextlib.suppress(OSError, AttributeError, ValueError):  # not glibc: its own rules
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, int(value))


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit: each connection is a file.
    Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.info("the open-file limit stays at %d: %s", soft, exc)
    return soft


def serve_waitress(settings: Settings) -> None:
    """waitress, in this process."""
    api, repository = build_app(settings)
    server = make_server(api.http.server(), settings, protocol_error_prefixes(api))
    grpc_server = start_grpc(api, settings)

    def stop(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        raise SystemExit(0)  # waitress's run() closes its sockets and threads on SystemExit

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    host = getattr(server, "effective_host", settings.host)
    port = getattr(server, "effective_port", settings.port)
    shown = f"[{host}]" if ":" in str(host) else host
    log.info(
        "serving %s on http://%s:%s/ (waitress, %d threads)",
        described(settings),
        shown,
        port,
        settings.threads,
    )
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if grpc_server is not None:
            grpc_server.stop()
        repository.close()  # finish the batches in flight
        log.info("stopped")
