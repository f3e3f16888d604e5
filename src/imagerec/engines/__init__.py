"""Engines: a bundle's model as one call from a batch of pixels to class probabilities.

    name = choose_engine(bundle, "auto")          # or "tensorflow", "onnx", "onnx-int8"
    engine = open_engine(bundle, name, workers=2)
    probs = engine(images)    # (N, H, W, 3) uint8 RGB at the input size -> (N, classes) float32

Every engine applies the bundle's test-time augmentation the same way: with `flip`, the mirrored
copies go through the model in the same call as the originals, and each image's two rows of
probabilities are averaged. `workers` is how many calls run at once (the micro-batcher's
workers); each gets its share of the cores. Engines know nothing about HTTP or batching.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from imagerec.bundle import Bundle
from imagerec.errors import BundleError, InvalidInput

ENGINES = ("tensorflow", "onnx", "onnx-int8")
ENGINE_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
# Fastest first, as measured in process with flip TTA (benchmarks/results/serve.md).
FASTEST_FIRST = ("onnx-int8", "onnx", "tensorflow")
# `auto` takes an engine whose recorded accuracy is at most this far below TensorFlow's.
AUTO_TOLERANCE = 0.002

Engine = Callable[[np.ndarray], np.ndarray]


def engine_metrics(bundle: Bundle) -> dict:
    """What `imagerec export` recorded for each engine: accuracy, agreement, images used."""
    recorded = bundle.metrics.get("engines")
    return recorded if isinstance(recorded, dict) else {}


def available_engines(bundle: Bundle) -> list[str]:
    """The engines whose model file the bundle holds (TensorFlow's always)."""
    return [n for n in ENGINES if n == "tensorflow" or bundle.has_file(ENGINE_FILES[n])]


def choose_engine(bundle: Bundle, requested: str = "auto") -> str:
    """`requested`, checked against the bundle; for `auto`, the fastest engine the bundle holds
    whose recorded accuracy is within AUTO_TOLERANCE of TensorFlow's on the same images."""
    if requested not in (*ENGINES, "auto"):
        raise InvalidInput(
            f"the engine must be auto or one of {', '.join(ENGINES)}, not {requested!r}"
        )
    held = available_engines(bundle)
    if requested != "auto":
        if requested not in held:
            raise BundleError(
                f"{bundle.path} has no {ENGINE_FILES[requested]} for the {requested} engine: "
                f"add it with `imagerec export {bundle.path} --format onnx"
                f"{' --int8 --data PATH' if requested == 'onnx-int8' else ''}`"
            )
        return requested
    recorded = engine_metrics(bundle)
    reference = recorded.get("tensorflow", {}).get("accuracy")
    for name in FASTEST_FIRST[: FASTEST_FIRST.index("tensorflow")]:
        accuracy = recorded.get(name, {}).get("accuracy")
        recorded_both = accuracy is not None and reference is not None
        if name in held and recorded_both and accuracy >= reference - AUTO_TOLERANCE:
            return name
    return "tensorflow"


def open_engine(bundle: Bundle, name: str, workers: int = 1, threads: int | None = None) -> Engine:
    """The engine `name` (as choose_engine gives it) over `bundle`, for `workers` callers;
    `threads` (ONNX Runtime only) sets each caller's compute threads instead of a share."""
    flip = bundle.preprocess.tta == "flip"
    if name == "tensorflow":
        from imagerec.engines.tensorflow import TensorFlowEngine

        return TensorFlowEngine(bundle, flip, workers)
    from imagerec.engines.onnx import OnnxEngine

    return OnnxEngine(bundle.path / ENGINE_FILES[name], flip, workers, threads)


def native_thread_ids() -> frozenset[int]:
    """The native ids of this process's threads (Linux; empty elsewhere)."""
    from pathlib import Path

    tasks = Path("/proc/self/task")
    return frozenset(int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else frozenset()


def usable_cores() -> int:
    """The CPUs this process may run on (at least one)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def cores_each(workers: int) -> int:
    """This process's CPUs divided among `workers` concurrent calls (at least one each)."""
    return max(1, usable_cores() // max(1, workers))
