"""The bundle's Keras model through one traced tf.function with a fixed input signature, so a
call costs the forward pass alone (model.predict builds a dataset and a loop for every call)."""

from __future__ import annotations

import logging

import numpy as np

from imagerec.bundle import Bundle
from imagerec.engines import cores_each
from imagerec.tfimport import import_tensorflow

log = logging.getLogger(__name__)


def share_cores(workers: int) -> None:
    """Give each of `workers` concurrent forward passes its own share of the cores.

    Call before TensorFlow runs anything. Batches then run side by side, each on its own cores,
    instead of every layer of one batch synchronising all of them; on the 2-core machine this
    served more images per second at every load and cut single-image latency
    (benchmarks/results/serve.md). Too late (TensorFlow already started) is logged and ignored.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores_each(workers))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, workers))
    except RuntimeError:
        log.info("TensorFlow is already running: its thread pools stay as they are")


class TensorFlowEngine:
    name = "tensorflow"

    def __init__(self, bundle: Bundle, flip: bool, workers: int = 1):
        import_tensorflow()
        if workers > 1:  # one caller keeps TensorFlow's own defaults
            share_cores(workers)
        import tensorflow as tf

        model = bundle.load_keras_model()
        height, width = bundle.preprocess.input_size

        @tf.function(
            input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8)],
            reduce_retracing=True,
        )
        def forward(images):
            x = tf.cast(images, tf.float32)
            probs = model(x, training=False)
            if flip:  # mirror and average, in the same traced call
                probs = (probs + model(tf.reverse(x, axis=[2]), training=False)) / 2.0
            return tf.cast(probs, tf.float32)

        self._forward = forward

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()
