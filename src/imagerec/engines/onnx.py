"""An exported ONNX model (float32 or int8) in ONNX Runtime. Imports no TensorFlow.

ONNX Runtime releases the GIL while it runs. Concurrent calls on one session would share its
thread pool, so each of the `workers` callers gets a session of its own, with its share of the
cores: the same division the TensorFlow engine makes.
"""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from imagerec.engines import cores_each, native_thread_ids
from imagerec.errors import BundleError


class OnnxEngine:
    def __init__(self, path: Path, flip: bool, workers: int = 1, threads: int | None = None):
        import onnxruntime as ort

        self.name = "onnx-int8" if path.name.endswith("-int8.onnx") else "onnx"
        self.flip = flip
        options = ort.SessionOptions()
        # `threads` overrides the share: a Ray actor is granted fewer cores than the machine has.
        options.intra_op_num_threads = threads or cores_each(workers)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()
        before = native_thread_ids()
        try:
            for _ in range(max(1, workers)):
                session = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
                self._sessions.put(session)
        except Exception as exc:  # ONNX Runtime raises its own types for a bad file
            raise BundleError(f"{path} could not be loaded by ONNX Runtime: {exc}") from None
        self._input = session.get_inputs()[0].name
        # The sessions' pool threads (none with one thread a session: it computes on the
        # caller's), so the server can leave them every core.
        self.thread_ids = native_thread_ids() - before

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        if self.flip:
            x = np.concatenate([x, x[:, :, ::-1]])
        session = self._sessions.get()
        try:
            (probs,) = session.run(None, {self._input: x})
        finally:
            self._sessions.put(session)
        if self.flip:
            count = len(images)
            probs = (probs[:count] + probs[count:]) / 2.0
        return probs.astype(np.float32, copy=False)
