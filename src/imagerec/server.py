"""`imagerec serve`: the hug API under waitress.

waitress buffers each request and response in full, so slow clients cost no worker thread. The
bundle's manifest is verified before the port opens (a missing model fails at once); loading
TensorFlow and warming the model happen in a background thread, so /healthz answers at once and
/readyz says 503 until the model is warm. SIGINT and SIGTERM stop the server cleanly.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask

from imagerec.api import PredictorSlot, ServingMetrics, create_app
from imagerec.bundle import verify_bundle
from imagerec.config import Settings
from imagerec.errors import ImagerecError
from imagerec.protocols.common import protocol_error_prefixes

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


def load_model(slot: PredictorSlot, settings: Settings, metrics: ServingMetrics) -> None:
    """Load, warm up and put a micro-batched predictor into `slot` (run in a thread)."""
    try:
        from imagerec.predictor import (
            MicroBatcher,
            Predictor,
            confine_python_threads,
            share_cores,
        )

        share_cores(settings.batch_workers)
        predictor = Predictor.from_path(settings.model, max_batch=settings.max_batch)
        predictor.warm_up()
        # TensorFlow leaves ~10^5 long-lived Python objects; frozen, the collector stops
        # rescanning them while requests allocate.
        gc.freeze()
        batcher = MicroBatcher(
            predictor,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            on_batch=metrics.observe_batch,
            workers=settings.batch_workers,
        )
        confined = confine_python_threads(settings.http_cores)
    except ImagerecError as exc:
        log.error("the model could not be loaded: %s", exc.message)
        slot.fail(f"the model could not be loaded: {exc.message}")
        return
    except Exception as exc:
        log.exception("the model could not be loaded")
        slot.fail(f"the model could not be loaded: {exc}")
        return
    slot.set(batcher)
    if confined:
        log.info("Python threads on CPU %s, the model's on all", sorted(confined))
    log.info("ready: model %s version %s", predictor.name, predictor.version)


def serve(settings: Settings) -> None:
    """Serve the API until SIGINT or SIGTERM."""
    verify_bundle(settings.model)
    slot = PredictorSlot()
    metrics = ServingMetrics()
    api = create_app(slot, settings, metrics=metrics)
    server = make_server(api.http.server(), settings, protocol_error_prefixes(api))
    loader = threading.Thread(
        target=load_model, args=(slot, settings, metrics), name="imagerec-loader", daemon=True
    )
    loader.start()

    def stop(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        raise SystemExit(0)  # waitress's run() closes its sockets and threads on SystemExit

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    host = getattr(server, "effective_host", settings.host)
    port = getattr(server, "effective_port", settings.port)
    shown = f"[{host}]" if ":" in str(host) else host
    log.info(
        "serving %s on http://%s:%s/ (%d threads)", settings.model, shown, port, settings.threads
    )
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if slot.ready and hasattr(slot.get(), "close"):
            slot.get().close()  # finish the batches in flight
        log.info("stopped")
