"""One function per architecture, each returning a Keras model. No training logic.

Every model takes RGB pixel values in 0..255 (any float or uint8-valued tensor) and returns
class probabilities; normalisation is the model's first layer, so serving cannot skew from
training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
from keras import layers

from imagerec.pretrained import BACKBONES

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet-small", *BACKBONES)
SHORTCUTS = ("identity-init", "add", "none")  # resnet_small's ways across a conv group


def build_model(
    arch: str,
    num_classes: int,
    input_size: tuple[int, int],
    mean: list[float],
    std: list[float],
    **kwargs,
) -> keras.Model:
    if arch == "resnet-small":
        return resnet_small(num_classes, input_size, mean, std, **kwargs)
    if arch in BACKBONES:
        return transfer_model(arch, num_classes, input_size, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' batch norm whose training step is TensorFlow's fused kernel.

    The same statistics, moving averages and gradients, in one operation instead of Keras'
    moments, casts and arithmetic: a training step here takes 35% less
    (benchmarks/results/profile_train.md). Inference is Keras' own code. Training uses it; a
    bundle holds the plain layer, with the same weights, so loading needs no custom class.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        fusable = len(inputs.shape) == 4 and self.axis in (3, -1) and mask is None
        if not training or not fusable or keras.backend.backend() != "tensorflow":
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones((channels,), "float32")
        offset = self.beta if self.center else tf.zeros((channels,), "float32")
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=tf.cast(scale, "float32"),
            offset=tf.cast(offset, "float32"),
            mean=tf.zeros((channels,)),  # unused in training mode
            variance=tf.ones((channels,)),
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,  # return this batch's statistics
            data_format="NHWC",
            is_training=True,
        )
        # The kernel returns the unbiased variance; Keras averages the biased one.
        count = tf.cast(tf.size(inputs) // channels, "float32")
        variance = variance * (count - 1) / count
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + variance * (1 - momentum))
        return outputs


def _conv_group(
    x, width: int, name: str, activation: str, norm=layers.BatchNormalization, add=False
):
    # airbench's group: conv, pool, norm, act, conv, norm, act. Pooling before the norm
    # halves the normalisation work at no cost in accuracy.
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = norm(momentum=0.6, epsilon=1e-5, scale=False, name=f"{name}_bn1")(x)
    x = layers.Activation(activation, name=f"{name}_act1")(x)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    y = norm(momentum=0.6, epsilon=1e-5, scale=False, name=f"{name}_bn2")(y)
    y = layers.Activation(activation, name=f"{name}_act2")(y)
    return layers.Add(name=f"{name}_residual")([x, y]) if add else y


def identity_init(model: keras.Model) -> None:
    """Start each group conv as an identity on its input channels (airbench94's dirac init).

    The first min(in, out) filters of every 3x3 conv in the groups pass their own input channel
    through (a 1 at the centre tap, zeros elsewhere); the remaining filters keep their random
    initialisation. The network starts close to a residual one without the adds.
    """
    for layer in model.layers:
        if layer.name.startswith("group") and "_conv" in layer.name:
            kernel = np.array(layer.kernel.numpy())
            size, _, channels_in, channels_out = kernel.shape
            n = min(channels_in, channels_out)
            kernel[:, :, :, :n] = 0
            kernel[size // 2, size // 2, np.arange(n), np.arange(n)] = 1
            layer.kernel.assign(kernel)


def resnet_small(
    num_classes: int,
    input_size: tuple[int, int] = (32, 32),
    mean: list[float] | None = None,
    std: list[float] | None = None,
    widths: tuple[int, ...] = (64, 256, 256),
    whiten_width: int = 24,
    activation: str = "relu",
    fused_norm: bool = False,
    shortcut: str = "identity-init",
) -> keras.Model:
    """A fast CNN for small images, after airbench94 and Page's ResNet-9.

    A frozen 2x2 patch-whitening convolution (airbench; set by `init_whitening`), three conv
    groups with max-pool and batch norm, then global max-pooling and a linear classifier.
    `fused_norm`: train with FusedBatchNormalization. `shortcut`: how a group carries its
    input forward: "identity-init" (airbench94: each conv starts as an identity, see
    `identity_init`; over Page's adds, 3 seeds with flip TTA: +0.8 points at 10 epochs,
    benchmarks/results/ablate_cifar10_seeds.md, and +0.4 at 30), "add" (Page's ResNet-9: a
    residual add per group) or "none".
    """
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; choose from {', '.join(SHORTCUTS)}")
    mean = mean or [127.5] * 3
    std = std or [64.0] * 3
    inputs = keras.Input((*input_size, 3), name="pixels")
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalize")(inputs)
    x = layers.Conv2D(
        whiten_width, 2, padding="valid", use_bias=False, trainable=False, name="whiten"
    )(x)
    x = layers.Activation(activation, name="whiten_act")(x)
    norm = FusedBatchNormalization if fused_norm else layers.BatchNormalization
    for index, width in enumerate(widths):
        x = _conv_group(x, width, f"group{index + 1}", activation, norm, shortcut == "add")
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, name="logits")(x)
    x = layers.Rescaling(0.125, name="logit_scale")(x)  # Page's ResNet-9: tames early steps
    # Softmax in float32 so that mixed-precision training keeps probabilities exact.
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="resnet_small")
    if shortcut == "identity-init":
        identity_init(model)
    return model


def whitening_kernel(images: np.ndarray, mean, std, eps: float = 5e-4) -> np.ndarray:
    """A (2, 2, 3, 2*12) kernel that whitens 2x2 patches of normalised images (airbench94).

    Eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and their negatives, so
    that a ReLU after it keeps all of the information.
    """
    x = (images.astype(np.float32) - np.float32(mean)) / np.float32(std)
    patches = (
        np.concatenate(
            [
                x[:, i : i + 2, j : j + 2, :][:, None]
                for i in range(0, x.shape[1] - 1, 2)
                for j in range(0, x.shape[2] - 1, 2)
            ],
            axis=1,
        )
        .reshape(-1, 12)
        .astype(np.float64)
    )
    patches -= patches.mean(axis=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors.T / np.sqrt(eigenvalues + eps)[:, None]  # (12 filters, 12 inputs)
    filters = np.concatenate([filters, -filters])  # (24, 12)
    return filters.T.reshape(2, 2, 3, -1).astype(np.float32)


def init_whitening(model: keras.Model, images: np.ndarray, mean, std) -> None:
    """Set the whitening layer from a sample of training images (uint8 RGB)."""
    layer = model.get_layer("whiten")
    kernel = whitening_kernel(images, mean, std)
    if kernel.shape != tuple(layer.kernel.shape):
        raise ValueError(f"whitening kernel {kernel.shape} does not fit {layer.kernel.shape}")
    layer.kernel.assign(kernel)


def _backbone(arch: str, input_size: tuple[int, int], include_top: bool, weights) -> keras.Model:
    spec = BACKBONES[arch]
    options = {"include_preprocessing": True} if spec.preprocessing_inside else {}
    model = getattr(keras.applications, spec.constructor)(
        input_shape=(*input_size, 3),
        include_top=include_top,
        weights=None if weights is None else str(weights),
        **options,
    )
    # Renamed, not passed as name=: EfficientNetV2 looks its blocks up by its name.
    model.name = "backbone"
    return model


def _scaled_input(arch: str, input_size: tuple[int, int]):
    """The pixels input and, for a backbone without its scaling inside, that scaling."""
    inputs = keras.Input((*input_size, 3), name="pixels")
    if BACKBONES[arch].preprocessing_inside:
        return inputs, inputs
    # MobileNetV2's range, which keras.applications.mobilenet_v2.preprocess_input applies.
    return inputs, layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")(inputs)


def transfer_model(
    arch: str,
    num_classes: int,
    input_size: tuple[int, int] = (224, 224),
    weights: str | Path | None = None,
    dropout: float = 0.2,
) -> keras.Model:
    """An ImageNet backbone from keras.applications under a new classifier head, as in Keras'
    transfer-learning guide: pooled features, dropout, one dense layer.

    The backbone is the layer named "backbone" and is always called in inference mode, so its
    batch norm keeps ImageNet's statistics even when unfrozen (the guide's advice for small
    datasets). `weights`: a file in Keras' layout for the backbone without its top (see
    imagerec.pretrained), or None for random initialisation.
    """
    inputs, x = _scaled_input(arch, input_size)
    base = _backbone(arch, input_size, include_top=False, weights=weights)
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=arch.replace("-", "_"))


def imagenet_classifier(arch: str, weights: str | Path | None) -> keras.Model:
    """Keras' 1000-class ImageNet model for `arch` at its default size, taking RGB 0..255."""
    size = BACKBONES[arch].default_size
    inputs, x = _scaled_input(arch, (size, size))
    outputs = _backbone(arch, (size, size), include_top=True, weights=weights)(x)
    return keras.Model(inputs, outputs, name=f"{arch.replace('-', '_')}_imagenet")


def unfreeze_top(base: keras.Model, count: int) -> int:
    """Make the top `count` layers of `base` trainable, batch norm excepted (Keras' EfficientNet
    fine-tuning example); the rest stay frozen. Returns how many layers became trainable."""
    base.trainable = True
    cut = max(0, len(base.layers) - count)
    opened = 0
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)
        opened += bool(layer.trainable and layer.weights)
    return opened
