"""The architectures and the recipe parts that have logic of their own."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from imagerec.models import (
    FusedBatchNormalization,
    build_model,
    resnet_small,
    transfer_model,
    unfreeze_top,
    whitening_kernel,
)
from imagerec.train import (
    TrainConfig,
    WarmupLinearDecay,
    alternating_flips,
    augment_batch,
    augmented_batches,
    batch_dataset,
    lookahead_decay,
    lookahead_update,
    nesterov_sgd,
    sgd_rates,
    use_bfloat16,
)


def _correlated_images(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random images: neighbouring pixels and channels are strongly correlated."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(count, 8, 8, 1))
    base = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)
    colour = base + 0.3 * rng.normal(size=(count, 32, 32, 3))
    return np.clip(127 + 40 * colour, 0, 255).astype(np.uint8)


def test_whitening_kernel_decorrelates_patches():
    images = _correlated_images(200)
    mean, std = [127.0] * 3, [40.0] * 3
    kernel = whitening_kernel(images, mean, std, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24)
    x = (images.astype(np.float32) - 127.0) / 40.0
    patches = x[:, :2, :2, :].reshape(len(x), -1).astype(np.float64)
    patches = np.concatenate(
        [x[:, i : i + 2, j : j + 2, :].reshape(len(x), -1) for i in (0, 10, 20) for j in (0, 10)]
    ).astype(np.float64)
    patches -= patches.mean(axis=0)
    filters = kernel.reshape(12, 24)[:, :12]  # the positive half
    whitened = patches @ filters
    covariance = whitened.T @ whitened / len(whitened)
    assert np.allclose(covariance, np.eye(12), atol=0.15)
    # The raw patches were far from white: the kernel did the work.
    raw = patches.T @ patches / len(patches)
    assert np.abs(raw - np.diag(np.diag(raw))).max() > 0.5
    assert np.allclose(kernel[..., 12:], -kernel[..., :12])


def test_resnet_small_outputs_probabilities_and_normalises_inside():
    model = resnet_small(10, (32, 32), mean=[120.0, 110.0, 100.0], std=[60.0, 60.0, 60.0])
    assert model.output_shape == (None, 10)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    probs = model(images, training=False).numpy()
    assert probs.shape == (3, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    normalize = model.get_layer("normalize")
    assert np.allclose(normalize.mean.numpy().ravel(), [120.0, 110.0, 100.0])
    assert model.get_layer("whiten").trainable is False


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_trains_exactly_like_keras_batch_norm(dtype):
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(2, 3, (8, 6, 6, 5)).astype(np.float32))
    weights = tf.range(5, dtype=tf.float32)[None, None, None]
    results = []
    for layer_class in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = layer_class(momentum=0.6, epsilon=1e-5, scale=False, dtype=dtype)
        layer.build(x.shape)
        layer.beta.assign(np.arange(5, dtype=np.float32) / 10)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, training=True), tf.float32)
            loss = tf.reduce_sum(y * weights * x)
        grad_x, grad_beta = tape.gradient(loss, [x, layer.beta])
        inference = tf.cast(layer(x, training=False), tf.float32)
        results.append(
            [t.numpy() for t in (y, grad_x, grad_beta, layer.moving_mean, layer.moving_variance)]
            + [inference.numpy()]
        )
    keras_run, fused_run = results
    tolerance = 1e-4 if dtype == "float32" else 2e-2  # bfloat16 keeps 8 bits of mantissa
    for expected, actual in zip(keras_run, fused_run, strict=True):
        assert np.allclose(actual, expected, rtol=tolerance, atol=tolerance)
    # The moving statistics moved: the comparison is not between two untouched layers.
    assert np.abs(keras_run[3]).min() > 0.1


def test_fused_norm_model_has_the_plain_models_weights():
    plain = resnet_small(10)
    fused = resnet_small(10, fused_norm=True)
    assert [w.shape for w in plain.weights] == [w.shape for w in fused.weights]
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in fused.layers) == 6
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain.layers)
    fused.set_weights([np.random.default_rng(0).random(w.shape) for w in fused.weights])
    plain.set_weights(fused.get_weights())
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    assert np.allclose(plain(images, training=False), fused(images, training=False), atol=1e-6)


def test_shortcuts_change_only_the_adds_and_the_initial_kernels():
    models = {name: resnet_small(10, shortcut=name) for name in ("identity-init", "add", "none")}
    shapes = {name: [w.shape for w in m.weights] for name, m in models.items()}
    assert shapes["identity-init"] == shapes["add"] == shapes["none"]
    adds = {
        name: [layer.name for layer in m.layers if isinstance(layer, keras.layers.Add)]
        for name, m in models.items()
    }
    assert adds == {
        "identity-init": [],
        "add": ["group1_residual", "group2_residual", "group3_residual"],
        "none": [],
    }
    with pytest.raises(ValueError, match="unknown shortcut"):
        resnet_small(10, shortcut="dense")


def test_identity_init_passes_each_input_channel_through_its_own_filter():
    model = resnet_small(10)  # the default shortcut is identity-init
    for name, channels_in, channels_out in [
        ("group1_conv1", 24, 64),
        ("group1_conv2", 64, 64),
        ("group2_conv1", 64, 256),
        ("group3_conv2", 256, 256),
    ]:
        kernel = model.get_layer(name).kernel.numpy()
        assert kernel.shape == (3, 3, channels_in, channels_out)
        n = min(channels_in, channels_out)
        identity = np.zeros((3, 3, channels_in, n), np.float32)
        identity[1, 1, np.arange(n), np.arange(n)] = 1
        assert np.array_equal(kernel[..., :n], identity)
        # The filters beyond the identity keep their random start.
        assert kernel[..., n:].size == 0 or np.abs(kernel[..., n:]).mean() > 1e-3
    # Applied as a layer, such a conv returns its input on the identity channels.
    layer = model.get_layer("group2_conv1")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 64)).astype(np.float32)
    assert np.allclose(layer(x).numpy()[..., :64], x, atol=1e-6)
    # Without it the centre taps are Keras' random values, not an identity.
    plain = resnet_small(10, shortcut="add").get_layer("group1_conv2").kernel.numpy()
    assert not np.allclose(plain[1, 1, np.arange(64), np.arange(64)], 1)


def test_build_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg", 10, (32, 32), [0.0] * 3, [1.0] * 3)


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnetv2-b0"])
def test_a_backbone_from_random_weights_takes_pixels_and_gives_probabilities(arch):
    model = transfer_model(arch, 4, (32, 32), weights=None)
    assert model.output_shape == (None, 4)
    probs = model(np.zeros((2, 32, 32, 3), np.float32), training=False).numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert all(layer.trainable for layer in model.layers)
    # Each backbone's own input scaling is inside the model: the bundle feeds 0..255.
    scaling = [layer for layer in model.get_layer("backbone").layers[:3] + model.layers[:3]]
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in scaling)


def test_a_backbone_loads_a_weight_file_and_unfreezes_only_its_top(tmp_path):
    donor = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=None)
    path = tmp_path / "imagenet.weights.h5"
    donor.save_weights(path)
    model = transfer_model("mobilenetv2", 3, (32, 32), weights=path)
    base = model.get_layer("backbone")
    for ours, theirs in zip(base.get_weights(), donor.get_weights(), strict=True):
        assert np.array_equal(ours, theirs)
    opened = unfreeze_top(base, 10)
    trainable = [layer for layer in base.layers if layer.trainable]
    assert 0 < opened <= len(trainable) <= 10
    assert set(trainable) <= set(base.layers[-10:])
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = WarmupLinearDecay(peak=1.0, warmup_steps=10, total_steps=110)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_schedule_can_start_and_end_above_zero():
    schedule = WarmupLinearDecay(peak=2.0, warmup_steps=10, total_steps=110, start=0.2, end=0.1)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 500)]
    assert values == pytest.approx([0.4, 1.2, 2.0, 1.1, 0.2, 0.2])


def test_sgd_rates_follow_airbench94s_decoupled_form():
    # airbench94: lr 11.5 and weight decay 0.0153 per 1024 images, momentum 0.85, batch 1024
    # give PyTorch rates 11.5 / 7850.67 per summed loss, i.e. 1.5 for the mean loss.
    lr, decay = sgd_rates(TrainConfig(batch_size=1024, lr=11.5, weight_decay=0.0153))
    assert lr == pytest.approx(11.5 * 1024 / (1024 * (1 + 1 / 0.15)))
    assert lr == pytest.approx(1.5, abs=1e-3) and decay == pytest.approx(0.0153 * 0.1304, 1e-3)
    half_lr, half_decay = sgd_rates(TrainConfig(batch_size=512, lr=11.5, weight_decay=0.0153))
    assert (half_lr, half_decay) == pytest.approx((lr / 2, decay / 2))


def test_sgd_gives_norm_biases_a_faster_rate_and_the_same_decay():
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")(inputs)
    outputs = keras.layers.BatchNormalization(scale=False, name="bn")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").beta.assign([1.0, -1.0])
    optimizer = nesterov_sgd(0.1, peak_lr=0.1, decay=0.01, momentum=0.0, bias_lr_scale=64.0)
    kernel, beta = (v.numpy().copy() for v in model.trainable_variables)
    optimizer.apply([np.zeros_like(kernel), np.zeros_like(beta)], model.trainable_variables)
    # No gradient: only the decay acts, the same fraction (decay) of every weight.
    assert model.trainable_variables[0].numpy() == pytest.approx(kernel * 0.99)
    assert model.trainable_variables[1].numpy() == pytest.approx(beta * 0.99)
    optimizer.apply([np.ones_like(kernel), np.ones_like(beta)], model.trainable_variables)
    moved = [
        a - b for a, b in zip((kernel * 0.99, beta * 0.99), model.trainable_variables, strict=True)
    ]
    # float32 weights: a step is the difference of two numbers near 1, good to about 1e-7.
    assert moved[0] == pytest.approx(0.1 * (1 + 0.1 * kernel * 0.99), abs=1e-6)
    assert moved[1] == pytest.approx(6.4 * (1 + 0.01 / 6.4 * beta * 0.99), abs=1e-5)


def test_lookahead_decay_grows_from_zero_to_its_base():
    assert lookahead_decay(0, 100) == 0.0
    assert lookahead_decay(50, 100) == pytest.approx(0.95**5 / 8)
    assert lookahead_decay(100, 100) == pytest.approx(0.95**5)


def test_lookahead_update_interpolates_every_weight():
    slow = [np.zeros((2, 2)), np.array([4.0])]
    fast = [np.ones((2, 2)), np.array([0.0])]
    new = lookahead_update(slow, fast, decay=0.75)
    assert np.allclose(new[0], 0.25) and np.allclose(new[1], 3.0)
    assert np.allclose(lookahead_update(slow, fast, 0.0)[0], fast[0])


def test_alternating_flips_mirror_each_image_once_every_two_epochs():
    masks = [alternating_flips(1000, epoch, np.random.default_rng(3)) for epoch in range(4)]
    assert 400 < masks[0].sum() < 600
    assert np.array_equal(masks[1], ~masks[0]) and np.array_equal(masks[2], masks[0])
    assert np.array_equal(masks[3], masks[1])


def test_augmented_batches_cover_every_image_once_per_epoch_mirrored_in_turn():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    config = TrainConfig(batch_size=4, translate=0, seed=5)
    # One class per image, so each one-hot label names the image it came with.
    batches = augmented_batches(x, np.arange(10), config, num_classes=10)
    epochs = []
    for _ in range(3):
        epoch = [next(batches) for _ in range(3)]
        assert [len(images) for images, _ in epoch] == [4, 4, 2]
        images = np.concatenate([images for images, _ in epoch])
        which = np.concatenate([labels for _, labels in epoch]).argmax(axis=1)
        assert sorted(which) == list(range(10))
        epochs.append(images[np.argsort(which)])
    first, second, third = (e.astype(np.uint8) for e in epochs)
    mirrored = x[:, :, ::-1]  # (image, row, column, channel): columns reversed
    flipped = [np.array_equal(first[i], mirrored[i]) for i in range(10)]
    for i in range(10):
        assert np.array_equal(first[i], mirrored[i] if flipped[i] else x[i])
        assert np.array_equal(second[i], x[i] if flipped[i] else mirrored[i])
        assert np.array_equal(third[i], first[i])
    assert 0 < sum(flipped) < 10


def test_batch_dataset_yields_the_generators_batches_as_float_tensors():
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    config = TrainConfig(batch_size=4, translate=0)
    dataset = batch_dataset(x, np.arange(6) % 2, config, num_classes=2)
    first, second, third = [batch for batch, _ in zip(dataset, range(3), strict=False)]
    assert [len(b[0]) for b in (first, second, third)] == [4, 2, 4]
    assert first[0].dtype.name == "float32" and first[1].shape == (4, 2)


def test_augment_batch_flips_and_translates_copies_of_each_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = augment_batch(images, np.random.default_rng(1), translate=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    flipped = moved = 0
    for original, augmented in zip(images, out, strict=True):
        candidates = {}
        for flip in (False, True):
            source = original[:, ::-1] if flip else original
            padded = np.pad(source, ((2, 2), (2, 2), (0, 0)), mode="reflect")
            for dy in range(5):
                for dx in range(5):
                    candidates[(flip, dy, dx)] = padded[dy : dy + 8, dx : dx + 8]
        matches = [key for key, view in candidates.items() if np.array_equal(view, augmented)]
        assert matches, "every output is a flipped/translated copy of its input"
        flipped += any(key[0] for key in matches)
        moved += any(key[1:] != (2, 2) for key in matches)
    assert 10 < flipped < 54 and moved > 32  # both augmentations actually happen
    assert np.array_equal(augment_batch(images, np.random.default_rng(1), 2), out)


def test_cutout_sets_one_square_per_image_to_the_fill_colour():
    images = np.full((50, 8, 8, 3), 200, np.uint8)
    fill = np.array([1, 2, 3], np.uint8)
    out = augment_batch(images, np.random.default_rng(0), 0, np.zeros(50, bool), 3, fill)
    for image in out:
        filled = np.all(image == fill, axis=-1)
        ys, xs = np.nonzero(filled)
        assert filled.sum() == 9 and np.ptp(ys) == 2 and np.ptp(xs) == 2  # one 3x3 square
        assert np.all(image[~filled] == 200)
    corners = {(int(np.argmax(np.all(i == fill, -1).any(1))), 0) for i in out}
    assert len(corners) > 1, "the square moves"


def test_augment_batch_flips_where_the_mask_says():
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    mask = np.array([True, False, True, False, False, True])
    out = augment_batch(images, np.random.default_rng(1), translate=0, flip=mask)
    assert np.array_equal(out[mask], images[mask][:, :, ::-1])
    assert np.array_equal(out[~mask], images[~mask])


def test_bfloat16_choice_follows_the_request():
    assert use_bfloat16("float32") is False
    assert use_bfloat16("bfloat16") is True
