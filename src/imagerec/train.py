"""The training recipe: augmentation, schedule, callbacks, checkpoints. Writes a bundle.

Every hyperparameter lives in TrainConfig with its unit and its reason. The default recipe is
for 32x32 images (CIFAR-10); figures for it are in benchmarks/results/train_cifar10.md.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imagerec.bundle import Preprocess, write_bundle
from imagerec.config import Settings
from imagerec.errors import DatasetError, ImagerecError
from imagerec.pretrained import BACKBONES, WEIGHTS_CHOICES, Weights, resolve_weights

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    arch: str = "resnet-small"
    widths: tuple[int, ...] = (64, 256, 256)  # resnet-small's conv groups, 2x2 pooled each
    epochs: int = 30  # accuracy against epochs: benchmarks/results/train_cifar10.md
    batch_size: int = 1024  # images per step (airbench94)
    val_split: float = 0.1  # fraction held out, stratified; 0 trains on everything
    seed: int = 0  # weights, augmentation and shuffling
    split_seed: int = 0  # which images are held out: fixed, so runs of any seed compare
    image_size: int | None = None  # square side; None: 32 for resnet-small, else the backbone's
    tta: str = "flip"  # test-time augmentation stored in the bundle: mirror and average
    export_onnx: bool = True  # add model.onnx and model-int8.onnx, scored (imagerec.export)
    # Rates in airbench94's decoupled form, per 1024 images and independent of the momentum;
    # sgd_rates() turns them into the optimizer's.
    lr: float = 11.5  # peak learning rate (airbench94)
    weight_decay: float = 0.0153  # weight decay, independent of the learning rate (airbench94)
    momentum: float = 0.85  # Nesterov momentum (airbench94)
    bias_lr_scale: float = 64.0  # batch-norm biases learn this much faster (airbench94)
    warmup: float = 0.23  # fraction of steps to the peak rate, from 0.2x to 1x, then to 0.07x
    lookahead: bool = True  # airbench94's lookahead (resnet-small): average late weights
    label_smoothing: float = 0.2  # airbench94 and Page's later versions
    translate: int = 2  # pixels of random translation with reflection padding (airbench94)
    cutout: int = 0  # side of a random square set to the mean colour (airbench96); 0: off
    precision: str = "auto"  # "auto": bfloat16 compute where the CPU has it (AMX/AVX512-BF16)
    # Transfer learning on the keras.applications backbones (imagerec.pretrained), after Keras'
    # transfer-learning guide (keras.io/guides/transfer_learning): a new head trained on the
    # frozen backbone, then the top of the backbone fine-tuned at a low rate. Its other
    # defaults differ from the CIFAR recipe's: TRANSFER_DEFAULTS, applied by for_arch().
    weights: str | None = None  # imagenet (fetched once), none, or a weight file; None: imagenet
    head_share: float = 0.5  # of the epochs, this share trains the head alone; the rest fine-tune
    head_lr: float = 1e-3  # Adam on the new head (the guide: Adam's default rate)
    fine_tune_lr: float = 1e-5  # Adam once unfrozen (the guide): moves pretrained features a little
    # Backbone layers unfrozen for fine-tuning, counted from its output, batch norm excepted
    # (Keras' EfficientNet fine-tuning example): few photos cannot retrain the early filters.
    fine_tune_layers: int = 20
    scratch_lr: float = 1e-3  # --weights none: Adam on every layer from the start
    dropout: float = 0.2  # before the new head (the guide)
    # Random resized crop (Inception's augmentation, torchvision's RandomResizedCrop): keep this
    # share of the image's area at least, aspect ratio within 3/4..4/3. Above the usual 0.08:
    # the photos are already framed and a few hundred of them cannot afford much missing.
    crop_scale: float = 0.35
    jitter: float = 0.1  # colour: brightness, contrast and saturation each within +-10%

    @classmethod
    def for_arch(cls, arch: str | None = None, **overrides) -> TrainConfig:
        """The recipe for `arch`: these defaults, TRANSFER_DEFAULTS for a backbone, then the
        overrides that are not None."""
        arch = arch or cls.arch
        values = dict(TRANSFER_DEFAULTS) if arch in BACKBONES else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(arch=arch, **values)

    def resolved_image_size(self) -> tuple[int, int]:
        default = BACKBONES[self.arch].default_size if self.arch in BACKBONES else 32
        side = self.image_size or default
        return side, side

    def resolved_weights(self) -> str | None:
        if self.arch not in BACKBONES:
            return None
        return self.weights or "imagenet"


# The backbones' recipe where it differs from the CIFAR one above (TrainConfig.for_arch).
TRANSFER_DEFAULTS = {
    # 5 epochs on the head, 5 fine-tuning: a head over pretrained features converges in a few
    # passes over a few hundred photos; the low fine-tuning rate needs a few more to matter.
    "epochs": 10,
    "batch_size": 32,  # Keras' own default: a few hundred photos still give many steps an epoch
    "label_smoothing": 0.1,  # Inception v3's value, the usual one for ImageNet backbones
    "translate": 0,  # the random resized crop moves the image instead
    "weights": "imagenet",
}


@dataclass
class TrainResult:
    path: Path
    metrics: dict


def train(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    cache_dir: Path | None = None,
    settings: Settings | None = None,
    weights: Weights | None = None,
) -> TrainResult:
    """Train on `data` ('cifar10' or a path) and write a verified bundle to `out`.

    A backbone's pretrained weights (`weights`, else `starting_weights`) are fetched or found
    in the cache first, before any data is read or anything written."""
    from imagerec import data as datasets

    config = config or TrainConfig()
    out = Path(out)
    if weights is None:
        weights = starting_weights(config, settings or Settings.from_env())
    size = config.resolved_image_size()
    _check_out(out)
    train_set, val_set = datasets.load_dataset(data, size, cache_dir=cache_dir)
    if val_set is None and config.val_split > 0:
        train_set, val_set = datasets.stratified_split(
            train_set, config.val_split, config.split_seed
        )
    if len(train_set) < config.batch_size:
        log.info("only %d training images: batch size lowered to match", len(train_set))
        config.batch_size = max(1, len(train_set))
    return _fit(train_set, val_set, out, config, size, str(data), weights)


def starting_weights(config: TrainConfig, settings: Settings) -> Weights | None:
    """Check `config`, then find its backbone's starting weights: downloaded once, or from the
    cache. None for resnet-small. The command line calls this before importing TensorFlow, so
    that a machine without the weights fails in a second or two."""
    _check_config(config)
    if config.arch not in BACKBONES:
        return None
    size = config.resolved_image_size()
    return resolve_weights(
        config.arch,
        config.resolved_weights(),
        size[0],
        settings.weights_url,
        settings.download_timeout_s,
    )


def _check_out(out: Path) -> None:
    """Fail before training, not after it: the output must be writable and not clobber data."""
    if out.exists() and not out.is_dir():
        raise ImagerecError(f"--out {out} exists and is not a folder", code="bad_output")
    if out.is_dir() and any(out.iterdir()) and not (out / "MANIFEST.sha256").exists():
        raise ImagerecError(
            f"--out {out} is a non-empty folder that is not a model bundle; refusing to replace it",
            code="bad_output",
        )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImagerecError(f"cannot create {parent}: {exc.strerror}", code="bad_output") from None
    if not os.access(parent, os.W_OK):
        raise ImagerecError(f"cannot write to {parent}: permission denied", code="bad_output")


def _check_config(config: TrainConfig) -> None:
    architectures = ("resnet-small", *BACKBONES)  # models.ARCHITECTURES, without Keras' import
    if config.arch not in architectures:
        raise ImagerecError(f"--arch must be one of {', '.join(architectures)}", code="usage")
    if config.epochs < 1 or config.batch_size < 1:
        raise ImagerecError("--epochs and --batch-size must be at least 1", code="usage")
    if not 0 <= config.val_split < 1:
        raise ImagerecError("--val-split must be in [0, 1)", code="usage")
    if config.image_size is not None and config.image_size < 8:
        raise ImagerecError("--image-size must be at least 8", code="usage")
    if config.arch in BACKBONES:
        if config.image_size is not None and config.image_size < 32:
            raise ImagerecError(f"--image-size must be at least 32 for {config.arch}", code="usage")
        if not 0 < config.head_share <= 1 or config.fine_tune_layers < 0:
            raise ImagerecError("head_share must be in (0, 1], fine_tune_layers >= 0", code="usage")
    elif config.weights is not None:
        raise ImagerecError(
            f"--weights ({WEIGHTS_CHOICES}) is for the pretrained backbones "
            f"({', '.join(BACKBONES)}), not {config.arch}",
            code="usage",
        )
    if config.arch == "resnet-small":
        if not config.widths or min(config.widths) < 1:
            raise ImagerecError("--widths needs one or more positive widths", code="usage")
        side = min(config.resolved_image_size()) - 1  # after the 2x2 whitening
        for _ in config.widths:
            side //= 2
        if side < 1:
            raise ImagerecError(
                f"--widths: each conv group halves the image, and {len(config.widths)} groups "
                f"do not fit {min(config.resolved_image_size())} pixels",
                code="usage",
            )


def use_bfloat16(precision: str) -> bool:
    if precision in ("bfloat16", "float32"):
        return precision == "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # bf16 without AMX or AVX512-BF16 is emulated and slower than float32.
    return "amx_bf16" in flags or "avx512_bf16" in flags


@contextlib.contextmanager
def _dtype_policy(name: str):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class WarmupLinearDecay:
    """Learning rate: linear from `start` x peak to `peak` over `warmup_steps`, then linear to
    `end` x peak at `total_steps` (airbench94's triangle; Page's ResNet-9 has start = end = 0).
    """

    def __init__(
        self,
        peak: float,
        warmup_steps: int,
        total_steps: int,
        start: float = 0.0,
        end: float = 0.0,
    ):
        self.peak = float(peak)
        self.warmup_steps = max(1, int(warmup_steps))
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        import keras.ops as ops

        step = ops.cast(step, "float32")
        up = self.start + (1 - self.start) * step / self.warmup_steps
        down = self.end + (1 - self.end) * (self.total_steps - step) / (
            self.total_steps - self.warmup_steps
        )
        return self.peak * ops.clip(ops.minimum(up, down), min(self.start, self.end), 1.0)


def sgd_rates(config: TrainConfig) -> tuple[float, float]:
    """(peak learning rate of the mean loss, weight decay per step) from airbench94's form.

    With Nesterov momentum m a steady gradient moves the weights 1 + 1/(1 - m) times each step,
    so airbench94 divides both rates by that (and states them per 1024 images): momentum and
    batch size can then change without retuning the rates.
    """
    scale = config.batch_size / (1024 * (1 + 1 / (1 - config.momentum)))
    return config.lr * scale, config.weight_decay * scale


def nesterov_sgd(schedule, peak_lr: float, decay: float, momentum: float, bias_lr_scale: float):
    """Nesterov SGD with airbench94's weight decay and a faster rate for batch-norm biases.

    The decay is coupled (added to the gradient, so momentum carries it) and divided by the peak
    rate, so that each step removes decay x schedule of every weight whatever the rate; biases
    get `bias_lr_scale` times the rate but the same decay.
    """
    import keras
    import keras.ops as ops

    class NesterovSGD(keras.optimizers.SGD):
        def build(self, variables):
            super().build(variables)
            # By index: update_step may see the backend's variable, not the Keras one.
            self.norm_biases = {self._get_variable_index(v) for v in variables if _is_norm_bias(v)}

        def update_step(self, gradient, variable, learning_rate):
            biases = self._get_variable_index(variable) in self.norm_biases
            scale = bias_lr_scale if biases else 1.0
            gradient = ops.cast(gradient, variable.dtype)
            gradient = gradient + (decay / (peak_lr * scale)) * variable
            super().update_step(gradient, variable, ops.multiply(learning_rate, scale))

    return NesterovSGD(learning_rate=schedule, momentum=momentum, nesterov=True)


def _is_norm_bias(variable) -> bool:
    return variable.path.endswith("/beta")


def lookahead_decay(step: int, total_steps: int, base: float = 0.95**5, power: float = 3.0):
    """How much of the slow weights to keep at `step`: grows from 0 to `base` (airbench94)."""
    return base * (step / max(1, total_steps)) ** power


def lookahead_update(slow: list[np.ndarray], fast: list[np.ndarray], decay: float):
    """The new slow weights, decay x slow + (1 - decay) x fast; the model is then set to them."""
    return [s * decay + f * (1 - decay) for s, f in zip(slow, fast, strict=True)]


def _lookahead(total_steps: int, start_step: int, every: int = 5):
    """airbench94's lookahead: every `every` steps from `start_step`, move a slow copy of all the
    weights (batch-norm statistics included) toward the model and set the model to it; at each
    epoch's end the model is set to the slow copy, so checkpoints hold it and a resumed run
    continues exactly.
    """
    import keras

    class Lookahead(keras.callbacks.Callback):
        slow = None

        def _step(self) -> int:
            return int(self.model.optimizer.iterations.numpy())

        def on_epoch_begin(self, epoch, logs=None):
            if self.slow is None and self._step() >= start_step:  # resumed past the start
                self.slow = self.model.get_weights()

        def on_train_batch_end(self, batch, logs=None):
            step = self._step()
            if step < start_step or step % every:
                return
            if self.slow is None:
                self.slow = self.model.get_weights()
                return
            decay = lookahead_decay(step, total_steps)
            self.slow = lookahead_update(self.slow, self.model.get_weights(), decay)
            self.model.set_weights(self.slow)

        def on_epoch_end(self, epoch, logs=None):
            if self.slow is not None:
                self.model.set_weights(self.slow)

    return Lookahead()


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    translate: int,
    flip: np.ndarray | None = None,
    cutout: int = 0,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """Horizontal flip (random, or where the `flip` mask says), random translation with
    reflection padding and, with `cutout`, a random square set to `fill`, of uint8 images."""
    if flip is None:
        flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = out[flip, :, ::-1]
    height, width = images.shape[1:3]
    if translate:
        t = translate
        padded = np.pad(out, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")
        dy = rng.integers(0, 2 * t + 1, len(images))
        dx = rng.integers(0, 2 * t + 1, len(images))
        for oy in range(2 * t + 1):  # one vectorised slice per offset, not per image
            for ox in range(2 * t + 1):
                pick = (dy == oy) & (dx == ox)
                if pick.any():
                    out[pick] = padded[pick, oy : oy + height, ox : ox + width]
    if cutout:
        top = rng.integers(0, height - cutout + 1, len(images))[:, None]
        left = rng.integers(0, width - cutout + 1, len(images))[:, None]
        rows = (np.arange(height) >= top) & (np.arange(height) < top + cutout)
        cols = (np.arange(width) >= left) & (np.arange(width) < left + cutout)
        square = rows[:, :, None] & cols[:, None, :]
        out[square] = 0 if fill is None else fill
    return out


def alternating_flips(count: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
    """Which images to mirror in `epoch`: a random half in even epochs, the other half in odd
    ones, so every image is seen both ways every two epochs (airbench94's alternating flip).
    `rng` must be seeded the same way for every epoch; it draws the one random mask."""
    return (rng.random(count) < 0.5) ^ bool(epoch % 2)


def augmented_batches(x: np.ndarray, y: np.ndarray, config: TrainConfig, num_classes: int):
    """Shuffled, augmented batches for every epoch in one endless generator; augmentation
    stays on uint8 arrays. Each epoch has ceil(len(x) / batch_size) batches, the last one short.
    """
    fill = np.round(x[:5000].reshape(-1, x.shape[-1]).mean(axis=0)).astype(np.uint8)
    eye = np.eye(num_classes, dtype=np.float32)
    rng = np.random.default_rng(config.seed)
    size = config.batch_size
    for epoch in itertools.count():
        order = rng.permutation(len(x))
        flips = alternating_flips(len(x), epoch, np.random.default_rng(config.seed))
        for start in range(0, len(x), size):
            pick = np.sort(order[start : start + size])
            images = augment_batch(x[pick], rng, config.translate, flips[pick], config.cutout, fill)
            yield images.astype(np.float32), eye[y[pick]]


def batch_dataset(x: np.ndarray, y: np.ndarray, config: TrainConfig, num_classes: int):
    """augmented_batches as a tf.data pipeline that prepares the next batches during a step.

    fit() reads it with steps_per_epoch, so one iterator serves the whole run. Keras' own
    PyDataset path makes a new iterator every epoch, and dropping the old one stalled a
    quarter of the epochs here for about 40 s with both cores idle (py-spy: the main thread
    waiting in the iterator's destructor).
    """
    import tensorflow as tf

    signature = (
        tf.TensorSpec((None, *x.shape[1:]), tf.float32),
        tf.TensorSpec((None, num_classes), tf.float32),
    )
    return tf.data.Dataset.from_generator(
        lambda: augmented_batches(x, y, config, num_classes), output_signature=signature
    ).prefetch(2)


def _stream_batches(stream, config: TrainConfig, num_classes: int):
    """Training batches from a folder too large for memory, augmented in the tf.data graph."""
    import keras
    import tensorflow as tf

    height, width = stream.image_size
    flip = keras.layers.RandomFlip("horizontal", seed=config.seed)
    shift = keras.layers.RandomTranslation(
        config.translate / height, config.translate / width, fill_mode="reflect", seed=config.seed
    )

    def prepare(images, labels):
        images = shift(flip(tf.cast(images, tf.float32)))
        return images, tf.one_hot(labels, num_classes)

    dataset = stream.to_tf_dataset(config.batch_size, shuffle=True, seed=config.seed)
    return dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _fit_from_scratch(
    train_set, validation, config, size, sample, mean, std, backup, steps_per_epoch, precision,
    verbose,
):  # fmt: skip
    """resnet-small's recipe: one fit, SGD with airbench94's schedule and lookahead."""
    import keras

    from imagerec import data as datasets

    streaming = isinstance(train_set, datasets.StreamingImageSet)
    num_classes = len(train_set.class_names)
    total_steps = steps_per_epoch * config.epochs
    with _dtype_policy(precision):
        model = compiled_model(config, num_classes, size, sample, mean, std, total_steps)
    callbacks = [_EpochTimer()]
    if config.lookahead and config.arch == "resnet-small":  # measured with its SGD recipe only
        # Before the checkpoint callback, so that the checkpoint holds the slow weights.
        callbacks.append(_lookahead(total_steps, start_step=int(0.3 * total_steps)))
    callbacks += [
        keras.callbacks.CSVLogger(str(backup / "history.csv"), append=True),
        checkpoints(backup / "checkpoint"),
    ]
    if streaming:
        batches = _stream_batches(train_set, config, num_classes)
    else:
        batches = batch_dataset(train_set.x, train_set.y, config, num_classes)
    history = model.fit(
        batches,
        epochs=config.epochs,
        steps_per_epoch=None if streaming else steps_per_epoch,
        validation_data=validation,
        callbacks=callbacks,
        shuffle=False,  # the batches come shuffled; Keras warns that it cannot shuffle a dataset
        verbose=verbose,
    )
    resumed_at = history.epoch[0] if history.epoch else config.epochs
    return model, resumed_at, None


def _fit_backbone(
    model, train_set, validation, config, weights: Weights, backup, steps_per_epoch, verbose
):
    """Keras' transfer-learning recipe: the new head on the frozen backbone, then its top
    `fine_tune_layers` unfrozen at `fine_tune_lr`. From random weights (--weights none) every
    layer trains from the start instead. Each phase keeps its own checkpoint, so a killed run
    resumes in the phase it was in."""
    import keras

    from imagerec import data as datasets
    from imagerec.models import unfreeze_top

    streaming = isinstance(train_set, datasets.StreamingImageSet)
    num_classes = len(train_set.class_names)
    batches = photo_batches(train_set, config, num_classes)
    base = model.get_layer("backbone")
    if weights.path is None:
        plan = [("all layers, random start", 0, config.epochs, config.scratch_lr, None)]
    else:
        head = max(1, round(config.epochs * config.head_share))
        plan = [("head on the frozen backbone", 0, head, config.head_lr, 0)]
        if head < config.epochs:
            plan.append(
                ("top of the backbone unfrozen", head, config.epochs, config.fine_tune_lr,
                 config.fine_tune_layers)
            )  # fmt: skip
    phases, resumed_at = [], None
    for index, (what, first, last, rate, unfrozen) in enumerate(plan):
        if unfrozen is None:
            base.trainable = True
            opened = sum(1 for layer in base.layers if layer.weights)
        elif unfrozen == 0:
            base.trainable = False
            opened = 0
        else:
            opened = unfreeze_top(base, unfrozen)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        log.info("epochs %d-%d: %s, Adam at %g (%d backbone layers with weights train)",
                 first + 1, last, what, rate, opened)  # fmt: skip
        checkpoint = backup / f"checkpoint-phase{index + 1}"
        history = model.fit(
            batches,
            initial_epoch=first,
            epochs=last,
            steps_per_epoch=None if streaming else steps_per_epoch,
            validation_data=validation,
            callbacks=[
                _EpochTimer(),
                keras.callbacks.CSVLogger(str(backup / "history.csv"), append=True),
                checkpoints(checkpoint),
            ],
            shuffle=False,  # photo_batches shuffles
            verbose=verbose,
        )
        if resumed_at is None and history.epoch:
            resumed_at = history.epoch[0]
        phases.append(
            {"epochs": [first + 1, last], "trains": what, "adam_lr": rate,
             "backbone_layers_trained": opened}
        )  # fmt: skip
    return model, resumed_at if resumed_at is not None else config.epochs, phases


def photo_batches(train_set, config: TrainConfig, num_classes: int):
    """Training batches of photos for the backbones: shuffled, then augmented in the tf.data
    graph by `augment_photos` (random resized crop, flip, colour jitter)."""
    import tensorflow as tf

    from imagerec import data as datasets

    height, width = train_set.image_size
    if isinstance(train_set, datasets.StreamingImageSet):
        dataset = train_set.to_tf_dataset(config.batch_size, shuffle=True, seed=config.seed)
    else:
        x, y = train_set.x, train_set.y

        def endless():
            rng = np.random.default_rng(config.seed)
            while True:
                order = rng.permutation(len(x))
                for start in range(0, len(x), config.batch_size):
                    pick = np.sort(order[start : start + config.batch_size])
                    yield x[pick], y[pick]

        signature = (
            tf.TensorSpec((None, height, width, 3), tf.uint8),
            tf.TensorSpec((None,), y.dtype),
        )
        dataset = tf.data.Dataset.from_generator(endless, output_signature=signature)

    def prepare(images, labels):
        images = augment_photos(images, config.crop_scale, config.jitter)
        return images, tf.one_hot(labels, num_classes)

    return dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def augment_photos(images, crop_scale: float, jitter: float):
    """Random resized crop (area share in [crop_scale, 1], aspect ratio in [3/4, 4/3]) back to
    the batch's size, horizontal flip, and brightness, contrast and saturation each scaled
    within 1 +- `jitter`, of a batch of RGB images; returns float32 in 0..255."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    count = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    uniform = tf.random.uniform
    area = uniform([count], crop_scale, 1.0)
    log_ratio = uniform([count], np.log(3 / 4), np.log(4 / 3))
    ratio = tf.exp(log_ratio)
    crop_w = tf.minimum(1.0, tf.sqrt(area * ratio))
    crop_h = tf.minimum(1.0, tf.sqrt(area / ratio))
    top = uniform([count]) * (1.0 - crop_h)
    left = uniform([count]) * (1.0 - crop_w)
    boxes = tf.stack([top, left, top + crop_h, left + crop_w], axis=1)
    images = tf.image.crop_and_resize(images, boxes, tf.range(count), (height, width))
    flip = uniform([count]) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if jitter:

        def factor():
            return uniform([count, 1, 1, 1], 1 - jitter, 1 + jitter)

        images = images * factor()  # brightness
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = mean + (images - mean) * factor()  # contrast
        gray = tf.reduce_mean(images, axis=3, keepdims=True)
        images = gray + (images - gray) * factor()  # saturation
    return tf.clip_by_value(images, 0.0, 255.0)


class _EpochTimer:
    """Adds each epoch's wall time to the logs, so CSVLogger keeps it across resumes."""

    def __new__(cls):
        import keras

        class EpochTimer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                if logs is not None:
                    logs["epoch_time_s"] = time.perf_counter() - self.started

        return EpochTimer()


def _fit(
    train_set, val_set, out: Path, config: TrainConfig, size, data_spec: str, weights=None
) -> TrainResult:
    import keras

    from imagerec import data as datasets
    from imagerec.models import build_model

    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    class_names = list(train_set.class_names)
    num_classes = len(class_names)
    streaming = isinstance(train_set, datasets.StreamingImageSet)
    sample = (
        train_set.sample_arrays(2000, config.seed)
        if streaming
        else train_set.x[np.random.default_rng(config.seed).permutation(len(train_set))[:5000]]
    )
    mean, std = datasets.channel_stats(sample if streaming else train_set.x)
    precision = "mixed_bfloat16" if use_bfloat16(config.precision) else "float32"
    log.info(
        "training %s on %d images (%d classes, %dx%d), validating on %d, %s compute",
        config.arch,
        len(train_set),
        num_classes,
        *size,
        len(val_set) if val_set else 0,
        precision,
    )

    steps_per_epoch = int(np.ceil(len(train_set) / config.batch_size))
    backup = out.parent / f".{out.name}.backup"
    with _checkpoint_writes(backup):
        backup = _backup_dir(out, config, train_set.fingerprint)
    history_csv = backup / "history.csv"
    validation = None
    if val_set is not None and not isinstance(val_set, datasets.StreamingImageSet):
        validation = (val_set.x.astype(np.float32), np.eye(num_classes)[val_set.y])
    verbose = 1 if sys.stderr.isatty() else 2
    if config.arch in BACKBONES:
        try:
            with _dtype_policy(precision):
                model = build_model(
                    config.arch, num_classes, size, mean, std, weights=weights.path,
                    dropout=config.dropout,
                )  # fmt: skip
        except ValueError as exc:  # Keras' loader: a file of other layers or shapes
            raise ImagerecError(
                f"--weights {weights.path} does not fit {config.arch} without its top: {exc}",
                code="usage",
            ) from None
        with _checkpoint_writes(backup):
            fit = _fit_backbone(
                model, train_set, validation, config, weights, backup, steps_per_epoch, verbose
            )
    else:
        with _checkpoint_writes(backup):
            fit = _fit_from_scratch(
                train_set, validation, config, size, sample, mean, std, backup, steps_per_epoch,
                precision, verbose,
            )  # fmt: skip
    model, resumed_at, phases = fit
    if resumed_at:
        log.info("resumed from the checkpoint after epoch %d", resumed_at)

    # Serve in float32: portable to CPUs without bfloat16 and exact; weights are float32 anyway.
    with _dtype_policy("float32"):
        final = build_model(config.arch, num_classes, size, mean, std, **_arch_options(config))
    final.set_weights(model.get_weights())
    wall_time = time.perf_counter() - started
    epochs_log = _read_history(history_csv)
    metrics = _metrics(final, val_set, class_names, config, epochs_log, wall_time, resumed_at)
    if weights is not None:
        metrics["backbone"] = {
            "name": config.arch,
            "keras_application": BACKBONES[config.arch].constructor,
            "input_size": list(size),
            "weights": weights.record,
            "phases": phases,
        }
    if val_set is None and not streaming:
        # Nothing held out (--val-split 0, the final run): describe the fit on training images,
        # under their own keys so that no one reads them as validation accuracy.
        metrics.update(_training_fit(final, train_set, class_names, config))
    metrics["data"] = {
        "spec": data_spec,
        "fingerprint": train_set.fingerprint,
        "train_count": len(train_set),
    }
    artifacts = {"training.png": _curves(epochs_log, config)}
    if "confusion" in metrics:
        from imagerec.plots import confusion_png

        matrix = np.array(metrics.pop("confusion"))
        if metrics["val_count"]:
            title = f"validation, {metrics['val_count']} images, tta {config.tta}"
        else:
            count = metrics["train_eval_count"]
            title = f"{count} training images (seen in training), tta {config.tta}"
        artifacts["confusion.png"] = confusion_png(matrix, class_names, title)
        metrics["confusion_matrix"] = matrix.tolist()
    preprocess = Preprocess(input_size=size, mean=mean, std=std, tta=config.tta)
    path = write_bundle(out, final, class_names, preprocess, metrics, artifacts)
    if config.export_onnx:
        metrics["engines"] = _export_engines(path, train_set, val_set, config)
    shutil.rmtree(backup, ignore_errors=True)  # the run is complete: nothing left to resume
    return TrainResult(path, metrics)


def _export_engines(path: Path, train_set, val_set, config: TrainConfig) -> dict:
    """The ONNX engines, calibrated on training images and scored on the validation split (on
    training images when none was held out, recorded as such)."""
    from imagerec import data as datasets
    from imagerec.export import CALIBRATION_IMAGES, Evaluation, export_bundle

    if isinstance(train_set, datasets.StreamingImageSet):
        calibration = train_set.sample_arrays(CALIBRATION_IMAGES, config.seed)
    else:
        pick = np.random.default_rng(config.seed).permutation(len(train_set))
        calibration = train_set.x[pick[:CALIBRATION_IMAGES]]
    evaluation = None
    if isinstance(val_set, datasets.ImageSet):
        evaluation = Evaluation(val_set.x, val_set.y, "the validation split", False)
    elif val_set is None and isinstance(train_set, datasets.ImageSet):
        pick = np.sort(np.random.default_rng(config.seed).permutation(len(train_set))[:10_000])
        source = f"{len(pick)} of the training images (nothing was held out)"
        evaluation = Evaluation(train_set.x[pick], train_set.y[pick], source, True)
    try:
        return export_bundle(path, int8=True, calibration=calibration, evaluation=evaluation)
    except ImagerecError as exc:
        if exc.code != "int8_failed":
            raise
        log.warning("%s; the bundle gets the float32 ONNX engine only", exc.message)
    return export_bundle(path, int8=False, evaluation=evaluation)


def compiled_model(
    config: TrainConfig, num_classes, size, sample, mean, std, total_steps, fused_norm=True
):
    """`config`'s model, whitening set from `sample`, compiled with its optimizer and loss.
    Build it under the dtype policy it will train in. `fused_norm=False` (resnet-small): with
    Keras' own batch norm, for comparison."""
    import keras

    from imagerec.models import build_model, init_whitening

    if config.arch == "resnet-small":
        options = _arch_options(config)
        model = build_model(
            config.arch, num_classes, size, mean, std, fused_norm=fused_norm, **options
        )
        init_whitening(model, sample, mean, std)
    else:
        model = build_model(config.arch, num_classes, size, mean, std)
    peak_lr, decay = sgd_rates(config)
    schedule = WarmupLinearDecay(
        peak_lr, config.warmup * total_steps, total_steps, start=0.2, end=0.07
    )
    optimizer = nesterov_sgd(
        _keras_schedule(schedule), peak_lr, decay, config.momentum, config.bias_lr_scale
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return model


def _arch_options(config: TrainConfig) -> dict:
    if config.arch in BACKBONES:
        return {"dropout": config.dropout}
    return {"widths": tuple(config.widths)} if config.arch == "resnet-small" else {}


def _keras_schedule(schedule: WarmupLinearDecay):
    import keras

    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return schedule(step)

        def get_config(self):
            return {
                "peak": schedule.peak,
                "warmup_steps": schedule.warmup_steps,
                "total_steps": schedule.total_steps,
                "start": schedule.start,
                "end": schedule.end,
            }

    return Schedule()


def checkpoints(folder: Path):
    """Keras' BackupAndRestore, with each checkpoint written whole beside the last one and
    renamed into place: a write that fails half-way (a full disk, a kill) leaves the last whole
    checkpoint, which the next run resumes from, rather than a torn file it cannot read.

    HDF5 writes the checkpoint in memory-backed scratch space (/dev/shm where there is one);
    Python copies it beside the bundle. On a full disk it is then Python's write that fails,
    cleanly: an HDF5 write that fails leaves the library in a state that crashes the process
    when it exits."""
    import keras

    scratch_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

    class WholeBackupAndRestore(keras.callbacks.BackupAndRestore):
        def _save_model(self):
            final = self._weights_path, self._training_metadata_path
            staged = [f"{path}.next" for path in final]
            with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
                self._weights_path = os.path.join(scratch, "latest.weights.h5")
                self._training_metadata_path = os.path.join(scratch, "training_metadata.json")
                try:
                    super()._save_model()
                    written = self._weights_path, self._training_metadata_path
                finally:
                    self._weights_path, self._training_metadata_path = final
                try:
                    for source, target in zip(written, staged, strict=True):
                        shutil.copyfile(source, target)
                except BaseException:
                    for path in staged:
                        with contextlib.suppress(OSError):
                            os.remove(path)  # the room it took, back
                    raise
            # Weights first: a kill between the renames costs at most an epoch trained twice.
            for source, target in zip(staged, final, strict=True):
                os.replace(source, target)

    return WholeBackupAndRestore(str(folder), delete_checkpoint=False)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


@contextlib.contextmanager
def _checkpoint_writes(backup: Path):
    """A checkpoint (or the epoch log beside it) that cannot be written stops training with a
    message that says where and why, and that the same command resumes once there is room."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        raise ImagerecError(
            f"training stopped: its checkpoint in {backup} could not be written "
            f"({os.strerror(exc.errno)}). Make room there and run the same command again: it "
            "resumes from the last checkpoint that was written",
            code="checkpoint_not_written",
        ) from None


def _backup_dir(out: Path, config: TrainConfig, fingerprint: str) -> Path:
    """Where BackupAndRestore keeps its checkpoint: beside the bundle, keyed by the run."""
    key = hashlib.sha256(
        json.dumps({"config": asdict(config), "data": fingerprint}, sort_keys=True).encode()
    ).hexdigest()[:16]
    backup = out.parent / f".{out.name}.backup"
    marker = backup / "run.json"
    if backup.exists():
        try:
            same = json.loads(marker.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if not same:
            log.warning("discarding a checkpoint in %s from a different run", backup)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            log.info("found a checkpoint of this run in %s: resuming", backup)
    backup.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"key": key, "config": asdict(config)}))
    return backup


def _read_history(path: Path) -> dict[str, list[float]]:
    """Per-epoch logs; an epoch logged twice (killed before its checkpoint) keeps its last row."""
    rows: dict[int, dict] = {}
    with contextlib.suppress(OSError), open(path) as handle:
        for row in csv.DictReader(handle):
            rows[int(row.pop("epoch"))] = row
    history: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            if value not in ("", "NA", None):  # CSVLogger writes NA for a missing value
                history.setdefault(key, []).append(float(value))
    return history


def _curves(history: dict[str, list[float]], config: TrainConfig) -> bytes:
    from imagerec.plots import training_curves_png

    return training_curves_png(history, f"{config.arch}, {config.epochs} epochs")


def predict_probabilities(model, images: np.ndarray, tta: str, batch_size: int | None = None):
    """Probabilities over uint8 images with the given TTA, in batches (by default 500 CIFAR
    images' worth of pixels, at least 16 images: photos at 224x224 come 16 at a time)."""
    import tensorflow as tf

    if batch_size is None:
        batch_size = max(16, 500 * 32 * 32 // (images.shape[1] * images.shape[2]))

    @tf.function(reduce_retracing=True)
    def forward(batch):
        batch = tf.cast(batch, tf.float32)
        probs = model(batch, training=False)
        if tta == "flip":
            probs = (probs + model(tf.reverse(batch, axis=[2]), training=False)) / 2
        return probs

    return np.concatenate(
        [forward(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
    )


def _metrics(model, val_set, class_names, config, epochs_log, wall_time, resumed_at) -> dict:
    import cv2
    import keras
    import tensorflow as tf

    metrics = {
        "arch": config.arch,
        "epochs": config.epochs,
        "wall_time_s": round(wall_time, 1),
        "epoch_times_s": [round(t, 1) for t in epochs_log.get("epoch_time_s", [])],
        "resumed_at_epoch": resumed_at,
        "config": asdict(config),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
        "val_accuracy": None,
        "val_accuracy_tta": None,
        "val_count": 0,
    }
    if val_set is None:
        return metrics
    from imagerec import data as datasets

    if isinstance(val_set, datasets.StreamingImageSet):
        raise DatasetError("the validation split is too large for memory; use a smaller val/")
    fit = _accuracy(model, val_set.x, val_set.y, class_names, config.tta)
    metrics.update(
        {
            "val_accuracy": fit["accuracy"],
            "val_accuracy_tta": fit["accuracy_tta"],
            "val_count": len(val_set),
            "per_class_accuracy": fit["per_class"],
            "confusion": fit["confusion"],
        }
    )
    return metrics


def _training_fit(model, train_set, class_names, config, limit: int = 10_000) -> dict:
    """Accuracy on (up to `limit`) training images: how well the model fits what it saw."""
    pick = np.sort(np.random.default_rng(config.seed).permutation(len(train_set))[:limit])
    fit = _accuracy(model, train_set.x[pick], train_set.y[pick], class_names, config.tta)
    return {
        "train_accuracy": fit["accuracy"],
        "train_accuracy_tta": fit["accuracy_tta"],
        "train_eval_count": len(pick),
        "per_class_accuracy": fit["per_class"],
        "confusion": fit["confusion"],
    }


def _accuracy(model, x: np.ndarray, y: np.ndarray, class_names, tta: str) -> dict:
    from imagerec.plots import confusion_matrix

    plain = predict_probabilities(model, x, "none")
    flipped = predict_probabilities(model, x, "flip")
    chosen = flipped if tta == "flip" else plain
    matrix = confusion_matrix(y, chosen.argmax(axis=1), len(class_names))
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    return {
        "accuracy": float((plain.argmax(1) == y).mean()),
        "accuracy_tta": float((flipped.argmax(1) == y).mean()),
        "per_class": {n: round(float(a), 4) for n, a in zip(class_names, per_class, strict=True)},
        "confusion": matrix.tolist(),
    }
