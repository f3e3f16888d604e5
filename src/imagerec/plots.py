"""The bundle's pictures: training curves and the confusion matrix, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def training_curves_png(history: dict[str, list[float]], title: str = "") -> bytes:
    """Loss and accuracy per epoch, training and (when present) validation."""
    plt, figure = _figure(9, 3.6)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for index, metric in enumerate(("loss", "accuracy")):
        axis = figure.add_subplot(1, 2, index + 1)
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                label = "validation" if prefix else "training"
                axis.plot(epochs[: len(values)], values, style, marker="o", ms=3, label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return _png(plt, figure)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def confusion_png(matrix: np.ndarray, labels: list[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix with counts, true class down, predicted across."""
    size = max(5.0, 0.55 * len(labels) + 2)
    plt, figure = _figure(size, size)
    axis = figure.add_subplot(1, 1, 1)
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    axis.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(labels))
    axis.set_xticks(ticks, labels, rotation=45, ha="right")
    axis.set_yticks(ticks, labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if len(labels) <= 30:
        for i in ticks:
            for j in ticks:
                share = matrix[i, j] / rows[i, 0]
                colour = "white" if share > 0.5 else "black"
                axis.text(
                    j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour
                )
    if title:
        axis.set_title(title)
    return _png(plt, figure)
