"""The plots of a model folder: training curves and the test confusion matrix (matplotlib, no display)."""

from __future__ import annotations

import math
import os

import numpy as np


def training_log(log_history: list[dict]) -> list[dict]:
    """The entries logged during training: the run's summary entry (with `train_runtime`) ends it, and an
    evaluation after it (the final one of the best model) would be drawn as one more point at the last epoch."""
    ends = [i for i, entry in enumerate(log_history) if "train_runtime" in entry]
    return log_history[: ends[-1] + 1] if ends else log_history


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> None:
    """Training loss at every logging step and validation loss per evaluation (left), validation accuracy/AUC
    per evaluation (right), against the epoch; a note instead of a curve where nothing was logged."""
    from matplotlib.figure import Figure

    log_history = training_log(log_history)

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [
            (entry.get("epoch", entry.get("step", i)), entry[key])
            for i, entry in enumerate(log_history)
            if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])
        ]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(11, 4.2), layout="constrained")  # a Figure without pyplot uses the Agg canvas
    ax_loss, ax_metrics = fig.subplots(1, 2)
    x, y = series("loss")
    if x:
        ax_loss.plot(
            x, y, ".-" if len(x) < 50 else "-", label="training loss (per logging step)", markersize=5
        )
    else:  # fewer steps than logging_steps: only the Trainer's run average is logged
        x, y = series("train_loss")
        if x:
            ax_loss.plot(x, y, "s", label="training loss (average over the run)", markersize=5)
    x, y = series("eval_loss")
    if x:
        ax_loss.plot(x, y, "o-", label="validation loss", markersize=4)
    for key, label in (
        ("eval_accuracy", "validation accuracy"),
        ("eval_auc", "validation AUC"),
        ("eval_top5_accuracy", "validation top-5 accuracy"),
    ):
        x, y = series(key)
        if x:
            ax_metrics.plot(x, y, "o-", label=label, markersize=4)
    for ax, title, ylabel in (
        (ax_loss, "Loss", "cross-entropy"),
        (ax_metrics, "Validation metrics", "value"),
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(
                0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
    fig.savefig(path, dpi=100)


def plot_confusion_matrix(labels: np.ndarray, logits: np.ndarray, label_names: list[str], path) -> None:
    """The test confusion matrix (true rows, predicted columns; predictions = argmax of the logits)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    predictions = np.asarray(logits).argmax(axis=-1)
    n = len(label_names)
    side = max(4.5, 0.6 * n + 2.5)
    fig = Figure(figsize=(side + 1.5, side + 0.5), layout="constrained")
    ax = fig.subplots()
    display = ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(n)),
        display_labels=label_names,
        ax=ax,
        colorbar=True,
        xticks_rotation=45 if n > 3 else "horizontal",
        cmap="Blues",
    )
    accuracy = float((predictions == labels).mean()) if len(labels) else float("nan")
    display.ax_.set_title(f"Test confusion matrix\n{len(labels)} volumes, accuracy {accuracy:.3f}")
    fig.savefig(path, dpi=100)
