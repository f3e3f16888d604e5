"""Bundle to fast batched inference. Never imports training code.

The model runs through one traced `tf.function` with a fixed input signature, so a call costs
the forward pass alone (model.predict builds a dataset and a loop for every call). Test-time
augmentation from the bundle's preprocess.json is applied here, so every prediction path (CLI,
evaluation, HTTP) honours it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from imagerec.bundle import Bundle
from imagerec.images import resize_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    top_k: list[tuple[str, float]]


class Predictor:
    """Thread-safe batched inference over a verified bundle."""

    def __init__(self, bundle: Bundle, max_batch: int = 64):
        import tensorflow as tf

        self.bundle = bundle
        self.labels = list(bundle.labels)
        self.input_size = bundle.preprocess.input_size
        self.tta = bundle.preprocess.tta
        self.max_batch = max_batch
        model = bundle.model
        height, width = self.input_size
        flip = self.tta == "flip"

        @tf.function(
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8)],
            reduce_retracing=True,
        )
        def forward(images):
            x = tf.cast(images, tf.float32)
            probs = model(x, training=False)
            if flip:  # mirror and average
                probs = (probs + model(tf.reverse(x, axis=[2]), training=False)) / 2.0
            return tf.cast(probs, tf.float32)

        self._forward = forward
        self._lock = threading.Lock()  # one forward pass at a time: TF already uses every core

    @classmethod
    def from_path(cls, path, max_batch: int = 64) -> Predictor:
        return cls(Bundle.load(path), max_batch=max_batch)

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
        log.info("model %s (version %s) warmed up", self.name, self.version)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Resize a decoded RGB image to the model's input size."""
        return resize_image(image, self.input_size)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for (N, H, W, 3) uint8 RGB images at the input size."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected (N, {self.input_size[0]}, {self.input_size[1]}, 3) uint8")
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        out = []
        for start in range(0, len(images), self.max_batch):
            with self._lock:
                out.append(self._forward(images[start : start + self.max_batch]).numpy())
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
        batch = np.stack([self.prepare(image) for image in images])
        return self.top_k(self.predict_arrays(batch), k)
