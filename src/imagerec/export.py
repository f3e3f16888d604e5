"""Export a bundle's Keras model to ONNX, float32 and statically quantised int8, into the bundle.

    imagerec export models/cifar10 --format onnx --int8 --data PATH

- model.onnx: the Keras model converted by tf2onnx (opset 17), input `pixels` FP32 [N, H, W, 3]
  with values 0..255 (normalisation is inside, as in model.keras), output the class
  probabilities. Plain ONNX: ONNX Runtime, Triton's onnxruntime backend and OpenVINO load it.
- model-int8.onnx: the same graph quantised by ONNX Runtime's static quantiser in QDQ form:
  int8 weights per output channel, int8 activations whose ranges come from calibration images
  (the 99.999th percentile of each tensor's values over them).
- metrics.json `engines`: for each engine, accuracy on the evaluation images (with the bundle's
  test-time augmentation, through the same engines that serve) and top-1 agreement with the
  float32 TensorFlow model; `imagerec serve`'s `auto` engine reads them.

The bundle is rewritten atomically (bundle.add_to_bundle): a failed export leaves it as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagerec.bundle import Bundle, add_to_bundle
from imagerec.engines import ENGINE_FILES, open_engine
from imagerec.errors import ImagerecError, InvalidInput

log = logging.getLogger(__name__)

OPSET = 17
CALIBRATION_IMAGES = 512  # 2,048 moved neither accuracy nor agreement measurably (README)
CALIBRATION_BATCH = 64
# The percentile calibrator holds every activation of every calibration image at once: 245
# photos at 224x224 through MobileNetV3Large took 12.5 GB. At most this many pixels of images
# then, twice CIFAR's 512 images: all of them at 32x32, 20 photos at 224x224.
CALIBRATION_PIXELS = 2 * CALIBRATION_IMAGES * 32 * 32


@dataclass
class Evaluation:
    """Labelled images to score every engine on, and what they are."""

    x: np.ndarray  # (N, H, W, 3) uint8 at the bundle's input size
    y: np.ndarray  # (N,) class indices in the bundle's label order
    source: str  # e.g. "validation split (10%, seed 0)"
    seen_in_training: bool


def keras_to_onnx(model, input_size: tuple[int, int]) -> bytes:
    """The Keras model as a serialised float32 ONNX model with a dynamic batch dimension."""
    import keras
    import tensorflow as tf
    import tf2onnx

    height, width = input_size
    # Wrapped in a functional model of its own: tf2onnx cannot name a Sequential model's outputs
    # under Keras 3, and this way every export has the same input and output names.
    pixels = keras.Input((height, width, 3), name="pixels")
    wrapper = keras.Model(pixels, keras.layers.Identity(name="probabilities")(model(pixels)))
    spec = (tf.TensorSpec((None, height, width, 3), tf.float32, name="pixels"),)
    proto, _ = tf2onnx.convert.from_keras(wrapper, input_signature=spec, opset=OPSET)
    return proto.SerializeToString()


def whole_batches(calibration: np.ndarray) -> np.ndarray:
    """The calibration images, at most CALIBRATION_PIXELS of them, cut to whole batches: the
    percentile calibrator stacks each tensor's values across batches, which must then be of
    one size."""
    if len(calibration) == 0:
        raise InvalidInput("int8 quantisation needs calibration images; none were given")
    pixels = calibration.shape[1] * calibration.shape[2]
    calibration = calibration[: max(1, CALIBRATION_PIXELS // pixels)]
    batch = min(CALIBRATION_BATCH, len(calibration))
    return calibration[: len(calibration) // batch * batch]


def quantize_int8(float_model: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 quantisation (QDQ, per-channel weights, percentile ranges) of a float model,
    calibrated on `calibration`, (N, H, W, 3) uint8 images in whole batches (whole_batches)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batch = min(CALIBRATION_BATCH, len(calibration))

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = (
                {"pixels": calibration[i : i + batch].astype(np.float32)}
                for i in range(0, len(calibration), batch)
            )

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="imagerec-quantize-") as work:
        source, prepared, target = (Path(work) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        source.write_bytes(float_model)
        # Folds and fuses the graph first, so that quantisation sees conv + bias + relu whole.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        head = _classifier_head(prepared)
        # The percentile calibrator prints its progress to stdout: keep it off the terminal.
        with contextlib.redirect_stdout(io.StringIO()), _calibration_errors():
            quantize_static(
                str(prepared),
                str(target),
                Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                # Weights in 7 bits: CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) sum
                # pairs of 8-bit products into 16 bits, which saturate with full-range weights.
                # The bundled model was right on 45% of 2,000 training images on an AVX2 AMD EPYC
                # (TensorFlow 99.8%); with 7-bit weights, on 99.85%.
                reduce_range=True,
                # Percentile (99.999) clips the rare outliers that min/max spends range on:
                # top-1 agreement 99.1% -> 99.2% on a held-out split (README, "Engines").
                calibrate_method=CalibrationMethod.Percentile,
                # The head stays float32: quantised, the probabilities came out in steps of
                # 1/255 and summed to 0.99-1.002; it is a 256x10 product, nothing to save.
                nodes_to_exclude=head,
            )
        return target.read_bytes()


@contextlib.contextmanager
def _calibration_errors():
    """The calibrator's failure as one clear error: an activation whose range is too narrow
    for its histogram (seen with untrained, near-constant backbones) raises ValueError."""
    try:
        yield
    except ValueError as exc:
        raise ImagerecError(
            f"the int8 quantiser could not calibrate this model: {exc}", code="int8_failed"
        ) from None


def _classifier_head(model_path: Path) -> list[str]:
    """The names of the last MatMul/Gemm node and of every node after it (scale, softmax)."""
    import onnx

    nodes = list(onnx.load(str(model_path)).graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Gemm")), default=None)
    return [] if last is None else [n.name for n in nodes[last:]]


def export_bundle(
    path: str | os.PathLike,
    int8: bool = False,
    calibration: np.ndarray | None = None,
    evaluation: Evaluation | None = None,
    int8_only: bool = False,
) -> dict:
    """Add model.onnx (and with `int8`, model-int8.onnx) to the bundle at `path`, with each
    engine's accuracy on `evaluation` in metrics.json. `int8_only` leaves model.onnx out (it is
    still made, as the quantiser's input). Returns the `engines` record."""
    if (int8 or int8_only) and calibration is None:
        raise InvalidInput("--int8 needs calibration images: give --data with training images")
    int8 = int8 or int8_only
    bundle = Bundle.load(path)
    files = {ENGINE_FILES["onnx"]: keras_to_onnx(bundle.model, bundle.preprocess.input_size)}
    if int8:
        calibration = whole_batches(calibration)
        files[ENGINE_FILES["onnx-int8"]] = quantize_int8(files[ENGINE_FILES["onnx"]], calibration)
    if int8_only:
        del files[ENGINE_FILES["onnx"]]
    record = _score_engines(bundle, files, evaluation, len(calibration) if int8 else 0)
    metrics = dict(bundle.metrics, engines=record)
    add_to_bundle(path, files, metrics)
    return record


