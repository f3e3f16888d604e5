"""The `ray` engine of `imagerec classify`: the same decode and Predictor on Ray Data.

Ray Data's batch inference pattern: the paths become a dataset, `map_batches` tasks read and
decode them (images.load_image, as the local engine), an actor pool classifies (each actor loads
the bundle once), and the rows are written as Parquet. `ray.init()` joins the cluster that
`RAY_ADDRESS` names (as under `ray job submit`), or starts one on this machine. Paths must be
readable where the tasks run: on a cluster, a file system that every node mounts.

The output is the local engine's Parquet folder: Ray writes into a hidden staging folder inside
it, and the files become parts once the whole dataset is written, `chunk` images at a time, so a
killed run loses at most the chunk under way and the same command resumes.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from imagerec.bulk import (
    BulkResult,
    ParquetFolder,
    batched,
    checked_top_k,
    decode_batch,
    iter_sources,
    output_format,
    ranked_rows,
    skip_done,
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
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:  # a local cluster: no dashboard (its extra packages are not part of ray[data])
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
        raise ImagerecError(f"Ray could not start: {exc}", code="ray_unavailable") from None
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's plan and per-operator lines
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    return True


def decode_for_ray(batch: dict, size: tuple[int, int], max_pixels: int | None) -> dict:
    """A map_batches task: {"path"} -> paths, pixels at the input size, and errors."""
    import cv2

    from imagerec.images import DEFAULT_MAX_PIXELS

    # Ray runs a task a CPU it grants; OpenCV's own threads on top of that only compete.
    cv2.setNumThreads(1)
    paths = [str(p) for p in batch["path"]]
    pixels, ok, errors = decode_batch(paths, size, max_pixels or DEFAULT_MAX_PIXELS)
    full = np.zeros((len(paths), size[0], size[1], 3), np.uint8)
    full[ok] = pixels
    return {
        "path": np.array(paths, dtype=object),
        "pixels": full,
        "error_code": np.array([errors.get(i, {}).get("code", "") for i in range(len(paths))]),
        "error_message": np.array(
            [errors.get(i, {}).get("message", "") for i in range(len(paths))], dtype=object
        ),
    }


class RayClassifier:
    """An actor of the pool: the bundle loaded once, then batches of decoded pixels to rows."""

    def __init__(self, bundle: str, engine: str, threads: int, top_k: int, batch_size: int):
        from imagerec.predictor import Predictor

        self.predictor = Predictor.from_path(
            bundle, max_batch=batch_size, engine=engine, threads=threads
        )
        self.k = top_k

    def __call__(self, batch: dict):
        codes = [str(c) for c in batch["error_code"]]
        ok = np.array([c == "" for c in codes], bool)
        errors = {
            i: {"code": c, "message": str(batch["error_message"][i])}
            for i, c in enumerate(codes)
            if c
        }
        probs = self.predictor.predict_arrays(batch["pixels"][ok])
        paths = [str(p) for p in batch["path"]]
        return ranked_rows(paths, probs, ok, errors, self.predictor.labels, self.k).to_arrow()


def classify_on_ray(
    bundle: str | os.PathLike,
    sources: list[str],
    out: Path,
    *,
    model_engine: str = "auto",
    top_k: int = 3,
    batch_size: int = 64,
    actors: int = 0,
    actor_cpus: float = 0.5,
    decode_cpus: float = 0.5,
    max_pixels: int | None = None,
    chunk: int = 200_000,
    ray_batch: int = 1024,
) -> BulkResult:
    """Label the sources' images into the Parquet folder `out` on Ray Data.

    `actors` classifiers (0: one a CPU of the cluster), each computing on one ONNX Runtime
    thread. An actor reserves `actor_cpus` of a CPU and a decode task `decode_cpus`, so decode
    tasks always fit beside a full pool: with whole CPUs, a pool that took every CPU would leave
    the decode tasks none, and the run would wait forever. With the same reservation for both
    (half a CPU each, the default), Ray Data fuses the decode stage into the actors' processes:
    each actor reads, decodes and classifies its batch, so as many batches decode at once as
    there are actors (which photo-sized images need: their decoding costs several times the
    model) and the pixels never cross the object store. Measured against 0.75 and 0.25 on 2
    cores, it was faster for CIFAR-sized and photo-sized images alike. Each stage takes up to
    `ray_batch` images a batch; the model, `batch_size` at a time."""
    import time

    import pyarrow as pa

    from imagerec.bundle import Bundle
    from imagerec.engines import choose_engine

    if output_format(out) != ".parquet":
        raise InvalidInput(
            "the ray engine writes Parquet: --out must end in .parquet", code="usage"
        )
    ray = import_ray()
    start = time.monotonic()
    loaded = Bundle.load(bundle, keras_model=False)
    engine = choose_engine(loaded, model_engine)
    checked_top_k(top_k, loaded.labels)
    model = {"name": loaded.name, "version": loaded.version, "engine": engine}
    sink = ParquetFolder(out, model)
    already, done = sink.done()
    result = BulkResult(out, skipped=already, model=loaded.name, engine=f"ray/{engine}")
    started = start_ray(ray)
    try:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        pool = actors or max(1, int(cpus))
        if pool * actor_cpus + 2 * decode_cpus > cpus:
            raise InvalidInput(
                f"{pool} actors reserve {pool * actor_cpus:g} of the cluster's {cpus:g} CPUs, "
                "leaving the decode tasks too few: ask for fewer --ray-actors",
                code="usage",
            )
        for stale in out.glob(".ray-*"):  # a killed run's staging folder
            shutil.rmtree(stale, ignore_errors=True)
        for paths in batched(skip_done(iter_sources(sources), done), chunk):
            staging = out / f".ray-{uuid.uuid4().hex}"
            # A block of paths is one batch of each stage: Ray Data's cost a batch (scheduling,
            # moving it between stages) is spread over up to `ray_batch` images, while the
            # Predictor still runs `batch_size` at a time inside the actor. A small chunk is cut
            # finer, so that every actor has some of it.
            step = max(1, min(ray_batch, -(-len(paths) // (2 * pool))))
            dataset = ray.data.from_arrow(
                [
                    pa.table({"path": pa.array(paths[i : i + step], pa.string())})
                    for i in range(0, len(paths), step)
                ]
            )
            decoded = dataset.map_batches(
                decode_for_ray,
                fn_kwargs={"size": loaded.preprocess.input_size, "max_pixels": max_pixels},
                batch_size=step,
                batch_format="numpy",
                num_cpus=decode_cpus,
            )
            labelled = decoded.map_batches(
                RayClassifier,
                fn_constructor_kwargs={
                    "bundle": str(Path(bundle).resolve()),
                    "engine": engine,
                    "threads": 1,
                    "top_k": top_k,
                    "batch_size": batch_size,
                },
                batch_size=step,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_cpus=actor_cpus,
            )
            # Writing is light work: with a whole CPU asked, it waits for the actors to finish.
            labelled.write_parquet(str(staging), ray_remote_args={"num_cpus": decode_cpus})
            parts = sink.adopt(sorted(staging.glob("*.parquet")))
            shutil.rmtree(staging, ignore_errors=True)
            result.written += len(paths)
            _count_errors(parts, result)
    finally:
        if started:
            ray.shutdown()
    result.seconds = time.monotonic() - start
    return result


def _count_errors(parts: list[Path], result: BulkResult) -> None:
    """Add the error rows of the new `parts` to `result`, by code."""
    import pyarrow.parquet as pq

    for part in parts:
        for error in pq.read_table(part, columns=["error"]).column("error").to_pylist():
            if error is not None:
                result.errors += 1
                result.error_codes[error["code"]] = result.error_codes.get(error["code"], 0) + 1
