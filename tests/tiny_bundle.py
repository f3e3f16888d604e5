"""A tiny but real model bundle for the serving tests: same contract as models/cifar10."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = sorted((FIXTURES / "samples").glob("*.jpg"))
LABELS = [p.stem for p in SAMPLES]


def make_tiny_bundle(out: Path) -> Path:
    """Rescaling -> Conv2D(8) -> pooling -> Dense(10) softmax, random but fixed weights."""
    import keras

    from imagerec.bundle import Preprocess, write_bundle

    keras.utils.set_random_seed(1234)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    preprocess = Preprocess(input_size=(32, 32), tta="flip")
    return write_bundle(out, model, LABELS, preprocess, metrics={"val_accuracy": 0.5})
