"""The `ray` engine of `imagerec classify`: the same decode and Predictor on Ray Data.

Ray Data's batch inference pattern: the paths become a dataset, a `map_batches` stage reads and
decodes them (bulk.read_image, as the local engine), an actor pool classifies (each actor loads
the bundle once), and the rows stream back to this process, which writes them into `--out` as
the local engine does: any of its formats, committed every `commit_rows` images, so a killed run
loses at most what was not committed and the same command resumes. `ray.init()` joins the
cluster that `RAY_ADDRESS` names (as under `ray job submit`), or starts one on this machine.
Paths must be readable where the tasks run: on a cluster, a file system that every node mounts;
the output only needs to be writable here.

An actor is a node's worth of work: it runs `threads` batches at once (default: the CPUs of the
smallest node), each read, decoded and classified on one core in an ONNX Runtime session of its
own, as the local engine's threads do. A Ray worker process costs seconds of CPU to start (it
imports Ray Data), so one process a node, not one a CPU, keeps that cost off small runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np

from imagerec.bulk import (
    BulkResult,
    Committer,
    Rows,
    _count_in_background,
    _progress_bar,
    batched,
    checked_top_k,
    decode_batch,
    iter_sources,
    open_sink,
    path_text,
    raise_terminated,
    skip_done,
    top_k_columns,
)
from imagerec.errors import ImagerecError, InvalidInput

log = logging.getLogger(__name__)

RAY_MISSING = "the ray engine needs Ray Data: pip install 'imagerec[ray]'"


def import_ray():
    """Ray and Ray Data, or an ImagerecError that says how to install them."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImagerecError(RAY_MISSING, code="ray_missing", status=501) from None
    return ray


def start_ray(ray) -> bool:
    """Join RAY_ADDRESS's cluster, or start a local one; True if this call started Ray."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_answers(address)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(logging_level=logging.WARNING)
        else:
            # A cluster for this command alone: no dashboard (its extra packages are not part
            # of ray[data]), and no usage statistics sent to Ray's makers unless the user's
            # environment asks for them (Ray's default sends them, and Ray Data starts an
            # actor process on every fresh cluster to gather them: a second and a half of CPU).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
        raise ImagerecError(f"Ray could not start: {exc}", code="ray_unavailable") from None
    if on_sigterm is raise_terminated and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # the command's: ray.init put an exit there
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's plan and per-operator lines
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


def check_answers(address: str, timeout: float = 10.0) -> None:
    """An ImagerecError at once if nothing listens at RAY_ADDRESS's host:port (or does not
    answer within `timeout` seconds): Ray itself retries such an address for minutes (over 5
    measured here) before it gives up. "auto" and the like are left to Ray, which finds the
    cluster itself and says at once when none is running."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ImagerecError(
            f"Ray could not start: nothing answers at {address} (RAY_ADDRESS): {exc}; is the "
            "cluster up (ray status), and is this its head's address?",
            code="ray_unavailable",
        ) from None


def node_cpus(ray) -> list[int]:
    """The CPUs of each live node of the cluster."""
    return [
        int(node["Resources"].get("CPU", 0))
        for node in ray.nodes()
        if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1
    ] or [1]


def decode_for_ray(
    batch: dict, size: tuple[int, int], max_pixels: int | None, cwd: str | None = None
) -> dict:
    """A map_batches stage: {"path"} (the file system's bytes) -> paths (as the output holds
    them), pixels at the input size, and errors. Relative paths are read from `cwd`, the
    command's folder: the workers of a running cluster start in folders of their own (a
    cluster's workers run this job alone, and Ray itself moves them into a job's working_dir)."""
    import cv2

    from imagerec.images import DEFAULT_MAX_PIXELS, hold_decode_buffers

    if cwd:
        with contextlib.suppress(OSError):  # not on this node: relative paths are error rows
            if os.getcwd() != cwd:
                os.chdir(cwd)

    # Each batch is decoded on one core; OpenCV's own threads on top of that only compete.
    cv2.setNumThreads(1)
    hold_decode_buffers()  # as the local engine: the process's next image reuses these pages
    paths = [os.fsdecode(p) for p in batch["path"]]
    pixels, ok, errors = decode_batch(paths, size, max_pixels or DEFAULT_MAX_PIXELS)
    full = np.zeros((len(paths), size[0], size[1], 3), np.uint8)
    full[ok] = pixels
    return {
        "path": np.array([path_text(p) for p in paths], dtype=object),
        "pixels": full,
        "error_code": np.array([errors.get(i, {}).get("code", "") for i in range(len(paths))]),
        "error_message": np.array(
            [path_text(errors.get(i, {}).get("message", "")) for i in range(len(paths))],
            dtype=object,
        ),
    }