def images_for_export(
    bundle: Bundle, spec: str | os.PathLike, cache_dir: Path | None = None
) -> tuple[np.ndarray, Evaluation | None]:
    """Calibration images from the training part of `spec` and labelled evaluation images from
    its validation part, split as the bundle's training split them (its val_split and
    split_seed), so a bundle that held images out is scored on exactly those. A bundle trained
    on everything is scored on a 10% split of its own training images, and says so."""
    from imagerec import data as datasets
    from imagerec.errors import DatasetError

    train, val = datasets.load_dataset(spec, bundle.preprocess.input_size, cache_dir)
    if list(train.class_names) != list(bundle.labels):
        raise DatasetError(
            f"the dataset's classes {list(train.class_names)} differ from the model's labels "
            f"{list(bundle.labels)}"
        )
    config = bundle.metrics.get("config", {})
    val_split, split_seed = float(config.get("val_split", 0.1)), int(config.get("split_seed", 0))
    rng = np.random.default_rng(0)
    if isinstance(train, datasets.StreamingImageSet):
        log.info("%s is too large for memory: calibrating on a sample, not scoring", spec)
        return train.sample_arrays(CALIBRATION_IMAGES, 0), None
    if val is not None:
        fit, source, seen = train, f"the val/ folder of {spec}", False
    else:
        trained_on = bundle.metrics.get("data", {}).get("fingerprint")
        fit, val = datasets.stratified_split(train, val_split or 0.1, split_seed)
        if val_split > 0:
            source, seen = f"validation split ({val_split:g}, seed {split_seed})", False
        elif trained_on == train.fingerprint:
            source = f"a 0.1 split (seed {split_seed}) of the images the model was trained on"
            seen = True
        else:
            source, seen = f"a 0.1 split (seed {split_seed}) of {spec}", False
    if isinstance(val, datasets.StreamingImageSet):
        val = None
    calibration = fit.x[rng.permutation(len(fit))[:CALIBRATION_IMAGES]]
    evaluation = None if val is None else Evaluation(val.x, val.y, source, seen)
    return calibration, evaluation


def _score_engines(
    bundle: Bundle, files: dict[str, bytes], evaluation: Evaluation | None, calibrated_on: int
) -> dict:
    """Each engine's accuracy and top-1 agreement with TensorFlow on the evaluation images."""
    names = ["tensorflow", *(n for n, f in ENGINE_FILES.items() if f in files)]
    record = {name: {"file": ENGINE_FILES.get(name, "model.keras")} for name in names}
    if calibrated_on:
        record["onnx-int8"]["calibration_images"] = calibrated_on
    if evaluation is None:
        log.info("no evaluation images: the engines' accuracy is not recorded")
        return record
    with tempfile.TemporaryDirectory(prefix="imagerec-export-") as work:
        # The engines read their files from a bundle folder: score them from a scratch copy.
        for name, data in files.items():
            (Path(work) / name).write_bytes(data)
        scratch = dataclasses.replace(bundle, path=Path(work))
        top1 = {}
        # 256 CIFAR images' worth of pixels a call: 16 photos at 224x224 keep memory in bounds.
        step = max(16, 256 * 32 * 32 // (evaluation.x.shape[1] * evaluation.x.shape[2]))
        for name in names:
            engine = open_engine(bundle if name == "tensorflow" else scratch, name)
            top1[name] = np.concatenate(
                [
                    engine(evaluation.x[i : i + step]).argmax(1)
                    for i in range(0, len(evaluation.x), step)
                ]
            )
    for name in names:
        record[name].update(
            {
                "accuracy": round(float((top1[name] == evaluation.y).mean()), 5),
                "agreement_with_tensorflow": round(
                    float((top1[name] == top1["tensorflow"]).mean()), 5
                ),
                "evaluated_on": {
                    "images": int(len(evaluation.y)),
                    "source": evaluation.source,
                    "seen_in_training": evaluation.seen_in_training,
                    "tta": bundle.preprocess.tta,
                },
            }
        )
    return record
