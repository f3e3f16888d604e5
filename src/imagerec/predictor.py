"""Bundle to fast batched inference, through any engine. Never imports training code.

The engine (imagerec.engines: TensorFlow, ONNX Runtime float32 or int8) runs the model and the
bundle's test-time augmentation, so every prediction path (CLI, evaluation, HTTP) honours it.
The Predictor resizes decoded images, splits batches at `max_batch` and ranks the labels; the
MicroBatcher gathers concurrent callers into shared batches.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagerec.bundle import Bundle
from imagerec.engines import choose_engine, open_engine
from imagerec.images import resize_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]


def confine_python_threads(cores: int, spare: frozenset[int] = frozenset()) -> set[int] | None:
    """Keep every thread of the process that is not a model's compute thread (the server's
    request threads, Python's or Granian's, its runtime, the batcher's unless `spare`d) on the
    first `cores` of its CPUs; return that set, or None if nothing changed.

    Call after the model has run once. The threads in `spare` (native ids: ONNX Runtime's
    pools, and the batcher's where the engine computes on the caller's thread, as ONNX Runtime
    does with one thread a session) keep every core, as does any thread TensorFlow names tf_*.
    A request passes between threads several times (request thread, batcher, back); on one core
    those wake-ups stay local instead of interrupting a CPU that is running the model. On the
    2-core benchmark machine that served about 10% more images per second under waitress and
    15% more under granian with the int8 engine (README, "HTTP API"). 0 leaves the threads
    alone; so does a process allowed no more than `cores` CPUs.
    """
    if cores <= 0 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if cores >= len(allowed):
        return None
    chosen = set(allowed[:cores])
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else []:
        try:
            compute = int(task.name) in spare or (task / "comm").read_text().startswith("tf_")
            # A model loaded later starts its threads from a confined one: give them all back.
            os.sched_setaffinity(int(task.name), allowed if compute else chosen)
        except OSError as exc:  # the thread ended meanwhile, or the system refuses
            log.info("thread %s keeps its CPUs: %s", task.name, exc)
    return chosen


class Predictor:
    """Batched inference over a verified bundle; safe to call from several threads at once."""

    def __init__(
        self,
        bundle: Bundle,
        max_batch: int = 64,
        engine: str = "tensorflow",
        workers: int = 1,
        threads: int | None = None,
    ):
        self.bundle = bundle
        self.labels = list(bundle.labels)
        self.input_size = bundle.preprocess.input_size
        self.tta = bundle.preprocess.tta
        self.max_batch = max_batch
        self.engine = choose_engine(bundle, engine)
        self._forward = open_engine(bundle, self.engine, workers, threads)

    @property
    def compute_threads(self) -> frozenset[int]:
        """Native ids of the threads the engine computes on besides its callers' (if it knows)."""
        return getattr(self._forward, "thread_ids", frozenset())

    @classmethod
    def from_path(
        cls,
        path,
        max_batch: int = 64,
        engine: str = "tensorflow",
        workers: int = 1,
        threads: int | None = None,
    ) -> Predictor:
        """A verified bundle through `engine` (or `auto`); TensorFlow is imported only if the
        engine is TensorFlow's."""
        return cls(Bundle.load(path, keras_model=False), max_batch, engine, workers, threads)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def warm_up(self) -> None:
        """Trace and run the graph once per batch shape class so the first request is fast."""
        height, width = self.input_size
        for size in sorted({1, self.max_batch}):
            self.predict_arrays(np.zeros((size, height, width, 3), np.uint8))
        log.info("model %s (version %s, engine %s) warmed up", self.name, self.version, self.engine)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Resize a decoded RGB image to the model's input size."""
        return resize_image(image, self.input_size)

    def as_batch(self, images: np.ndarray) -> np.ndarray:
        """`images` as a contiguous (N, H, W, 3) uint8 array at the input size, or ValueError."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected (N, {self.input_size[0]}, {self.input_size[1]}, 3) uint8")
        return images

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for (N, H, W, 3) uint8 RGB images at the input size."""
        images = self.as_batch(images)
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        out = []
        for start in range(0, len(images), self.max_batch):
            out.append(self._forward(images[start : start + self.max_batch]))
        return np.concatenate(out)

    def top_k(self, probs: np.ndarray, k: int) -> list[Prediction]:
        """Top-k labels and scores for each row of probabilities."""
        k = max(1, min(k, len(self.labels)))
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            pairs = [(self.labels[i], float(row[i])) for i in order]
            results.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return results

    def classify(self, images: list[np.ndarray], k: int = 3) -> list[Prediction]:
        """Decoded RGB images of any size to their top-k predictions."""
        if not images:
            return []
        return self.top_k(self.predict_arrays(self.stack(images)), k)

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded images resized into one (N, H, W, 3) batch; one image is not copied."""
        prepared = [self.prepare(image) for image in images]
        return prepared[0][None] if len(prepared) == 1 else np.stack(prepared)


class _Job:
    """One caller's images waiting for the batcher, and the slot its answer comes back in.

    The caller blocks on `done`, a lock taken at creation that the batcher releases once: one
    wake-up per answer, fewer than an Event's condition variable costs."""

    __slots__ = ("images", "done", "result", "error")

    def __init__(self, images: np.ndarray):
        self.images = images
        self.done = threading.Lock()
        self.done.acquire()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None


