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


def plot_reliability_diagram(labels: np.ndarray, logits: np.ndarray, temperature: float | None, path) -> None:
    """Test accuracy against top-class confidence in 15 equal-width bins, before and after temperature scaling
    (`temperature`; only before when None), with the ECE of each and the count of volumes per bin."""
    from matplotlib.figure import Figure

    from .calibration import calibrated_probabilities, expected_calibration_error, reliability_bins

    fig = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    variants = [("raw softmax", None, "tab:red")]
    if temperature is not None:
        variants.append((f"temperature scaled (T = {temperature:.3g})", temperature, "tab:blue"))
    for name, t, colour in variants:
        probabilities = calibrated_probabilities(logits, t)
        table = [row for row in reliability_bins(probabilities, labels) if row["count"]]
        ece = expected_calibration_error(probabilities, labels)
        ax.plot(
            [row["confidence"] for row in table],
            [row["accuracy"] for row in table],
            "o-",
            color=colour,
            label=f"{name}: ECE {ece:.3f}",
            markersize=4,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class (15 bins)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"Reliability on the test split ({len(labels)} volumes)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=100)


VIEWS = (("axial (D)", 0), ("coronal (H)", 1), ("sagittal (W)", 2))


def _draw_explanation(axes, volume: np.ndarray, heatmap: np.ndarray, title: str, method: str):
    """Three orthogonal slices of `volume` (D, H, W, values in [0, 1]) through the peak of `heatmap` (same shape),
    the volume in grey and the map (scaled to its maximum) overlaid; returns the last overlay, for a colour bar."""
    from .explain import heatmap_peak

    peak = heatmap_peak(heatmap)
    top = float(heatmap.max()) or 1.0
    shown = None
    for ax, (name, axis) in zip(axes, VIEWS):
        index = [slice(None)] * 3
        index[axis] = peak[axis]
        ax.imshow(volume[tuple(index)], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        overlay = np.ma.masked_less_equal(heatmap[tuple(index)] / top, 0.0)
        shown = ax.imshow(overlay, cmap="inferno", vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
        ax.set_title(f"{name} slice {peak[axis]}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(title, fontsize=8)
    axes[1].set_xlabel(f"{method}: evidence / its maximum, through the peak {peak}", fontsize=7)
    return shown


def plot_explanation(volume: np.ndarray, heatmap: np.ndarray, title: str, method: str, path) -> None:
    """One volume's explanation as a PNG: the three orthogonal slices through the heatmap's peak, with a colour
    bar and `title` (the predicted label and its probability)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    shown = _draw_explanation(axes, volume, heatmap, "", method)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="evidence (relative)")
    fig.savefig(path, dpi=100)


def plot_evidence_gallery(rows: list[tuple[str, tuple | None, tuple | None]], method: str, path) -> None:
    """The model card's gallery: one row per class, a correctly and a wrongly classified test volume of it (each
    (volume, heatmap, caption), None where there is none), three slices each through the evidence's peak."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 2.3 * max(len(rows), 1) + 0.8), layout="constrained")
    grid = fig.subplots(max(len(rows), 1), 6, squeeze=False)
    shown = None
    for axes, (name, correct, wrong) in zip(grid, rows):
        for part, example, kind in ((axes[:3], correct, "correctly"), (axes[3:], wrong, "wrongly")):
            if example is None:
                for ax in part:
                    ax.axis("off")
                part[1].text(0.5, 0.5, f"no {name} test volume was classified {kind}", ha="center",
                             va="center", transform=part[1].transAxes, color="gray", fontsize=8)  # fmt: skip
                continue
            shown = _draw_explanation(part, *example, method)
    if shown is not None:
        fig.colorbar(shown, ax=grid, shrink=0.4, label="evidence (relative)")
    fig.suptitle(
        f"Test volumes per class, correctly (left) and wrongly (right) classified, with the evidence for the "
        f"predicted class ({method})",
        fontsize=10,
    )
    fig.savefig(path, dpi=80)