def plan_shape(
    nodes: list[int], count: int, actors: int = 0, threads: int = 0, ray_batch: int = 1024
) -> tuple[int, int, float, int]:
    """(threads an actor, actors, CPU share a stage asks for, images a batch) for `count` images
    on a cluster of `nodes` CPUs, as classify_on_ray explains them."""
    threads = threads or min(nodes)
    pool = actors or max(1, sum(nodes) // threads)
    step = min(ray_batch, max(16, -(-count // (16 * pool * threads))))
    return threads, pool, threads / 2, step


def actor_pool(ray, size: int, threads: int):
    """Ray Data's strategy for the pool: `size` actors, each running `threads` batches at once
    on threads of its own, with as many again queued so that none waits between batches."""
    return ray.data.ActorPoolStrategy(
        size=size,
        max_concurrent_calls_per_actor=threads,
        enable_true_multi_threading=True,
        max_tasks_in_flight_per_actor=2 * threads,
    )


class RayClassifier:
    """An actor of the pool: the bundle loaded once, with a session for each of the `threads`
    batches it runs at once; decoded batches in, each row's top k out (as columns)."""

    def __init__(self, bundle: str, engine: str, threads: int, top_k: int, batch_size: int):
        from imagerec.predictor import Predictor

        self.predictor = Predictor.from_path(
            bundle, max_batch=batch_size, engine=engine, workers=threads, threads=1
        )
        self.k = top_k

    def __call__(self, batch: dict) -> dict:
        codes = batch["error_code"].astype(str)
        ok = codes == ""
        probs = self.predictor.predict_arrays(batch["pixels"][ok])
        top, score = top_k_columns(probs, ok, self.k)
        return {
            "path": batch["path"],
            "top": top,
            "score": score,
            "error_code": codes,
            "error_message": batch["error_message"],
        }


def rows_of(batch: dict, labels: list[str], k: int) -> Rows:
    """The Rows of one batch that came back from the actors."""
    errors = [
        {"code": str(code), "message": str(message)} if code else None
        for code, message in zip(batch["error_code"], batch["error_message"], strict=True)
    ]
    rows = Rows(labels, k)
    rows.add([str(p) for p in batch["path"]], batch["top"], batch["score"], errors)
    return rows


def classify_on_ray(
    bundle: str | os.PathLike,
    sources: list[str],
    out: Path,
    *,
    model_engine: str = "auto",
    top_k: int = 3,
    batch_size: int = 64,
    actors: int = 0,
    threads: int = 0,
    commit_rows: int = 8192,
    commit_s: float = 10.0,
    max_pixels: int | None = None,
    progress: bool = True,
    chunk: int = 200_000,
    ray_batch: int = 1024,
) -> BulkResult:
    """Label the sources' images into `out` on Ray Data, skipping what `out` already holds.

    `actors` classifiers (0: as many as the cluster's CPUs hold `threads` each), each running
    `threads` batches at once (0: the CPUs of the smallest node). The decode stage and the actors
    ask Ray for the same share of a CPU, so Ray Data fuses decoding into the actors' processes
    (the pixels never cross the object store), and that share is half of what the actor uses, so
    that decode tasks still find room on a version of Ray that would not fuse them. Each stage
    takes up to `ray_batch` images a batch, cut finer (to 16 at least) for a smaller run so that
    every thread has about 16: a batch of photos is seconds of work, and the threads that finish
    their last ones early leave cores idle. The model runs `batch_size` at a time. A dataset
    covers up to `chunk` paths, which bounds the memory of this process."""
    from imagerec.bundle import Bundle
    from imagerec.engines import choose_engine

    ray = import_ray()
    start = time.monotonic()
    loaded = Bundle.load(bundle, keras_model=False)
    engine = choose_engine(loaded, model_engine)
    k = checked_top_k(top_k, loaded.labels)
    model = {"name": loaded.name, "version": loaded.version, "engine": engine}
    with open_sink(out, model) as sink:  # closed, and so let go of, however the run ends
        already, done = sink.done()
        started = start_ray(ray)
        result = BulkResult(out, skipped=already, model=loaded.name, engine=f"ray/{engine}")
        bar = _progress_bar(progress, already)
        stop_counting = _count_in_background(bar, sources)
        committer = Committer(sink, result, bar, loaded.labels, k, commit_rows, commit_s)
        try:
            nodes = node_cpus(ray)
            threads, pool, share, _ = plan_shape(nodes, 0, actors, threads)
            if (pool + 1) * share > sum(nodes):
                raise InvalidInput(
                    f"{pool} actors of {threads} threads ask for more than the cluster's "
                    f"{sum(nodes)} CPUs: ask for fewer --ray-actors or --threads",
                    code="usage",
                )
            for paths in batched(skip_done(iter_sources(sources), done), chunk):
                step = plan_shape(nodes, len(paths), pool, threads, ray_batch)[3]
                # from_items builds the blocks here; from_arrow would run a Ray task a block for
                # their metadata, and have Ray start worker processes (seconds of CPU each) for it.
                # Paths go as bytes: a name that is not UTF-8 has no place in an Arrow string.
                dataset = ray.data.from_items(
                    [{"path": os.fsencode(path)} for path in paths],
                    override_num_blocks=-(-len(paths) // step),
                )
                decoded = dataset.map_batches(
                    decode_for_ray,
                    fn_kwargs={
                        "size": loaded.preprocess.input_size,
                        "max_pixels": max_pixels,
                        "cwd": os.getcwd(),
                    },
                    batch_size=step,
                    batch_format="numpy",
                    num_cpus=share,
                )
                labelled = decoded.map_batches(
                    RayClassifier,
                    fn_constructor_kwargs={
                        "bundle": str(Path(bundle).resolve()),
                        "engine": engine,
                        "threads": threads,
                        "top_k": k,
                        "batch_size": batch_size,
                    },
                    batch_size=step,
                    batch_format="numpy",
                    compute=actor_pool(ray, pool, threads),
                    num_cpus=share,
                )
                for batch in labelled.iter_batches(batch_size=None, batch_format="numpy"):
                    committer.add(rows_of(batch, loaded.labels, k))
            committer.finish()
        except KeyboardInterrupt:
            committer.save()  # the rows that came back are not lost with the ones under way
            raise
        finally:
            stop_counting.set()
            if bar is not None:
                bar.close()
            if started:
                ray.shutdown()
    result.seconds = time.monotonic() - start
    return result