_STOP = object()


class MicroBatcher:
    """Gathers the images of concurrent callers into one forward pass of a Predictor.

    Each worker thread (`workers`, default 2) takes a waiting job, adds every job already
    queued, and, if its previous batch had more callers than it has now, waits up to
    `max_wait_ms` for them, never past `max_batch` images. A lone caller is never kept waiting,
    so latency under no load is the predictor's own. If a batch fails, its jobs are retried one
    by one so that only the job at fault sees the error. Thread-safe; offers Predictor's
    `classify` and `predict_arrays`.
    """

    reports_batches = True

    def __init__(
        self,
        predictor: Predictor,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
        workers: int = 2,
    ):
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait_ms = max_wait_ms
        self.on_batch = on_batch
        # Not SimpleQueue: with two consumers its timed get() can lose the deadline and block
        # until the next put (CPython: a wake-up whose item another worker took recomputes a
        # negative timeout, which means "forever"), so a burst's last caller waited for the next
        # request. Queue's get(timeout) is Python code that re-checks its deadline.
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        # Two workers keep the model busy: one gathers and dispatches the next batch (Python, under
        # the GIL) while the other's forward pass runs, so the cores never wait between batches.
        self._threads = [
            threading.Thread(target=self._run, name=f"imagerec-batcher-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def bundle(self) -> Bundle:
        return self.predictor.bundle

    @property
    def thread_ids(self) -> frozenset[int]:
        """The native ids of the worker threads."""
        return frozenset(t.native_id for t in self._threads if t.native_id is not None)

    @property
    def labels(self) -> list[str]:
        return self.predictor.labels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.predictor.input_size

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def version(self) -> str:
        return self.predictor.version

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for (N, H, W, 3) uint8 images, computed in a shared batch."""
        images = self.predictor.as_batch(images)  # checked here, so it cannot fail a batch
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        if self._closed:
            raise RuntimeError("the batcher is closed")
        job = _Job(images)
        self._queue.put(job)
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result

    def classify(self, images: list[np.ndarray], k: int = 3) -> list[Prediction]:
        """Decoded RGB images of any size to their top-k predictions (as Predictor.classify)."""
        if not images:
            return []
        return self.predictor.top_k(self.predict_arrays(self.predictor.stack(images)), k)

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker threads."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)  # each worker takes exactly one and exits
            for thread in self._threads:
                thread.join()

    def _run(self) -> None:
        previous_jobs = 1
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stop = self._gather(first, previous_jobs)
            self._execute(jobs)
            previous_jobs = len(jobs)
            if stop:
                return

    def _gather(self, first: _Job, previous_jobs: int) -> tuple[list[_Job], bool]:
        jobs, count = [first], len(first.images)
        deadline = None
        while count < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if len(jobs) >= previous_jobs:
                    break  # no sign that more callers are on their way
                if deadline is None:
                    deadline = time.monotonic() + self.max_wait_ms / 1000.0
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                return jobs, True
            if count + len(job.images) > self.max_batch:
                self._execute(jobs)  # keep batches within max_batch; the newcomer starts the next
                jobs, count = [], 0
            jobs.append(job)
            count += len(job.images)
        return jobs, False

    def _execute(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            probs = self.predictor.predict_arrays(images)
        except BaseException as exc:  # handed to the callers, never lost
            if len(jobs) == 1:
                jobs[0].error = exc
                jobs[0].done.release()
                return
            for job in jobs:  # isolate the job at fault
                self._execute([job])
            return
        if self.on_batch is not None:
            try:
                self.on_batch(len(images))
            except Exception:
                log.exception("the on_batch callback failed")
        start = 0
        for job in jobs:
            job.result = probs[start : start + len(job.images)]
            start += len(job.images)
            job.done.release()
