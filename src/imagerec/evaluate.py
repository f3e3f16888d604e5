"""Accuracy of a bundle on a labelled dataset, through the same Predictor that serving uses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imagerec.errors import DatasetError


def evaluate_bundle(
    bundle_path: str | os.PathLike,
    data: str | os.PathLike,
    confusion_path: Path | None = None,
    cache_dir: Path | None = None,
    engine: str = "tensorflow",
) -> dict:
    """Overall and per-class accuracy; writes the confusion matrix PNG when a path is given."""
    from imagerec import data as datasets
    from imagerec.plots import confusion_matrix, confusion_png
    from imagerec.predictor import Predictor

    predictor = Predictor.from_path(bundle_path, max_batch=256, engine=engine)
    labels = predictor.labels
    dataset = datasets.load_eval_dataset(data, predictor.input_size, cache_dir=cache_dir)
    if isinstance(dataset, datasets.StreamingImageSet):
        y_true, y_pred = [], []
        for images, targets in dataset.to_tf_dataset(256, shuffle=False, seed=0):
            y_pred.append(predictor.predict_arrays(images.numpy()).argmax(axis=1))
            y_true.append(targets.numpy())
        y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
        names = dataset.class_names
    else:
        y_true, names = dataset.y, dataset.class_names
        y_pred = predictor.predict_arrays(dataset.x).argmax(axis=1)
    if list(names) != labels:
        raise DatasetError(
            f"the dataset's classes {list(names)} differ from the model's labels {labels}"
        )
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    per_class = matrix.diagonal() / matrix.sum(axis=1).clip(min=1)
    report = {
        "model": predictor.name,
        "version": predictor.version,
        "engine": predictor.engine,
        "tta": predictor.tta,
        "count": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()),
        "per_class": {name: float(acc) for name, acc in zip(labels, per_class, strict=True)},
        "confusion_matrix": matrix.tolist(),
    }
    if confusion_path is not None:
        title = f"{predictor.name} on {Path(str(data)).name}, {len(y_true)} images"
        Path(confusion_path).write_bytes(confusion_png(matrix, labels, title))
    return report
