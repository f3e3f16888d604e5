"""MicroBatcher: same answers as the predictor, shared batches, failures kept to their caller."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest

from imagerec.predictor import MicroBatcher, Predictor, confine_python_threads
from tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_path(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny"))


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_concurrent_callers_get_their_own_predictions(predictor):
    images = random_images(96)
    expected = predictor.predict_arrays(images)
    batch_sizes = []
    batcher = MicroBatcher(predictor, max_batch=16, max_wait_ms=2, on_batch=batch_sizes.append)
    try:
        with ThreadPoolExecutor(16) as pool:
            # Callers send one or three images each, to mix request sizes in a batch.
            slices = [slice(i, i + (3 if i % 2 else 1)) for i in range(0, 96, 4)]
            results = list(pool.map(lambda s: batcher.predict_arrays(images[s]), slices))
    finally:
        batcher.close()
    for part, result in zip(slices, results, strict=True):
        np.testing.assert_allclose(result, expected[part], atol=1e-5)
    assert sum(batch_sizes) == sum(len(images[s]) for s in slices)
    assert max(batch_sizes) <= 16


def test_classify_matches_the_predictor(predictor):
    images = [random_images(1, seed)[0] for seed in range(5)]
    with_batcher = MicroBatcher(predictor)
    try:
        got = with_batcher.classify(images, k=3)
    finally:
        with_batcher.close()
    want = predictor.classify(images, k=3)
    assert [p.label for p in got] == [p.label for p in want]
    assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)
    assert with_batcher.labels == predictor.labels and with_batcher.version == predictor.version


class GatedPredictor:
    """Holds its first batch until released, then fails any batch holding a poisoned image."""

    def __init__(self, inner: Predictor):
        self.inner = inner
        self.input_size = inner.input_size
        self.labels = inner.labels
        self.as_batch = inner.as_batch
        self.release = threading.Event()
        self.calls: list[int] = []

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        if len(self.calls) == 1:
            self.release.wait(10)
        if (images == 7).all(axis=(1, 2, 3)).any():
            raise RuntimeError("poisoned image")
        return self.inner.predict_arrays(images)


def test_a_failing_request_does_not_fail_its_batch_mates(predictor):
    gated = GatedPredictor(predictor)
    batcher = MicroBatcher(gated, max_batch=64, max_wait_ms=1, workers=1)  # one gate to hold
    good = random_images(4, seed=3)
    poisoned = np.full((1, 32, 32, 3), 7, np.uint8)
    try:
        with ThreadPoolExecutor(5) as pool:
            blocker = pool.submit(batcher.predict_arrays, good[:1])
            while not gated.calls:  # the worker is now inside the gated first batch
                time.sleep(0.001)
            mates = [pool.submit(batcher.predict_arrays, good[i : i + 1]) for i in range(1, 4)]
            bad = pool.submit(batcher.predict_arrays, poisoned)
            while batcher._queue.qsize() < 4:  # all four queued behind the gate
                time.sleep(0.001)
            gated.release.set()
            with pytest.raises(RuntimeError, match="poisoned"):
                bad.result(10)
            results = [blocker.result(10)] + [m.result(10) for m in mates]
    finally:
        batcher.close()
    assert gated.calls[1] == 4  # the four waiting callers did share one batch
    np.testing.assert_allclose(np.concatenate(results), predictor.predict_arrays(good), atol=1e-5)


def test_wrong_shapes_are_refused_before_they_reach_a_batch(predictor):
    batcher = MicroBatcher(predictor)
    try:
        with pytest.raises(ValueError, match="expected"):
            batcher.predict_arrays(np.zeros((1, 8, 8, 3), np.uint8))
        assert batcher.predict_arrays(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 10)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.predict_arrays(random_images(1))


def test_flip_tta_averages_the_image_and_its_mirror(predictor):
    """The bundle's tta setting is honoured: "flip" is the mean over the image and its mirror."""
    import dataclasses

    images = random_images(6, seed=5)
    model = predictor.bundle.model
    plain = model(images.astype(np.float32), training=False).numpy()
    mirrored = model(images[:, :, ::-1].astype(np.float32), training=False).numpy()
    assert not np.allclose(plain, mirrored, atol=1e-4)  # the test can tell the two apart
    for tta, expected in (("flip", (plain + mirrored) / 2), ("none", plain)):
        preprocess = dataclasses.replace(predictor.bundle.preprocess, tta=tta)
        bundle = dataclasses.replace(predictor.bundle, preprocess=preprocess)
        np.testing.assert_allclose(Predictor(bundle).predict_arrays(images), expected, atol=1e-5)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="thread placement needs Linux and at least two CPUs",
)
def test_confine_python_threads_pins_every_python_thread_and_zero_leaves_them():
    release = threading.Event()
    helper = threading.Thread(target=release.wait, name="helper")
    helper.start()
    # Our two threads; others (from earlier tests) may end at any moment, so they are skipped.
    before = {
        tid: os.sched_getaffinity(tid) for tid in (threading.get_native_id(), helper.native_id)
    }
    try:
        assert confine_python_threads(0) is None
        assert all(os.sched_getaffinity(tid) == cpus for tid, cpus in before.items())
        # asking for as many CPUs as the process has is no change either
        assert confine_python_threads(len(os.sched_getaffinity(0))) is None
        assert all(os.sched_getaffinity(tid) == cpus for tid, cpus in before.items())
        lowest = min(os.sched_getaffinity(0))
        assert confine_python_threads(1) == {lowest}
        assert os.sched_getaffinity(helper.native_id) == {lowest}
        assert os.sched_getaffinity(threading.get_native_id()) == {lowest}
    finally:
        for thread in threading.enumerate():  # every thread the call may have pinned
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.sched_setaffinity(thread.native_id, before[threading.get_native_id()])
        release.set()
        helper.join()


class InstantPredictor:
    """Answers at once with each image's first pixel value, so a mix-up would show."""

    input_size = (2, 2)
    labels = ["value", "zero"]

    def as_batch(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, dtype=np.uint8)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        time.sleep(0.0002)
        probs = np.zeros((len(images), 2), np.float32)
        probs[:, 0] = images[:, 0, 0, 0]
        return probs


def test_every_caller_of_a_burst_is_answered_without_a_later_arrival():
    # Bursts of 1 to 32 callers against two workers: each burst must finish on its own. With
    # SimpleQueue, one worker could sit on gathered jobs until the next request woke it (the
    # server then left a client hanging); on that code this test failed in most runs.
    batcher = MicroBatcher(InstantPredictor(), max_batch=8, max_wait_ms=1, workers=2)
    images = [np.full((1, 2, 2, 3), i, np.uint8) for i in range(32)]
    try:
        with ThreadPoolExecutor(32) as pool:
            for burst in range(6000):
                calls = [
                    pool.submit(batcher.predict_arrays, images[i]) for i in range(burst % 32 + 1)
                ]
                _, waiting = wait(calls, timeout=10)
                if waiting:
                    batcher.predict_arrays(images[0])  # a new arrival frees them, so we can stop
                assert not waiting, f"burst {burst}: {len(waiting)} callers were never answered"
                assert [call.result()[0, 0] for call in calls] == list(range(len(calls)))
    finally:
        batcher.close()
