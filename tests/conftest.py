"""Shared test fixtures: paths to committed fixtures and an isolated cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of reports

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point IMAGEREC_CACHE_DIR at a fresh folder so no test reads or writes ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("IMAGEREC_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def cifar_small() -> Path:
    """32x32 CIFAR-10 training JPEGs, 8 per class, in root/<class>/NNNN.jpg layout."""
    return FIXTURES / "cifar_small"


@pytest.fixture(scope="session")
def card_bundle(tmp_path_factory: pytest.TempPathFactory, cifar_small: Path) -> Path:
    """A small bundle fitted to cifar_small, with a confusion matrix and training curves, so
    the web page has confident answers and a model card to link to (a few seconds on a CPU)."""
    import keras
    import numpy as np

    from imagerec.bundle import Preprocess, write_bundle
    from imagerec.images import load_image
    from imagerec.plots import confusion_matrix, confusion_png, training_curves_png

    labels = sorted(p.name for p in cifar_small.iterdir() if p.is_dir())
    paths = sorted(cifar_small.glob("*/*.jpg"))
    x = np.stack([load_image(p, (32, 32)) for p in paths])
    y = np.array([labels.index(p.parent.name) for p in paths])
    order = np.random.default_rng(7).permutation(len(y))  # validation_split takes the tail
    x, y = x[order], y[order]
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(len(labels), activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=25, batch_size=16, validation_split=0.25, verbose=0)
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    artifacts = {
        "confusion.png": confusion_png(confusion_matrix(y, predicted, len(labels)), labels),
        "training.png": training_curves_png(history.history),
    }
    metrics = {"val_accuracy": float(history.history["val_accuracy"][-1])}
    out = tmp_path_factory.mktemp("card-bundle") / "cifar-small"
    preprocess = Preprocess(input_size=(32, 32), tta="flip")
    return write_bundle(out, model, labels, preprocess, metrics, artifacts)


@pytest.fixture(scope="session")
def protocol_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle (tests/tiny_bundle.py) that the wire-protocol tests serve."""
    from tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("protocol-bundle") / "tiny")


@pytest.fixture(scope="session")
def protocol_predictor(protocol_bundle: Path):
    """An in-process Predictor of `protocol_bundle`: the answers the protocols must match."""
    from imagerec.predictor import Predictor

    return Predictor.from_path(protocol_bundle)


@pytest.fixture(scope="session")
def live_server(protocol_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """`imagerec serve` on a free port in a subprocess, ready; yields its base URL."""
    from live_server import running_server

    with running_server(protocol_bundle, tmp_path_factory.mktemp("live-server")) as server:
        yield server.url
